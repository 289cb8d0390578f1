"""Convolution as one explicit im2col + GEMM on CPU: the "gemm" convolution implementation of the cpu backend
(fused_resnet.dispatch), for the small maps where ATen's CPU convolution (oneDNN) is slow.

Why: with many channels and few output pixels, oneDNN's convolution kernels are far from the GEMM they
amount to. Measured on one thread (benchmarks/cpu_conv_algorithms.py): ResNet-18's layer4 3x3 convolution at a 64x64
input (8 x 512 x 2 x 2, 512 filters) takes about 80 ms for its weight gradient and 10 ms for its forward in
oneDNN, and about 5 ms and 3 ms as the GEMMs below. On larger maps oneDNN wins. So nothing here is chosen by a
rule: dispatch.conv_choice measures both once per shape (as torch.backends.cudnn.benchmark does) and keeps
the faster; ``applies`` only bounds what is worth measuring (small maps, a bounded im2col buffer).

Layout: rows of the channels_last (NHWC) order, where every GEMM operand below is a view or one gather:
    cols[(n, oh, ow), (r, s, c)] = a[n, c, oh*sh - ph + r*dh, ow*sw - pw + s*dw]   (0 outside the map)
        gathered tap by tap from the zero-padded NHWC input: R*S strided slices, stacked
    W2[k, (r, s, c)] = weight[k, c, r, s]   (a view of a channels_last weight)
    dy_rows[(n, oh, ow), k]                 (a view of a channels_last dy)
  forward  y rows = cols W2^T                 [N*Ho*Wo, K]: y in channels_last memory
  wgrad    dW2    = dy_rows^T cols            [K, R*S*C]:   dweight in channels_last memory
  dgrad    dcols  = dy_rows W2                [N*Ho*Wo, R*S*C], each tap's slice added back into the padded
                                              NHWC gradient at the positions it was gathered from (col2im)
The prologue (relu?(bn(x))) and the epilogues (statistics; bias + residual + ReLU) are the ATen
implementation's (fused_resnet.reference), with the same BatchNorm kernels: only the convolution differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import reference
from ._layout import conv_output_size

DTYPES = (torch.float32, torch.float64)
MAX_OUTPUT_PIXELS = 64           # output maps of at most 8x8: beyond, oneDNN's kernels win (measured)
MAX_COLS_BYTES = 64 * 2 ** 20    # the im2col buffer, N * Ho * Wo * C * R * S elements


def applies(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether this implementation takes the convolution (and is worth measuring against ATen's)."""
    if x.device.type != "cpu" or groups != 1 or x.dtype not in DTYPES or weight.dtype != x.dtype or x.dim() != 4:
        return False
    k, c, r, s = weight.shape
    ho, wo = conv_output_size(x.shape[2], x.shape[3], r, s, stride, padding, dilation)
    cols = x.shape[0] * ho * wo * c * r * s * x.element_size()
    return 0 < ho * wo <= MAX_OUTPUT_PIXELS and cols <= MAX_COLS_BYTES and x.numel() > 0


def _taps(h: int, w: int, r: int, s: int, stride, padding, dilation):
    """(output size, and per tap (r, s) the slices of the padded NHWC map it reads): out[oh, ow] of tap
    (i, j) reads padded position (oh*sh + i*dh, ow*sw + j*dw)."""
    ho, wo = conv_output_size(h, w, r, s, stride, padding, dilation)
    taps = [(slice(i * dilation[0], i * dilation[0] + stride[0] * (ho - 1) + 1, stride[0]),
             slice(j * dilation[1], j * dilation[1] + stride[1] * (wo - 1) + 1, stride[1]))
            for i in range(r) for j in range(s)]
    return ho, wo, taps


def _cols(a: Tensor, r: int, s: int, stride, padding, dilation) -> Tensor:
    """cols [N*Ho*Wo, R*S*C] (module docstring), from any layout of a."""
    n, c, h, w = a.shape
    ho, wo, taps = _taps(h, w, r, s, stride, padding, dilation)
    padded = F.pad(a.permute(0, 2, 3, 1), (0, 0, padding[1], padding[1], padding[0], padding[0]))  # NHWC
    return torch.stack([padded[:, th, tw, :] for th, tw in taps], dim=3).reshape(n * ho * wo, r * s * c)


def _w2(weight: Tensor) -> Tensor:
    k, c, r, s = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(k, r * s * c)


def _dy_rows(grad_out: Tensor) -> Tensor:
    return grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])


def _convolution(a: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    n, k, r, s = a.shape[0], weight.shape[0], weight.shape[2], weight.shape[3]
    ho, wo = conv_output_size(a.shape[2], a.shape[3], r, s, stride, padding, dilation)
    rows = _cols(a, r, s, stride, padding, dilation) @ _w2(weight).t()
    return rows.view(n, ho, wo, k).permute(0, 3, 1, 2)  # [N, K, Ho, Wo] in channels_last memory


def conv_fwd(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, prologue: Optional[tuple] = None,
             stats: bool = False, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             relu: bool = False, bn=None) -> tuple[Tensor, Optional[Tensor]]:
    """reference.conv_fwd's contract, the convolution as a GEMM."""
    bn = reference._bn_module(bn)
    y = _convolution(reference.conv_input(x, prologue, bn), weight, stride, padding, dilation)
    return reference.conv_epilogue(y.contiguous(memory_format=suggest_memory_format(x)), stats, bias, residual,
                                   relu, bn)


def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups: int,
               dtype: torch.dtype, memory_format=torch.channels_last) -> Tensor:
    """Gradient of the convolution's input of shape ``input_shape``: dcols = dy_rows W2, added back tap by
    tap into the zero-padded NHWC gradient, which is then cropped."""
    n, c, h, w = input_shape
    k, _, r, s = weight.shape
    ho, wo, taps = _taps(h, w, r, s, stride, padding, dilation)
    dcols = (_dy_rows(grad_out) @ _w2(weight)).view(n, ho, wo, r * s, c)
    ph, pw = padding
    padded = dcols.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
    for t, (th, tw) in enumerate(taps):
        padded[:, th, tw, :] += dcols[:, :, :, t, :]
    dx = padded[:, ph:ph + h, pw:pw + w, :].permute(0, 3, 1, 2)  # [N, C, H, W] in channels_last memory
    return dx.to(dtype).contiguous(memory_format=memory_format)


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int, dtype: torch.dtype,
               prologue: Optional[tuple] = None, bn=None) -> Tensor:
    """Gradient of the convolution's weight, its input recomputed from x through the prologue."""
    k, c, r, s = weight_shape
    cols = _cols(reference.conv_input(x, prologue, bn), r, s, stride, padding, dilation)
    dw2 = _dy_rows(grad_out).t() @ cols                                   # [K, R*S*C]
    return dw2.view(k, r, s, c).permute(0, 3, 1, 2).to(dtype)             # [K, C, R, S], channels_last memory


def conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                  prologue: Optional[tuple] = None, bn=None) -> tuple[Tensor, Tensor]:
    """(gradient of the input, of the weight): reference.conv_backward's contract."""
    grad_a = conv_dgrad(grad_out, weight, x.shape, stride, padding, dilation, groups, x.dtype,
                        suggest_memory_format(x))
    return grad_a, conv_wgrad(grad_out, x, weight.shape, stride, padding, dilation, groups, weight.dtype, prologue,
                              bn)
