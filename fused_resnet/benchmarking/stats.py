"""Summaries of timing samples: what every timed figure in a result file carries, and how noisy it is.

A timed figure is a list of samples (seconds per call, or per training step). Its summary is the median with
the quartiles, the extremes and the relative spread (the interquartile range over the median). Means are
reported but never used: one descheduled step on a shared machine moves a mean, not a median.

Quartiles use linear interpolation between order statistics (numpy's default, ``statistics.quantiles(...,
method="inclusive")``), so that 5 samples give q1 = the 2nd and q3 = the 4th smallest.

A ratio of two timed figures (a speed-up) gets an honest range from the quartiles: the median ratio, and the
ratios of opposite quartiles (low = numerator's q1 / denominator's q3, high = numerator's q3 / denominator's
q1). The range is wide when either figure is noisy, and a range that contains 1.0 says that the run does not
show which of the two is faster.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

# A figure whose interquartile range exceeds this fraction of its median is flagged as noisy (and warned
# about): at 10% a 1.1x speed-up is no longer distinguishable from run-to-run variation.
NOISY_REL_IQR = 0.10
# Samples kept in a result file per figure (kernel timers can take thousands); the summary uses all of them.
MAX_STORED_SAMPLES = 500


@dataclass
class Summary:
    """Order statistics of one figure's samples, in the unit the samples are in."""

    n: int
    median: float
    q1: float
    q3: float
    min: float
    max: float
    mean: float
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR / median (NaN when the median is 0 or the figure is empty)."""
        return self.iqr / self.median if self.median else math.nan

    @property
    def noisy(self) -> bool:
        return not (self.rel_iqr <= NOISY_REL_IQR)  # NaN (no samples) counts as noisy

    def scaled(self, factor: float) -> "Summary":
        """The same summary in another unit (e.g. seconds to milliseconds: factor 1e3)."""
        return Summary(self.n, self.median * factor, self.q1 * factor, self.q3 * factor, self.min * factor,
                       self.max * factor, self.mean * factor, [s * factor for s in self.samples])

    def to_dict(self) -> dict:
        """The JSON form: the unit is in the key that holds it (``"train_step_ms": {...}``)."""
        return dict(median=self.median, q1=self.q1, q3=self.q3, min=self.min, max=self.max, mean=self.mean,
                    n=self.n, iqr_pct=100 * self.rel_iqr, noisy=self.noisy, samples=_thin(self.samples))


def summarize(samples) -> Summary:
    """The summary of ``samples`` (any iterable of numbers, in time order)."""
    xs = [float(s) for s in samples]
    if not xs:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan, [])
    ordered = sorted(xs)
    if len(xs) == 1:
        q1 = q3 = ordered[0]
    else:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Summary(len(xs), statistics.median(ordered), q1, q3, ordered[0], ordered[-1], statistics.fmean(xs), xs)


def from_dict(d: dict) -> Summary:
    """A summary read back from its JSON form (the stored samples may be thinned)."""
    return Summary(d["n"], d["median"], d["q1"], d["q3"], d["min"], d["max"], d["mean"], list(d.get("samples", [])))


def ratio(numerator: Summary, denominator: Summary) -> dict:
    """numerator / denominator with a range from the quartiles (see the module docstring). For a speed-up of
    B over A, pass A's time as the numerator and B's as the denominator."""
    def div(a, b):
        return a / b if b else math.nan

    return dict(median=div(numerator.median, denominator.median), low=div(numerator.q1, denominator.q3),
                high=div(numerator.q3, denominator.q1))


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """numerator / denominator from samples taken in the same rounds (``e2e.measure_all`` interleaves the
    variants, one step of each per round): the median of the per-round ratios, with their quartiles as the
    range. A change in machine load between rounds moves both samples of a round alike, so it cancels here,
    where the quartiles of two separately summarised figures (``ratio``) would keep it."""
    per_round = summarize(a / b for a, b in zip(numerator, denominator) if b)
    return dict(median=per_round.median, low=per_round.q1, high=per_round.q3, paired_rounds=per_round.n)


def ratio_is_decisive(r: dict) -> bool:
    """Whether the whole quartile range of a ratio lies on one side of 1.0."""
    return (r["low"] > 1.0 or r["high"] < 1.0) if all(math.isfinite(r[k]) for k in ("low", "high")) else False


def noise_warning(name: str, parts: list[tuple[str, Summary, str]], remedy: str) -> str | None:
    """One warning line naming ``name`` and each of its noisy figures (``parts``: (what, summary, unit));
    None when none is noisy."""
    noisy = [(what, sm, unit) for what, sm, unit in parts if sm.noisy]
    if not noisy:
        return None
    described = "; ".join(f"{what} IQR {100 * sm.rel_iqr:.0f}% of the median over {sm.n} samples (min "
                          f"{fmt(sm.min)}, median {fmt(sm.median)}, max {fmt(sm.max)} {unit})"
                          for what, sm, unit in noisy)
    return f"warning: {name}: noisy times: {described}. {remedy}"


def fmt(x: float) -> str:
    """A number for a sentence: 1,234 / 12.3 / 0.0123."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _thin(samples: list[float]) -> list[float]:
    """At most MAX_STORED_SAMPLES, evenly spaced in time order."""
    if len(samples) <= MAX_STORED_SAMPLES:
        return list(samples)
    step = len(samples) / MAX_STORED_SAMPLES
    return [samples[int(i * step)] for i in range(MAX_STORED_SAMPLES)]
