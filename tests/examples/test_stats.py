"""Statistics of the main job (`more_tools/stats.py`): intervals on known cases, the paired test, and its error rate on
seeds that either learn the task or do not."""

import numpy as np
import pytest

from more_tools import stats as more_stats


def test_constant_hits_have_a_zero_width_interval():
    estimate = more_stats.estimate_accuracy(np.ones((3, 50)))
    assert (estimate.mean, estimate.low, estimate.high) == (1.0, 1.0, 1.0)
    assert estimate.to_dict() == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 50, "per_seed": [1.0, 1.0, 1.0]}


def test_bernoulli_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    hits = rng.random((1, 2000)) < 0.3  # one seed: only example noise
    estimate = more_stats.estimate_accuracy(hits)
    half_width = 1.96 * np.sqrt(0.3 * 0.7 / 2000)
    assert estimate.low < 0.3 < estimate.high
    assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_seed_variance_widens_the_interval():
    """Seeds that disagree (one learned the task, one did not) must not look as certain as one seed's examples."""
    rng = np.random.default_rng(1)
    agreeing = (rng.random((3, 400)) < 0.5).astype(int)
    disagreeing = np.stack([np.ones(400), np.zeros(400), rng.random(400) < 0.5]).astype(int)
    width = lambda hits: np.subtract(*more_stats.estimate_accuracy(hits).to_dict()["ci95"][::-1])  # noqa: E731
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


def _bimodal_hits(rng, seeds: int, examples: int) -> np.ndarray:
    """Hits of `seeds` training runs that each learn the task (accuracy 0.95-1.0) with probability 0.75, or stall
    anywhere below 0.8, as the main job's seeds do."""
    learned = rng.random(seeds) < 0.75
    accuracy = np.where(learned, rng.uniform(0.95, 1.0, seeds), rng.uniform(0.0, 0.8, seeds))
    return (rng.random((seeds, examples)) < accuracy[:, None]).astype(int)


@pytest.mark.parametrize("seeds", [3, 6])
def test_a_variant_against_itself_is_called_different_at_most_at_the_nominal_rate(seeds):
    """Two seed sets of one variant differ by luck alone: a 95 % test may call at most ~5 % of such pairs different.
    A bootstrap that resamples 3 seeds called about 20 % different here."""
    rng = np.random.default_rng(4)
    trials = 400
    calls = sum(
        more_stats.paired_difference(_bimodal_hits(rng, seeds, 300), _bimodal_hits(rng, seeds, 300)).significant
        for _ in range(trials)
    )
    assert calls / trials <= 0.07


def test_a_variant_whose_every_seed_learns_beats_one_whose_seeds_stall():
    rng = np.random.default_rng(5)
    learned = (rng.random((3, 300)) < rng.uniform(0.95, 1.0, (3, 1))).astype(int)
    stalled = (rng.random((3, 300)) < rng.uniform(0.1, 0.4, (3, 1))).astype(int)
    difference = more_stats.paired_difference(learned, stalled)
    assert difference.significant and difference.low > 0.3 and difference.p_value < 0.05


def test_intervals_stay_inside_the_possible_range():
    disagreeing = np.stack([np.ones(100), np.zeros(100), np.ones(100)])  # a 3-seed t interval reaches past 1
    estimate = more_stats.estimate_accuracy(disagreeing)
    assert 0.0 <= estimate.low < estimate.mean < estimate.high == 1.0
    difference = more_stats.paired_difference(disagreeing, 1 - disagreeing)
    assert -1.0 == difference.low < difference.mean < difference.high <= 1.0


def test_noise_between_two_accuracies_is_symmetric_and_one_sided_at_the_ceiling():
    """At 1.0 the Wilson interval of 400 examples is [0.9905, 1]: a gain from 0.9925 (3 examples) or a loss to it is
    noise, a gain from 0.99 (4 examples) is not; half the interval's width (0.0048) would call 2 examples a change."""
    assert more_stats.wilson_interval(1.0, 400)[1] == pytest.approx(1.0)
    for earlier, final in ((0.9925, 1.0), (1.0, 0.9925)):
        assert abs(final - earlier) <= more_stats.noise_between(final, earlier, 400)
        assert more_stats.noise_between(final, earlier, 400) == more_stats.noise_between(earlier, final, 400)
    assert 0.01 > more_stats.noise_between(1.0, 0.99, 400) > 2 * 0.0048 - 1e-4
    # Away from the bounds the interval is nearly symmetric: about the half-width either way.
    low, high = more_stats.wilson_interval(0.5, 400)
    half = (high - low) / 2
    assert more_stats.noise_between(0.5, 0.45, 400) == pytest.approx(half, rel=0.05)


def test_wilson_interval_is_the_test_set_noise_of_one_seed():
    def half_width(accuracy):
        low, high = more_stats.wilson_interval(accuracy, 400)
        return (high - low) / 2

    assert half_width(0.5) == pytest.approx(1.96 * (0.25 / 400) ** 0.5, rel=0.01)
    assert 0.004 < half_width(1.0) < 0.006  # above 0 where the normal approximation is 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="seeds, examples"):
        more_stats.estimate_accuracy(np.ones(5))
    with pytest.raises(ValueError, match="same"):
        more_stats.paired_difference(np.ones((2, 5)), np.ones((3, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_hits_are_refused(bad):
    hits = np.array([[1.0, bad], [0.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        more_stats.estimate_accuracy(hits)
    with pytest.raises(ValueError, match="finite"):
        more_stats.paired_difference(hits, np.ones((2, 2)))
