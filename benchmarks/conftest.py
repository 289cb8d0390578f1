"""Benchmark session setup: device, sizes, the copy-bandwidth ceiling, and the summary table.

    pytest benchmarks/bench_batch_norm.py                      # CUDA: ResNet-50 shapes, batch 256, bf16
    pytest benchmarks/bench_batch_norm.py --smoke              # any device: tiny sizes, checks the harness
    pytest benchmarks/bench_batch_norm.py --results-json out.json --providers triton,cuda,eager,compile
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_resnet.benchmarking import micro  # noqa: E402
from fused_resnet.benchmarking.timing import copy_bandwidth  # noqa: E402


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
    cfg: micro.MicroConfig
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
        cfg = micro.default_config(torch.device("cuda" if cuda else "cpu"), smoke, request.config.getoption("--batch"))
        providers = [p.strip() for p in request.config.getoption("--providers").split(",") if p.strip()]
        if smoke and not cuda:
            providers = [p.replace("cuda", "cpu") for p in providers]
        bw = copy_bandwidth(cfg.device, nbytes=(1 << 22) if smoke else (1 << 30))
        _ENV = BenchEnv(cfg, providers, bw)
    return _ENV


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _ENV is None or not _ENV.results:
        return
    env = _ENV
    tr = terminalreporter
    name = torch.cuda.get_device_name(env.cfg.device) if env.cfg.device.type == "cuda" else "cpu"
    tr.write_sep("=", "fused BatchNorm microbenchmarks")
    tr.write_line(f"device {name} | torch {torch.__version__} | dtype {str(env.cfg.dtype).split('.')[-1]} | "
                  f"batch {env.cfg.batch} | channels_last | copy bandwidth {env.copy_bytes_per_s / 1e9:.0f} GB/s "
                  "(read + write)")
    tr.write_line("GB/s = bytes the fused algorithm must move (each pass reads its inputs once, writes its "
                  "outputs once) / median time; eager rows use the same byte count.")
    for line in micro.table(env.results, env.providers):
        tr.write_line(line)
    path = config.getoption("--results-json")
    if path:
        with open(path, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "batch": env.cfg.batch,
                       "dtype": str(env.cfg.dtype), "copy_bytes_per_s": env.copy_bytes_per_s,
                       "results": env.results}, f, indent=1)
        tr.write_line(f"results written to {path}")
