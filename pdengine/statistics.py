"""Confidence intervals for evaluation scores (docs/DESIGN.md, "Evaluation").

Every accuracy is a mean over questions, so its uncertainty comes from which questions were
asked: a percentile bootstrap over questions (resample the questions with replacement,
recompute the mean, take the 2.5 % and 97.5 % quantiles) gives the 95 % interval without
assuming a distribution. Two methods answered the same questions, so their difference is
bootstrapped *paired*: each resample takes the same questions for both, which cancels the
questions' own difficulty and gives a much narrower interval than two separate ones would.

All intervals of one report share one set of resamples from a fixed seed, so a report is
reproducible and its intervals are mutually consistent.
"""
from __future__ import annotations

import numpy as np

from pdengine.errors import InputError

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
_CHUNK = 250  # resamples drawn at once: bounds memory at _CHUNK x n_questions indices


class Bootstrap:
    """Resampled means of per-question values; the same resamples for every series of length n."""

    def __init__(self, n: int, *, n_resamples: int = N_RESAMPLES, seed: int = SEED):
        if n < 1:
            raise InputError("bootstrap: no questions to resample")
        if n_resamples < 1:
            raise InputError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
        self.n, self.n_resamples, self.seed = n, n_resamples, seed

    def means(self, values) -> np.ndarray:
        """The mean of `values` in each resample, `[n_resamples]`."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.n,):
            raise InputError(f"bootstrap: expected {self.n} values, got shape {values.shape}")
        rng = np.random.default_rng(self.seed)  # same seed: same resamples for every series
        out = []
        for start in range(0, self.n_resamples, _CHUNK):
            rows = min(_CHUNK, self.n_resamples - start)
            out.append(values[rng.integers(0, self.n, size=(rows, self.n))].mean(axis=1))
        return np.concatenate(out)

    def interval(self, values, confidence: float = CONFIDENCE) -> list[float]:
        """The percentile-bootstrap interval `[low, high]` of the mean of `values`."""
        if not 0 < confidence < 1:
            raise InputError(f"confidence must be in (0, 1), got {confidence}")
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(self.means(values), [tail, 100 - tail])
        return [float(low), float(high)]


def mean_ci(values, **kwargs) -> tuple[float, list[float]]:
    """(mean, 95 % bootstrap interval) of per-question values."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), Bootstrap(len(values), **kwargs).interval(values)


def paired_difference(a, b, **kwargs) -> tuple[float, list[float]]:
    """(mean of a - b, its 95 % paired-bootstrap interval): a[i] and b[i] score the same question."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired difference: {a.shape[0]} and {b.shape[0]} questions differ")
    return mean_ci(a - b, **kwargs)


def normal_interval(values, z: float = 1.959963984540054) -> list[float]:
    """mean +- z * sd / sqrt(n) (sd with 1/n): the large-sample limit of the bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    half = z * values.std() / np.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]
