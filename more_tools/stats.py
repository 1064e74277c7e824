"""Statistics of the main job: bootstrap confidence intervals over seeds and test examples, and a paired test.

An accuracy here is the mean of a (seeds, examples) matrix of 0/1 hits: every training seed of a variant is scored on
the same test examples. Its uncertainty has two sources, the training run (seed) and the finite test set (example),
so the bootstrap resamples both: seeds with replacement, then examples with replacement, and takes the mean of the
resampled matrix. Two variants trained with the same seeds (same data order and initialisation seed) and scored on
the same examples are compared by a paired bootstrap: the same resampled seeds and examples for both, so the shared
difficulty of an example or the luck of a seed cancels in the difference.
"""

from dataclasses import dataclass

import numpy as np


DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of a hit matrix with a bootstrap confidence interval."""

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
    return hits


def _resampled_means(matrices: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap means of each matrix under the SAME resampled seeds and examples, (resamples,) each."""
    num_seeds, num_examples = matrices[0].shape
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(0, num_seeds, size=(resamples, num_seeds))  # (resamples, seeds)
    example_index = rng.integers(0, num_examples, size=(resamples, num_examples))  # (resamples, examples)
    means = []
    for matrix in matrices:
        # Mean over resampled examples of each seed, then over resampled seeds: (resamples, seeds) -> (resamples,)
        per_seed = np.stack([matrix[:, index].mean(axis=1) for index in example_index])  # (resamples, seeds)
        means.append(np.take_along_axis(per_seed, seed_index, axis=1).mean(axis=1))
    return means


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_accuracy(hits, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """Mean accuracy of a (seeds, examples) hit matrix with its 95 % bootstrap interval over seeds and examples.

    >>> bootstrap_accuracy([[1, 0, 1, 1], [1, 1, 0, 1]]).mean
    0.75
    """
    hits = _as_hits(hits)
    (means,) = _resampled_means([hits], resamples, seed)
    low, high = _interval(means)
    return Estimate(float(hits.mean()), low, high, hits.shape[1], [float(v) for v in hits.mean(axis=1)])


def paired_difference(hits_a, hits_b, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Difference:
    """Accuracy of a minus accuracy of b, paired over seeds and examples, with a 95 % interval and a p-value.

    The p-value is two-sided, from the bootstrap distribution of the difference: twice the smaller share of resamples
    on either side of zero (at least 1 / resamples).
    """
    hits_a, hits_b = _as_hits(hits_a), _as_hits(hits_b)
    if hits_a.shape != hits_b.shape:
        raise ValueError(f"paired hits need the same (seeds, examples) shape, got {hits_a.shape} and {hits_b.shape}")
    means_a, means_b = _resampled_means([hits_a, hits_b], resamples, seed)
    differences = means_a - means_b
    low, high = _interval(differences)
    observed = float(hits_a.mean() - hits_b.mean())
    if np.all(differences == 0):
        p_value = 1.0
    else:
        tail = min(np.mean(differences <= 0), np.mean(differences >= 0))
        p_value = float(min(1.0, max(2 * tail, 1 / resamples)))
    return Difference(observed, low, high, p_value)
