"""Eval-mode folding: a BatchNorm with running statistics folded into the convolution before it.

    conv(x) -> bn      ==   conv(x, weight * s) + (beta + (conv_bias - running_mean) * s),
                            s = gamma / sqrt(running_var + eps) per output channel

The fold is recomputed on every forward from the live parameters and buffers (a few per-channel ops and one
weight-sized multiply per convolution). Nothing is cached: a cache keyed on version counters missed updates
made through ``.data`` (EMA and clipping idioms) and ``vector_to_parameters``, and a cache kept on the module
was pickled with it. Under torch.compile the fold is part of the graph; with autograd recording it is
differentiable (gradients reach the conv and BN parameters).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..ops.batch_norm import bn_act_call
from ..ops.layout import acc_dtype_of


def can_fold(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with running statistics in this forward (eval mode with tracked statistics)."""
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def autocast_disabled(device_type: str):
    """A context without autocast on ``device_type``; nothing on devices that have no autocast (meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of ``conv`` with the eval BatchNorm after it folded in (formula in the module docstring),
    in the conv weight's dtype and the accumulation dtype respectively."""
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    with autocast_disabled(conv.weight.device.type):
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(acc)
        weight = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
        shifted = -bn.running_mean.to(acc) if conv.bias is None else conv.bias.to(acc) - bn.running_mean.to(acc)
        bias = shifted * scale
        if bn.bias is not None:
            bias = bias + bn.bias.to(acc)
    return weight, bias


_UNIT: dict = {}


def _unit_scale(c: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(zeros, ones) per channel, so that bn_act applies just bias (+ residual) (+ ReLU). Constants, kept per
    (C, device, dtype) in this module (never on a model); fresh under torch.compile and torch.jit.trace, which
    record their creation."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)
    key = (c, device, dtype)
    if key not in _UNIT:
        # Never inference tensors (were the first call under torch.inference_mode): a later eval forward
        # with autograd recording saves these for backward, which inference tensors refuse.
        with torch.inference_mode(False):
            _UNIT[key] = (torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype))
    return _UNIT[key]


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                  relu: bool = True) -> Tensor:
    """Eval: relu?(conv(x) with ``bn`` folded in [+ residual]): the convolution (ATen/cuDNN), then bias,
    residual and ReLU in one fused elementwise pass."""
    weight, bias = folded_conv_bn(conv, bn)
    y = conv._conv_forward(x, weight, None)
    zeros, ones = _unit_scale(y.shape[1], y.device, acc_dtype_of(y))
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    backend = backends.resolve(getattr(bn, "backend", None), y.device)
    return bn_act_call(y, zeros, ones, None, bias, residual, None, relu, backend, None)
