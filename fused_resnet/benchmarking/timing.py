"""Device-synchronised timing and the device ceilings every figure is reported against.

All timings are medians of device-synchronised rounds after warm-up. On CUDA the host clock around a
synchronised round measures device time once launch gaps are amortised (``calibrate`` sizes the rounds).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(fn: Callable[[], object], device: torch.device, min_round_s: float = 2e-3, warmup: int = 3) -> int:
    """Warm ``fn`` up (compilation, autotuning, allocator) and return k, the number of back-to-back calls a
    timed round needs to last at least ``min_round_s`` (amortising launch gaps and the final sync)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    k = 1
    while k < 4096:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        if time.perf_counter() - t0 >= min_round_s:
            break
        k *= 2
    return k


def time_per_call(fn: Callable[[], object], device: torch.device, rounds: int = 25) -> float:
    """Median seconds per call over ``rounds`` rounds of k calls each, device-synchronised."""
    k = calibrate(fn, device)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / k)
    return statistics.median(samples)


def timed_steps(fn: Callable[[], object], device: torch.device, steps: int, warmup: int,
                on_step: Callable[[], None] | None = None) -> tuple[float, float]:
    """Run ``fn`` ``warmup`` times, then ``steps`` timed times, each synchronised on its own (a training step is
    long enough not to need batching). Returns (median seconds per step, peak bytes allocated on the device
    during the timed steps; NaN off CUDA). ``on_step`` is called after every call (progress reporting)."""
    for _ in range(warmup):
        fn()
        if on_step:
            on_step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if on_step:
            on_step()
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written) of a large same-device copy."""
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, rounds=15)
    return 2 * n * src.element_size() / seconds


def matmul_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul rate in FLOP/s of an n x n x n product (2 n^3 FLOPs): the compute roof."""
    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    seconds = time_per_call(lambda: a @ b, device, rounds=10)
    return 2 * n ** 3 / seconds
