"""Mean, spread and 95 % intervals of accuracies measured at several seeds, and the verdict a paired comparison supports.

Pure functions over plain numbers (no torch), used by ``compress.seed_grid``:

- ``summarise(values)``: n, mean, sample standard deviation and an interval of the mean, either Student's t
  (``t_interval``) or a percentile bootstrap over the values with a fixed seed (``bootstrap_interval``);
- ``paired_differences(a, b)``: a[seed] - b[seed] over the seeds both arms measured. Two arms that share a seed
  share its base model, data order and test split, so the per-seed difference cancels what the seed does to both
  and its interval is narrower than either arm's;
- ``verdict(interval)``: "helps" (the whole interval above 0), "hurts" (below 0), "no measurable effect" (it
  contains 0).

Why t by default: with five seeds a percentile bootstrap of the mean is too narrow. Its spread is sqrt((n - 1) / n)
of the standard error and its quantiles are those of a known spread, not of one estimated from five values: at
n = 5 its interval is about 0.6 of the t-interval's width. The t-interval assumes the per-seed values are roughly
normal, which accuracies of one recipe at several seeds are close to.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: the same values always give the same bootstrap interval
INTERVAL_METHODS = ("t", "bootstrap")
HELPS, HURTS, NO_EFFECT = "helps", "hurts", "no measurable effect"
NO_INTERVAL = "no interval (fewer than 2 seeds)"


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("the mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with n - 1 in the denominator; None for fewer than two values."""
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (integer >= 1) degrees of freedom, t >= 0.

    The closed forms of Abramowitz & Stegun 26.7.3 / 26.7.4 in theta = atan(t / sqrt(df)): a finite sum of
    powers of cos(theta), exact for integer df (what a count of seeds gives).
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    if df == 1:
        return 2.0 * theta / math.pi
    # 2/pi * (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    term, total = 1.0, 1.0
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + sin * math.sqrt(cos2) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = ``confidence`` (df 4, 0.95: 2.776), by bisection on the exact probability."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while t_central_probability(high, df) < confidence:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """mean -/+ t(confidence, n - 1) * std / sqrt(n); None for fewer than two values."""
    if len(values) < 2:
        return None
    half = t_quantile(confidence, len(values) - 1) * sample_std(values) / math.sqrt(len(values))
    centre = mean(values)
    return centre - half, centre + half


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float] | None:
    """Percentile bootstrap of the mean: ``resamples`` draws of n values with replacement (numpy PCG64 ``seed``),
    the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their means; None for fewer than two values."""
    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[draws].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return float(low), float(high)


def interval(values: Sequence[float], method: str = "t", confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The interval of the mean by ``method``: "t" (``t_interval``) or "bootstrap" (``bootstrap_interval``)."""
    if method == "t":
        return t_interval(values, confidence)
    if method == "bootstrap":
        return bootstrap_interval(values, confidence)
    raise ValueError(f"interval method must be one of {INTERVAL_METHODS}, got {method!r}")


def summarise(values: Sequence[float], method: str = "t", confidence: float = CONFIDENCE) -> dict:
    """{"n", "mean", "std", "interval": [low, high] or None} of values measured at several seeds."""
    span = interval(values, method, confidence)
    return {"n": len(values), "mean": mean(values), "std": sample_std(values),
            "interval": None if span is None else [span[0], span[1]]}


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> dict[int, float]:
    """{seed: a[seed] - b[seed]} over the seeds both arms measured (ascending)."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def verdict(span: Sequence[float] | None) -> str:
    """What an interval of a difference (arm minus its reference) supports: "helps" when it lies above 0,
    "hurts" when below 0, "no measurable effect" when it contains 0 (an end at exactly 0 included)."""
    if span is None:
        return NO_INTERVAL
    low, high = span
    if low > 0.0:
        return HELPS
    if high < 0.0:
        return HURTS
    return NO_EFFECT


def compare(a: Mapping[int, float], b: Mapping[int, float], method: str = "t", confidence: float = CONFIDENCE) -> dict:
    """The paired comparison of arm ``a`` against reference ``b`` (both {seed: value}): the per-seed differences,
    their summary (``summarise``) and its ``verdict``."""
    differences = paired_differences(a, b)
    if not differences:
        return {"differences": {}, "n": 0, "mean": None, "std": None, "interval": None, "verdict": NO_INTERVAL}
    summary = summarise(list(differences.values()), method, confidence)
    return {"differences": differences, **summary, "verdict": verdict(summary["interval"])}
