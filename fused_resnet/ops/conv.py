"""The fused convolutions: custom ops, autograd and the functional API.

    conv_stats       (y, stats) = conv2d(relu?(bn(x)), w), stats = (count, mean, m2) of y
                     The prologue (optional) is the previous BatchNorm's apply + ReLU; the statistics are the
                     next BatchNorm's (ops/batch_norm.py takes them as ``stats=``), computed in the
                     convolution's epilogue. Training path of the fused blocks.
    conv_bias_act    y = relu?(conv2d(x, w) + bias [+ residual]): eval, with a BatchNorm folded into w and bias.
    conv             y = conv2d(x, w): eval, where the BatchNorm after it is applied unfolded (models/fold.py).

Implementations (fused_resnet.dispatch): "triton", the fused kernels (kernels/conv_fwd.py, conv_bwd.py): the
normalised activation relu?(bn(x)) never reaches memory, in forward or backward (wgrad recomputes it in
registers); "aten", ATen's convolution with the backend's BatchNorm kernels around it: relu?(bn(x)) is
materialised for the convolution and freed, and recomputed in backward.

What backward keeps, either way: x (the pre-BatchNorm tensor, which that BatchNorm's backward needs anyway),
the weight, the per-channel statistics and parameters; for conv_bias_act with a ReLU, also its output (the
mask). The statistics output is not differentiable: the BatchNorm that consumes it accounts for its
dependence on y (its backward with batch statistics), as it does for statistics it computed itself.

Backward: dw = wgrad(dy, prologue(x)) and da = dgrad(dy, w) (from one ATen call for "aten": conv_dgrad_wgrad); then the prologue BatchNorm's backward turns da
into dx, dweight and dbias (bn_act_grads: ReLU mask, reductions, elementwise pass). The Triton dgrad applies
the ReLU mask and computes the BatchNorm's reductions in its epilogue (conv_dgrad_bn), leaving only the
elementwise pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import backends, dispatch
from .._layout import acc_dtype_of, conv_output_size
from ._library import differentiable_bn, differentiable_grads, eager, eager_autograd
from .batch_norm import _reference_composite, bn_act_grads, prepare_normalization


def _out_format(x: Tensor):
    """Every implementation returns the convolution output in x's memory format (channels_last stays)."""
    return suggest_memory_format(x)


def _conv_out(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    ho, wo = conv_output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=_out_format(x))


def _prologue(mean, invstd, bn_weight, bn_bias, relu) -> Optional[tuple]:
    return None if mean is None else (mean, invstd, bn_weight, bn_bias, relu)


def _format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


# ---------------------------------------------------------------------------------------------------------
# The backward passes as custom ops of their own, so that torch.compile / AOTAutograd trace the backward
# formulas below through fake kernels instead of calling the Triton kernels with fake tensors.


@torch.library.custom_op("fused_resnet::conv_dgrad", mutates_args=())
def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape: list[int], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, dtype: torch.dtype, channels_last: bool, impl: str,
               backend: str) -> Tensor:
    """Gradient of the convolution's input (shape input_shape, dtype, channels_last or contiguous)."""
    fns = dispatch.conv_functions(impl, backend)
    fmt = _format(channels_last)
    return fns.dgrad(grad_out, weight, input_shape, stride, padding, dilation, groups, dtype, fmt).contiguous(
        memory_format=fmt)


@conv_dgrad.register_fake
def _(grad_out, weight, input_shape, stride, padding, dilation, groups, dtype, channels_last, impl, backend):
    return torch.empty(input_shape, dtype=dtype, device=grad_out.device, memory_format=_format(channels_last))


@torch.library.custom_op("fused_resnet::conv_wgrad", mutates_args=())
def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape: list[int], stride: list[int], padding: list[int],
               dilation: list[int], groups: int, dtype: torch.dtype, channels_last: bool, mean: Optional[Tensor],
               invstd: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], relu: bool,
               impl: str, backend: str) -> Tensor:
    """Gradient of the convolution's weight, its input recomputed from x through the prologue (mean None:
    none)."""
    fns = dispatch.conv_functions(impl, backend)
    dw = fns.wgrad(grad_out, x, weight_shape, stride, padding, dilation, groups, dtype,
                   _prologue(mean, invstd, bn_weight, bn_bias, relu))
    return dw.contiguous(memory_format=_format(channels_last))


@conv_wgrad.register_fake
def _(grad_out, x, weight_shape, stride, padding, dilation, groups, dtype, channels_last, mean, invstd, bn_weight,
      bn_bias, relu, impl, backend):
    return torch.empty(weight_shape, dtype=dtype, device=x.device, memory_format=_format(channels_last))


@torch.library.custom_op("fused_resnet::conv_dgrad_bn", mutates_args=())
def conv_dgrad_bn(grad_out: Tensor, weight: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], relu: bool, stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, channels_last: bool, impl: str,
                  backend: str) -> tuple[Tensor, Tensor]:
    """(dz, (sum dz, sum dz * xhat)): dgrad of a convolution whose input was relu?(bn(x)), with the ReLU mask
    and the BatchNorm backward's reduction fused into its epilogue (implementations that have it)."""
    fns = dispatch.conv_functions(impl, backend)
    fmt = _format(channels_last)
    dz, sums = fns.dgrad_bn(grad_out, weight, x, mean, invstd, bn_weight, bn_bias, relu, stride, padding, dilation,
                            groups, fmt)
    return dz.contiguous(memory_format=fmt), sums


@conv_dgrad_bn.register_fake
def _(grad_out, weight, x, mean, invstd, bn_weight, bn_bias, relu, stride, padding, dilation, groups, channels_last,
      impl, backend):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(channels_last)),
            mean.new_empty((2, x.shape[1])))


@torch.library.custom_op("fused_resnet::conv_dgrad_wgrad", mutates_args=())
def conv_dgrad_wgrad(grad_out: Tensor, x: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                     dilation: list[int], groups: int, mean: Optional[Tensor], invstd: Optional[Tensor],
                     bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], relu: bool, impl: str,
                     backend: str) -> tuple[Tensor, Tensor]:
    """(gradient of the convolution's input, of its weight) from one call, for implementations that have it
    (fns.backward): the input relu?(bn(x)) recomputed from x through the prologue (mean None: x itself)."""
    fns = dispatch.conv_functions(impl, backend)
    grad_a, grad_w = fns.backward(grad_out, x, weight, stride, padding, dilation, groups,
                                  _prologue(mean, invstd, bn_weight, bn_bias, relu))
    return (grad_a.contiguous(memory_format=_out_format(x)),
            grad_w.contiguous(memory_format=_format(_is_channels_last(weight))))


@conv_dgrad_wgrad.register_fake
def _(grad_out, x, weight, stride, padding, dilation, groups, mean, invstd, bn_weight, bn_bias, relu, impl, backend):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_out_format(x)),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device,
                        memory_format=_format(_is_channels_last(weight))))


def _is_channels_last(t: Tensor) -> bool:
    return _out_format(t) == torch.channels_last


def _dgrad(grad_out, weight, x, stride, padding, dilation, groups, impl, backend) -> Tensor:
    args = (grad_out, weight, list(x.shape), stride, padding, dilation, groups, x.dtype, _is_channels_last(x), impl,
            backend)
    return conv_dgrad._init_fn(*args) if eager(grad_out, weight) else conv_dgrad(*args)


def _dgrad_bn(grad_out, weight, x, prologue, stride, padding, dilation, groups, impl, backend):
    mean, invstd, bn_weight, bn_bias, relu = prologue
    args = (grad_out, weight, x, mean, invstd, bn_weight, bn_bias, relu, stride, padding, dilation, groups,
            _is_channels_last(x), impl, backend)
    return conv_dgrad_bn._init_fn(*args) if eager(grad_out, weight, x) else conv_dgrad_bn(*args)


def _dgrad_wgrad(grad_out, x, weight, stride, padding, dilation, groups, prologue, impl, backend):
    mean, invstd, bn_weight, bn_bias, relu = prologue if prologue is not None else (None, None, None, None, False)
    args = (grad_out, x, weight, stride, padding, dilation, groups, mean, invstd, bn_weight, bn_bias, relu, impl,
            backend)
    return conv_dgrad_wgrad._init_fn(*args) if eager(grad_out, x, weight) else conv_dgrad_wgrad(*args)


def _wgrad(grad_out, x, weight, stride, padding, dilation, groups, prologue, impl, backend) -> Tensor:
    mean, invstd, bn_weight, bn_bias, relu = prologue if prologue is not None else (None, None, None, None, False)
    args = (grad_out, x, list(weight.shape), stride, padding, dilation, groups, weight.dtype,
            _is_channels_last(weight), mean, invstd, bn_weight, bn_bias, relu, impl, backend)
    return conv_wgrad._init_fn(*args) if eager(grad_out, x) else conv_wgrad(*args)


# ---------------------------------------------------------------------------------------------------------
# conv_stats


@torch.library.custom_op("fused_resnet::conv_stats", mutates_args=())
def conv_stats(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
               mean: Optional[Tensor], invstd: Optional[Tensor], bn_weight: Optional[Tensor],
               bn_bias: Optional[Tensor], count: Optional[Tensor], relu: bool, impl: str, backend: str,
               group_name: Optional[str]) -> tuple[Tensor, Tensor]:
    """mean / invstd / bn_weight / bn_bias / relu: the prologue BatchNorm (mean None: no prologue); count and
    group_name shape only its backward, as in bn_act. impl: "triton" or "aten"; backend: the BatchNorm kernels."""
    fns = dispatch.conv_functions(impl, backend)
    y, stats = fns.fwd(x, weight, stride, padding, dilation, groups,
                       prologue=_prologue(mean, invstd, bn_weight, bn_bias, relu), stats=True)
    return y.contiguous(memory_format=_out_format(x)), stats


@conv_stats.register_fake
def _(x, weight, stride, padding, dilation, groups, mean, invstd, bn_weight, bn_bias, count, relu, impl, backend,
      group_name):
    return _conv_out(x, weight, stride, padding, dilation), x.new_empty((3, weight.shape[0]), dtype=torch.float64)


def _conv_stats_setup(ctx, inputs, output):
    (x, weight, stride, padding, dilation, groups, mean, invstd, bn_weight, bn_bias, count, relu, impl, backend,
     group_name) = inputs
    ctx.save_for_backward(x, weight, mean, invstd, bn_weight, bn_bias, count)  # never relu?(bn(x))
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu, ctx.impl, ctx.backend, ctx.group_name = relu, impl, backend, group_name
    ctx.mark_non_differentiable(output[1])


def _conv_stats_double_backward(ctx, grad_y, x, weight, mean, invstd, bn_weight, bn_bias, count, need):
    stride, padding, dilation, groups = ctx.conv_args
    need_x, need_w, need_bw, need_bb = need
    with torch.enable_grad():
        a = x
        if mean is not None:
            z = differentiable_bn(x, mean, invstd, bn_weight, bn_bias, count, ctx.group_name)
            a = (torch.relu(z) if ctx.relu else z).to(x.dtype)
        y = torch.nn.functional.conv2d(a, weight, None, stride, padding, dilation, groups)
        return differentiable_grads(y, [x if need_x else None, weight if need_w else None,
                                        bn_weight if need_bw else None, bn_bias if need_bb else None], grad_y)


def _conv_stats_backward(ctx, grad_y, grad_stats):
    x, weight, mean, invstd, bn_weight, bn_bias, count = ctx.saved_tensors
    need_x, need_w, need_bw, need_bb = (ctx.needs_input_grad[i] for i in (0, 1, 8, 9))
    none = (None,) * 5
    if grad_y is None:
        return (None, None) + none + (None,) * 8
    if torch.is_grad_enabled():  # create_graph=True: differentiable eager ops (ops/_library.py)
        grad_x, grad_w, grad_bw, grad_bb = _conv_stats_double_backward(
            ctx, grad_y, x, weight, mean, invstd, bn_weight, bn_bias, count, (need_x, need_w, need_bw, need_bb))
        return (grad_x, grad_w) + (None,) * 4 + (None, None, grad_bw, grad_bb) + (None,) * 5
    stride, padding, dilation, groups = ctx.conv_args
    prologue = _prologue(mean, invstd, bn_weight, bn_bias, ctx.relu)
    fns = dispatch.conv_functions(ctx.impl, ctx.backend)
    grad_w = grad_x = grad_bw = grad_bb = grad_a = None
    need_a = need_x or (prologue is not None and (need_bw or need_bb))
    if need_w and need_a and fns.backward is not None:
        grad_a, grad_w = _dgrad_wgrad(grad_y, x, weight, stride, padding, dilation, groups, prologue, ctx.impl,
                                      ctx.backend)
    elif need_w:
        grad_w = _wgrad(grad_y, x, weight, stride, padding, dilation, groups, prologue, ctx.impl, ctx.backend)
    if (need_a and grad_a is None and prologue is not None and fns.dgrad_bn is not None
            and fns.dgrad_bn_takes(grad_y, weight, x, mean, stride, dilation, groups)):
        # dgrad + ReLU mask + the BatchNorm's backward reduction in one kernel; the elementwise pass follows.
        dz, reduced = _dgrad_bn(grad_y, weight, x, prologue, stride, padding, dilation, groups, ctx.impl,
                                ctx.backend)
        grad_x, grad_bw, grad_bb, _ = bn_act_grads(dz, x, mean, invstd, bn_weight, bn_bias, count, None, ctx.relu,
                                                   ctx.backend, ctx.group_name, need_x, need_bw, need_bb, False,
                                                   reduced=reduced)
    elif need_a:
        if grad_a is None:
            grad_a = _dgrad(grad_y, weight, x, stride, padding, dilation, groups, ctx.impl, ctx.backend)
        if prologue is None:
            grad_x = grad_a
        else:
            grad_x, grad_bw, grad_bb, _ = bn_act_grads(grad_a, x, mean, invstd, bn_weight, bn_bias, count, None,
                                                       ctx.relu, ctx.backend, ctx.group_name, need_x, need_bw, need_bb,
                                                       False)
    return (grad_x, grad_w) + (None,) * 4 + (None, None, grad_bw, grad_bb) + (None,) * 5


conv_stats.register_autograd(_conv_stats_backward, setup_context=_conv_stats_setup)
conv_stats_call = eager_autograd(conv_stats, _conv_stats_setup, _conv_stats_backward)


# ---------------------------------------------------------------------------------------------------------
# conv_bias_act (eval)


@torch.library.custom_op("fused_resnet::conv_bias_act", mutates_args=())
def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor], stride: list[int],
                  padding: list[int], dilation: list[int], groups: int, relu: bool, impl: str,
                  backend: str) -> Tensor:
    """bias: float32 (float64 for float64 x), one per output channel; residual: y's shape and dtype."""
    fns = dispatch.conv_functions(impl, backend)
    y, _ = fns.fwd(x, weight, stride, padding, dilation, groups, bias=bias, residual=residual, relu=relu)
    return y.contiguous(memory_format=_out_format(x))


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu, impl, backend):
    return _conv_out(x, weight, stride, padding, dilation)


def _conv_bias_act_setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu, impl, backend = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu, ctx.impl, ctx.backend = relu, impl, backend
    ctx.bias_dtype = bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _conv_bias_act_backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    need_x, need_w, need_b, need_r = (ctx.needs_input_grad[i] for i in range(4))
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    dz = torch.where(out > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)) if ctx.relu else grad
    grad_x = grad_w = grad_b = grad_r = None
    if need_b:
        grad_b = dz.sum(dim=(0, 2, 3), dtype=ctx.bias_dtype)
    if need_r:
        grad_r = dz.to(ctx.residual_dtype)
    grad_x, grad_w = _plain_conv_grads(ctx, dz, x, weight, need_x, need_w)
    return grad_x, grad_w, grad_b, grad_r, None, None, None, None, None, None, None


def _plain_conv_grads(ctx, dz, x, weight, need_x: bool, need_w: bool):
    """(grad of x, grad of weight) of conv2d(x, weight) (no prologue) for output gradient dz; differentiable
    eager ops when backward is recorded (create_graph=True)."""
    stride, padding, dilation, groups = ctx.conv_args
    if torch.is_grad_enabled():  # create_graph=True: dz is differentiable in the incoming gradient
        with torch.enable_grad():
            y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
            return tuple(differentiable_grads(y, [x if need_x else None, weight if need_w else None], dz))
    if need_x and need_w and dispatch.conv_functions(ctx.impl, ctx.backend).backward is not None:
        return _dgrad_wgrad(dz, x, weight, stride, padding, dilation, groups, None, ctx.impl, ctx.backend)
    grad_x = grad_w = None
    if need_x:
        grad_x = _dgrad(dz, weight, x, stride, padding, dilation, groups, ctx.impl, ctx.backend)
    if need_w:
        grad_w = _wgrad(dz, x, weight, stride, padding, dilation, groups, None, ctx.impl, ctx.backend)
    return grad_x, grad_w


conv_bias_act.register_autograd(_conv_bias_act_backward, setup_context=_conv_bias_act_setup)
conv_bias_act_call = eager_autograd(conv_bias_act, _conv_bias_act_setup, _conv_bias_act_backward)


# ---------------------------------------------------------------------------------------------------------
# conv (plain: no prologue, no epilogue)


@torch.library.custom_op("fused_resnet::conv", mutates_args=())
def conv(x: Tensor, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
         impl: str, backend: str) -> Tensor:
    """y = conv2d(x, weight) by convolution implementation ``impl``: the eval path's convolution where the
    BatchNorm after it is applied unfolded (models/fold.py)."""
    y, _ = dispatch.conv_functions(impl, backend).fwd(x, weight, stride, padding, dilation, groups)
    return y.contiguous(memory_format=_out_format(x))


@conv.register_fake
def _(x, weight, stride, padding, dilation, groups, impl, backend):
    return _conv_out(x, weight, stride, padding, dilation)


def _conv_setup(ctx, inputs, output):
    x, weight, stride, padding, dilation, groups, impl, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.impl, ctx.backend = impl, backend


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad if grad.dtype == x.dtype else grad.to(x.dtype)
    grad_x, grad_w = _plain_conv_grads(ctx, grad, x, weight, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return grad_x, grad_w, None, None, None, None, None, None


conv.register_autograd(_conv_backward, setup_context=_conv_setup)
conv_call = eager_autograd(conv, _conv_setup, _conv_backward)


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


def _check_conv(x: Tensor, conv_weight: Tensor, groups: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"fused_resnet: expected a 4-D input (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError("fused_resnet: conv_weight must be a 4-D tensor (out, in / groups, kh, kw)")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fused_resnet: groups must be a positive int, got {groups!r}")
    if conv_weight.shape[1] * groups != x.shape[1] or conv_weight.shape[0] % groups:
        raise ValueError(f"fused_resnet: conv_weight {tuple(conv_weight.shape)} with groups={groups} does not "
                         f"take {x.shape[1]} input channels")
    if conv_weight.device != x.device:
        raise ValueError(f"fused_resnet: conv_weight is on {conv_weight.device} but the input is on {x.device}")


def _seconds(fn, device: torch.device) -> float:
    """The time of one call of fn: triton.testing.do_bench on CUDA (CUDA events, L2 flushed); on CPU the
    fastest of three calls after a warm-up one (the least disturbed by other programs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=3, rep=10) * 1e-3
    import time

    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _measure(backend, x, weight, stride, padding, dilation, groups, prologue, train: bool, kind: str):
    """measure(impl) -> seconds of one convolution with its epilogue (the statistics, the eval bias + ReLU, or
    none for kind "conv_plain")
    and, when training, its backward (dgrad + wgrad as the backward runs them), on these inputs: for
    dispatch.conv_choice's per-shape choice."""
    def measure(impl: str) -> float:
        fns = dispatch.conv_functions(impl, backend)
        eval_epilogue = kind == "conv_bias"
        bias = torch.zeros(weight.shape[0], device=x.device, dtype=acc_dtype_of(x)) if eval_epilogue else None

        def run():
            y, _ = fns.fwd(x, weight, stride, padding, dilation, groups, prologue=prologue,
                           stats=kind in ("conv", "bn_conv"), bias=bias, relu=eval_epilogue)
            if train and fns.backward is not None:
                fns.backward(y, x, weight, stride, padding, dilation, groups, prologue)
            elif train:
                fns.dgrad(y, weight, x.shape, stride, padding, dilation, groups, x.dtype, _out_format(x))
                fns.wgrad(y, x, weight.shape, stride, padding, dilation, groups, weight.dtype, prologue)

        with torch.no_grad():
            return _seconds(run, x.device)

    return measure


def _choose(backend, x, weight, stride, padding, dilation, groups, prologue, kind) -> str:
    train = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # Measurable only with real tensors outside torch.compile / tracing (else a cached choice or the heuristic).
    measurable = eager(x, weight, *(prologue[:4] if prologue is not None else ()))
    return dispatch.conv_choice(backend, x, weight, stride, padding, dilation, groups, prologue is not None,
                                f"{kind}/{'train' if train else 'infer'}",
                                measure=_measure(backend, x, weight, stride, padding, dilation, groups, prologue,
                                                 train, kind) if measurable else None)


def conv2d(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
           backend: Optional[str] = None) -> Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` by the convolution implementation the
    dispatch chooses for it on ``backend`` (F.conv2d itself where that is "aten")."""
    _check_conv(x, weight, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    backend = backends.resolve(backend, x.device)
    dtype = conv_dtype_for(x, weight)
    xc, wc = x.to(dtype), weight.to(dtype)  # the dtype the convolution runs in (autocast's cast, once)
    impl = _choose(backend, xc, wc, stride, padding, dilation, groups, None, "conv_plain")
    if impl == "aten":
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    return conv_call(xc, wc, stride, padding, dilation, groups, impl, backend)


def conv2d_stats(x: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(y, stats): ``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` and the (count, mean, m2)
    float64 [3, K] statistics of y for the BatchNorm after it, computed in the convolution's epilogue."""
    _check_conv(x, weight, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    backend = backends.resolve(backend, x.device)
    dtype = conv_dtype_for(x, weight)
    x, weight = x.to(dtype), weight.to(dtype)
    impl = _choose(backend, x, weight, stride, padding, dilation, groups, None, "conv")
    return conv_stats_call(x, weight, stride, padding, dilation, groups, None, None, None, None, None, False, impl,
                           backend, None)


def batch_norm_act_conv2d_stats(
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
    stats: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(y, y's statistics): ``conv2d(relu?(batch_norm(x)), conv_weight, ...)`` with the BatchNorm applied in the
    convolution's prologue, never stored for backward (and, with the Triton convolutions, never stored at
    all), and y's (count, mean, m2) statistics from its epilogue. BatchNorm arguments as ``batch_norm_act``
    (``stats``: x's statistics, from the convolution that produced x); convolution arguments as ``F.conv2d``
    (no bias, zero padding given as ints)."""
    _check_conv(x, conv_weight, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    n = prepare_normalization(x, running_mean, running_var, weight, bias, training, momentum, eps,
                              num_batches_tracked, backend, process_group, stats=stats)
    dtype = conv_dtype_for(x, conv_weight)
    cw = conv_weight.to(dtype)
    if n is None:  # empty input
        r = _reference_composite(x, running_mean, running_var, weight, bias, training, momentum, eps, None, relu)
        y = torch.nn.functional.conv2d(r.to(dtype), cw, None, stride, padding, dilation, groups)
        return y, torch.zeros((3, cw.shape[0]), dtype=torch.float64, device=x.device)
    prologue = (n.mean, n.invstd, n.weight, n.bias, relu)
    # The fused prologue reads x in the GEMM dtype; a pre-BN tensor of another dtype takes the aten path.
    impl = (_choose(n.backend, x, cw, stride, padding, dilation, groups, prologue, "bn_conv") if x.dtype == dtype
            else "aten")
    return conv_stats_call(x, cw, stride, padding, dilation, groups, n.mean, n.invstd, n.weight, n.bias, n.count,
                           relu, impl, n.backend, n.group_name)


def batch_norm_act_conv(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: Optional[float],
                        eps: float, conv_weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                        relu: bool = True, num_batches_tracked: Optional[Tensor] = None,
                        backend: Optional[str] = None, process_group=None, stats: Optional[Tensor] = None) -> Tensor:
    """``conv2d(relu?(batch_norm(x)), conv_weight, ...)`` without keeping the BatchNorm's output for backward
    (``batch_norm_act_conv2d_stats`` without the statistics of the result)."""
    return batch_norm_act_conv2d_stats(x, running_mean, running_var, weight, bias, training, momentum, eps,
                                       conv_weight, stride, padding, dilation, groups, relu, num_batches_tracked,
                                       backend, process_group, stats)[0]


def conv2d_bias_act(x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor] = None, stride=1,
                    padding=0, dilation=1, groups: int = 1, relu: bool = True,
                    backend: Optional[str] = None) -> Tensor:
    """``relu?(F.conv2d(x, weight, bias, ...) [+ residual])`` in one pass over the output (eval: a BatchNorm
    folded into weight and bias). bias is read in the accumulation dtype; residual is cast to y's dtype."""
    _check_conv(x, weight, groups)
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    backend = backends.resolve(backend, x.device)
    dtype = conv_dtype_for(x, weight)
    x, weight = x.to(dtype), weight.to(dtype)
    if residual is not None and residual.dtype != dtype:
        residual = residual.to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    impl = _choose(backend, x, weight, stride, padding, dilation, groups, None, "conv_bias")
    return conv_bias_act_call(x, weight, bias.to(acc).contiguous(), residual, stride, padding, dilation, groups,
                              relu, impl, backend)
