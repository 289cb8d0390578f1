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

from ..ops.conv import conv2d_bias_act


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


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                  relu: bool = True) -> Tensor:
    """Eval: relu?(conv(x) with ``bn`` folded in [+ residual]) in one pass over the output (the Triton
    convolutions' epilogue; ATen's convolution then one fused elementwise pass otherwise)."""
    weight, bias = folded_conv_bn(conv, bn)
    return conv2d_bias_act(x, weight, bias, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu,
                           backend=getattr(bn, "backend", None))
