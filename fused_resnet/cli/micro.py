"""``fused-resnet micro``: the kernel microbenchmarks of benchmarks/bench_batch_norm.py without pytest, at every
BatchNorm shape of ResNet-50: the fused module's forward and backward per provider (fused backends, eager ATen,
optionally torch.compile of eager) and each fused pass alone. Reported as GB/s against the device copy
bandwidth and FLOP/s against the matmul rate, both measured in the same run (a roofline chart).

Defaults: CUDA batch 256, bf16, providers triton,cuda,eager; CPU batch 8, fp32, providers cpu,eager.

Timing: on CUDA triton.testing.do_bench (CUDA events, L2 flushed before each call; --rounds x 5 ms of
repetitions), on CPU torch.utils.benchmark.Timer on one thread (--rounds blocks of >= 10 ms; on a shared
machine a multi-threaded kernel waits for the scheduler, see fused_resnet/benchmarking/timing.py).
Each case reports the median with its spread (IQR as % of the median, min); noisy cases are warned about.
The roof of each case is a copy of one of its tensors, timed the same way in the same run.
"""
from __future__ import annotations

import argparse

import torch

from ..benchmarking import micro
from ..benchmarking.report import INTERPRETER_BANNER, busy_machine_warning, dtype_name
from ..benchmarking.timing import CPU_KERNEL_THREADS, copy_bandwidth, matmul_rate
from . import plots
from .common import (CLIError, Progress, ResultWriter, add_batch_argument, add_common_arguments, positive_int,
                     resolve_device, result_document)

HELP = "kernel microbenchmarks (GB/s, FLOP/s) against the measured copy bandwidth and matmul rate"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("micro", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default=None,
                   help=f"comma-separated from {', '.join(micro.PROVIDERS)} (default: triton,cuda,eager on CUDA, "
                        "cpu,eager on CPU)")
    add_batch_argument(p, None, "default 256 (CUDA), 8 (CPU)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated substrings of the shape names to keep (e.g. layer1,stem); default all")
    p.add_argument("--no-kernels", action="store_true", help="only the module forward/backward, not each pass")
    p.add_argument("--rounds", type=positive_int, default=20, help="timed rounds per case (median)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the harness, measures nothing useful")
    add_common_arguments(p, "fused_resnet_results")
    p.set_defaults(run=run)


def _shapes(spec: str | None) -> list[int]:
    names = [n for n, *_ in micro.RESNET50_BN_SHAPES]
    if spec is None:
        return list(range(len(names)))
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    orders = [i for i, n in enumerate(names) if any(w in n for w in wanted)]
    if not orders:
        raise CLIError(f"--shapes {spec!r} matches no shape; the shapes are: {', '.join(names)}")
    return orders


def run(args) -> int:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    cfg = micro.default_config(device, args.smoke, args.batch or (None if cuda or args.smoke else 8))
    if cfg.batch < 2:
        raise CLIError("--batch must be >= 2: training-mode BatchNorm needs more than one value per channel")
    args.batch = cfg.batch  # the batch in use, for main()'s out-of-memory message
    providers = [p.strip() for p in (args.providers or ("triton,cuda,eager" if cuda else "cpu,eager")).split(",")
                 if p.strip()]
    unknown = [p for p in providers if p not in micro.PROVIDERS]
    if unknown or not providers:
        raise CLIError(f"unknown provider(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(micro.PROVIDERS)}")
    items, skipped = micro.plan(cfg, providers, _shapes(args.shapes), kernels=not args.no_kernels)
    if not items:
        raise CLIError("no provider can run here: " + "; ".join(f"{p}: {r}" for p, r in skipped.items()))
    with ResultWriter(args.out) as writer:
        roofs = micro.CopyRoofs(cfg, rounds=args.rounds)
        with Progress(2 + len(items), "micro", enabled=not args.quiet) as bar:
            bar.info = "copy bandwidth"
            bw = copy_bandwidth(device, nbytes=(1 << 22) if args.smoke else (1 << 30) if cuda else (1 << 26),
                                rounds=args.rounds)
            bar.update(info="matmul rate")
            mm_dtype = torch.bfloat16 if cuda else torch.float32
            mm = matmul_rate(device, n=256 if args.smoke else 8192 if cuda else 1024, dtype=mm_dtype,
                             rounds=args.rounds)
            bar.update()
            results = []
            for build, order, provider, direction in items:
                case = build(cfg, order, provider, direction)
                bar.info = f"{case.shape} {direction} {provider}"
                results.append(micro.measure(case, cfg, roofs, rounds=args.rounds))
                del case
                bar.update()
        micro.add_speedups(results)
        dtype = dtype_name(cfg.dtype)
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        timer = "do_bench" if cuda else f"timed on {CPU_KERNEL_THREADS} thread"
        title = (f"BN family at ResNet-50 shapes, batch {cfg.batch}, {dtype}, channels_last | {name}, {timer} | "
                 f"copy {bw.rate / 1e9:,.1f} GB/s ({bw.detail['tensor_bytes'] / 2**20:.0f} MiB), "
                 f"matmul {mm.rate / 1e12:.2f} TFLOP/s ({dtype_name(mm_dtype)})")
        print("\n" + title)
        interpreted = any(r["interpreted"] for r in results)
        if interpreted:
            print(INTERPRETER_BANNER)
        for p, reason in skipped.items():
            print(f"skipped {p}: {reason}")
        print("GB/s = bytes the fused algorithm must move / median time; eager and compile rows are charged the "
              "same bytes. % of same-size copy: against a copy of one of the case's tensors, timed the same way.")
        print(micro.table(results, providers))
        for line in micro.noise_warnings(results):
            print(line)
        if busy := busy_machine_warning(device):
            print(busy)
        if interpreted:
            print(INTERPRETER_BANNER)
        config = dict(batch=cfg.batch, dtype=dtype, smoke=cfg.smoke, providers=providers, rounds=args.rounds,
                      timer="triton.testing.do_bench" if cuda else "torch.utils.benchmark.Timer",
                      timer_threads=None if cuda else CPU_KERNEL_THREADS,
                      shapes=[micro.RESNET50_BN_SHAPES[o][0] for o in _shapes(args.shapes)])
        doc = result_document("micro", getattr(args, "argv", None), device, config, results,
                              roof=dict(copy=bw.to_dict(), matmul=mm.to_dict(), copy_by_size=roofs.to_list()),
                              skipped=skipped)
        writer.write_json("micro.json", doc)
        writer.chart("micro.png", plots.roofline_chart, results, doc["roof"], title.replace(" | ", "\n", 1))
        writer.finish()
    return 0
