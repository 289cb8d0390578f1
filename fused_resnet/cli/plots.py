"""The CLI's charts (PNG, matplotlib's Agg backend: no display needed).

matplotlib is an optional dependency (``pip install matplotlib``, or the ``cli`` extra): without it the
subcommands still write their JSON and print their tables, and say that the charts were skipped.
"""
from __future__ import annotations

import importlib.util
import math
import zlib

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


# One colour per variant in every chart (bench, micro, memory, train): a micro provider or a conv-benchmark
# provider takes the colour of the bench variant it is.
PALETTE = {"eager": "#1f77b4", "compile": "#17becf", "fused": "#d62728", "fused-triton": "#ff7f0e",
           "fused-cuda": "#2ca02c", "fused-cpu": "#9467bd", "fused-eager": "#8c564b", "fused-compile": "#e377c2"}
SAME_AS = {"triton": "fused-triton", "cuda": "fused-cuda", "cpu": "fused-cpu", "cudnn": "eager",
           "cudnn+bn": "fused-eager"}
_SPARE = ("#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39")


def color(name: str) -> str:
    """The colour of a variant (or provider) name, the same in every chart and every run."""
    name = SAME_AS.get(name, name)
    if name in PALETTE:
        return PALETTE[name]
    return _SPARE[zlib.crc32(name.encode()) % len(_SPARE)]


def _rate_errors(rows: list[dict], rate_key: str, time_key: str):
    """(rates, [lower errors], [upper errors]): a rate = work / median time, and its range from the times'
    quartiles (work / q3 .. work / q1)."""
    rates, lo, hi = [], [], []
    for r in rows:
        rate, t = r.get(rate_key), r.get(time_key)
        if rate is None or not t or not math.isfinite(rate):
            rates.append(0.0), lo.append(0.0), hi.append(0.0)
            continue
        rates.append(rate)
        lo.append(rate - rate * t["median"] / t["q3"] if t["q3"] else 0.0)
        hi.append(rate * t["median"] / t["q1"] - rate if t["q1"] else 0.0)
    return rates, lo, hi


def bench_chart(path: str, rows: list[dict], title: str) -> None:
    """Bars per variant: training and inference images/s with error bars from the step times' quartiles and
    the speed-up over eager on each bar, and memory (peak on CUDA, saved activations elsewhere)."""
    plt = _pyplot()
    names = [r["variant"] for r in rows]
    peak = [r.get("peak_gib") for r in rows]
    use_peak = any(v is not None and math.isfinite(v) for v in peak)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    colors = [color(n) for n in names]
    for ax, phase, label in ((axes[0], "train", "training images/s"), (axes[1], "infer", "inference images/s")):
        rates, lo, hi = _rate_errors(rows, f"{phase}_img_per_s", f"{phase}_step_ms")
        bars = ax.bar(range(len(names)), rates, color=colors, yerr=[lo, hi], capsize=4,
                      error_kw=dict(ecolor="black", lw=1))
        for b, r, v, h in zip(bars, rows, rates, hi):
            s = r.get(f"{phase}_speedup_vs_eager")
            text = f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
            if s:
                text += f"\n{s['median']:.2f}x eager\n({s['low']:.2f}-{s['high']:.2f})"
            ax.annotate(text, (b.get_x() + b.get_width() / 2, v + h), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
        ax.set_title(label + " (bars: median; whiskers: quartiles)", fontsize=9)
        ax.margins(y=0.3)
    mem = axes[2]
    values = _finite(peak if use_peak else [r.get("saved_mib") for r in rows])
    bars = mem.bar(range(len(names)), values, color=colors)
    for b, v in zip(bars, values):
        mem.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                     ha="center", va="bottom", fontsize=7)
    mem.set_title("peak memory (GiB)" if use_peak else "saved activations (MiB)", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def roofline_chart(path: str, rows: list[dict], roof: dict, title: str) -> None:
    """Achieved FLOP/s against arithmetic intensity (FLOP/byte) under the roofs measured in the same run:
    min(copy bandwidth x intensity, matmul rate) for the large copy (solid) and for the fastest same-size copy
    of the cases (dashed: cache-resident sizes copy faster). Each case is held to its own same-size copy;
    one above it is drawn with a red ring. The BN family sits far left, where the roof is the copy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    bw = roof["copy"]["gb_per_s"] * 1e9
    mm = roof["matmul"]["tflop_per_s"] * 1e12
    best_bw = max([bw] + [c["gb_per_s"] * 1e9 for c in roof.get("copy_by_size", [])])
    intensities = [r["flop"] / r["moved_bytes"] for r in rows if r["moved_bytes"] > 0]
    lo = min(intensities + [0.1]) / 4
    hi = max(intensities + [mm / bw * 8])
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(bw * x, mm) for x in xs], color="black", lw=1.5,
            label=f"roof, large copy ({roof['copy'].get('tensor_bytes', 0) / 2**20:.0f} MiB): "
                  f"{bw / 1e9:,.1f} GB/s; matmul {mm / 1e12:,.2f} TFLOP/s")
    if best_bw > bw * 1.05:
        ax.plot(xs, [min(best_bw * x, mm) for x in xs], color="black", lw=1, ls="--",
                label=f"roof, fastest copy at a case's size (cache): {best_bw / 1e9:,.1f} GB/s")
    own = [(r["flop"] / r["moved_bytes"], min(r["copy_gb_per_s"] * 1e9 * r["flop"] / r["moved_bytes"], mm))
           for r in rows if r["moved_bytes"] > 0 and r.get("copy_gb_per_s")]
    if own:
        ax.scatter([p[0] for p in own], [p[1] for p in own], marker="_", s=90, color="grey", lw=1.2,
                   label="each case's own roof (a copy of its tensor)")
    markers = {"fwd": "o", "bwd": "s"}
    for provider in sorted({r["provider"] for r in rows}):
        for module in (True, False):
            pts = [r for r in rows if r["provider"] == provider and (r["direction"] in markers) == module]
            if not pts:
                continue
            ax.scatter([r["flop"] / r["moved_bytes"] for r in pts], [r["tflop_per_s"] * 1e12 for r in pts],
                       marker="o" if module else "^", s=28, color=color(provider), alpha=0.8,
                       label=f"{provider} {'module fwd/bwd' if module else 'single passes'}")
    above = [r for r in rows if r.get("above_roof")]
    if above:
        ax.scatter([r["flop"] / r["moved_bytes"] for r in above], [r["tflop_per_s"] * 1e12 for r in above],
                   s=110, facecolors="none", edgecolors="red", lw=1.5, label="above its same-size copy roof")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("achieved FLOP/s (median time)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)


def stage_positions(n: int, starts: dict[str, int], stages: list[str]) -> list[float]:
    """x positions of a timeline of ``n`` points on a stage axis: stage k spans [k, k + 1], and the points
    recorded during stage k are spread evenly over it. ``starts``: the index of the first point of each stage
    (a stage missing from it, or with no points, gets zero width), so two variants line up by stage."""
    bounds, last = [], 0
    for s in stages:
        last = max(last, min(starts.get(s, last), n))
        bounds.append(last)
    bounds.append(n)
    xs = [0.0] * n
    for k in range(len(stages)):
        a, b = bounds[k], bounds[k + 1]
        for i in range(a, b):
            xs[i] = k + (i - a) / (b - a)
    return xs


def memory_chart(path: str, stages: list[str], by_variant: dict[str, dict[str, float]], ylabel: str,
                 timelines: dict[str, dict], timeline_label: str, timeline_stages: list[str], title: str) -> None:
    """Left: grouped bars per stage (one bar per variant). Right: memory over the step, one line per variant,
    on a stage axis (each stage one unit wide, boundaries drawn), so that eager and fused line up by layer.
    ``timelines``: {variant: {"series": [...], "stage_starts": {stage: index}}}."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    n = max(len(by_variant), 1)
    width = 0.8 / n
    for i, (variant, values) in enumerate(by_variant.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(stages))]
        left.bar(xs, _finite([values.get(s) for s in stages]), width, label=variant, color=color(variant))
    left.set_xticks(range(len(stages)), stages)
    left.set_ylabel(ylabel)
    left.set_title("per stage", fontsize=10)
    left.legend(fontsize=8)
    for variant, t in timelines.items():
        series = t.get("series") or []
        if series:
            xs = stage_positions(len(series), t.get("stage_starts") or {}, timeline_stages)
            right.plot(xs, series, label=variant, lw=1.2, color=color(variant))
    for k in range(1, len(timeline_stages)):
        right.axvline(k, color="grey", lw=0.8, ls=":")
    right.set_xticks([k + 0.5 for k in range(len(timeline_stages))], timeline_stages, fontsize=8)
    right.set_xlim(0, len(timeline_stages))
    right.set_xlabel("stage of the step (each stage one unit wide)")
    right.set_ylabel(timeline_label)
    right.set_title("over time", fontsize=10)
    right.legend(fontsize=8)
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def training_chart(path: str, histories: dict[str, dict], title: str) -> None:
    """Loss (per step, and per-epoch test loss) and test accuracy per epoch, one colour per model."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, h in histories.items():
        c = color(name)
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
