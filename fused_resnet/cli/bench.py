"""``fused-resnet bench``: end-to-end training-step and inference throughput, eager vs torch.compile vs fused
(each backend) vs fused + torch.compile, measured side by side in one run; a first-step parity check first.

Defaults: on CUDA the product's case (ResNet-50, batch 256, 224x224, bf16 autocast, channels_last, all
variants); on CPU a small case that finishes in seconds (10 s measured on 2 cores: ResNet-18, batch 8,
64x64, fp32, eager and fused; torch.compile of a ResNet takes minutes on a small CPU: ask with --variants).
"""
from __future__ import annotations

import argparse

import torch

from .. import backends
from ..benchmarking import e2e
from ..models import BUILDERS
from . import plots
from .common import (CLIError, Progress, ResultWriter, add_arch_argument, add_batch_argument, add_common_arguments,
                     add_dtype_arguments, add_memory_format_arguments, add_size_argument, check_dtype, format_table,
                     non_negative_int, positive_int, resolve_device, result_document)

HELP = "end-to-end training/inference throughput: eager vs torch.compile vs fused (+ compile)"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help=HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arch_argument(p, BUILDERS, None, "default resnet50 (CUDA), resnet18 (CPU)")
    add_batch_argument(p, None, "default 256 (CUDA), 8 (CPU)")
    add_size_argument(p, None, "image height = width; default 224 / 64")
    add_dtype_arguments(p, None, "autocast dtype; default bf16 (CUDA) / fp32 (CPU)")
    add_memory_format_arguments(p)
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps (median); default 20 / 5")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first; default 5 / 2")
    p.add_argument("--variants", default=None,
                   help="comma-separated from: eager, compile, fused, fused-<backend> (triton, cuda, cpu, eager), "
                        "fused-compile; or 'all'. Default: every GPU backend on CUDA, eager,fused on CPU")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--no-inference", action="store_true", help="time the training step only")
    p.add_argument("--no-parity", action="store_true", help="skip the first-step parity check")
    add_common_arguments(p, "fused_resnet_results")
    p.set_defaults(run=run)


def _config(args, device: torch.device) -> e2e.E2EConfig:
    cuda = device.type == "cuda"
    cfg = e2e.E2EConfig(
        arch=args.arch or ("resnet50" if cuda else "resnet18"),
        batch=args.batch or (256 if cuda else 8),
        size=args.size or (224 if cuda else 64),
        dtype=args.dtype or ("bf16" if cuda else "fp32"),
        channels_last=args.memory_format == "channels_last",
        steps=args.steps or (20 if cuda else 5),
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 2),
        num_classes=args.num_classes,
        inference=not args.no_inference,
    )
    check_dtype(cfg.dtype, device)
    if cfg.batch < 2:
        raise CLIError("--batch must be >= 2: training-mode BatchNorm needs more than one value per channel")
    if cfg.size < 32:
        raise CLIError(f"--size {cfg.size} is too small for a ResNet (5 stride-2 stages): use >= 32")
    return cfg


def parse_variants(spec: str | None, device: torch.device) -> list[str]:
    """The variants to measure; a CLIError for unknown names or a fused backend that cannot run here."""
    if spec is None:
        return e2e.default_variants(device)
    names = e2e.all_variants(device) if spec.strip() == "all" else [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in e2e.all_variants(device)]
    if unknown or not names:
        raise CLIError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                       f"{', '.join(e2e.all_variants(device))} or 'all'")
    runnable = []
    for v in names:
        try:
            e2e.variant_backend(v, device)
        except backends.BackendUnavailableError as exc:
            if spec.strip() == "all":
                continue  # 'all' means all that can run here
            raise CLIError(f"variant {v!r}: {exc}") from None
        runnable.append(v)
    return list(dict.fromkeys(runnable))


def run(args) -> int:
    device = resolve_device(args.device)
    cfg = _config(args, device)
    args.batch = cfg.batch  # the batch in use, for main()'s out-of-memory message
    variants = parse_variants(args.variants, device)
    with ResultWriter(args.out) as writer:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        parity = []
        if not args.no_parity:
            fused_backends = sorted({b for v in variants if (b := e2e.variant_backend(v, device)) is not None})
            with Progress(len(fused_backends), "parity", enabled=not args.quiet) as bar:
                for b in fused_backends:
                    parity.append(e2e.first_step_parity(cfg, device, b))
                    bar.update(info=b)
        results = []
        with Progress(len(variants) * e2e.steps_per_variant(cfg), "bench", enabled=not args.quiet) as bar:
            for v in variants:
                bar.info = v
                results.append(e2e.measure(v, cfg, device, on_step=bar.update))

        title = (f"{cfg.arch}, batch {cfg.batch}, {cfg.size}x{cfg.size}, {cfg.dtype}, "
                 f"{'channels_last' if cfg.channels_last else 'contiguous'} | {_device_label(device)} | "
                 f"torch {torch.__version__}")
        print(f"\n{title} | median of {cfg.steps} steps after {cfg.warmup} warm-up")
        for p in parity:
            print(f"parity (one training step, fused[{p['backend']}] vs eager vs {p['reference_dtype']} reference): "
                  f"{'OK' if p['ok'] else 'FAILED'} | forward worst {p['forward_worst']} "
                  f"{p['forward_fused_err']:.1e} (eager {p['forward_eager_err']:.1e}) | gradients "
                  f"{p['grad_fused_err']:.1e} (eager {p['grad_eager_err']:.1e}, bound {p['grad_bound']:.1e})")
        print(table(results))
        doc = result_document("bench", getattr(args, "argv", None), device, e2e.config_dict(cfg), results,
                              parity=parity, variants=variants)
        writer.write_json("bench.json", doc)
        writer.chart("bench.png", plots.bench_chart, results, title)
        writer.finish()
    return 0 if all(p["ok"] for p in parity) else 1


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table(results: list[dict]) -> str:
    by = {r["variant"]: r for r in results}

    def ratio(r, key, ref):
        return f"{r[key] / by[ref][key]:.2f}x" if ref in by and by[ref][key] == by[ref][key] else "-"

    rows = [[r["variant"], r["backend"] or "-", r["train_img_s"], r["train_ms"], r["peak_gib"], r["saved_mib"],
             r["infer_img_s"], ratio(r, "train_img_s", "eager"), ratio(r, "train_img_s", "compile"),
             ratio(r, "peak_gib", "eager") if r["peak_gib"] == r["peak_gib"] else ratio(r, "saved_mib", "eager")]
            for r in results]
    return format_table(["variant", "backend", "train img/s", "ms/step", "peak GiB", "saved MiB", "infer img/s",
                         "train vs eager", "train vs compile", "memory vs eager"], rows)
