"""BatchNorm-apply (+ReLU) followed by a convolution, as one autograd node that never stores the BN output.

    out = conv2d(relu?(x * scale + shift), conv_weight)

Eager PyTorch keeps the ReLU output alive for the convolution's weight gradient. This op keeps only x (the
pre-BN tensor, which the BN backward needs anyway) and recomputes relu?(x * scale + shift) in backward: one
extra elementwise pass (read x, write r) buys one activation of memory per BN -> conv pair. In a ResNet
bottleneck that is bn1 -> conv2 and bn2 -> conv3, two of the six activations a block otherwise keeps.

The convolution itself is ATen's (cuDNN on CUDA); the fused Triton convolutions will later take its place
and also skip materialising r in the forward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .batch_norm import (_empty_act, _impl, bn_act, bn_act_grads, differentiable_bn, differentiable_grads,
                         eager_autograd)


def _conv(r: Tensor, conv_weight: Tensor, stride, padding, dilation, groups) -> Tensor:
    return torch.ops.aten.convolution(r, conv_weight, None, stride, padding, dilation, False, [0, 0], groups)


@torch.library.custom_op("fused_resnet::bn_act_conv", mutates_args=())
def bn_act_conv(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                count: Optional[Tensor], conv_weight: Tensor, stride: list[int], padding: list[int],
                dilation: list[int], groups: int, relu: bool, backend: str, group_name: Optional[str]) -> Tensor:
    """``count``/``group_name`` as in ``bn_act``. The convolution runs in conv_weight's dtype (under autocast
    the caller passes the weight already cast, and r follows it)."""
    r = _impl(backend).bn_act(x, mean, invstd, weight, bias, None, relu)
    return _conv(r.to(conv_weight.dtype), conv_weight, stride, padding, dilation, groups)


@bn_act_conv.register_fake
def _(x, mean, invstd, weight, bias, count, conv_weight, stride, padding, dilation, groups, relu, backend,
      group_name):
    r = _empty_act(x).to(conv_weight.dtype)
    return _conv(r, conv_weight, stride, padding, dilation, groups)


def _setup_context(ctx, inputs, output):
    (x, mean, invstd, weight, bias, count, conv_weight, stride, padding, dilation, groups, relu, backend,
     group_name) = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias, count, conv_weight)  # not r: recomputed
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu, ctx.backend, ctx.group_name = relu, backend, group_name


def _backward(ctx, grad_out):
    x, mean, invstd, weight, bias, count, conv_weight = ctx.saved_tensors
    need_x, need_w, need_b, need_cw = (ctx.needs_input_grad[i] for i in (0, 3, 4, 6))
    stride, padding, dilation, groups = ctx.conv_args
    need_r = need_x or need_w or need_b
    if torch.is_grad_enabled():  # create_graph=True: differentiable eager ops (see ops/batch_norm.py)
        with torch.enable_grad():
            z = differentiable_bn(x, mean, invstd, weight, bias, count, ctx.group_name)
            r = (torch.relu(z) if ctx.relu else z).to(conv_weight.dtype)
            y = torch.nn.functional.conv2d(r, conv_weight, None, stride, padding, dilation, groups)
            grad_x, grad_w, grad_b, grad_cw = differentiable_grads(
                y, [x if need_x else None, weight if need_w else None, bias if need_b else None,
                    conv_weight if need_cw else None], grad_out)
        return grad_x, None, None, grad_w, grad_b, None, grad_cw, None, None, None, None, None, None, None
    r = bn_act(x, mean, invstd, weight, bias, None, None, ctx.relu, ctx.backend, None).to(conv_weight.dtype)
    grad_r, grad_cw, _ = torch.ops.aten.convolution_backward(
        grad_out, r, conv_weight, None, stride, padding, dilation, False, [0, 0], groups, [need_r, need_cw, False])
    del r
    grad_x = grad_w = grad_b = None
    if need_r:
        grad_x, grad_w, grad_b, _ = bn_act_grads(grad_r, x, mean, invstd, weight, bias, count, None, ctx.relu,
                                                 ctx.backend, ctx.group_name, need_x, need_w, need_b, False)
    return grad_x, None, None, grad_w, grad_b, None, grad_cw, None, None, None, None, None, None, None


bn_act_conv.register_autograd(_backward, setup_context=_setup_context)
bn_act_conv_call = eager_autograd(bn_act_conv, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------------
# Functional API


def _pair(v, name: str) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    raise ValueError(f"fused_resnet: {name} must be an int or a pair of ints, got {v!r}")


def conv_dtype_for(x: Tensor, conv_weight: Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's where it is on (as F.conv2d would cast), else the
    weight's, which must then match the input's exactly as eager PyTorch requires."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if conv_weight.dtype != x.dtype:
        raise TypeError(f"fused_resnet: input type ({x.dtype}) and conv weight type ({conv_weight.dtype}) should "
                        "be the same (or run under torch.autocast)")
    return conv_weight.dtype


def batch_norm_act_conv(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    conv_weight: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
    process_group=None,
) -> Tensor:
    """``conv2d(relu?(batch_norm(x)), conv_weight, stride, padding, dilation, groups)`` without keeping the
    BN output for backward. BatchNorm arguments as ``batch_norm_act``; convolution arguments as
    ``F.conv2d`` (no bias, zero padding given as ints)."""
    from .batch_norm import _reference_composite, prepare_normalization

    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("fused_resnet: conv_weight must be a 4-D tensor (out, in / groups, kh, kw)")
    if x.dim() == 4 and (conv_weight.shape[1] * groups != x.shape[1] or conv_weight.shape[0] % groups):
        raise ValueError(f"fused_resnet: conv_weight {tuple(conv_weight.shape)} with groups={groups} does not "
                         f"take {x.shape[1]} input channels")
    if conv_weight.device != x.device:
        raise ValueError(f"fused_resnet: conv_weight is on {conv_weight.device} but the input is on {x.device}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    n = prepare_normalization(x, running_mean, running_var, weight, bias, training, momentum, eps,
                              num_batches_tracked, backend, process_group)
    cw = conv_weight.to(conv_dtype_for(x, conv_weight))
    if n is None:
        r = _reference_composite(x, running_mean, running_var, weight, bias, training, momentum, eps, None, relu)
        return torch.nn.functional.conv2d(r.to(cw.dtype), cw, None, stride, padding, dilation, groups)
    return bn_act_conv_call(x, n.mean, n.invstd, n.weight, n.bias, n.count, cw, stride, padding, dilation, groups,
                            relu, n.backend, n.group_name)
