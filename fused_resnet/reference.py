"""Eager PyTorch implementations of the op contract: plain and obviously right.

They are the last fallback on any device and the reference the kernels are read against. Each function has
the signature of its compiled twin in csrc/ops.cpp (and of fused_resnet/kernels/batch_norm.py). Arithmetic is
in the accumulation dtype (fp32, fp64 for fp64 inputs); outputs are allocated like the kernels' (see
fused_resnet/_layout.py) so every backend returns identical strides.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from ._layout import acc_dtype_of, kernel_layout


def _per_channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _scale_bias(invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]):
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    beta = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale, beta


def _bn_affine(x: Tensor, mean: Tensor, scale: Tensor, beta: Tensor) -> Tensor:
    """(x - mean) * scale + bias, the mean subtracted first (see csrc/common/bn_math.h)."""
    return (x - _per_channel(mean)) * _per_channel(scale) + _per_channel(beta)


def _like(x: Tensor, value: Tensor) -> Tensor:
    out = torch.empty_like(x)
    out.copy_(value)
    return out


def bn_stats(x: Tensor) -> Tensor:
    """float64 [3, C]: (count, mean, m2) per channel, m2 = n * biased variance, from torch's var_mean."""
    n, c = x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    stats = torch.zeros((3, c), dtype=torch.float64, device=x.device)
    if n == 0:
        return stats
    var, mean = torch.var_mean(x.to(acc_dtype_of(x)), dim=(0, 2, 3), correction=0)
    stats[0] = n
    stats[1] = mean.double()
    stats[2] = n * var.double()
    return stats


def bn_finalize(stats: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, mean, m2 = stats.double()
    var = (m2 / n).clamp_min(0.0)
    invstd = torch.rsqrt(var + eps)
    if running_mean is not None:
        factor = momentum if momentum is not None else 1.0 / num_batches_tracked.double()
        seen = n > 0  # a channel nobody saw (an all-empty synchronized batch) keeps its buffers
        rm, rv = running_mean.double(), running_var.double()
        running_mean.copy_(torch.where(seen, (1.0 - factor) * rm + factor * mean, rm))
        running_var.copy_(torch.where(seen, (1.0 - factor) * rv + factor * var * n / (n - 1.0), rv))
    return mean.to(dtype, copy=True), invstd.to(dtype)  # never a view of stats


def bn_act(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], relu: bool) -> Tensor:
    x = kernel_layout(x)
    scale, beta = _scale_bias(invstd, weight, bias)
    z = _bn_affine(x.to(scale.dtype), mean, scale, beta)
    if residual is not None:
        z = z + residual.to(scale.dtype)
    if relu:
        z = torch.relu(z)
    return _like(x, z)


def _dz_xhat(grad_out, x, mean, invstd, weight, bias, out, relu):
    acc = mean.dtype
    xa = x.to(acc)
    dz = grad_out.to(acc)
    if relu:
        if out is not None:
            active = out > 0
        else:
            active = _bn_affine(xa, mean, *_scale_bias(invstd, weight, bias)) > 0
        dz = torch.where(active, dz, torch.zeros((), dtype=acc, device=dz.device))
    xhat = (xa - _per_channel(mean)) * _per_channel(invstd)
    return dz, xhat


def bn_backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], out: Optional[Tensor], relu: bool) -> Tensor:
    dz, xhat = _dz_xhat(grad_out, x, mean, invstd, weight, bias, out, relu)
    return torch.stack([dz.sum(dim=(0, 2, 3)), (dz * xhat).sum(dim=(0, 2, 3))])


def bn_backward_elemt(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], out: Optional[Tensor], sums: Optional[Tensor],
                      count: Optional[Tensor], relu: bool, need_dz: bool) -> tuple[Tensor, Tensor]:
    x = kernel_layout(x)
    dz, xhat = _dz_xhat(grad_out, x, mean, invstd, weight, bias, out, relu)
    scale, _ = _scale_bias(invstd, weight, bias)
    if sums is not None:
        inv_n = (1.0 / count).to(mean.dtype)
        grad = _per_channel(scale) * (dz - _per_channel(sums[0] * inv_n) - xhat * _per_channel(sums[1] * inv_n))
    else:
        grad = _per_channel(scale) * dz
    dz_out = _like(x, dz) if need_dz else x.new_empty((0,))
    return _like(x, grad), dz_out


# ---------------------------------------------------------------------------------------------------------
# Convolutions (the contract of fused_resnet/kernels/conv_fwd.py and conv_bwd.py). ATen's convolution (cuDNN
# on CUDA) with the BatchNorm pieces of ``bn``: a module with this file's bn_act / bn_stats signatures, this
# file by default, or a backend's compiled or Triton kernels ("aten" convolutions, fused_resnet.dispatch).


def _bn_module(bn):
    return bn if bn is not None else sys.modules[__name__]


_UNIT: dict = {}


def unit_scale(c: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(zeros, ones) per channel, so that bn_act applies just bias (+ residual) (+ ReLU). Constants kept per
    (C, device, dtype) here (never on a model); fresh under torch.compile and torch.jit.trace, which record
    their creation."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)
    key = (c, device, dtype)
    if key not in _UNIT:
        # Never inference tensors (were the first call under torch.inference_mode): a later eval forward with
        # autograd recording saves these for backward, which inference tensors refuse.
        with torch.inference_mode(False):
            _UNIT[key] = (torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype))
    return _UNIT[key]


def conv_input(x: Tensor, prologue: Optional[tuple], bn=None) -> Tensor:
    """The convolution's input: x, or relu?(bn(x)) for prologue = (mean, invstd, bn_weight, bn_bias, relu)."""
    if prologue is None:
        return x
    mean, invstd, bn_weight, bn_bias, relu = prologue
    return _bn_module(bn).bn_act(x, mean, invstd, bn_weight, bn_bias, None, relu)


def conv_fwd(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, prologue: Optional[tuple] = None,
             stats: bool = False, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
             relu: bool = False, bn=None) -> tuple[Tensor, Optional[Tensor]]:
    """(y, stats of y or None): y = conv2d(prologue(x), weight), then relu?(y + bias [+ residual]) when a bias
    is given (the eval epilogue). The prologue's output is materialised here, and freed on return."""
    bn = _bn_module(bn)
    y = torch.ops.aten.convolution(conv_input(x, prologue, bn), weight, None, list(stride), list(padding),
                                   list(dilation), False, [0, 0], groups)
    return conv_epilogue(y, stats, bias, residual, relu, bn)


def conv_epilogue(y: Tensor, stats: bool, bias: Optional[Tensor], residual: Optional[Tensor], relu: bool,
                  bn=None) -> tuple[Tensor, Optional[Tensor]]:
    """(y, stats of y or None), y = relu?(y + bias [+ residual]) when a bias is given: conv_fwd's epilogue as
    passes of ``bn``'s kernels after the convolution."""
    bn = _bn_module(bn)
    if bias is not None:
        zeros, ones = unit_scale(y.shape[1], y.device, acc_dtype_of(y))
        y = bn.bn_act(y, zeros, ones, None, bias, residual, relu)
    return y, (bn.bn_stats(y) if stats else None)


def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups: int,
               dtype: torch.dtype, memory_format=torch.channels_last) -> Tensor:
    """Gradient of conv2d's input of shape ``input_shape``."""
    placeholder = grad_out.new_empty(1, dtype=dtype).expand(input_shape)  # only its shape and dtype are read
    grad = torch.ops.aten.convolution_backward(grad_out, placeholder, weight, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, [True, False, False])[0]
    return grad.contiguous(memory_format=memory_format)


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int, dtype: torch.dtype,
               prologue: Optional[tuple] = None, bn=None) -> Tensor:
    """Gradient of conv2d's weight, the convolution's input recomputed from x through the prologue."""
    a = conv_input(x, prologue, bn)
    placeholder = a.new_empty(1, dtype=dtype).expand(weight_shape)
    return torch.ops.aten.convolution_backward(grad_out, a, placeholder, None, list(stride), list(padding),
                                               list(dilation), False, [0, 0], groups, [False, True, False])[1]


def conv_backward(grad_out: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                  prologue: Optional[tuple] = None, bn=None) -> tuple[Tensor, Tensor]:
    """(gradient of the convolution's input, gradient of its weight) from one ATen convolution_backward, the
    input recomputed from x through the prologue. One call instead of conv_dgrad + conv_wgrad: ATen (oneDNN on
    CPU) shares the reorder of grad_out and its setup between the two, as eager PyTorch's backward does."""
    a = conv_input(x, prologue, bn)
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(grad_out, a, weight, None, list(stride), list(padding),
                                                            list(dilation), False, [0, 0], groups,
                                                            [True, True, False])
    return grad_a, grad_w
