"""Benchmark session setup: device, sizes, the copy-bandwidth ceiling, and the summary table.

    pytest benchmarks/bench_batch_norm.py                      # CUDA: ResNet-50 shapes, batch 256, bf16
    pytest benchmarks/bench_batch_norm.py --smoke              # any device: tiny sizes, checks the harness
    pytest benchmarks/bench_batch_norm.py --results-json out.json --providers triton,cuda,eager,compile
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

from common import copy_bandwidth  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fused_resnet benchmarks")
    group.addoption("--smoke", action="store_true",
                    help="tiny sizes on any device: exercises the harness, measures nothing meaningful")
    group.addoption("--providers", default="triton,cuda,eager",
                    help="comma-separated: triton, cuda, cpu, eager (ATen nn.BatchNorm2d), compile "
                         "(torch.compile of the eager composite)")
    group.addoption("--batch", type=int, default=None, help="batch size (default 256; 2 with --smoke)")
    group.addoption("--results-json", default=None, help="also write every measurement to this file")


@dataclass
class BenchEnv:
    device: torch.device
    dtype: torch.dtype
    batch: int
    smoke: bool
    providers: list
    copy_bytes_per_s: float
    results: list = field(default_factory=list)


_ENV: BenchEnv | None = None


@pytest.fixture(scope="session")
def bench_env(request) -> BenchEnv:
    global _ENV
    if _ENV is None:
        smoke = request.config.getoption("--smoke")
        cuda = torch.cuda.is_available()
        if not cuda and not smoke:
            pytest.skip("benchmarks measure CUDA kernels: no CUDA device here (use --smoke to check the harness)")
        device = torch.device("cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32  # the Triton interpreter has no bf16
        batch = request.config.getoption("--batch") or (2 if smoke else 256)
        providers = [p.strip() for p in request.config.getoption("--providers").split(",") if p.strip()]
        if smoke and not cuda:
            providers = [p.replace("cuda", "cpu") for p in providers]
        bw = copy_bandwidth(device, nbytes=(1 << 22) if smoke else (1 << 30))
        _ENV = BenchEnv(device, dtype, batch, smoke, providers, bw)
    return _ENV


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _ENV is None or not _ENV.results:
        return
    env = _ENV
    tr = terminalreporter
    name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    tr.write_sep("=", "fused BatchNorm microbenchmarks")
    tr.write_line(f"device {name} | torch {torch.__version__} | dtype {str(env.dtype).split('.')[-1]} | "
                  f"batch {env.batch} | channels_last | copy bandwidth {env.copy_bytes_per_s / 1e9:.0f} GB/s "
                  "(read + write)")
    tr.write_line("GB/s = bytes the fused algorithm must move (each pass reads its inputs once, writes its "
                  "outputs once) / median time; eager rows use the same byte count.")
    providers = [p for p in env.providers if any(r["provider"] == p for r in env.results)]
    direction_order = {d: i for i, d in enumerate(("fwd", "bwd", "stats", "act", "reduce", "elemt"))}
    keys = sorted({(r["order"], direction_order.get(r["direction"], 9), r["shape"], r["direction"])
                   for r in env.results})
    header = f"| {'shape':<22} | {'pass':<6} | " + " | ".join(f"{p + ' us':>10} | {'GB/s':>5} | {'%copy':>5}" for p in providers)
    if "eager" in providers:
        header += " | " + " | ".join(f"{p + '/eager':>12}" for p in providers if p != "eager")
    tr.write_line(header)
    index = {(r["shape"], r["direction"], r["provider"]): r for r in env.results}
    for _, _, shape, direction in keys:
        cells = []
        for p in providers:
            r = index.get((shape, direction, p))
            cells.append(f"{r['us']:>10.1f} | {r['gbps']:>5.0f} | {r['pct_copy']:>5.0f}" if r else
                         f"{'-':>10} | {'-':>5} | {'-':>5}")
        line = f"| {shape:<22} | {direction:<6} | " + " | ".join(cells)
        if "eager" in providers:
            base = index.get((shape, direction, "eager"))
            ratios = []
            for p in providers:
                if p == "eager":
                    continue
                r = index.get((shape, direction, p))
                ratios.append(f"{base['us'] / r['us']:>11.2f}x" if r and base else f"{'-':>12}")
            line += " | " + " | ".join(ratios)
        tr.write_line(line)
    path = config.getoption("--results-json")
    if path:
        with open(path, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "batch": env.batch,
                       "dtype": str(env.dtype), "copy_bytes_per_s": env.copy_bytes_per_s,
                       "results": env.results}, f, indent=1)
        tr.write_line(f"results written to {path}")
