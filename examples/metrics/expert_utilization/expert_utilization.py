"""Expert utilisation of a mixture-of-experts model and its health against the MoRE research guide's ranges (§5.1).

`evaluate.load("examples/metrics/expert_utilization")` copies this file into the evaluate cache, so it depends on
numpy only; a test checks it against `modeling_more.routing_statistics`.
"""

import math

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Expert utilisation per MoE layer (or layer x iteration) from router outputs: the share of top-k assignments each
expert receives (`load`), its coefficient of variation, the max/mean, min/mean and max/min load ratios, the effective
number of experts (inverse Herfindahl index of the load), and, from router logits, the mean routing entropy and top-1
probability. Each group is checked against the research guide's healthy ranges (§5.1); they are written for 8 experts
and scaled to E experts: effective experts in [0.75 E, E], router entropy in [0.72, 1.35] x log(E).
"""

_KWARGS_DESCRIPTION = """
Configs:
    "router_logits" (default): one row per token and group, `router_logits` = that token's router logits.
    "expert_ids": one row per token and group, `expert_ids` = the experts the token was sent to (top-k).
Args:
    router_logits (`list` of `list` of `float`) or expert_ids (`list` of `list` of `int`): one entry per token.
    layers (`list` of `int`): the group of each row, e.g. its index in `outputs.router_logits` (layer x iteration).
    top_k (`int`, to `compute`, "router_logits" only): experts per token; default 1.
    num_experts (`int`, to `compute`, "expert_ids" only, required): experts per layer.
Returns:
    load_cv, max_load_ratio, min_load_ratio, max_min_load_ratio, effective_experts (and router_entropy, max_prob from
    logits): means over groups.
    per_layer (`dict`): every statistic, the `load` vector and the `checks` (statistic -> in healthy range) per group.
    health_score (`float`): 100 x share of (group, statistic) checks inside the healthy range.
    checks_passed, num_checks (`int`): the counts behind `health_score`.
    healthy (`bool`): every check of every group passes.
    healthy_ranges (`dict`): the ranges used, for this number of experts.
Examples:
    >>> metric = evaluate.load("examples/metrics/expert_utilization", "expert_ids")
    >>> result = metric.compute(expert_ids=[[0], [1], [0], [1]], layers=[0, 0, 0, 0], num_experts=2)
    >>> result["load_cv"], result["effective_experts"], result["healthy"]
    (0.0, 2.0, True)
"""

_CITATION = """
@article{fedus2021switch,
  title={Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity},
  author={Fedus, William and Zoph, Barret and Shazeer, Noam},
  journal={arXiv preprint arXiv:2101.03961},
  year={2021}
}
"""

_FEATURES = {
    "router_logits": datasets.Features(
        {"router_logits": datasets.Sequence(datasets.Value("float32")), "layers": datasets.Value("int32")}
    ),
    "expert_ids": datasets.Features(
        {"expert_ids": datasets.Sequence(datasets.Value("int64")), "layers": datasets.Value("int32")}
    ),
}
# Floating point slack on the range bounds, so a perfectly balanced layer (effective experts == E) passes.
_TOLERANCE = 1e-6


def healthy_ranges(num_experts: int) -> dict[str, tuple[float, float]]:
    """The guide's §5.1 ranges (stated for 8 experts), with counts and entropies scaled to `num_experts`."""
    entropy_scale = math.log(num_experts) / math.log(8)
    return {
        "load_cv": (0.0, 0.3),
        "max_load_ratio": (0.8, 1.5),
        "min_load_ratio": (0.5, 1.2),
        "effective_experts": (6.0 / 8 * num_experts, float(num_experts)),
        "router_entropy": (1.5 * entropy_scale, 2.8 * entropy_scale),
    }


def load_statistics(counts: np.ndarray) -> dict[str, float]:
    """Balance statistics of one group from the number of assignments per expert."""
    load = counts / max(counts.sum(), 1)
    mean = load.mean()
    return {
        "load": load.tolist(),
        "load_cv": float(load.std() / mean) if mean > 0 else math.inf,
        "max_load_ratio": float(load.max() / mean) if mean > 0 else math.inf,
        "min_load_ratio": float(load.min() / mean) if mean > 0 else 0.0,
        "max_min_load_ratio": float(load.max() / load.min()) if load.min() > 0 else math.inf,
        "effective_experts": float(1.0 / max((load**2).sum(), 1e-12)),
    }


def logit_statistics(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, dict[str, float]]:
    """Assignment counts (top-k of the softmax) and the routing entropy (nats) and top-1 probability of one group."""
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    counts = np.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).astype(np.float64)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(-1)
    return counts, {"router_entropy": float(entropy.mean()), "max_prob": float(probs.max(-1).mean())}


def in_range(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    return low - _TOLERANCE <= value <= high + _TOLERANCE


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExpertUtilization(evaluate.Metric):
    def _info(self):
        name = "router_logits" if self.config_name == "default" else self.config_name
        if name not in _FEATURES:
            raise KeyError(f"Unknown config {name!r}; valid configs: {sorted(_FEATURES)}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES[name],
        )

    def _compute(self, layers, router_logits=None, expert_ids=None, top_k=1, num_experts=None):
        layers = np.asarray(layers)
        if router_logits is not None:
            router_logits = np.asarray(router_logits, dtype=np.float64)
            num_experts = router_logits.shape[-1]
        elif num_experts is None:
            raise ValueError("The 'expert_ids' config needs `num_experts` (experts that got no token count too)")
        else:
            expert_ids = np.asarray(expert_ids, dtype=np.int64)
        ranges = healthy_ranges(num_experts)
        per_layer = {}
        for layer in np.unique(layers):
            rows = layers == layer
            if router_logits is not None:
                counts, stats = logit_statistics(router_logits[rows], top_k)
            else:
                counts = np.bincount(expert_ids[rows].reshape(-1), minlength=num_experts).astype(np.float64)
                stats = {}
            stats = {**load_statistics(counts), **stats}
            stats["checks"] = {name: in_range(stats[name], bounds) for name, bounds in ranges.items() if name in stats}
            per_layer[int(layer)] = stats
        checks = [passed for stats in per_layer.values() for passed in stats["checks"].values()]
        groups = list(per_layer.values())
        names = [name for name in groups[0] if name not in ("load", "checks")] if groups else []
        return {
            **{name: float(np.mean([stats[name] for stats in groups])) for name in names},
            "per_layer": per_layer,
            "health_score": 100.0 * sum(checks) / len(checks) if checks else 0.0,
            "checks_passed": sum(checks),
            "num_checks": len(checks),
            "healthy": bool(checks) and all(checks),
            "healthy_ranges": ranges,
        }
