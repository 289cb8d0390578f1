"""Custom-op plumbing shared by the op families (ops/batch_norm.py, ops/conv.py, ops/bn_act_maxpool.py).

  eager fast path    plain tensors outside torch.compile and torch.jit.trace call the implementations (and a
                     plain torch.autograd.Function) directly instead of going through torch.library's
                     dispatcher round trips; everything else runs the custom ops, so graphs and traces see them
  double backward    differentiable eager recomputations for backward formulas under create_graph=True
  collectives        the functional all-reduce the synchronized backward uses
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._layout import kernel_layout

# ---------------------------------------------------------------------------------------------------------
# Eager fast path. The ops without an autograd formula (statistics, finalize, the backward kernels) run their
# implementation directly when nothing traces them. This skips the dispatcher round trips of torch.library
# custom ops (~60 us per BatchNorm forward on the host, measured, most of it the version-bump wrapper of the
# mutating finalize), which eager GPU training pays 53 times per ResNet-50 pass. Under torch.compile or
# torch.jit.trace, or for fake / subclass tensors, the custom ops run.

_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter disables __torch_function__: as plain as a Tensor


def eager(*tensors) -> bool:
    """Plain tensors outside torch.compile and torch.jit.trace (which must record the custom ops themselves)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and all(t is None or type(t) in _PLAIN for t in tensors))


def eager_autograd(op, setup_context, backward):
    """A callable that runs ``op`` (a custom op with this autograd formula) through a plain
    torch.autograd.Function in eager mode, and through the custom op itself otherwise (torch.compile, fake or
    subclass tensors). The Function reuses the op's implementation, setup_context and backward, so both paths
    compute the same thing; it skips custom_op's per-call argument handling (~35 us on the host, measured).
    Ops with several outputs mark the non-tensor-valued or statistics outputs non-differentiable themselves
    (setup_context gets ``ctx``)."""
    impl = op._init_fn

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if eager(*tensors):
            if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
                return impl(*args)  # nothing to differentiate (inference, no_grad): no autograd node either
            return _Function.apply(*args)
        return op(*args)

    return call


def empty_act(x: Tensor) -> Tensor:
    """What every implementation allocates for an activation-shaped output of x (fake kernels use it)."""
    return torch.empty_like(kernel_layout(x))


# ---------------------------------------------------------------------------------------------------------
# Double backward. When backward itself is recorded (create_graph=True: gradient penalties, MAML, Hessian-vector
# products), the kernels' backward is not differentiable, so the ops' backward formulas switch to eager PyTorch
# ops on the saved tensors: differentiable to any order, and exact with respect to the batch statistics.


def differentiable_bn(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      count: Optional[Tensor], group_name: Optional[str]) -> Tensor:
    """(x - mean) * weight * invstd + bias in plain torch ops, in the accumulation dtype. With batch statistics
    (``count`` given) mean and invstd are recomputed from x, so that their dependence on x is in the graph;
    their values stay the saved ones (value + (g - g.detach()) carries g's gradient). eps is not needed: the
    derivative of rsqrt(var + eps) is -invstd^3 / 2, a function of the saved invstd alone."""
    acc = mean.dtype
    xa = x.to(acc)
    if count is not None:
        if group_name is not None:
            raise RuntimeError("fused_resnet: double backward (create_graph=True) through synchronized BatchNorm is "
                               "not supported; run the penalty term without sync_bn, or use nn.BatchNorm2d there")
        var_b, mean_b = torch.var_mean(xa, dim=(0, 2, 3), correction=0)
        eps_hat = (invstd.detach() ** -2 - var_b.detach())  # var_b + eps_hat == 1 / invstd^2
        g = torch.rsqrt(var_b + eps_hat)
        mean = mean.detach() + (mean_b - mean_b.detach())
        invstd = invstd.detach() + (g - g.detach())
    scale = invstd if weight is None else weight.to(acc) * invstd
    z = (xa - mean.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    return z if bias is None else z + bias.to(acc).view(1, -1, 1, 1)


def differentiable_grads(output: Tensor, inputs: list, grad: Tensor) -> list:
    """d(output)/d(inputs) . grad with create_graph=True; None for inputs that are None."""
    wanted = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(output, wanted, grad, create_graph=True, allow_unused=True) if wanted else ())
    return [None if t is None else next(found) for t in inputs]


# ---------------------------------------------------------------------------------------------------------
# Collectives


def all_reduce_sum(t: Tensor, group_name: str) -> Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group_name))


def all_gather(t: Tensor, group_name: str) -> Tensor:
    """[world * t.shape[0], ...]: every process's t, in rank order."""
    import torch.distributed._functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_gather_tensor(t.contiguous(), 0, group_name))
