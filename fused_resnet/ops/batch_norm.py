"""The fused BatchNorm family: op contract, custom-op registration, autograd and the functional API.

Contract (identical for every implementation: Triton ``fused_resnet/kernels/batch_norm.py``, CUDA
``csrc/cuda``, C++ CPU ``csrc/cpu``, eager ``fused_resnet/reference.py``; one channel c over its n = N*H*W
elements; acc = float32, or float64 for float64 activations):

  bn_stats(x) -> float64 [3, C]               (count, mean, m2), m2 = sum of squared deviations from the
                                              mean: accumulated in acc as centred partials, Chan-merged in
                                              float64 in a fixed order, so mean 1e4 / std 1 in fp32 and
                                              mean 1e8 / std 1 in fp64 stay exact to rounding. Summaries from
                                              several processes merge exactly (merge_stats), raw sums of
                                              squares would cancel.
  bn_finalize(stats, running_mean?, running_var?, num_batches_tracked?, momentum?, eps, dtype)
      -> (mean, invstd) of dtype              var = m2 / count; updates the running buffers in place like
                                              nn.BatchNorm2d (unbiased running_var; momentum=None: factor
                                              1/num_batches), all in float64; a channel of count 0 keeps them.
  bn_act(x, mean, invstd, weight?, bias?, residual?, relu) -> y
                                              y = relu?(x * scale + shift [+ residual]) in x's dtype,
                                              scale = weight * invstd, shift = bias - mean * scale.
  bn_backward_reduce(dy, x, mean, invstd, weight?, bias?, out?, relu) -> acc [2, C]
                                              (sum dz, sum dz * xhat), dz = dy * [relu mask],
                                              xhat = (x - mean) * invstd. The mask is out > 0 when the
                                              output was saved, else recomputed from x.
  bn_backward_elemt(dy, x, mean, invstd, weight?, bias?, out?, sums?, count?, relu, need_dz) -> (dx, dz)
                                              batch statistics (sums and count given):
                                              dx = scale * (dz - sum dz / n - xhat * sum(dz xhat) / n);
                                              running statistics: dx = scale * dz. dz only if need_dz.

Each op is a ``torch.library.custom_op`` in the ``fused_resnet`` namespace with a ``backend`` argument
(resolved once, in the functional API, by ``fused_resnet.backends``), a fake kernel for torch.compile and,
for ``bn_act``, an autograd formula. What backward saves: x (the pre-BN tensor), the per-channel mean and
invstd, the parameters, and the output only when a residual enters before the ReLU (its mask cannot be
recomputed from x alone; in a ResNet that output is the next block's input, which the next convolution
saves anyway). Eager BN + ReLU saves x and the ReLU output: one activation-sized tensor more.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends, dispatch
from .._layout import SUPPORTED_DTYPES, acc_dtype_of
from ._library import (all_gather, all_reduce_sum, differentiable_bn, differentiable_grads, eager, eager_autograd,
                       empty_act)


def _impl(backend: str):
    return dispatch.bn_implementation(backend)


# ---------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: allocate exactly what every implementation returns. They serve the contract ops below
# and, with the same signatures minus ``backend``, the compiled ops torch.ops.fused_resnet_C.*.


def _fake_stats(x):
    return x.new_empty((3, x.shape[1]), dtype=torch.float64)


def _fake_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype):
    c = stats.shape[1]
    return stats.new_empty((c,), dtype=dtype), stats.new_empty((c,), dtype=dtype)


def _fake_act(x, mean, invstd, weight, bias, residual, relu):
    return empty_act(x)


def _fake_backward_reduce(grad_out, x, mean, invstd, weight, bias, out, relu):
    return mean.new_empty((2, x.shape[1]))


def _fake_backward_elemt(grad_out, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz):
    return empty_act(x), (empty_act(x) if need_dz else x.new_empty((0,)))


if backends.extension_loaded():
    for _name, _fake in (("bn_stats", _fake_stats), ("bn_finalize", _fake_finalize), ("bn_act", _fake_act),
                         ("bn_backward_reduce", _fake_backward_reduce),
                         ("bn_backward_elemt", _fake_backward_elemt)):
        torch.library.register_fake(f"fused_resnet_C::{_name}", _fake)


# ---------------------------------------------------------------------------------------------------------
# Custom ops (the contract)


@torch.library.custom_op("fused_resnet::bn_stats", mutates_args=())
def bn_stats(x: Tensor, backend: str) -> Tensor:
    return _impl(backend).bn_stats(x)


@bn_stats.register_fake
def _(x, backend):
    return _fake_stats(x)


@torch.library.custom_op("fused_resnet::bn_finalize", mutates_args=("running_mean", "running_var"))
def bn_finalize(stats: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                dtype: torch.dtype, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).bn_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps,
                                      dtype)


@bn_finalize.register_fake
def _(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype, backend):
    return _fake_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype)


@torch.library.custom_op("fused_resnet::bn_act", mutates_args=())
def bn_act(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], count: Optional[Tensor], relu: bool, backend: str,
           group_name: Optional[str]) -> Tensor:
    """Forward apply. ``count`` (float64 [C], given iff mean/invstd are x's batch statistics) and
    ``group_name`` (process group the statistics were all-reduced over) only shape the backward."""
    return _impl(backend).bn_act(x, mean, invstd, weight, bias, residual, relu)


@bn_act.register_fake
def _(x, mean, invstd, weight, bias, residual, count, relu, backend, group_name):
    return _fake_act(x, mean, invstd, weight, bias, residual, relu)


@torch.library.custom_op("fused_resnet::bn_backward_reduce", mutates_args=())
def bn_backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], out: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    return _impl(backend).bn_backward_reduce(grad_out, x, mean, invstd, weight, bias, out, relu)


@bn_backward_reduce.register_fake
def _(grad_out, x, mean, invstd, weight, bias, out, relu, backend):
    return _fake_backward_reduce(grad_out, x, mean, invstd, weight, bias, out, relu)


@torch.library.custom_op("fused_resnet::bn_backward_elemt", mutates_args=())
def bn_backward_elemt(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], out: Optional[Tensor], sums: Optional[Tensor],
                      count: Optional[Tensor], relu: bool, need_dz: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend).bn_backward_elemt(grad_out, x, mean, invstd, weight, bias, out, sums, count, relu,
                                            need_dz)


@bn_backward_elemt.register_fake
def _(grad_out, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz, backend):
    return _fake_backward_elemt(grad_out, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz)


def _stats(x: Tensor, backend: str) -> Tensor:
    return _impl(backend).bn_stats(x) if eager(x) else bn_stats(x, backend)


def _finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype, backend):
    if not eager(stats, running_mean, running_var):
        return bn_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype, backend)
    out = _impl(backend).bn_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype)
    for buffer in (running_mean, running_var):
        if buffer is not None:  # as the custom op's mutation annotation would (autograd's saved-tensor checks see it)
            torch.autograd.graph.increment_version(buffer)
    return out


def _backward_reduce(grad, x, mean, invstd, weight, bias, out, relu, backend):
    if eager(grad, x, out):
        return _impl(backend).bn_backward_reduce(grad, x, mean, invstd, weight, bias, out, relu)
    return bn_backward_reduce(grad, x, mean, invstd, weight, bias, out, relu, backend)


def _backward_elemt(grad, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz, backend):
    if eager(grad, x, out):
        return _impl(backend).bn_backward_elemt(grad, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz)
    return bn_backward_elemt(grad, x, mean, invstd, weight, bias, out, sums, count, relu, need_dz, backend)


def _bn_act_double_backward(grad, x, mean, invstd, weight, bias, count, out, relu, group_name, need):
    """(grad_x, grad_weight, grad_bias, grad_residual) of bn_act, differentiable. The ReLU mask is the forward's:
    out > 0 when a residual entered before the ReLU (out saved), else recomputed from x."""
    need_x, need_w, need_b, need_r = need
    with torch.enable_grad():
        z = differentiable_bn(x, mean, invstd, weight, bias, count, group_name)
        dz = grad.to(z.dtype)
        if relu:
            active = (out > 0) if out is not None else (z.detach() > 0)
            dz = dz * active
        grad_x, grad_w, grad_b = differentiable_grads(
            z, [x if need_x else None, weight if need_w else None, bias if need_b else None], dz)
    grad_r = dz.to(grad.dtype) if need_r else None
    return grad_x, grad_w, grad_b, grad_r


# ---------------------------------------------------------------------------------------------------------
# Autograd of bn_act: one reduction pass and one elementwise pass, recomputing xhat and the ReLU mask.


def _bn_act_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, residual, count, relu, backend, group_name = inputs
    # The output is needed only for the mask of a ReLU that follows a residual add.
    out = output if (relu and residual is not None) else None
    ctx.save_for_backward(x, mean, invstd, weight, bias, count, out)
    ctx.relu, ctx.backend, ctx.group_name = relu, backend, group_name
    ctx.has_residual = residual is not None


def merge_stats(parts: Tensor) -> Tensor:
    """One (count, mean, m2) summary float64 [3, C] from P summaries [P, 3, C] (one per process): count = sum n_i,
    mean = sum n_i mean_i / count, m2 = sum m2_i + sum n_i (mean_i - mean)^2. Every term is a weighted mean or a
    sum of non-negative squares, so nothing cancels; empty summaries (n_i = 0) contribute nothing. A handful of
    vectorised ops whatever P, deterministic for a given P."""
    n_i, mean_i, m2_i = parts.unbind(1)
    n = n_i.sum(0)
    mean = (n_i * mean_i).sum(0) / torch.where(n > 0, n, 1.0)
    spread = torch.where(n_i > 0, mean_i - mean, 0.0)
    return torch.stack([n, mean, m2_i.sum(0) + (n_i * spread * spread).sum(0)])


def _all_gather_stats(stats: Tensor, group_name: str) -> Tensor:
    """The statistics of the whole process group: every process's summary gathered, then merged in rank order.
    (A summary of (count, mean, m2) does not add up under an all-reduce; raw sums would, but cancel.)"""
    return merge_stats(all_gather(stats, group_name).view(-1, *stats.shape))


def bn_act_grads(grad, x, mean, invstd, weight, bias, count, out, relu, backend, group_name,
                 need_x, need_w, need_b, need_r, reduced: Optional[Tensor] = None):
    """Gradients of y = relu?(bn(x) [+ residual]) from grad = dL/dy: (grad_x, grad_weight, grad_bias,
    grad_residual), each None when not needed. One reduction pass (skipped when only grad_x is needed with
    running statistics) and one elementwise pass. With batch statistics (``count`` given) grad_x includes
    their dependence on x; ``group_name`` all-reduces the reduction first (synchronized BN).

    ``reduced``: the reduction (sum dz, sum dz * xhat) computed by the caller together with grad (a dgrad
    epilogue, kernels/conv_bwd.py); grad is then dz, the ReLU mask already applied, and no residual enters."""
    batch_stats = count is not None
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    grad_x = grad_w = grad_b = grad_r = None
    sums = reduced
    if reduced is not None:
        relu = False  # grad is dz
    if reduced is None and (need_w or need_b or (need_x and batch_stats)):
        sums = _backward_reduce(grad, x, mean, invstd, weight, bias, out, relu, backend)
    if sums is not None:
        if need_w:
            grad_w = sums[1].to(weight.dtype)
        if need_b:
            grad_b = sums[0].to(bias.dtype)
    dz_for_residual = need_r and relu
    if need_x:
        if batch_stats and group_name is not None:
            sums = all_reduce_sum(sums, group_name)  # the gradient of globally shared statistics
        grad_x, dz = _backward_elemt(grad, x, mean, invstd, weight, bias, out,
                                       sums if batch_stats else None, count if batch_stats else None,
                                       relu, dz_for_residual, backend)
        if dz_for_residual:
            grad_r = dz
    elif dz_for_residual:
        grad_r = torch.where(out > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    if need_r and not relu:
        grad_r = grad
    return grad_x, grad_w, grad_b, grad_r


def _bn_act_backward(ctx, grad):
    x, mean, invstd, weight, bias, count, out = ctx.saved_tensors
    need_x, need_w, need_b, need_r = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
    if torch.is_grad_enabled():  # create_graph=True
        grad_x, grad_w, grad_b, grad_r = _bn_act_double_backward(grad, x, mean, invstd, weight, bias, count, out,
                                                                 ctx.relu, ctx.group_name,
                                                                 (need_x, need_w, need_b, need_r))
        return grad_x, None, None, grad_w, grad_b, grad_r, None, None, None, None
    grad_x, grad_w, grad_b, grad_r = bn_act_grads(grad, x, mean, invstd, weight, bias, count, out, ctx.relu,
                                                  ctx.backend, ctx.group_name, need_x, need_w, need_b, need_r)
    return grad_x, None, None, grad_w, grad_b, grad_r, None, None, None, None


bn_act.register_autograd(_bn_act_backward, setup_context=_bn_act_setup_context)
bn_act_call = eager_autograd(bn_act, _bn_act_setup_context, _bn_act_backward)


# ---------------------------------------------------------------------------------------------------------
# Functional API


def _check_channel_vector(t: Optional[Tensor], name: str, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"fused_resnet: {name} must be a Tensor or None, got {type(t).__name__}")
    c = x.shape[1]
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(f"fused_resnet: {name} should contain {c} elements (one per channel of the input "
                         f"{tuple(x.shape)}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"fused_resnet: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"fused_resnet: {name} is on {t.device} but the input is on {x.device}")


def _check_inputs(x, running_mean, running_var, weight, bias, residual, num_batches_tracked) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fused_resnet: input must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected 4D input (got {x.dim()}D input)")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fused_resnet: input dtype {x.dtype} is not supported; use float16, bfloat16, "
                        "float32 or float64")
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"),
                    (bias, "bias")):
        _check_channel_vector(t, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("fused_resnet: running_mean and running_var must be given together")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"fused_resnet: residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"fused_resnet: residual has shape {tuple(residual.shape)} but the input has "
                             f"{tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"fused_resnet: residual dtype {residual.dtype} differs from the input's {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"fused_resnet: residual is on {residual.device} but the input is on {x.device}")
    if num_batches_tracked is not None and num_batches_tracked.device != x.device:
        raise ValueError(f"fused_resnet: num_batches_tracked is on {num_batches_tracked.device} but the input "
                         f"is on {x.device}")


def _contiguous_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _reference_composite(x, running_mean, running_var, weight, bias, training, momentum, eps, residual,
                         relu):
    """nn.functional semantics, for the inputs the kernels need not see (empty tensors)."""
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training,
                                       0.0 if momentum is None else momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def batch_norm_stats(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """Per-channel (count, mean, m2) as float64 [3, C], m2 the sum of squared deviations from the mean: the batch
    statistics, mergeable across processes with ``merge_stats``."""
    _check_inputs(x, None, None, None, None, None, None)
    return bn_stats(x.detach(), backends.resolve(backend, x.device))


def batch_norm_finalize(stats: Tensor, running_mean: Optional[Tensor] = None,
                        running_var: Optional[Tensor] = None, num_batches_tracked: Optional[Tensor] = None,
                        momentum: Optional[float] = 0.1, eps: float = 1e-5, dtype: torch.dtype = torch.float32,
                        backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(mean, invstd) from ``batch_norm_stats``; updates the running buffers when given."""
    if momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("fused_resnet: momentum=None (cumulative moving average) needs num_batches_tracked")
    return bn_finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, dtype,
                       backends.resolve(backend, stats.device))


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, residual,
                           num_batches_tracked, process_group):
    _check_inputs(x, running_mean, running_var, weight, bias, residual, num_batches_tracked)
    if not training and running_mean is None:
        raise ValueError("fused_resnet: running_mean and running_var are required when training=False")
    if training and process_group is None and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    if training and momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("fused_resnet: momentum=None (cumulative moving average) needs num_batches_tracked")


def _check_eps(eps, training: bool) -> None:
    # nn.functional.batch_norm's own check and message: eps <= 0 would give NaN on a constant channel.
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def _check_stats(stats: Tensor, x: Tensor) -> None:
    if not isinstance(stats, Tensor) or stats.dtype != torch.float64 or stats.shape != (3, x.shape[1]):
        raise ValueError(f"fused_resnet: stats must be the float64 [3, {x.shape[1]}] (count, mean, m2) statistics of "
                         f"the input (batch_norm_stats or a convolution's statistics epilogue), got "
                         f"{getattr(stats, 'dtype', type(stats).__name__)} {tuple(getattr(stats, 'shape', ()))}")
    if stats.device != x.device:
        raise ValueError(f"fused_resnet: stats are on {stats.device} but the input is on {x.device}")


def normalization_statistics(x, running_mean, running_var, training, momentum, eps, num_batches_tracked, backend,
                             process_group=None, stats=None):
    """(mean, invstd, count, group_name) that normalise x: its batch statistics when training (updating the
    running buffers; merged over ``process_group`` when given), else the running ones (count None). ``stats``:
    x's statistics computed elsewhere (a convolution's epilogue), used instead of reducing x again; the merge
    over the process group and the finalize are the same whatever produced them."""
    acc = acc_dtype_of(x)
    if training:
        stats = _stats(x.detach(), backend) if stats is None else stats.detach()
        group_name = None
        if process_group is not None:
            group_name = process_group.group_name
            stats = _all_gather_stats(stats, group_name)
        mean, invstd = _finalize(stats, running_mean, running_var, num_batches_tracked, momentum, eps, acc, backend)
        return mean, invstd, stats[0], group_name
    with torch.no_grad():
        # copies: backward must not see later in-place updates of the buffers
        mean = running_mean.to(acc, copy=True).contiguous()
        invstd = torch.rsqrt(running_var.to(acc) + eps).contiguous()
    return mean, invstd, None, None


class Normalization(NamedTuple):
    """What the fused ops need to normalise x (see prepare_normalization)."""
    backend: str
    mean: Tensor
    invstd: Tensor
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    count: Optional[Tensor]
    group_name: Optional[str]


def prepare_normalization(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                          backend, process_group, residual=None, stats=None) -> Optional[Normalization]:
    """The shared entry of every functional BatchNorm op: check the arguments, resolve the backend (an explicit
    unavailable one raises even for empty input), and compute the statistics (updating the running buffers when
    training). None for an empty input, which the caller handles with eager PyTorch, except in synchronized
    training: as nn.SyncBatchNorm, an empty process still joins the statistics merge (with count 0) and, through
    the ops' backward, the gradient all-reduce, so that every process runs the same collectives in the same
    order. ``stats``: x's statistics computed elsewhere (see normalization_statistics)."""
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, residual,
                           num_batches_tracked, process_group)
    _check_eps(eps, training)
    if stats is not None:
        _check_stats(stats, x)
    backend = backends.resolve(backend, x.device)
    if x.numel() == 0 and not (training and process_group is not None):
        return None
    mean, invstd, count, group_name = normalization_statistics(x, running_mean, running_var, training, momentum,
                                                               eps, num_batches_tracked, backend, process_group,
                                                               stats)
    return Normalization(backend, mean, invstd, _contiguous_or_none(weight), _contiguous_or_none(bias), count,
                         group_name)


def batch_norm_act(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    relu: bool = False,
    num_batches_tracked: Optional[Tensor] = None,
    backend: Optional[str] = None,
    process_group=None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    """``relu?(batch_norm(x) [+ residual])`` with ``torch.nn.functional.batch_norm``'s arguments.

    training: normalise with the batch statistics and update the running buffers (when given) like
    ``nn.BatchNorm2d``; ``momentum=None`` takes the cumulative average over ``num_batches_tracked`` (which
    the caller has already incremented, as ``nn.BatchNorm2d`` does). Otherwise normalise with the running
    buffers. ``process_group``: merge the statistics (and all-reduce their gradients) over it (synchronized
    BN). ``stats``: x's (count, mean, m2) statistics when already computed (a convolution's statistics
    epilogue): training then skips its own reduction of x.
    """
    n = prepare_normalization(x, running_mean, running_var, weight, bias, training, momentum, eps,
                              num_batches_tracked, backend, process_group, residual, stats)
    if n is None:
        return _reference_composite(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                    residual, relu)
    return bn_act_call(x, n.mean, n.invstd, n.weight, n.bias, residual, n.count, relu, n.backend, n.group_name)
