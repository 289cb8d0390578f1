"""``fused-resnet bench``: end-to-end training-step and inference throughput, eager vs torch.compile vs fused
(each backend) vs fused + torch.compile, measured side by side in one run; a first-step parity check first.

Defaults: on CUDA the product's case (ResNet-50, batch 256, 224x224, bf16 autocast, channels_last, all
variants); on CPU a small case that finishes in seconds (10 s measured on 2 cores: ResNet-18, batch 8,
64x64, fp32, eager and fused; torch.compile of a ResNet takes minutes on a small CPU: ask with --variants).

Every timed step is a sample. The table gives the median step time with its spread (the interquartile range
as a percentage of the median, and the fastest step), throughput as batch / median, and speed-ups as the
median ratio with a range from both variants' quartiles. A variant whose steps spread by more than 10% of
the median is named in a warning; more --steps and a quieter machine narrow the spread.
"""
from __future__ import annotations

import argparse

import torch

from .. import backends, dispatch
from ..benchmarking import e2e, stats
from ..models import BUILDERS
from . import plots
from ..benchmarking.report import INTERPRETER_BANNER, busy_machine_warning, speedup_cell
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
                        "fused-compile; or 'all'. A fused variant may add :conv=<setting> (auto, auto+cuda, triton, "
                        "cuda, aten, gemm: the convolutions forced, or the measured per-shape selection), e.g. "
                        "fused-triton:conv=cuda. Default: every GPU backend on CUDA, eager,fused on CPU")
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
    unknown, reasons = [], []
    for v in names:
        try:
            e2e.check_variant(v, device)
        except ValueError as exc:
            unknown.append(v)
            reasons.append(str(exc))
    if unknown or not names:
        raise CLIError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}"
                       f"{' (' + '; '.join(reasons) + ')' if reasons else ''}; choose from "
                       f"{', '.join(e2e.all_variants(device))} or 'all', a fused one optionally with "
                       f":conv=<{'|'.join(dispatch.CONV_SETTINGS)}>")
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
            # One check per (backend, convolution setting) among the fused variants.
            fused = list(dict.fromkeys((b, e2e.split_variant(v)[1]) for v in variants
                                       if (b := e2e.variant_backend(v, device)) is not None))
            with Progress(len(fused), "parity", enabled=not args.quiet) as bar:
                for b, conv in fused:
                    parity.append(e2e.first_step_parity(cfg, device, b, conv))
                    bar.update(info=b if conv is None else f"{b}:conv={conv}")
        with Progress(len(variants) * e2e.steps_per_variant(cfg), "bench", enabled=not args.quiet) as bar:
            bar.info = ", ".join(variants)
            results = e2e.measure_all(variants, cfg, device, on_step=bar.update)
        add_speedups(results)

        title = (f"{cfg.arch}, batch {cfg.batch}, {cfg.size}x{cfg.size}, {cfg.dtype}, "
                 f"{'channels_last' if cfg.channels_last else 'contiguous'} | {_device_label(device)} | "
                 f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"\n{title} | {cfg.steps} timed steps after {cfg.warmup} warm-up")
        if any(r["interpreted"] for r in results):
            print(INTERPRETER_BANNER)
        for p in parity:
            label = p["backend"] if p.get("conv") is None else f"{p['backend']}:conv={p['conv']}"
            print(f"parity (one training step, fused[{label}] vs eager vs {p['reference_dtype']} reference): "
                  f"{'OK' if p['ok'] else 'FAILED'} | forward worst {p['forward_worst']} "
                  f"{p['forward_fused_err']:.1e} (eager {p['forward_eager_err']:.1e}) | gradients "
                  f"{p['grad_fused_err']:.1e} (eager {p['grad_eager_err']:.1e}, bound {p['grad_bound']:.1e})")
        print(table(results))
        print("step times: median (IQR as % of the median, min); img/s = batch / median step. The variants run "
              "interleaved, one step of each per round; speed-up: the median of the per-round step-time ratios "
              "(range: their quartiles)")
        calls = [f"{r['variant']}: " + ", ".join(f"{impl} {n}" for impl, n in r["conv_calls"].items())
                 for r in results if r.get("conv_calls")]
        if calls:
            print("convolution implementation per call of the first training step (cuda: sent to the compiled "
                  "convolutions, ATen where CUTLASS does not take the call): " + "; ".join(calls))
        for line in noise_warnings(results, device):
            print(line)
        if busy := busy_machine_warning(device):
            print(busy)
        if any(r["interpreted"] for r in results):
            print(INTERPRETER_BANNER)
        doc = result_document("bench", getattr(args, "argv", None), device, e2e.config_dict(cfg), results,
                              parity=parity, variants=variants)
        writer.write_json("bench.json", doc)
        writer.chart("bench.png", plots.bench_chart, results, title)
        writer.finish()
    return 0 if all(p["ok"] for p in parity) else 1


def _device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def add_speedups(results: list[dict]) -> None:
    """Add to each record its speed-ups over eager (and over compile, where measured); None for the reference
    itself. Interleaved runs pair their samples round by round: the median of the per-round ratios, with their
    quartiles as the range (stats.paired_ratio). Otherwise the ratio of the medians, with a range from the
    quartiles of both (stats.ratio)."""
    by = {r["variant"]: r for r in results}
    for r in results:
        for ref in ("eager", "compile"):
            for phase in ("train", "infer"):
                key = f"{phase}_speedup_vs_{ref}"
                if ref == "compile" and ref not in by:
                    continue
                mine, base = r.get(f"{phase}_step_ms"), by.get(ref, {}).get(f"{phase}_step_ms")
                if not (mine and base and r["variant"] != ref):
                    r[key] = None
                elif r.get("interleaved") and by[ref].get("interleaved") and mine["n"] == base["n"] \
                        and len(mine["samples"]) == mine["n"] == len(base["samples"]):
                    r[key] = stats.paired_ratio(base["samples"], mine["samples"])  # the same rounds
                else:
                    r[key] = stats.ratio(stats.from_dict(base), stats.from_dict(mine))


def noise_warnings(results: list[dict], device: torch.device) -> list[str]:
    """Lines warning of noisy step times (one per variant) and of speed-ups whose quartile range contains 1."""
    lines = []
    remedy = "More --steps, and fewer other programs running, narrow it."
    if device.type == "cpu" and torch.get_num_threads() > 1:
        remedy += (f" On a shared CPU, OMP_NUM_THREADS=1 also helps: a parallel region on {torch.get_num_threads()} "
                   "threads waits for its slowest thread's next time slice.")
    for r in results:
        parts = [(what, stats.from_dict(r[key]), "ms") for key, what in (("train_step_ms", "training step"),
                                                                         ("infer_step_ms", "inference"))
                 if r.get(key)]
        w = stats.noise_warning(r["variant"], parts, remedy)
        if w:
            lines.append(w)
    for r in results:
        for phase in ("train", "infer"):
            s = r.get(f"{phase}_speedup_vs_eager")
            if s and not stats.ratio_is_decisive(s):
                lines.append(f"note: {r['variant']}: the {'training' if phase == 'train' else 'inference'} "
                             f"speed-up over eager, {speedup_cell(s)}, has a quartile range that contains 1.0: "
                             "this run does not show which is faster")
    return lines


def table(results: list[dict]) -> str:
    by = {r["variant"]: r for r in results}

    def step(t):
        return "-" if not t else f"{t['median']:,.1f} ({t['iqr_pct']:.0f}%, min {t['min']:,.1f})"

    def speedup(r, key, ref):
        return "reference" if r["variant"] == ref else speedup_cell(r.get(key))

    use_peak = any(r["peak_gib"] is not None and r["peak_gib"] == r["peak_gib"] for r in results)
    mem_key = "peak_gib" if use_peak else "saved_mib"
    has_compile = "compile" in by
    has_infer = any(r["infer_step_ms"] for r in results)

    def memory_ratio(r):
        base, mine = by.get("eager", {}).get(mem_key), r.get(mem_key)
        return f"{mine / base:.2f}x" if base and mine and mine == mine and base == base else "-"

    header = ["variant", "backend", "train ms/step (IQR, min)", "train img/s", "train speed-up vs eager"]
    if has_compile:
        header.append("train speed-up vs compile")
    if has_infer:
        header += ["infer ms/step (IQR, min)", "infer img/s", "infer speed-up vs eager"]
    header += (["peak GiB"] if use_peak else []) + ["saved MiB", f"{'peak' if use_peak else 'saved'} memory / eager"]
    rows = []
    for r in results:
        row = [r["variant"], r["backend"] or "-", step(r["train_step_ms"]), r["train_img_per_s"],
               speedup(r, "train_speedup_vs_eager", "eager")]
        if has_compile:
            row.append(speedup(r, "train_speedup_vs_compile", "compile"))
        if has_infer:
            row += [step(r["infer_step_ms"]), r["infer_img_per_s"], speedup(r, "infer_speedup_vs_eager", "eager")]
        row += ([r["peak_gib"]] if use_peak else []) + [r["saved_mib"], memory_ratio(r)]
        rows.append(row)
    return format_table(header, rows)
