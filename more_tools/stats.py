"""Statistics of the main job: t intervals over seeds and test examples, and a paired test.

An accuracy here is the mean of a (seeds, examples) matrix of 0/1 hits: every training seed of a variant is scored on
the same test examples. Its uncertainty has two sources, the training run (seed) and the finite test set (example):

- seed: the variance of the per-seed accuracies over the seeds, divided by their number (seeds - 1 degrees of
  freedom);
- example: the variance of the per-example hit rates (mean over seeds) over the examples, divided by their number.

The interval is mean ± t · sqrt(seed + example), with Welch-Satterthwaite degrees of freedom for the sum. With 3 seeds
the seed part has 2 degrees of freedom and t is 4.3, not 1.96: a seed that never learned the task widens the interval
as much as it should. (A bootstrap that resamples 3 seeds cannot: its resampled means never leave the range of the 3
seeds. On simulated seeds that learn the task or not, as the main job's do, it called about 20 % of comparisons of a
variant with itself different, where a 95 % test calls at most 5 %; `tests/examples/test_stats.py`.)

Two variants trained with the same seeds (same data order and initialisation seed) and scored on the same examples are
compared on their per-seed differences and per-example differences: the luck of a seed's data order and the
difficulty of an example cancel in the difference.
"""

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats


CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of a hit matrix with its confidence interval (clipped to [0, 1])."""

    mean: float
    low: float
    high: float
    n: int  # test examples per seed
    per_seed: list[float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "n": self.n, "per_seed": self.per_seed}


@dataclass(frozen=True)
class Difference:
    """Paired difference of two hit matrices (a - b) with its confidence interval and two-sided p-value."""

    mean: float
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {
            "mean": self.mean,
            "ci95": [self.low, self.high],
            "p_value": self.p_value,
            "significant": self.significant,
        }


def _as_hits(hits) -> np.ndarray:
    hits = np.asarray(hits, dtype=np.float64)
    if hits.ndim != 2 or hits.shape[0] < 1 or hits.shape[1] < 1:
        raise ValueError(f"hits must be a non-empty (seeds, examples) matrix, got shape {hits.shape}")
    if not np.isfinite(hits).all():  # a NaN would pass every comparison below and divide by zero in the interval
        raise ValueError(f"hits must be finite, got {int((~np.isfinite(hits)).sum())} NaN or infinite entries")
    return hits


def _variance_of_mean(values: np.ndarray) -> tuple[float, int]:
    """(variance of the mean of `values`, its degrees of freedom); (0, 0) for a single value."""
    if values.shape[0] < 2:
        return 0.0, 0
    return float(values.var(ddof=1)) / values.shape[0], values.shape[0] - 1


def _t_interval(mean: float, seed_values: np.ndarray, example_values: np.ndarray) -> tuple[float, float, float]:
    """(low, high, two-sided p-value of mean = 0) of `mean` with the seed and example variance components of
    `seed_values` (seeds,) and `example_values` (examples,), Welch-Satterthwaite degrees of freedom."""
    components = [_variance_of_mean(seed_values), _variance_of_mean(example_values)]
    variance = sum(part for part, _ in components)
    if variance == 0:  # every seed and every example alike: no spread to estimate
        return mean, mean, 1.0 if mean == 0 else 0.0
    dof = variance**2 / sum(part**2 / part_dof for part, part_dof in components if part > 0)
    scale = float(np.sqrt(variance))
    half_width = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, dof)) * scale
    p_value = float(2 * scipy_stats.t.sf(abs(mean) / scale, dof))
    return mean - half_width, mean + half_width, p_value  # Python floats: JSON-serialisable


def wilson_interval(accuracy: float, examples: int) -> tuple[float, float]:
    """95 % Wilson interval of one run's accuracy on `examples` examples: the test-set noise of a single seed, still
    wide at an accuracy of 0 or 1 (where the normal approximation gives 0 width), and one-sided there.

    >>> [round(bound, 4) for bound in wilson_interval(1.0, 400)]
    [0.9905, 1.0]
    """
    z = float(scipy_stats.norm.ppf(0.5 + CONFIDENCE / 2))
    spread = accuracy * (1 - accuracy) / examples + z**2 / (4 * examples**2)
    half_width = z * float(np.sqrt(spread)) / (1 + z**2 / examples)
    center = (accuracy + z**2 / (2 * examples)) / (1 + z**2 / examples)
    return center - half_width, center + half_width


def within_noise(final: float, earlier: float, examples: int) -> float:
    """How far below (or above) `final` accuracy an `earlier` one may lie and still be inside the Wilson interval of
    `final` on `examples` examples: the change that test-set noise alone explains, on the side it happened. At 1.0 the
    whole interval lies below: 0.0095 on 400 examples, its whole width.

    >>> round(within_noise(1.0, 0.99, 400), 4)
    0.0095
    """
    low, high = wilson_interval(final, examples)
    return final - low if earlier <= final else high - final


def noise_between(final: float, earlier: float, examples: int) -> float:
    """The largest change between two accuracies on `examples` examples that test-set noise explains: either one
    inside the other's Wilson interval (`within_noise` both ways). Symmetric in the two, so one example lost at 1.0
    (inside the interval of 1.0) is noise as much as one example gained.

    >>> round(noise_between(0.9975, 1.0, 400), 4)
    0.0095
    """
    return max(within_noise(final, earlier, examples), within_noise(earlier, final, examples))


def estimate_accuracy(hits) -> Estimate:
    """Mean accuracy of a (seeds, examples) hit matrix with its 95 % t interval over seeds and examples.

    >>> estimate_accuracy([[1, 0, 1, 1], [1, 1, 0, 1]]).mean
    0.75
    """
    hits = _as_hits(hits)
    per_seed = hits.mean(axis=1)  # (seeds,)
    mean = float(hits.mean())
    low, high, _ = _t_interval(mean, per_seed, hits.mean(axis=0))
    return Estimate(mean, max(low, 0.0), min(high, 1.0), hits.shape[1], [float(v) for v in per_seed])


def paired_difference(hits_a, hits_b) -> Difference:
    """Accuracy of a minus accuracy of b, paired over seeds and examples, with a 95 % t interval (clipped to
    [-1, 1]) and a two-sided p-value."""
    hits_a, hits_b = _as_hits(hits_a), _as_hits(hits_b)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired hits need the same (seeds, examples) shape, got {hits_a.shape} and {hits_b.shape}")
    difference = hits_a - hits_b  # (seeds, examples)
    mean = float(difference.mean())
    low, high, p_value = _t_interval(mean, difference.mean(axis=1), difference.mean(axis=0))
    return Difference(mean, max(low, -1.0), min(high, 1.0), p_value)
