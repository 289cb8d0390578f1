"""The compiled fused forward convolution, ``torch.ops.fused_resnet_C.conv_fwd`` (schema: csrc/ops.cpp), as
the convolution implementation "cuda" of fused_resnet.dispatch:

  CUDA tensors  CUTLASS kernels (csrc/cuda/conv/), when the extension was built with them (``cutlass_built``)
                and the call is one they take (``cutlass_takes``: fp16 or bf16, groups 1, C and K multiples of 8,
                filters of at most 32 x 32 taps and tensors under 2 GiB (``cutlass_shape_fits``), and
                the BN-apply + ReLU prologue, no prologue and no epilogue, or the eval epilogue bias (+ residual)
                + ReLU); every other call
                takes the "aten" path
                (reference.conv_fwd with the backend's BatchNorm kernels), so the choice of "cuda" is safe
                for any convolution.
  CPU tensors   the C++ twin of the same schema (csrc/cpu/conv_cpu.cpp: ATen's convolution around the C++
                BatchNorm kernels), so that opcheck and the contract tests run the compiled op without a GPU.
                Never chosen automatically on CPU: only when asked for (dispatch.conv_functions("cuda", ...)).

Dtypes: fp16 and bf16, one instantiation of each kernel per dtype. The BN-apply + ReLU prologue takes fp16
scale / shift vectors for both (CUTLASS's scale/bias iterator loads 16-bit pairs): fp16 activations use
CUTLASS's transform (fp16 arithmetic), bf16 ones our specialisation of it (csrc/cuda/conv/
bf16_scale_bias_relu.cuh: fp32 arithmetic, one rounding). Vectors beyond fp16's range are divided by a power
of two that the epilogue multiplies back (no host sync).

Statistics (``stats=True``): with the prologue or without one, computed in the fprop's epilogue from the tile each CTA just
stored (csrc/cuda/conv/tile_epilogue.cuh), per 128-row tile and channel, Chan-merged in double in a
fixed order: deterministic, bn_stats' format. With the eval epilogue: bn_stats on the stored y.

Backward: ``conv_wgrad`` is compiled the same way (fused_resnet_C::conv_wgrad: CUTLASS's wgrad mainloop
fusion recomputes the prologue in registers, or the plain wgrad without one, deterministic serial split-K;
its C++ twin on CPU), and so is
``conv_dgrad`` (CUTLASS's strided dgrad) and ``conv_dgrad_bn`` (dgrad_bn: CUTLASS's unit-stride dgrad with
the prologue BatchNorm's ReLU mask and backward reduction in its epilogue, stride 1; other calls dgrad, then
the backend's bn_backward_reduce and the mask; the fused backward does not call it for those
(``dgrad_bn_takes``) but runs dgrad and the BatchNorm backward, which masks as it goes).

Status: the CUTLASS path compiles (scripts/check_cuda_compile.sh, sm_80 and sm_90) but has not run on a GPU:
no parity or speed claim is made for it, and dispatch's automatic per-shape choice does not measure it
(dispatch.CUDA_CONV_AUTO) until the GPU parity tests have passed.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import backends, reference
from .._layout import conv_output_size

CUTLASS_DTYPES = (torch.float16, torch.bfloat16)  # one instantiation each (csrc/cuda/conv/*_f16.cu, *_bf16.cu)
CUTLASS_ALIGNMENT = 8  # channels per 128-bit access of the 16-bit instantiations (csrc/cuda/conv/conv_launch.h)
# CUTLASS's own limits beside the alignment (csrc/cuda/conv/conv_launch.h, shape_fits): filters of at most
# 32 x 32 taps (the kOptimized iterators keep one mask bit per tap) and tensors under 2 GiB (its iterators'
# 32-bit byte offsets; 16-bit x / w / y, the fp32 dw of wgrad).
CUTLASS_MAX_FILTER = 32
CUTLASS_MAX_BYTES = 2 ** 31


@functools.lru_cache(maxsize=None)
def cutlass_built() -> bool:
    """Whether fused_resnet._C was compiled with the CUTLASS convolutions (setup.py FUSED_RESNET_CUTLASS)."""
    if not backends.extension_loaded():
        return False
    import fused_resnet._C as ext
    return bool(getattr(ext, "WITH_CUTLASS", False))


def cutlass_shape_fits(input_shape, weight_shape, output_shape) -> bool:
    """CUTLASS's limits on a convolution's extents (csrc/cuda/conv/conv_launch.h, shape_fits): at most
    CUTLASS_MAX_FILTER taps each way, and every tensor (16-bit input, weight and output; the fp32 weight
    gradient) under CUTLASS_MAX_BYTES."""
    numel = math.prod
    return (len(weight_shape) == 4 and weight_shape[2] <= CUTLASS_MAX_FILTER and weight_shape[3] <= CUTLASS_MAX_FILTER
            and 2 * numel(input_shape) < CUTLASS_MAX_BYTES and 4 * numel(weight_shape) < CUTLASS_MAX_BYTES
            and 2 * numel(output_shape) < CUTLASS_MAX_BYTES)


def cutlass_takes(x: Tensor, weight: Tensor, groups: int, prologue: Optional[tuple], bias: Optional[Tensor],
                  residual: Optional[Tensor], relu: bool, stride, padding, dilation) -> bool:
    """Whether the CUDA registrations of conv_fwd / conv_wgrad (csrc/cuda/conv/conv_cuda_ops.cpp) take this
    call: their checks, restated (they reject anything else with an error, never computing it differently).
    conv_wgrad is asked with bias=None, relu=False (prologue or none)."""
    shape_ok = (x.dtype in CUTLASS_DTYPES and weight.dtype == x.dtype and x.dim() == 4 and groups == 1
                and x.shape[1] > 0 and x.shape[1] % CUTLASS_ALIGNMENT == 0
                and weight.shape[0] % CUTLASS_ALIGNMENT == 0)
    if shape_ok:
        ho, wo = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
        shape_ok = cutlass_shape_fits(x.shape, weight.shape, (x.shape[0], weight.shape[0], ho, wo))
    bn_relu_prologue = prologue is not None and bool(prologue[4]) and bias is None and residual is None and not relu
    plain = prologue is None and bias is None and residual is None and not relu
    eval_epilogue = prologue is None and bias is not None and relu
    return shape_ok and (bn_relu_prologue or plain or eval_epilogue)


def conv_fwd(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, prologue: Optional[tuple] = None,
             stats: bool = False, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             relu: bool = False, bn=None) -> tuple[Tensor, Optional[Tensor]]:
    """(y, stats of y or None), the signature of kernels/conv_fwd.conv_fwd and reference.conv_fwd (``bn``: the
    BatchNorm kernels of the fallback on CUDA)."""
    if x.device.type == "cuda" and not (cutlass_built() and cutlass_takes(x, weight, groups, prologue, bias,
                                                                         residual, relu, stride, padding, dilation)):
        return reference.conv_fwd(x, weight, stride, padding, dilation, groups, prologue=prologue, stats=stats,
                                  bias=bias, residual=residual, relu=relu, bn=bn)
    mean, invstd, bn_weight, bn_bias, relu_in = prologue if prologue is not None else (None, None, None, None, False)
    y, s = torch.ops.fused_resnet_C.conv_fwd(x, weight, mean, invstd, bn_weight, bn_bias, bool(relu_in), bias,
                                             residual, bool(relu), list(stride), list(padding), list(dilation),
                                             groups, bool(stats))
    return y, (s if stats else None)


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int, dtype: torch.dtype,
               prologue: Optional[tuple] = None, bn=None) -> Tensor:
    """The weight gradient, its input recomputed from x through the prologue: the signature of
    reference.conv_wgrad (``bn``: the BatchNorm kernels of the fallback on CUDA)."""
    if x.device.type == "cuda" and not (cutlass_built() and grad_out.dtype == x.dtype
                                        and cutlass_takes(x, torch.empty(weight_shape, dtype=x.dtype, device="meta"),
                                                          groups, prologue, None, None, False, stride, padding,
                                                          dilation)):
        return reference.conv_wgrad(grad_out, x, weight_shape, stride, padding, dilation, groups, dtype,
                                    prologue=prologue, bn=bn)
    mean, invstd, bn_weight, bn_bias, relu_in = prologue if prologue is not None else (None, None, None, None, False)
    dw = torch.ops.fused_resnet_C.conv_wgrad(grad_out.to(x.dtype), x, list(weight_shape), mean, invstd, bn_weight,
                                             bn_bias, bool(relu_in), list(stride), list(padding), list(dilation),
                                             groups)
    return dw if dw.dtype == dtype else dw.to(dtype)


def cutlass_takes_dgrad(grad_out: Tensor, weight: Tensor, input_shape, dilation, groups: int) -> bool:
    """Whether the CUDA registration of conv_dgrad takes this call (fp16 or bf16, groups 1, dilation 1, C and K
    multiples of 8, cutlass_shape_fits), restated from csrc/cuda/conv/conv_cuda_ops.cpp."""
    return (grad_out.dtype in CUTLASS_DTYPES and weight.dtype == grad_out.dtype and groups == 1
            and tuple(dilation) == (1, 1) and len(input_shape) == 4 and input_shape[1] > 0
            and input_shape[1] % CUTLASS_ALIGNMENT == 0 and weight.shape[0] % CUTLASS_ALIGNMENT == 0
            and cutlass_shape_fits(input_shape, weight.shape, grad_out.shape))


def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups: int,
               dtype: torch.dtype, memory_format=torch.channels_last) -> Tensor:
    """The input gradient: the signature of reference.conv_dgrad."""
    if grad_out.device.type == "cuda" and not (cutlass_built() and cutlass_takes_dgrad(grad_out, weight, input_shape,
                                                                                       dilation, groups)):
        return reference.conv_dgrad(grad_out, weight, input_shape, stride, padding, dilation, groups, dtype,
                                    memory_format)
    dx = torch.ops.fused_resnet_C.conv_dgrad(grad_out.to(weight.dtype), weight, list(input_shape), list(stride),
                                             list(padding), list(dilation), groups)
    return dx.to(dtype).contiguous(memory_format=memory_format)


def cutlass_takes_dgrad_bn(grad_out: Tensor, weight: Tensor, x: Tensor, mean: Tensor, stride, dilation,
                           groups: int) -> bool:
    """Whether the CUDA registration of conv_dgrad_bn takes this call: conv_dgrad's conditions, stride 1 (the
    unit-stride dgrad, whose tiles are consecutive rows of dx), x of grad_out's dtype, fp32 statistics."""
    return (tuple(stride) == (1, 1) and x.dtype == grad_out.dtype and mean.dtype == torch.float32
            and cutlass_takes_dgrad(grad_out, weight, x.shape, dilation, groups))


def dgrad_bn_takes(grad_out: Tensor, weight: Tensor, x: Tensor, mean: Tensor, stride, dilation, groups: int) -> bool:
    """Whether ``conv_dgrad_bn`` computes this call in one kernel (CUTLASS on CUDA, the C++ twin on CPU). Where
    it does not, the caller does better with plain dgrad and the BatchNorm backward, which applies the ReLU
    mask itself, than with conv_dgrad_bn's fallback (which has to return dz masked: an extra pass)."""
    return x.device.type != "cuda" or (cutlass_built() and cutlass_takes_dgrad_bn(grad_out, weight, x, mean, stride,
                                                                                dilation, groups))


def conv_dgrad_bn(grad_out: Tensor, weight: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], relu: bool, stride, padding, dilation,
                  groups: int, memory_format=torch.channels_last, bn=None) -> tuple[Tensor, Tensor]:
    """(dz, (sum dz, sum dz * xhat)): the signature of kernels/conv_bwd.conv_dgrad_bn. CUTLASS's dgrad with the
    mask and the reduction in its epilogue where it takes the call; on other CUDA calls conv_dgrad followed by
    the backend's bn_backward_reduce and the mask; on CPU tensors the C++ twin."""
    if not dgrad_bn_takes(grad_out, weight, x, mean, stride, dilation, groups):
        dx = conv_dgrad(grad_out, weight, x.shape, stride, padding, dilation, groups, x.dtype, memory_format)
        sums = bn.bn_backward_reduce(dx, x, mean, invstd, bn_weight, bn_bias, None, relu)
        if relu:  # the prologue's z recomputed as the reference does (bn_math.h's bn_affine)
            z = reference._bn_affine(x.to(mean.dtype), mean, *reference._scale_bias(invstd, bn_weight, bn_bias))
            dx = torch.where(z > 0, dx, torch.zeros((), dtype=dx.dtype, device=dx.device))
        return dx.contiguous(memory_format=memory_format), sums
    dz, sums = torch.ops.fused_resnet_C.conv_dgrad_bn(grad_out.to(x.dtype), weight.to(x.dtype), x, mean, invstd,
                                                      bn_weight, bn_bias, bool(relu), list(stride), list(padding),
                                                      list(dilation), groups)
    return dz.contiguous(memory_format=memory_format), sums


def _fake_conv_dgrad_bn(grad_out, weight, x, mean, invstd, bn_weight, bn_bias, relu, stride, padding, dilation,
                        groups):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x)),
            mean.new_empty((2, x.shape[1])))


def _fake_conv_dgrad(grad_out, weight, input_size, stride, padding, dilation, groups):
    return torch.empty(input_size, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=suggest_memory_format(grad_out))


def _fake_conv_wgrad(grad_out, x, weight_size, mean, invstd, bn_weight, bn_bias, relu_in, stride, padding, dilation,
                     groups):
    return torch.empty(weight_size, dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))


def _fake_conv_fwd(x, weight, mean, invstd, bn_weight, bn_bias, relu_in, bias, residual, relu_out, stride, padding,
                   dilation, groups, stats):
    ho, wo = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    y = torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=suggest_memory_format(x))
    return y, x.new_empty((3, weight.shape[0]) if stats else (0,), dtype=torch.float64)


def _fake_bn_prologue_half(mean, invstd, weight, bias):
    c = mean.shape[0]
    return (mean.new_empty((c,), dtype=torch.float16), mean.new_empty((c,), dtype=torch.float16),
            mean.new_empty((1,), dtype=torch.float32))


if backends.extension_loaded():
    torch.library.register_fake("fused_resnet_C::bn_prologue_half", _fake_bn_prologue_half)
    torch.library.register_fake("fused_resnet_C::conv_fwd", _fake_conv_fwd)
    torch.library.register_fake("fused_resnet_C::conv_wgrad", _fake_conv_wgrad)
    torch.library.register_fake("fused_resnet_C::conv_dgrad", _fake_conv_dgrad)
    torch.library.register_fake("fused_resnet_C::conv_dgrad_bn", _fake_conv_dgrad_bn)

__all__ = ["conv_dgrad", "conv_dgrad_bn", "dgrad_bn_takes", "conv_fwd", "conv_wgrad", "cutlass_built",
           "cutlass_shape_fits", "cutlass_takes", "cutlass_takes_dgrad", "cutlass_takes_dgrad_bn"]
