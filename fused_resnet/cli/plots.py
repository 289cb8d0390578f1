"""The CLI's charts (PNG, matplotlib's Agg backend: no display needed).

matplotlib is an optional dependency (``pip install matplotlib``, or the ``cli`` extra): without it the
subcommands still write their JSON and print their tables, and say that the charts were skipped.
"""
from __future__ import annotations

import importlib.util
import math

MISSING = ("charts skipped: matplotlib is not installed (pip install matplotlib); the JSON results are "
           "complete without it")


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    _pyplot().close(fig)


def _finite(values):
    return [v if v is not None and math.isfinite(v) else 0.0 for v in values]


def bench_chart(path: str, rows: list[dict], title: str) -> None:
    """Bars per variant: training images/s, inference images/s, and memory (peak on CUDA, saved activations
    elsewhere)."""
    plt = _pyplot()
    names = [r["variant"] for r in rows]
    peak = [r.get("peak_gib") for r in rows]
    use_peak = any(v is not None and math.isfinite(v) for v in peak)
    panels = [("training images/s", [r["train_img_s"] for r in rows]),
              ("inference images/s", [r.get("infer_img_s") for r in rows]),
              ("peak memory (GiB)" if use_peak else "saved activations (MiB)",
               peak if use_peak else [r.get("saved_mib") for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colors = ["#888888" if not n.startswith("fused") else "#d62728" for n in names]
    for ax, (label, values) in zip(axes, panels):
        values = _finite(values)
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def roofline_chart(path: str, rows: list[dict], copy_bytes_per_s: float, flops_per_s: float, title: str) -> None:
    """Achieved FLOP/s against arithmetic intensity (FLOP/byte), under the roofs min(bandwidth x intensity,
    matmul rate) measured in the same run. The BN family sits far left: its roof is the copy bandwidth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensities = [r["flops"] / r["bytes"] for r in rows if r["bytes"] > 0]
    lo = min(intensities + [0.1]) / 4
    hi = max(intensities + [flops_per_s / copy_bytes_per_s * 8])
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(copy_bytes_per_s * x, flops_per_s) for x in xs], color="black", lw=1.5,
            label=f"roof: copy {copy_bytes_per_s / 1e9:,.0f} GB/s, matmul {flops_per_s / 1e12:,.1f} TFLOP/s")
    markers = {"triton": "o", "cuda": "s", "cpu": "D", "eager": "x", "compile": "+"}
    for provider in sorted({r["provider"] for r in rows}):
        pts = [(r["flops"] / r["bytes"], r["tflops"] * 1e12) for r in rows if r["provider"] == provider]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(provider, "."), s=28,
                   label=provider, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def memory_chart(path: str, stages: list[str], by_variant: dict[str, dict[str, float]], ylabel: str,
                 timelines: dict[str, list[float]], timeline_label: str, timeline_xlabel: str, title: str) -> None:
    """Left: grouped bars per stage (one bar per variant). Right: memory over the step, one line per variant."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    n = max(len(by_variant), 1)
    width = 0.8 / n
    for i, (variant, values) in enumerate(by_variant.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(stages))]
        left.bar(xs, _finite([values.get(s) for s in stages]), width, label=variant)
    left.set_xticks(range(len(stages)), stages)
    left.set_ylabel(ylabel)
    left.set_title("per stage", fontsize=10)
    left.legend(fontsize=8)
    for variant, series in timelines.items():
        if series:
            right.plot([i / max(len(series) - 1, 1) for i in range(len(series))], series, label=variant, lw=1.2)
    right.set_xlabel(timeline_xlabel)
    right.set_ylabel(timeline_label)
    right.set_title("over time", fontsize=10)
    right.legend(fontsize=8)
    right.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def training_chart(path: str, histories: dict[str, dict], title: str) -> None:
    """Loss (per step, and per-epoch test loss) and test accuracy per epoch, one colour per model."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"eager": "#1f77b4", "fused": "#d62728"}
    for name, h in histories.items():
        c = colors.get(name)
        steps = h["train_loss"]
        per_epoch = len(steps) / max(len(h["test_loss"]), 1)
        loss_ax.plot([(i + 1) / per_epoch for i in range(len(steps))], steps, color=c, alpha=0.35, lw=0.8,
                     label=f"{name} train (per step)")
        epochs = list(range(1, len(h["test_loss"]) + 1))
        k = len(steps) // max(len(epochs), 1)
        if k:
            loss_ax.plot(epochs, [sum(steps[e * k:(e + 1) * k]) / k for e in range(len(epochs))], color=c,
                         marker="s", lw=1.2, ls=":", label=f"{name} train (epoch mean)")
        loss_ax.plot(epochs, h["test_loss"], color=c, marker="o", lw=1.6, label=f"{name} test")
        acc_ax.plot(epochs, [100 * a for a in h["test_acc"]], color=c, marker="o", lw=1.6, label=name,
                    ls="-" if name == "eager" else "--")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=8)
    loss_ax.grid(True, alpha=0.3)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.legend(fontsize=8)
    acc_ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
