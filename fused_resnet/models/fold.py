"""Eval-mode folding: a BatchNorm with running statistics folded into the convolution before it.

    conv(x) -> bn      ==   conv(x, weight * s) + (beta + (conv_bias - running_mean) * s),
                            s = gamma / sqrt(running_var + eps) per output channel

Folding pays only where the convolution applies bias (+ residual) (+ ReLU) in its epilogue: the triton
backend's fused convolutions. Every other backend runs ATen's convolution, after which the eval BatchNorm
(+ residual) (+ ReLU) is one elementwise pass either way; there the BatchNorm is applied unfolded, after the
convolution, which saves the weight-sized multiply per convolution and per forward (on CPU at small batches
it costs more than the BatchNorm pass itself).

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
from ..nn.batch_norm import batch_norm_arguments
from ..ops.batch_norm import batch_norm_act
from ..ops.conv import conv2d, conv2d_bias_act


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


def folding_pays(x: Tensor, backend: Optional[str]) -> bool:
    """Whether the eval BatchNorm after a convolution is folded into it (module docstring): on the triton
    backend, whose convolutions apply the folded bias (+ residual) (+ ReLU) in their epilogue."""
    return backends.resolve(backend, x.device) == "triton"


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None,
                  relu: bool = True) -> Tensor:
    """Eval: relu?(bn(conv(x)) [+ residual]) in one pass over the output: ``bn`` folded into the convolution
    and applied in its epilogue where that pays (``folding_pays``); otherwise ATen's convolution, then the
    BatchNorm (+ residual) (+ ReLU) as one fused elementwise pass."""
    backend = getattr(bn, "backend", None)
    if not folding_pays(x, backend):
        if conv.bias is None:
            y = conv2d(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups, backend=backend)
        else:
            y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                           conv.groups)
        return batch_norm_act(y, residual=residual, relu=relu, **batch_norm_arguments(bn, y))
    weight, bias = folded_conv_bn(conv, bn)
    return conv2d_bias_act(x, weight, bias, residual, conv.stride, conv.padding, conv.dilation, conv.groups, relu,
                           backend=getattr(bn, "backend", None))
