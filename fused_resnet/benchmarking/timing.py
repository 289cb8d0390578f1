"""Timers for every device, and the device ceilings (copy bandwidth, matmul rate) figures are reported against.

Every timer returns all its samples, summarised by ``stats.summarize`` (median, quartiles, min, max): a result
file carries the samples and the summary, and a noisy figure says so.

Kernels (a call that can be repeated without changing what it measures):
  CUDA  ``triton.testing.do_bench``: CUDA events around each call, the L2 cache flushed before each call,
        warm-up and repetitions sized by time; every per-call time is kept (``return_mode="all"``, in Triton
        3.6 and 3.9 alike). Without Triton: CUDA events around each call, no L2 flush.
  CPU   ``torch.utils.benchmark.Timer`` on ``CPU_KERNEL_THREADS`` thread (the Timer's own default): a sample
        is one block of calls sized to last at least ``CPU_MIN_BLOCK_S``, divided by its calls (``rounds``
        samples, or at least CPU_MIN_SAMPLES once CPU_MAX_TIME_S is spent on slow calls). One thread,
        because on a shared machine a multi-threaded region waits at its barrier for the slowest thread's
        next time slice: measured here (2 cores shared), a 25 MB copy took 4.6 ms on one thread and 8.4 ms,
        every time, on two, and a 0.8 MB copy 30 us on one thread and 8 ms on two while another process
        ran. Those are the "8,000 or 16,000 us" figures: the scheduler's slices, not the kernel.
Training steps (each call changes the model, so no call is repeated for the timer's sake): one sample per
  step, each step synchronised on its own, host clock (steps are long enough for the sync not to matter).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .stats import Summary, summarize

CPU_MIN_BLOCK_S = 10e-3
CPU_KERNEL_THREADS = 1
CPU_MIN_SAMPLES, CPU_MAX_TIME_S = 3, 1.0
CUDA_WARMUP_MS = 25


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(fn: Callable[[], object], device: torch.device, min_round_s: float = 2e-3, warmup: int = 3) -> int:
    """Warm ``fn`` up (compilation, autotuning, allocator) and return k, the number of back-to-back calls a
    synchronised round needs to last at least ``min_round_s`` (for timers that time rounds, e.g.
    pytest-benchmark's)."""
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


def kernel_time(fn: Callable[[], object], device: torch.device, rounds: int = 20) -> Summary:
    """Seconds per call of ``fn``: the summary of all samples (see the module docstring for the timer per
    device). ``rounds``: the number of samples on CPU; on CUDA, ``5 * rounds`` ms of repetitions (at least
    ``rounds`` samples)."""
    if device.type == "cuda":
        return _cuda_time(fn, device, rounds)
    return _cpu_time(fn, rounds)


def _cpu_time(fn: Callable[[], object], rounds: int) -> Summary:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=CPU_KERNEL_THREADS)
    fn()  # warm-up: allocator, one-time dispatch work
    number, block_s = 1, timer.timeit(1).median
    first = [block_s]  # a one-call block after the warm-up is a sample like the others
    while block_s < CPU_MIN_BLOCK_S and number < 1 << 20:
        # Grow towards the block size the last block predicts (x1.2), at least doubling, at most x64.
        number = min(max(2 * number, math.ceil(1.2 * number * CPU_MIN_BLOCK_S / max(block_s, 1e-9))), 64 * number)
        block_s = timer.timeit(number).median * number
        first = []
    samples, spent = first, sum(first)
    # Slow calls (Triton's interpreter: seconds each) stop at CPU_MIN_SAMPLES once CPU_MAX_TIME_S is spent.
    while len(samples) < rounds and (len(samples) < CPU_MIN_SAMPLES or spent < CPU_MAX_TIME_S):
        samples.append(timer.timeit(number).median)
        spent += samples[-1] * number
    return summarize(samples)


def _cuda_time(fn: Callable[[], object], device: torch.device, rounds: int) -> Summary:
    rep_ms = 5 * rounds
    with torch.cuda.device(device):
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            times_ms = do_bench(fn, warmup=CUDA_WARMUP_MS, rep=rep_ms, return_mode="all")
            if len(times_ms) >= rounds:
                return summarize(t * 1e-3 for t in times_ms)
        return _cuda_event_time(fn, rep_ms, rounds)


def _cuda_event_time(fn: Callable[[], object], rep_ms: float, rounds: int) -> Summary:
    """CUDA events around each call, after warm-up; as many calls as fit in ``rep_ms`` (at least ``rounds``)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(CUDA_WARMUP_MS / estimate_ms))):
        fn()
    n = min(max(rounds, int(rep_ms / estimate_ms)), 100_000)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return summarize(s.elapsed_time(e) * 1e-3 for s, e in events)


def round_time(fn: Callable[[], object], device: torch.device, rounds: int = 20) -> Summary:
    """Seconds per call from synchronised rounds of k back-to-back calls (``calibrate``), host clock: what
    pytest-benchmark's rounds measure, for the roofs of benchmarks/ (a case and its roof timed alike; unlike
    ``kernel_time`` on CUDA, caches stay warm between the calls of a round)."""
    k = calibrate(fn, device)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / k)
    return summarize(samples)


def step_times(fn: Callable[[], object], device: torch.device, steps: int, warmup: int,
               on_step: Callable[[], None] | None = None) -> tuple[Summary, float]:
    """Run ``fn`` ``warmup`` times, then ``steps`` timed times, each synchronised on its own. Returns (the
    summary of the seconds per step, peak bytes allocated on the device during the timed steps; NaN off
    CUDA). ``on_step`` is called after every call (progress reporting)."""
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
    return summarize(times), peak


@dataclass
class Ceiling:
    """A device ceiling measured in this run: ``work`` (bytes moved, or FLOP) per call of a reference
    operation, and the summary of its seconds per call."""

    kind: str          # "copy" or "matmul"
    work: float
    time: Summary
    detail: dict

    @property
    def rate(self) -> float:
        """Bytes/s or FLOP/s at the median time."""
        return self.work / self.time.median

    def to_dict(self) -> dict:
        if self.kind == "copy":
            return dict(moved_bytes=self.work, gb_per_s=self.rate / 1e9, time_us=self.time.scaled(1e6).to_dict(),
                        **self.detail)
        return dict(flop=self.work, tflop_per_s=self.rate / 1e12, time_us=self.time.scaled(1e6).to_dict(),
                    **self.detail)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, rounds: int = 15,
                   dtype: torch.dtype = torch.bfloat16, timer: Callable = kernel_time) -> Ceiling:
    """Same-device copy of a tensor of ``nbytes / 2`` bytes: rate = bytes read + bytes written per second,
    timed by ``timer`` (that of the figures it is the ceiling of)."""
    n = max(nbytes // 2 // torch.empty((), dtype=dtype).element_size(), 1)
    src = torch.randn(n, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src), device, rounds=rounds)
    return Ceiling("copy", 2 * n * src.element_size(), seconds, dict(tensor_bytes=n * src.element_size()))


def matmul_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                rounds: int = 10) -> Ceiling:
    """Dense matmul of n x n by n x n (2 n^3 FLOP): the compute roof."""
    from .report import dtype_name

    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    seconds = kernel_time(lambda: a @ b, device, rounds=rounds)
    return Ceiling("matmul", 2 * n ** 3, seconds, dict(n=n, dtype=dtype_name(dtype)))
