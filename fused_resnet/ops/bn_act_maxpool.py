"""BatchNorm-apply (+ReLU) followed by max-pooling (a ResNet's stem), as one autograd node that keeps only the
pre-BN tensor.

Eager PyTorch keeps the ReLU output (the pool's input) and the pool's int64 argmax indices: for a ResNet-50
stem at 112x112 that is 64 x 112 x 112 activations plus 64 x 56 x 56 int64 indices per image, ~7% of the whole
network's saved activations in bf16. Backward here recomputes both from x (one BN-apply and one pooling
pass); the recomputed pool input is bitwise the forward's, so the argmax (ties included) is the same.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._library import differentiable_bn, differentiable_grads, eager_autograd, empty_act
from .batch_norm import _impl, bn_act, bn_act_grads


def _pool(r: Tensor, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[Tensor, Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(r, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("fused_resnet::bn_act_maxpool", mutates_args=())
def bn_act_maxpool(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   count: Optional[Tensor], kernel_size: list[int], stride: list[int], padding: list[int],
                   dilation: list[int], ceil_mode: bool, relu: bool, backend: str,
                   group_name: Optional[str]) -> Tensor:
    """``count``/``group_name`` as in ``bn_act``; pooling arguments as ``aten.max_pool2d``."""
    r = _impl(backend).bn_act(x, mean, invstd, weight, bias, None, relu)
    return _pool(r, kernel_size, stride, padding, dilation, ceil_mode)[0]


@bn_act_maxpool.register_fake
def _(x, mean, invstd, weight, bias, count, kernel_size, stride, padding, dilation, ceil_mode, relu, backend,
      group_name):
    return _pool(empty_act(x), kernel_size, stride, padding, dilation, ceil_mode)[0]


def _setup_context(ctx, inputs, output):
    (x, mean, invstd, weight, bias, count, kernel_size, stride, padding, dilation, ceil_mode, relu, backend,
     group_name) = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias, count)  # neither the pool input nor its indices
    ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode)
    ctx.relu, ctx.backend, ctx.group_name = relu, backend, group_name


def _backward(ctx, grad_out):
    x, mean, invstd, weight, bias, count = ctx.saved_tensors
    need_x, need_w, need_b = (ctx.needs_input_grad[i] for i in (0, 3, 4))
    grad_x = grad_w = grad_b = None
    if (need_x or need_w or need_b) and torch.is_grad_enabled():  # create_graph=True (see ops/batch_norm.py)
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool_args
        with torch.enable_grad():
            z = differentiable_bn(x, mean, invstd, weight, bias, count, ctx.group_name)
            r = (torch.relu(z) if ctx.relu else z).to(x.dtype)
            y = torch.nn.functional.max_pool2d(r, kernel_size, stride, padding, dilation, ceil_mode)
            grad_x, grad_w, grad_b = differentiable_grads(
                y, [x if need_x else None, weight if need_w else None, bias if need_b else None], grad_out)
    elif need_x or need_w or need_b:
        r = bn_act(x, mean, invstd, weight, bias, None, None, ctx.relu, ctx.backend, None)
        _, indices = _pool(r, *ctx.pool_args)
        grad_r = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, r, *ctx.pool_args, indices)
        del r, indices
        grad_x, grad_w, grad_b, _ = bn_act_grads(grad_r, x, mean, invstd, weight, bias, count, None, ctx.relu,
                                                 ctx.backend, ctx.group_name, need_x, need_w, need_b, False)
    return grad_x, None, None, grad_w, grad_b, None, None, None, None, None, None, None, None, None


bn_act_maxpool.register_autograd(_backward, setup_context=_setup_context)
bn_act_maxpool_call = eager_autograd(bn_act_maxpool, _setup_context, _backward)


def batch_norm_act_maxpool(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    kernel_size=3,
    stride=2,
    padding=1,
    dilation=1,
    ceil_mode: bool = False,
    relu: bool = True,
    num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
    process_group=None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    """``max_pool2d(relu?(batch_norm(x)), ...)`` without keeping the pool's input or indices for backward.
    BatchNorm arguments as ``batch_norm_act`` (``stats``: x's statistics, from the convolution that produced
    x); pooling arguments as ``F.max_pool2d``."""
    from .batch_norm import _reference_composite, prepare_normalization
    from .conv import _pair

    pool_args = (_pair(kernel_size, "kernel_size"), _pair(stride if stride is not None else kernel_size, "stride"),
                 _pair(padding, "padding"), _pair(dilation, "dilation"), bool(ceil_mode))
    n = prepare_normalization(x, running_mean, running_var, weight, bias, training, momentum, eps,
                              num_batches_tracked, backend, process_group, stats=stats)
    if n is None:
        r = _reference_composite(x, running_mean, running_var, weight, bias, training, momentum, eps, None, relu)
        return torch.nn.functional.max_pool2d(r, *pool_args)
    return bn_act_maxpool_call(x, n.mean, n.invstd, n.weight, n.bias, n.count, *pool_args, relu, n.backend,
                               n.group_name)
