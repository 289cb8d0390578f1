"""Microbenchmark cases of the fused BatchNorm family at every BatchNorm shape of ResNet-50: one source for
``benchmarks/bench_batch_norm.py`` (pytest-benchmark) and ``fused-resnet micro`` (no pytest).

A case is a zero-argument callable plus the bytes the fused algorithm must move and an approximate FLOP count,
so a median time becomes GB/s (against the copy bandwidth) and FLOP/s (for the roofline chart).

Bytes: each pass reads its inputs once and writes its outputs once (activation-sized tensors only; the
per-channel vectors are noise). Eager and compile rows are charged the same bytes as the fused op they
replace, so their GB/s is "useful" bandwidth and the ratio of two rows is their speed ratio.

The roof of a case is the copy of one of its activation tensors (x -> y), timed by the same timer in the same
run: a copy moves data at the rate this working-set size allows (in cache on a CPU at small batches, from
DRAM on a GPU, whose timer flushes L2 before each call), and a BatchNorm pass streams the same tensors. A
case is "above the roof" when even its slowest quartile beats the copy's fastest quartile: then the byte
count or the roof is wrong, and the table and the chart say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import backends, dispatch
from ..nn import BatchNormAct2d
from . import stats
from .report import format_table, speedup_cell, triton_interpreted
from .timing import Ceiling, copy_bandwidth, kernel_time

# Every BatchNorm of torchvision's ResNet-50 (v1.5: stride on the 3x3 conv), as (name, C, H=W, epilogue);
# epilogue: "relu" (bn1/bn2), "add_relu" (bn3 + identity), "none" (downsample BN). Repeated blocks share a row.
RESNET50_BN_SHAPES = [
    ("stem.bn1", 64, 112, "relu"),
    ("layer1.bn1/bn2", 64, 56, "relu"),
    ("layer1.bn3", 256, 56, "add_relu"),
    ("layer1.downsample", 256, 56, "none"),
    ("layer2.0.bn1", 128, 56, "relu"),
    ("layer2.bn1/bn2", 128, 28, "relu"),
    ("layer2.bn3", 512, 28, "add_relu"),
    ("layer2.downsample", 512, 28, "none"),
    ("layer3.0.bn1", 256, 28, "relu"),
    ("layer3.bn1/bn2", 256, 14, "relu"),
    ("layer3.bn3", 1024, 14, "add_relu"),
    ("layer3.downsample", 1024, 14, "none"),
    ("layer4.0.bn1", 512, 14, "relu"),
    ("layer4.bn1/bn2", 512, 7, "relu"),
    ("layer4.bn3", 2048, 7, "add_relu"),
    ("layer4.downsample", 2048, 7, "none"),
]

FUSED = ("triton", "cuda", "cpu")
PROVIDERS = (*FUSED, "eager", "compile")  # eager: ATen nn.BatchNorm2d (+ add) + ReLU; compile: torch.compile of it
PASSES = ("fwd", "bwd")                    # the module's forward, and its backward
KERNELS = ("stats", "act", "reduce", "elemt")  # each fused pass alone
# Approximate FLOPs per element of each pass (for the roofline chart; these ops are memory-bound by ~100x):
# stats: add, mul, add; act: sub, mul, add (+ add residual) (+ max); reduce: mask, 2 for x_hat, 2 multiply-adds;
# elemt: mask, 2 for x_hat, 3 for dx (+ residual copy).
_FLOPS_PER_ELEMENT = {"stats": 3, "act": 3, "reduce": 5, "elemt": 6}


@dataclass
class MicroConfig:
    device: torch.device
    dtype: torch.dtype
    batch: int
    smoke: bool = False  # tiny shapes: exercises the harness, measures nothing meaningful


@dataclass
class Case:
    order: int        # position of the shape in RESNET50_BN_SHAPES
    shape: str        # "layer1.bn3 256x56"
    direction: str    # a PASSES or KERNELS entry
    provider: str
    fn: Callable[[], object]
    nbytes: int       # bytes the fused algorithm moves
    flops: int
    tensor_bytes: int  # one activation tensor: the size of the copy that is this case's roof


def default_config(device: torch.device, smoke: bool, batch: int | None = None) -> MicroConfig:
    # bf16 on CUDA (the product's case); fp32 on CPU, where the Triton interpreter has no bf16.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return MicroConfig(device, dtype, batch or (2 if smoke else 256), smoke)


def skip_reason(provider: str, cfg: MicroConfig) -> str | None:
    """Why ``provider`` cannot be measured here (None: it can)."""
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})"
    if provider in FUSED:
        ok, reason = backends.backend_status(provider, cfg.device)
        if not ok:
            return f"backend {provider!r} unavailable: {reason}"
    if provider == "compile" and cfg.smoke:
        return "torch.compile is too slow for a smoke run"
    return None


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


def _inputs(cfg: MicroConfig, c: int, h: int, epilogue: str):
    if cfg.smoke:
        c, h = min(c, 64), max(2, h // 16)
    shape = (cfg.batch, c, h, h)

    def make():
        return torch.randn(shape, device=cfg.device).to(cfg.dtype).contiguous(memory_format=torch.channels_last)

    return shape, make(), (make() if epilogue == "add_relu" else None), make()


def _module(provider: str, c: int, relu: bool, cfg: MicroConfig) -> nn.Module:
    if provider in FUSED:
        return BatchNormAct2d(c, fuse_relu=relu, backend=provider).to(cfg.device)
    module = EagerBNAct(c, relu).to(cfg.device)
    return torch.compile(module) if provider == "compile" else module


def module_case(cfg: MicroConfig, order: int, provider: str, direction: str) -> Case:
    """The whole module: forward (statistics + apply) or backward (reduce + elementwise)."""
    name, c, h, epilogue = RESNET50_BN_SHAPES[order]
    shape, x, residual, grad = _inputs(cfg, c, h, epilogue)
    relu = epilogue != "none"
    module = _module(provider, shape[1], relu, cfg)
    numel = math.prod(shape)
    act = numel * x.element_size()
    has_res = residual is not None
    if direction == "fwd":
        fn = lambda: module(x, residual)  # noqa: E731
        nbytes = act * (3 + has_res)  # stats: read x; apply: read x (+ r), write y
        flops = numel * (_FLOPS_PER_ELEMENT["stats"] + _FLOPS_PER_ELEMENT["act"] + has_res + relu)
    elif direction == "bwd":
        xg = x.detach().requires_grad_()
        rg = None if residual is None else residual.detach().requires_grad_()
        y = module(xg, rg)
        wrt = [t for t in (xg, rg, *module.parameters()) if t is not None]
        fn = lambda: torch.autograd.grad(y, wrt, grad, retain_graph=True)  # noqa: E731
        # reduce: read dy, x (+ y); elementwise: read dy, x (+ y), write dx (+ d residual)
        nbytes = act * (8 if has_res else 5)
        flops = numel * (_FLOPS_PER_ELEMENT["reduce"] + _FLOPS_PER_ELEMENT["elemt"])
    else:
        raise ValueError(f"direction must be one of {PASSES}, got {direction!r}")
    return Case(order, f"{name} {shape[1]}x{shape[2]}", direction, provider, fn, nbytes, flops, act)


def kernel_case(cfg: MicroConfig, order: int, provider: str, kernel: str) -> Case:
    """One fused pass alone (``provider`` must be a fused backend), to see which falls short of the copy rate."""
    if provider not in FUSED:
        raise ValueError(f"kernel cases exist for the fused backends {FUSED}, got {provider!r}")
    name, c, h, epilogue = RESNET50_BN_SHAPES[order]
    ops = dispatch.bn_implementation(provider)
    shape, x, residual, grad = _inputs(cfg, c, h, epilogue)
    relu = epilogue != "none"
    c = shape[1]
    w = torch.rand(c, device=cfg.device) + 0.5
    b = torch.rand(c, device=cfg.device) - 0.5
    stats = ops.bn_stats(x)
    mean, invstd = ops.bn_finalize(stats, None, None, None, 0.1, 1e-5, torch.float32)
    out = ops.bn_act(x, mean, invstd, w, b, residual, relu)
    saved_out = out if residual is not None and relu else None
    sums = ops.bn_backward_reduce(grad, x, mean, invstd, w, b, saved_out, relu)
    has_out, has_res = saved_out is not None, residual is not None
    calls = {
        "stats": (lambda: ops.bn_stats(x), 1),
        "act": (lambda: ops.bn_act(x, mean, invstd, w, b, residual, relu), 2 + has_res),
        "reduce": (lambda: ops.bn_backward_reduce(grad, x, mean, invstd, w, b, saved_out, relu), 2 + has_out),
        "elemt": (lambda: ops.bn_backward_elemt(grad, x, mean, invstd, w, b, saved_out, sums, stats[0], relu,
                                                has_res), 3 + 2 * has_out),
    }
    if kernel not in calls:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    fn, passes = calls[kernel]
    numel = math.prod(shape)
    flops = numel * (_FLOPS_PER_ELEMENT[kernel] + (kernel == "act") * (has_res + relu))
    act = numel * x.element_size()
    return Case(order, f"{name} {c}x{shape[2]}", kernel, provider, fn, passes * act, flops, act)


class CopyRoofs:
    """The copy roof per tensor size, measured once per size in the run (see the module docstring)."""

    def __init__(self, cfg: MicroConfig, rounds: int = 20, timer: Callable = kernel_time):
        self.cfg, self.rounds, self.timer, self.by_size = cfg, rounds, timer, {}

    def __call__(self, tensor_bytes: int) -> Ceiling:
        if tensor_bytes not in self.by_size:
            self.by_size[tensor_bytes] = copy_bandwidth(self.cfg.device, 2 * tensor_bytes, rounds=self.rounds,
                                                        dtype=self.cfg.dtype, timer=self.timer)
        return self.by_size[tensor_bytes]

    def to_list(self) -> list[dict]:
        return [c.to_dict() for _, c in sorted(self.by_size.items())]


def result_row(case: Case, seconds: stats.Summary, roof: Ceiling) -> dict:
    """The JSON record of one measured case (``seconds``: per call; ``roof``: the copy at its tensor size)."""
    copy_fastest = roof.work / roof.time.q1 if roof.time.q1 > 0 else math.inf
    return dict(order=case.order, shape=case.shape, direction=case.direction, provider=case.provider,
                interpreted=case.provider == "triton" and triton_interpreted(),
                time_us=seconds.scaled(1e6).to_dict(), moved_bytes=case.nbytes, flop=case.flops,
                gb_per_s=case.nbytes / seconds.median / 1e9, tflop_per_s=case.flops / seconds.median / 1e12,
                copy_gb_per_s=roof.rate / 1e9, of_copy_pct=100 * case.nbytes / seconds.median / roof.rate,
                above_roof=bool(case.nbytes / seconds.q3 > copy_fastest))


def measure(case: Case, cfg: MicroConfig, roofs: CopyRoofs, rounds: int = 20) -> dict:
    return result_row(case, kernel_time(case.fn, cfg.device, rounds=rounds), roofs(case.tensor_bytes))


def add_speedups(results: list[dict]) -> None:
    """``speedup_vs_eager`` per record: eager's time over this one's at the same shape and pass, with the
    quartile range (stats.ratio); None for eager and where eager was not measured."""
    eager = {(r["shape"], r["direction"]): r for r in results if r["provider"] == "eager"}
    for r in results:
        base = eager.get((r["shape"], r["direction"]))
        r["speedup_vs_eager"] = (stats.ratio(stats.from_dict(base["time_us"]), stats.from_dict(r["time_us"]))
                                 if base and r is not base else None)


def plan(cfg: MicroConfig, providers: list[str], shapes: list[int] | None = None, kernels: bool = True):
    """The (builder, order, provider, direction) list a run measures, skipping providers that cannot run.
    Returns (plan, {provider: skip reason})."""
    runnable, skipped = [], {}
    for p in providers:
        reason = skip_reason(p, cfg)
        if reason:
            skipped[p] = reason
        else:
            runnable.append(p)
    orders = list(range(len(RESNET50_BN_SHAPES))) if shapes is None else shapes
    items = [(module_case, o, p, d) for o in orders for d in PASSES for p in runnable]
    if kernels:
        items += [(kernel_case, o, p, k) for o in orders for k in KERNELS for p in runnable if p in FUSED]
    return items, skipped


def table(results: list[dict], providers: list[str]) -> str:
    """One row per measured case, ordered by shape, pass, provider: the median time with its spread, GB/s,
    the percentage of the same-size copy's rate, and the speed-up over eager ATen."""
    order = {p: i for i, p in enumerate(providers)}
    direction_order = {d: i for i, d in enumerate((*PASSES, *KERNELS))}
    rows = []
    for r in sorted(results, key=lambda r: (r["order"], direction_order.get(r["direction"], 9),
                                            order.get(r["provider"], 99))):
        t = r["time_us"]
        pct = f"{r['of_copy_pct']:.0f}" + (" ABOVE ROOF" if r.get("above_roof") else "")
        rows.append([r["shape"], r["direction"], r["provider"],
                     f"{t['median']:,.1f} ({t['iqr_pct']:.0f}%, min {t['min']:,.1f})", r["gb_per_s"], pct,
                     speedup_cell(r.get("speedup_vs_eager")) if r["provider"] != "eager" else "reference"])
    return format_table(["shape", "pass", "provider", "time us: median (IQR, min)", "GB/s",
                         "% of same-size copy", "speed-up vs eager"], rows)


def noise_warnings(results: list[dict]) -> list[str]:
    """One line per noisy case (IQR > 10% of the median) and per case above its roof."""
    lines = []
    noisy = [r for r in results if r["time_us"]["noisy"]]
    if noisy:
        worst = max(noisy, key=lambda r: r["time_us"]["iqr_pct"])
        lines.append(f"warning: {len(noisy)} of {len(results)} cases have noisy times (IQR > "
                     f"{100 * stats.NOISY_REL_IQR:.0f}% of the median; worst {worst['shape']} {worst['direction']} "
                     f"{worst['provider']}: {worst['time_us']['iqr_pct']:.0f}%). More --rounds, and fewer other "
                     "programs running, narrow it.")
    for r in results:
        if r.get("above_roof"):
            lines.append(f"warning: {r['shape']} {r['direction']} {r['provider']} runs above its copy roof "
                         f"({r['gb_per_s']:.1f} GB/s vs a same-size copy at {r['copy_gb_per_s']:.1f} GB/s): "
                         "its byte count over-charges it, or the copy is not the ceiling at this size")
    return lines
