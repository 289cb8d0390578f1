"""``fused-resnet memory``: where a training step's memory goes, eager vs fused, per stage (stem, layer1..4,
head): bytes saved for backward (saved_tensors_hooks, any device) and, on CUDA, the peak allocated during
each stage's forward and during the backward + update (torch.cuda memory statistics), plus the allocation
history of the caching allocator over one step, also written as memory_snapshot_<variant>.pickle for
PyTorch's memory viewer (https://pytorch.org/memory_viz). On CPU the timeline is the running total of saved
bytes through the forward. The chart's timeline has one unit per stage, so eager and fused line up by layer.

Defaults: CUDA ResNet-50, batch 256, 224x224, bf16; CPU ResNet-50, batch 4, 128x128, fp32.
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from .. import backends
from ..benchmarking import e2e
from ..benchmarking.memory import (STAGES, STEP_STAGES, SavedTensorCounter, allocation_timeline_cuda, downsample,
                                   stage_peaks_cuda)
from ..models import BUILDERS
from . import plots
from .common import (CLIError, Progress, ResultWriter, add_arch_argument, add_batch_argument, add_common_arguments,
                     add_dtype_arguments, add_memory_format_arguments, add_size_argument, check_dtype, format_table,
                     resolve_device, result_document)

HELP = "peak memory and saved-activation bytes per stage, eager vs fused, with charts"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("memory", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arch_argument(p, BUILDERS, "resnet50")
    add_batch_argument(p, None, "default 256 (CUDA), 4 (CPU)")
    add_size_argument(p, None, "image height = width; default 224 / 128")
    add_dtype_arguments(p, None, "autocast dtype; default bf16 (CUDA) / fp32 (CPU)")
    add_memory_format_arguments(p)
    p.add_argument("--backend", choices=list(backends.BACKENDS), default=None,
                   help="fused backend (default: the fastest available)")
    add_common_arguments(p, "fused_resnet_results")
    p.set_defaults(run=run)


def _measure(variant: str, cfg: e2e.E2EConfig, device: torch.device, backend: str | None,
             snapshot_path: str | None = None) -> dict:
    torch.manual_seed(0)
    name = "eager" if variant == "eager" else f"fused-{backend}"
    model, _, source, _ = e2e.build(name, cfg, device)
    x, target = e2e.make_inputs(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward():
        with e2e.autocast(cfg, device):
            return nn.functional.cross_entropy(model(x), target)

    def step():
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    step()  # warm-up: optimizer state, cuDNN algorithm choice, allocator pools
    counter = SavedTensorCounter(model)
    loss = counter.run(forward)
    del loss
    result = dict(variant=variant, backend=None if variant == "eager" else backend, model_source=source,
                  saved_mib={s: counter.by_stage[s] / 2**20 for s in STAGES}, saved_total_mib=counter.total / 2**20,
                  peak_gib=None, stage_peak_gib=None, timeline_mib=None, timeline_stage_starts=None,
                  timeline_kind="saved bytes", allocator_snapshot=None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peaks = stage_peaks_cuda(model, step, device)
        result["stage_peak_gib"] = {k: v / 2**30 for k, v in peaks.items()}
        history = allocation_timeline_cuda(model, step, device, snapshot_path)
        if history and history[0]:
            series, starts = downsample([t / 2**20 for t in history[0]], history[1])
            result.update(timeline_mib=series, timeline_stage_starts=starts,
                          timeline_kind="allocated (caching allocator history)")
            if snapshot_path:
                result["allocator_snapshot"] = os.path.basename(snapshot_path)
    if result["timeline_mib"] is None:
        series, starts = downsample([total / 2**20 for _, total in counter.timeline], counter.stage_starts())
        result.update(timeline_mib=series, timeline_stage_starts=starts)
    model = opt = None  # free the device memory before the next variant (the closures share these cells)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(args) -> int:
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    cfg = e2e.E2EConfig(arch=args.arch, batch=args.batch or (256 if cuda else 4), size=args.size or (224 if cuda else 128),
                        dtype=args.dtype or ("bf16" if cuda else "fp32"),
                        channels_last=args.memory_format == "channels_last", inference=False)
    check_dtype(cfg.dtype, device)
    if cfg.batch < 2:
        raise CLIError("--batch must be >= 2: training-mode BatchNorm needs more than one value per channel")
    if cfg.size < 32:
        raise CLIError(f"--size {cfg.size} is too small for a ResNet (5 stride-2 stages): use >= 32")
    args.batch = cfg.batch  # the batch in use, for main()'s out-of-memory message
    try:
        backend = backends.resolve(args.backend, device)
    except backends.BackendUnavailableError as exc:
        raise CLIError(str(exc)) from None
    with ResultWriter(args.out) as writer:
        results = []
        with Progress(2, "memory", enabled=not args.quiet) as bar:
            for variant in ("eager", "fused"):
                bar.info = variant
                snapshot = writer.path(f"memory_snapshot_{variant}.pickle") if cuda else None
                results.append(_measure(variant, cfg, device, backend, snapshot))
                bar.update()
        eager, fused = results
        title = (f"{cfg.arch}, batch {cfg.batch}, {cfg.size}x{cfg.size}, {cfg.dtype}, "
                 f"{'channels_last' if cfg.channels_last else 'contiguous'}, training step | "
                 f"{torch.cuda.get_device_name(device) if cuda else 'cpu'} | fused backend {backend}")
        print("\n" + title)
        rows = []
        for s in (*STAGES, "total"):
            e = eager["saved_total_mib"] if s == "total" else eager["saved_mib"][s]
            f = fused["saved_total_mib"] if s == "total" else fused["saved_mib"][s]
            row = [s, e, f, f"{f / e:.2f}x" if e else "-"]
            if cuda:
                key = "backward" if s == "total" else s
                row += [eager["stage_peak_gib"].get(key, float("nan")), fused["stage_peak_gib"].get(key, float("nan"))]
            rows.append(row)
        header = ["stage", "eager saved MiB", "fused saved MiB", "fused / eager saved"]
        if cuda:
            header += ["eager peak GiB", "fused peak GiB"]
        print(format_table(header, rows))
        if cuda:
            print("(peak columns: peak allocated during that stage's forward; the 'total' row is the backward + "
                  f"update.) Whole step: eager {eager['peak_gib']:.2f} GiB, fused {fused['peak_gib']:.2f} GiB "
                  f"({fused['peak_gib'] / eager['peak_gib']:.2f}x)")
        if cuda:
            print("allocator snapshots: " + ", ".join(r["allocator_snapshot"] or f"none for {r['variant']}"
                                                      for r in results)
                  + " (open them in https://pytorch.org/memory_viz)")
        else:
            print("allocator snapshots: skipped (CUDA only: the CPU has no caching-allocator history)")
        print(f"saved activations, whole forward: fused {fused['saved_total_mib']:.1f} MiB vs eager "
              f"{eager['saved_total_mib']:.1f} MiB ({fused['saved_total_mib'] / eager['saved_total_mib']:.2f}x)")
        config = e2e.config_dict(cfg) | dict(backend=backend)
        for k in ("steps", "warmup", "inference"):
            config.pop(k)
        timeline_stages = list(STEP_STAGES) if results[0]["timeline_kind"].startswith("allocated") else list(STAGES)
        writer.write_json("memory.json", result_document("memory", getattr(args, "argv", None), device, config,
                                                         results, stages=list(STAGES), timeline_stages=timeline_stages))
        writer.chart("memory.png", plots.memory_chart, [*STAGES, "backward"] if cuda else list(STAGES),
                     {r["variant"]: (r["stage_peak_gib"] if cuda else r["saved_mib"]) for r in results},
                     "peak allocated (GiB)" if cuda else "saved for backward (MiB)",
                     {r["variant"]: dict(series=r["timeline_mib"], stage_starts=r["timeline_stage_starts"])
                      for r in results}, f"MiB ({results[0]['timeline_kind']})",
                     timeline_stages, title)
        writer.finish()
    return 0
