"""Statistics over seeds: means with Student-t confidence intervals, and paired differences.

A method is compared over n seeds; each seed fixes the data (partition, test subset), the
sampled clients and every other random stream, so two runs with the same seed differ only by
their method. The interval of a mean over n values x_1..x_n is

    mean +- t_{n-1, (1 + c) / 2} * sd / sqrt(n),    sd the sample standard deviation (n - 1),

and a paired difference is the same interval over d_i = x_i - y_i for the seeds both runs
finished (y the baseline). With one value there is no interval (NaN). A table of paired
differences (several runs against one baseline, or named pairs) also gives each difference's
paired t-test p-value (:func:`paired_t_p_value`) adjusted by Holm's method over the table's
differences (:func:`holm`), so a verdict can be read at a family-wise 5%.

The seed interval does not cover the test set's own sampling: :func:`paired_bootstrap`
resamples the test examples (the same resample for both runs of a seed: paired) and gives a
percentile interval of the mean over seeds of the difference in per-example score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its standard deviation and confidence interval."""

    n: int
    mean: float
    sd: float  # NaN when n < 2
    low: float  # NaN when n < 2
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 3) -> str:
        """``mean ± half-width`` (just the mean when there is no interval)."""
        if self.n == 0:
            return ""
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its Student-t ``confidence`` interval (see the module)."""
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE
) -> Interval:
    """Mean and interval of ``values[seed] - baseline[seed]`` over the seeds both have."""
    seeds = sorted(set(values) & set(baseline))
    return mean_interval([values[s] - baseline[s] for s in seeds], confidence)


def paired_t_p_value(difference: Interval) -> float:
    """Two-sided p-value of the paired t-test that the mean seed difference is 0:
    t = mean / (sd / sqrt(n)) with n - 1 degrees of freedom (``difference`` from
    :func:`paired_difference`). NaN below two seeds or when every difference is 0."""
    if difference.n < 2 or (difference.sd == 0 and difference.mean == 0):
        return math.nan
    if difference.sd == 0:
        return 0.0
    t = difference.mean / (difference.sd / math.sqrt(difference.n))
    return float(2 * stats.t.sf(abs(t), difference.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of m p-values (Holm, "A simple sequentially
    rejective multiple test procedure", Scand. J. Statist. 6, 1979): the i-th smallest
    becomes max over j <= i of min(1, (m - j + 1) p_(j)); an adjusted value below alpha rejects
    with the family-wise error rate at most alpha. NaN values are not in the family and stay
    NaN."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


BOOTSTRAP_DRAWS = 2000


def paired_bootstrap(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    draws: int = BOOTSTRAP_DRAWS,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Mean over seeds of mean(x) - mean(y), x and y two runs' per-example scores on one seed's
    test examples (``pairs``, one per seed, aligned by example), with the percentile
    ``confidence`` interval of ``draws`` paired bootstrap resamples of each seed's examples
    (``sd``: the resamples' standard deviation). Seeded, so a table is rewritten the same."""
    if not pairs:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    differences = [np.asarray(x, float) - np.asarray(y, float) for x, y in pairs]
    for x, y in pairs:
        if len(x) != len(y) or not len(x):
            raise ValueError(f"paired scores of {len(x)} and {len(y)} examples")
    mean = float(np.mean([d.mean() for d in differences]))
    resampled = np.mean(
        [d[rng.integers(len(d), size=(draws, len(d)))].mean(1) for d in differences], axis=0
    )
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Interval(len(pairs), mean, float(resampled.std(ddof=1)), float(low), float(high))
