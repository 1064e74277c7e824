"""Expert utilisation of a mixture-of-experts model and its health against the MoRE research guide's ranges (§5.1).

`evaluate.load("examples/metrics/expert_utilization")` copies this file into the evaluate cache; the statistics and
health checks are `more_tools.metrics.expert_utilization` (install the repository: `pip install -e .`), which a test
checks against `modeling_more.routing_statistics`.
"""

import datasets
import evaluate

from more_tools.metrics import expert_utilization


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
        return expert_utilization(layers, router_logits, expert_ids, top_k, num_experts)
