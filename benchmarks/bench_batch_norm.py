"""Microbenchmarks of the fused BatchNorm family at every BatchNorm shape of ResNet-50 (batch 256, 224x224,
bf16, channels_last): forward (statistics + apply) and backward (reduce + elementwise) of the fused module per
backend, against eager ATen (nn.BatchNorm2d + add + ReLU, torchvision's sequence) and optionally
torch.compile of it; plus each fused kernel alone. GB/s against the device copy bandwidth of the same run.

    pytest benchmarks/bench_batch_norm.py [--providers triton,cuda,eager,compile] [--results-json F]
"""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from common import RESNET50_BN_SHAPES, calibrate, synchronize
from fused_resnet import backends
from fused_resnet.nn import BatchNormAct2d

FUSED = ("triton", "cuda", "cpu")
ROUNDS = 20


class EagerBNAct(nn.Module):
    """torchvision's sequence: bn, (+= identity), relu(inplace=True)."""

    def __init__(self, c: int, relu: bool):
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(c), relu

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return torch.relu_(y) if self.relu else y


def _skip_unless_runnable(env, provider):
    if provider not in env.providers:
        pytest.skip(f"provider {provider!r} not selected (--providers)")
    if provider in FUSED:
        ok, reason = backends.backend_status(provider, env.device)
        if not ok:
            pytest.skip(f"backend {provider!r} unavailable: {reason}")
    if provider == "compile" and env.smoke:
        pytest.skip("torch.compile is too slow for a smoke run")


def _inputs(env, c, h, epilogue):
    if env.smoke:
        c, h = min(c, 64), max(2, h // 16)
    shape = (env.batch, c, h, h)
    make = lambda: torch.randn(shape, device=env.device).to(env.dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
    return shape, make(), (make() if epilogue == "add_relu" else None), make()


def _module(provider, c, epilogue, env):
    relu = epilogue != "none"
    if provider in FUSED:
        return BatchNormAct2d(c, fuse_relu=relu, backend=provider).to(env.device)
    module = EagerBNAct(c, relu).to(env.device)
    return torch.compile(module) if provider == "compile" else module


def _record(benchmark, env, fn, *, order, shape_name, direction, provider, nbytes):
    k = calibrate(fn, env.device)
    # pytest-benchmark times each round of k calls with this timer; synchronising the device inside it
    # makes its per-iteration figures (its own table) device time per call, launch gaps amortised.
    benchmark._timer = lambda: (synchronize(env.device), time.perf_counter())[1]
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=k, warmup_rounds=1)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    gbps = nbytes / seconds / 1e9
    benchmark.extra_info.update(us=seconds * 1e6, gbps=gbps, bytes=nbytes)
    env.results.append(dict(order=order, shape=shape_name, direction=direction, provider=provider,
                            us=seconds * 1e6, gbps=gbps, pct_copy=100 * nbytes / seconds / env.copy_bytes_per_s,
                            bytes=nbytes))


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("provider", ["triton", "cuda", "cpu", "eager", "compile"])
@pytest.mark.parametrize("case", list(enumerate(RESNET50_BN_SHAPES)), ids=lambda c: c[1][0])
def test_bn_act(benchmark, bench_env, case, provider, direction):
    order, (name, c, h, epilogue) = case
    _skip_unless_runnable(bench_env, provider)
    shape, x, residual, grad = _inputs(bench_env, c, h, epilogue)
    module = _module(provider, shape[1], epilogue, bench_env)
    act = math.prod(shape) * x.element_size()
    if direction == "fwd":
        fn = lambda: module(x, residual)  # noqa: E731
        nbytes = act * (3 + (residual is not None))  # stats: read x; apply: read x (+ r), write y
    else:
        xg = x.detach().requires_grad_()
        rg = None if residual is None else residual.detach().requires_grad_()
        y = module(xg, rg)
        wrt = [t for t in (xg, rg, *module.parameters()) if t is not None]
        fn = lambda: torch.autograd.grad(y, wrt, grad, retain_graph=True)  # noqa: E731
        # reduce: read dy, x (+ y); elementwise: read dy, x (+ y), write dx (+ d residual)
        nbytes = act * (8 if residual is not None else 5)
    _record(benchmark, bench_env, fn, order=order, shape_name=f"{name} {shape[1]}x{shape[2]}",
            direction=direction, provider=provider, nbytes=nbytes)


@pytest.mark.parametrize("kernel", ["stats", "act", "reduce", "elemt"])
@pytest.mark.parametrize("provider", FUSED)
@pytest.mark.parametrize("case", list(enumerate(RESNET50_BN_SHAPES)), ids=lambda c: c[1][0])
def test_fused_kernel(benchmark, bench_env, case, provider, kernel):
    """Each pass alone, to see which one falls short of the copy bandwidth."""
    order, (name, c, h, epilogue) = case
    _skip_unless_runnable(bench_env, provider)
    ops = backends.implementation(provider)
    shape, x, residual, grad = _inputs(bench_env, c, h, epilogue)
    relu = epilogue != "none"
    c = shape[1]
    w = torch.rand(c, device=bench_env.device) + 0.5
    b = torch.rand(c, device=bench_env.device) - 0.5
    stats = ops.bn_stats(x)
    mean, invstd = ops.bn_finalize(stats, None, None, None, 0.1, 1e-5, torch.float32)
    out = ops.bn_act(x, mean, invstd, w, b, residual, relu)
    saved_out = out if residual is not None and relu else None
    sums = ops.bn_backward_reduce(grad, x, mean, invstd, w, b, saved_out, relu)
    has_out = saved_out is not None
    calls = {
        "stats": (lambda: ops.bn_stats(x), 1),
        "act": (lambda: ops.bn_act(x, mean, invstd, w, b, residual, relu), 2 + (residual is not None)),
        "reduce": (lambda: ops.bn_backward_reduce(grad, x, mean, invstd, w, b, saved_out, relu), 2 + has_out),
        "elemt": (lambda: ops.bn_backward_elemt(grad, x, mean, invstd, w, b, saved_out, sums, stats[0], relu,
                                                residual is not None), 3 + 2 * has_out),
    }
    fn, passes = calls[kernel]
    _record(benchmark, bench_env, fn, order=order, shape_name=f"{name} {c}x{shape[2]}",
            direction=kernel, provider=provider, nbytes=passes * math.prod(shape) * x.element_size())
