"""Statistics of the main job (`more_tools/stats.py`): bootstrap intervals on known cases and the paired test."""

import numpy as np
import pytest

from more_tools import stats as more_stats


def test_constant_hits_have_a_zero_width_interval():
    estimate = more_stats.bootstrap_accuracy(np.ones((3, 50)))
    assert (estimate.mean, estimate.low, estimate.high) == (1.0, 1.0, 1.0)
    assert estimate.to_dict() == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 50, "per_seed": [1.0, 1.0, 1.0]}


def test_bernoulli_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    hits = rng.random((1, 2000)) < 0.3  # one seed: only example noise
    estimate = more_stats.bootstrap_accuracy(hits)
    half_width = 1.96 * np.sqrt(0.3 * 0.7 / 2000)
    assert estimate.low < 0.3 < estimate.high
    assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_seed_variance_widens_the_interval():
    """Seeds that disagree (one learned the task, one did not) must not look as certain as one seed's examples."""
    rng = np.random.default_rng(1)
    agreeing = (rng.random((3, 400)) < 0.5).astype(int)
    disagreeing = np.stack([np.ones(400), np.zeros(400), rng.random(400) < 0.5]).astype(int)
    width = lambda hits: np.subtract(*more_stats.bootstrap_accuracy(hits).to_dict()["ci95"][::-1])  # noqa: E731
    assert width(disagreeing) > 5 * width(agreeing)


def test_paired_test_detects_a_planted_difference():
    rng = np.random.default_rng(2)
    base = (rng.random((3, 300)) < 0.5).astype(int)
    better = base.copy()
    flip = (base == 0) & (rng.random(base.shape) < 0.2)  # 10 % more correct on the same examples
    better[flip] = 1
    difference = more_stats.paired_difference(better, base)
    assert difference.mean == pytest.approx(better.mean() - base.mean())
    assert difference.significant and difference.low > 0 and difference.p_value < 0.01
    assert more_stats.paired_difference(base, better).high < 0


def test_paired_test_reports_no_difference_for_a_null():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 300)) < 0.6).astype(int)
    b = (rng.random((3, 300)) < 0.6).astype(int)  # same accuracy, independent errors
    difference = more_stats.paired_difference(a, b)
    assert not difference.significant and difference.low < 0 < difference.high and difference.p_value > 0.05
    same = more_stats.paired_difference(a, a)
    assert (same.mean, same.low, same.high, same.p_value, same.significant) == (0.0, 0.0, 0.0, 1.0, False)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seeds, examples"):
        more_stats.bootstrap_accuracy(np.ones(5))
    with pytest.raises(ValueError, match="same"):
        more_stats.paired_difference(np.ones((2, 5)), np.ones((3, 5)))
