"""Benchmark session setup: device, sizes, the copy-bandwidth ceiling, and the summary table.

    pytest benchmarks/bench_batch_norm.py                      # CUDA: ResNet-50 shapes, batch 256, bf16
    pytest benchmarks/bench_batch_norm.py --smoke              # any device: tiny sizes, checks the harness
    pytest benchmarks/bench_batch_norm.py --results-json out.json --providers triton,cuda,eager,compile
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_resnet.benchmarking import micro  # noqa: E402
from fused_resnet.benchmarking.report import INTERPRETER_BANNER, dtype_name, result_document, write_json  # noqa: E402
from fused_resnet.benchmarking.timing import CPU_KERNEL_THREADS, Ceiling, copy_bandwidth, round_time  # noqa: E402


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
    copy: Ceiling                 # the large copy: the device's copy bandwidth
    roofs: micro.CopyRoofs        # the copy at each case's tensor size: each case's roof
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
        if not cuda:
            # As `fused-resnet micro` times CPU kernels (fused_resnet/benchmarking/timing.py): on a shared
            # machine a multi-threaded region waits for the scheduler, which is not the kernel's time.
            torch.set_num_threads(CPU_KERNEL_THREADS)
        # The roofs are timed like the cases: pytest-benchmark's synchronised rounds of k calls.
        bw = copy_bandwidth(cfg.device, nbytes=(1 << 22) if smoke else (1 << 30), timer=round_time)
        _ENV = BenchEnv(cfg, providers, bw, micro.CopyRoofs(cfg, timer=round_time))
    return _ENV


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _ENV is None or not _ENV.results:
        return
    env = _ENV
    tr = terminalreporter
    micro.add_speedups(env.results)
    name = torch.cuda.get_device_name(env.cfg.device) if env.cfg.device.type == "cuda" else "cpu"
    interpreted = any(r["interpreted"] for r in env.results)
    tr.write_sep("=", "fused BatchNorm microbenchmarks")
    if interpreted:
        tr.write_line(INTERPRETER_BANNER)
    tr.write_line(f"device {name} | torch {torch.__version__} | dtype {dtype_name(env.cfg.dtype)} | "
                  f"batch {env.cfg.batch} | channels_last | copy bandwidth {env.copy.rate / 1e9:.1f} GB/s "
                  "(read + write)")
    tr.write_line("times: pytest-benchmark rounds of k calls, synchronised, divided by k; GB/s = bytes the fused "
                  "algorithm must move (each pass reads its inputs once, writes its outputs once) / median time; "
                  "eager rows use the same byte count; % of a copy of one of the case's tensors.")
    for line in micro.table(env.results, env.providers).splitlines() + micro.noise_warnings(env.results):
        tr.write_line(line)
    if interpreted:
        tr.write_line(INTERPRETER_BANNER)
    path = config.getoption("--results-json")
    if path:
        cfg = dict(batch=env.cfg.batch, dtype=dtype_name(env.cfg.dtype), smoke=env.cfg.smoke,
                   providers=env.providers, timer="pytest-benchmark (pedantic, synchronised rounds)",
                   timer_threads=torch.get_num_threads() if env.cfg.device.type == "cpu" else None)
        doc = result_document("bench_batch_norm", config.invocation_params.args, env.cfg.device, cfg, env.results,
                              roof=dict(copy=env.copy.to_dict(), copy_by_size=env.roofs.to_list()))
        write_json(path, doc)
        tr.write_line(f"results written to {path}")
