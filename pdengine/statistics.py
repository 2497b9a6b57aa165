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
_CHUNK_VALUES = 2_000_000  # resampled values held at once (bounds memory on large evaluation sets)


class Bootstrap:
    """Resampled means over questions (and training seeds); the same question resamples for
    every series of n questions, so differences between series are paired.

    A series is `[n]` scores, one per question, or `[k, n]`: the scores of k training seeds
    of one method. Each resample draws n questions (shared by all series) and, for a
    `[k, n]` series, k seeds with replacement, so its interval covers both the choice of
    questions and the training noise. Series with the same k draw the same seeds: the i-th
    run of two methods is taken as the same training seed (paired as the questions are).
    """

    def __init__(self, n: int, *, n_resamples: int = N_RESAMPLES, seed: int = SEED):
        if n < 1:
            raise InputError("bootstrap: no questions to resample")
        if n_resamples < 1:
            raise InputError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
        self.n, self.n_resamples, self.seed = n, n_resamples, seed

    def means(self, values) -> np.ndarray:
        """The mean of `values` (`[n]` or `[k, n]`) in each resample, `[n_resamples]`."""
        values = np.asarray(values, dtype=np.float64)
        values = values[None] if values.ndim == 1 else values
        if values.ndim != 2 or values.shape[1] != self.n or values.shape[0] < 1:
            raise InputError(f"bootstrap: expected {self.n} values (or k rows of them), got shape {values.shape}")
        k = values.shape[0]
        questions = np.random.default_rng(self.seed)  # same seed: same resamples for every series
        seeds = np.random.default_rng([self.seed, k])
        chunk = max(1, min(self.n_resamples, _CHUNK_VALUES // (k * self.n)))
        out = []
        for start in range(0, self.n_resamples, chunk):
            rows = min(chunk, self.n_resamples - start)
            per_seed = values[:, questions.integers(0, self.n, size=(rows, self.n))].mean(axis=2)  # [k, rows]
            if k == 1:
                out.append(per_seed[0])
            else:
                drawn = seeds.integers(0, k, size=(rows, k))
                out.append(np.take_along_axis(per_seed.T, drawn, axis=1).mean(axis=1))
        return np.concatenate(out)

    def interval(self, values, confidence: float = CONFIDENCE) -> list[float]:
        """The percentile-bootstrap interval `[low, high]` of the mean of `values`."""
        return percentile_interval(self.means(values), confidence)


def percentile_interval(samples, confidence: float = CONFIDENCE) -> list[float]:
    """`[low, high]`: the central `confidence` share of bootstrap samples (e.g. of a - b)."""
    if not 0 < confidence < 1:
        raise InputError(f"confidence must be in (0, 1), got {confidence}")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.asarray(samples, dtype=np.float64), [tail, 100 - tail])
    return [float(low), float(high)]


def mean_ci(values, **kwargs) -> tuple[float, list[float]]:
    """(mean, 95 % bootstrap interval) of per-question values (`[n]`, or `[k, n]` for k seeds)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), Bootstrap(values.shape[-1], **kwargs).interval(values)


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
