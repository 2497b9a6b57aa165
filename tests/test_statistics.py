"""pdengine.statistics: percentile bootstrap over questions, against closed forms."""
import numpy as np
import pytest

from pdengine import statistics as S
from pdengine.errors import InputError


def test_two_values_match_the_enumerated_bootstrap_distribution():
    # resampling [0, 1] gives means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 exactly
    means = S.Bootstrap(2, n_resamples=20_000).means([0.0, 1.0])
    shares = [np.mean(means == v) for v in (0.0, 0.5, 1.0)]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    assert S.Bootstrap(2, n_resamples=20_000).interval([0.0, 1.0]) == [0.0, 1.0]


def test_bootstrap_standard_error_is_sd_over_sqrt_n():
    # the variance of a resampled mean is exactly (plug-in variance) / n
    values = np.random.default_rng(1).random(300) ** 2
    means = S.Bootstrap(300, n_resamples=20_000, seed=3).means(values)
    assert means.std() == pytest.approx(values.std() / np.sqrt(300), rel=0.03)
    assert means.mean() == pytest.approx(values.mean(), abs=values.std() / np.sqrt(300) / 20)


def test_interval_of_an_accuracy_approaches_the_normal_interval():
    correct = np.array([1.0] * 150 + [0.0] * 350)  # p = 0.3, n = 500: 0.3 +- 1.96 * sqrt(.21 / 500)
    mean, (low, high) = S.mean_ci(correct, n_resamples=20_000)
    half = 1.959963984540054 * np.sqrt(0.3 * 0.7 / 500)
    assert mean == 0.3
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half), abs=0.006)
    assert S.normal_interval(correct) == pytest.approx([0.3 - half, 0.3 + half])


def test_constant_scores_have_a_point_interval():
    assert S.mean_ci([1.0] * 40) == (1.0, [1.0, 1.0])


def test_paired_difference_shares_the_resamples():
    rng = np.random.default_rng(0)
    skill = rng.random(200)
    a = (skill > 0.3).astype(float)  # a is right wherever b is, and on 40 % more
    b = (skill > 0.7).astype(float)
    boot = S.Bootstrap(200)
    assert np.allclose(boot.means(a) - boot.means(b), boot.means(a - b), atol=1e-12)
    diff, (low, high) = S.paired_difference(a, b)
    assert diff == pytest.approx(a.mean() - b.mean()) and 0 < low < diff < high
    # pairing removes the shared difficulty: narrower than the two separate intervals allow
    (la, ha), (lb, hb) = boot.interval(a), boot.interval(b)
    assert high - low < (ha - la) + (hb - lb)
    assert S.paired_difference(a, a) == (0.0, [0.0, 0.0])
    assert S.paired_difference(b + 1, b) == (1.0, [1.0, 1.0])


def test_fixed_seed_makes_reports_reproducible():
    values = np.random.default_rng(5).random(50)
    assert S.mean_ci(values) == S.mean_ci(values)
    assert S.mean_ci(values, seed=1) != S.mean_ci(values, seed=2)


@pytest.mark.parametrize("call, needle", [
    (lambda: S.Bootstrap(0), "no questions"),
    (lambda: S.Bootstrap(3, n_resamples=0), "n_resamples"),
    (lambda: S.Bootstrap(3).means([1.0, 2.0]), "expected 3 values"),
    (lambda: S.Bootstrap(3).interval([1.0, 2.0, 3.0], confidence=1.5), "confidence"),
    (lambda: S.paired_difference([1.0], [1.0, 0.0]), "differ"),
])
def test_bad_inputs(call, needle):
    with pytest.raises(InputError, match=needle):
        call()


def test_seeds_are_resampled_too():
    # seed 0 wrong on every question, seed 1 right on every one: only the seed draw matters,
    # and two seeds drawn with replacement give means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    runs = [[0.0] * 30, [1.0] * 30]
    means = S.Bootstrap(30, n_resamples=20_000).means(runs)
    assert [np.mean(means == v) for v in (0.0, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    assert S.mean_ci(runs, n_resamples=20_000) == (0.5, [0.0, 1.0])
    # identical seeds: the same interval as one seed (the seed draw changes nothing)
    one = np.random.default_rng(2).random(30)
    assert S.Bootstrap(30).interval([one, one, one]) == pytest.approx(S.Bootstrap(30).interval(one))
