"""Memory-layout rules shared by every implementation and by the fake (meta) kernels.

The kernels address an N,C,H,W tensor as rows x channels: row m = n*HW + hw, element (m, c) at
``n*s_n + c*s_c + hw*s_hw``. That covers contiguous (s_hw = 1), channels_last (s_c = 1), slices along N, C
and H, and expanded (stride-0) tensors. Only tensors whose H and W dims cannot merge (a slice along W, an
NWHC permutation) are copied first, to their suggested memory format. Outputs are ``empty_like`` of the
input after that step, so they keep a dense version of its layout. csrc/common/tensor_utils.h mirrors this.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def hw_mergeable(t: torch.Tensor) -> bool:
    return t.size(2) == 1 or t.size(3) == 1 or t.stride(2) == t.size(3) * t.stride(3)


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can index it, else a copy in its suggested memory format."""
    return t if hw_mergeable(t) else t.contiguous(memory_format=suggest_memory_format(t))


def geometry(t: torch.Tensor) -> tuple[int, int, int, bool]:
    """(s_n, s_c, s_hw, rows_merged) of a tensor in kernel layout (see module docstring)."""
    n, _, h, w = t.shape
    s_hw = t.stride(2) if w == 1 else t.stride(3)
    rows_merged = n <= 1 or t.stride(0) == h * w * s_hw
    return t.stride(0), t.stride(1), s_hw, rows_merged


def acc_dtype_of(x: torch.Tensor) -> torch.dtype:
    """Accumulation / per-channel dtype: float64 for float64 activations, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def conv_output_size(h: int, w: int, r: int, s: int, stride, padding, dilation) -> tuple[int, int]:
    """(Ho, Wo) of a convolution, as torch.nn.functional.conv2d computes them. Like conv2d, a RuntimeError
    when the dilated filter is larger than the padded input (no output position: conv2d raises rather than
    return an empty map, and so does every implementation here, since they all size their output with this)."""
    padded = (h + 2 * padding[0], w + 2 * padding[1])
    span = (dilation[0] * (r - 1) + 1, dilation[1] * (s - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1]:
        raise RuntimeError(f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
                           f"({span[0]} x {span[1]}). Kernel size can't be greater than actual input size")
    return (padded[0] - span[0]) // stride[0] + 1, (padded[1] - span[1]) // stride[1] + 1


# The Triton kernels index pixel rows (program_id * BLOCK_M + arange) and the element offsets within one
# image in int32 (image bases are int64): rows plus a tile, and every in-image offset, must stay below 2^31.
INT32_LIMIT = 2 ** 31 - 1
ROW_MARGIN = 2 ** 16  # more than any tile's rows


def in_image_extent(shape, strides) -> int:
    """The largest element offset within one image of an N, C, H, W tensor of these sizes and strides."""
    return sum((n - 1) * abs(st) for n, st in zip(shape[1:], strides[1:]) if n > 0)


def int32_indexing_fits(rows: int, *tensors) -> bool:
    """Whether int32 indexing holds for ``rows`` pixel rows and each (shape, strides) of ``tensors``."""
    return rows + ROW_MARGIN <= INT32_LIMIT and all(in_image_extent(*t) <= INT32_LIMIT for t in tensors)
