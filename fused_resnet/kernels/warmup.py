"""Compile fused_resnet's Triton kernels for ResNet-50 on this GPU ahead of time, in parallel processes.

Triton compiles a kernel on its first launch, one variant after another: a ResNet-50 training step needs
about 80 variants per dtype (distinct convolution shapes x forward / dgrad / wgrad x epilogues, and the
BatchNorm kernels), a few seconds each. The first step (or a benchmark's warm-up) would spend minutes
compiling. This tool records the launches the launchers would make at batch 256 (kernels/launch_plan.py) and
compiles the distinct ones with ``JITFunction.warmup`` in ``--jobs`` processes; the results land in Triton's
on-disk cache (TRITON_CACHE_DIR), from which the real launches then load them.

    python -m fused_resnet.kernels.warmup [--dtypes bf16,fp32] [--jobs 16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _distinct_launches(dtypes) -> list:
    from .launch_plan import key, record_resnet50

    undo = []

    def setattr_(obj, name, value):
        undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        launches = record_resnet50(setattr_, dtypes=dtypes)
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
    unique: dict = {}
    for launch in launches:
        unique.setdefault(key(launch), launch)
    return list(unique.values())


def _compile_share(args) -> tuple[int, list]:
    """Worker: compile every ``jobs``-th distinct launch starting at ``index`` on the current GPU."""
    index, jobs, dtype_names = args
    from triton.runtime.jit import MockTensor

    launches = _distinct_launches([DTYPES[d] for d in dtype_names])[index::jobs]
    failures = []
    for launch in launches:
        fn = launch.kernel
        # Tensors become MockTensors of their dtype (data_ptr 0: aligned, as real allocations are).
        args_ = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
        kwargs = {k: (MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v) for k, v in launch.kwargs.items()}
        try:
            fn.warmup(*args_, grid=launch.grid, **kwargs)
        except Exception as exc:  # reported, never fatal: the real launch compiles it again
            failures.append(f"{fn.fn.__name__} [{launch.label}]: {type(exc).__name__}: {str(exc)[:300]}")
    return len(launches), failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated from {', '.join(DTYPES)}")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not torch.cuda.is_available():
        print("warmup: needs a CUDA device (the kernels are compiled for it)", file=sys.stderr)
        return 2
    if any(d not in DTYPES for d in names):
        print(f"warmup: --dtypes takes {', '.join(DTYPES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    total, failures = 0, []
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        for n, fails in pool.map(_compile_share, [(i, args.jobs, names) for i in range(args.jobs)]):
            total += n
            failures += fails
    print(f"warmup: {total} kernel variants compiled in {time.perf_counter() - t0:.0f} s with {args.jobs} "
          f"processes; {len(failures)} failed")
    for f in failures[:20]:
        print("  " + f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
