"""Markdown for MoRE evaluation results: the report tables of `evaluate_more.py` / `compare_more.py`, the model card
of an evaluated checkpoint (a `huggingface_hub.ModelCard` with model-index results, built from
`model_cards/more_model_card_template.md`) and the card stub `train_more.py` writes.
"""

import json
import logging
from pathlib import Path

import pandas as pd
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from configuration_more import MoREConfig


logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "more_model_card_template.md"
DATASET_NAME = "MoRE procedural reasoning tasks"
DATASET_TYPE = "more-reasoning"
EXAMPLE_PROMPT = "1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary?\nAnswer:"


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 3) -> str:
    """A table cell: integers and large floats with thousands separators, other floats rounded, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list], cell=fmt) -> str:
    """The one Markdown table writer of the examples; `cell` formats each value (the cells stay as formatted)."""
    frame = pd.DataFrame([[cell(value) for value in row] for row in rows], columns=headers)
    return frame.to_markdown(index=False, tablefmt="github", disable_numparse=True)


def summary_table(results: dict) -> str:
    utilization = results["expert_utilization"]
    rows = [
        ["total parameters", results["parameters"]["total"]],
        ["active parameters per token", results["parameters"]["active"]],
        [f"perplexity ({results.get('split', 'test')} {results['perplexity_on']})", results["perplexity"]],
        ["exact match, mean over tasks", results["exact_match"]["mean"]],
        ["multi-hop accuracy (bAbI 2, 3, 16)", results["multihop_accuracy"]],
        ["arithmetic accuracy", results["arithmetic_accuracy"]],
        ["tokens/s (forward)", results["tokens_per_second"]],
        ["peak memory (MB, forward)", results["peak_memory_mb"]],
        ["expert load CV", utilization["load_cv"]],
        ["effective experts", utilization["effective_experts"]],
        ["health score (share of healthy indicators, %)", results["health_score"]],
    ]
    return markdown_table(["metric", "value"], rows)


def task_table(results: dict) -> str:
    """Exact match per task, next to always answering the task's most frequent training answer when known."""
    majority = results.get("majority_baseline", {})
    rows = [[task, accuracy, majority.get(task)] for task, accuracy in results["exact_match"].items()]
    return markdown_table(["task", "exact match", "majority baseline"], rows)


def depth_table(results: dict) -> str:
    """Mean and per-task exact match at each depth of each swept knob."""
    if not results["depth_sweep"]:
        return "No depth knob applies to this model (no recurrent experts, one MoE iteration)."
    rows = []
    for name, by_depth in results["depth_sweep"].items():
        for depth, accuracy in by_depth.items():
            rows.append([f"{name}={depth}", accuracy["mean"]] + [v for k, v in accuracy.items() if k != "mean"])
    first = next(iter(next(iter(results["depth_sweep"].values())).values()))
    return markdown_table(["depth", "mean"] + [task for task in first if task != "mean"], rows)


def routing_table(results: dict) -> str:
    headers = ["layer", "iteration", "load CV", "max/min load", "effective experts", "router entropy", "max prob"]
    keys = ["layer", "iteration", "load_cv", "max_min_load_ratio", "effective_experts", "router_entropy", "max_prob"]
    return markdown_table(headers, [[row[key] for key in keys] for row in results["routing"]])


def recurrence_table(results: dict) -> str:
    """§5.2 statistics of the recurrence per MoE layer x iteration (empty for experts without a step loop)."""
    rows = [
        [
            row["layer"],
            row["iteration"],
            row.get("steps"),
            " ".join(f"{change:.3g}" for change in row.get("state_change", [])) or None,
            row.get("final_step_contribution"),
            row.get("refinement_consistency"),
            row.get("recurrent_branch_weight"),
        ]
        for row in results["recurrence"]
    ]
    headers = [
        "layer",
        "iteration",
        "steps",
        "state change per step",
        "final-step contribution",
        "refinement consistency",
        "recurrent branch weight",
    ]
    return markdown_table(headers, rows)


def checks_table(results: dict) -> str:
    utilization = results["expert_utilization"]
    rows = [
        [f"{name} (§5.1, mean over layers)", utilization[name], low, high, low <= utilization[name] <= high]
        for name, (low, high) in utilization["healthy_ranges"].items()
    ]
    rows += [
        [f"{name} (§5.2)", check["value"], *check["range"], check["healthy"]]
        for name, check in results["architecture_checks"].items()
    ]
    return markdown_table(["indicator", "value", "healthy from", "healthy to", "healthy"], rows)


def render_report(results: dict) -> str:
    """The Markdown report of one evaluated model."""
    config = results["config"]
    sections = [
        f"# MoRE evaluation: {config['expert_type']} experts, {config['router_type']} router",
        summary_table(results),
        "## Exact match by task",
        task_table(results),
        "## Test-time compute",
        depth_table(results),
        "## Expert utilisation per MoE layer and iteration (guide §5.1)",
        routing_table(results),
        "## Recurrence (guide §5.2)",
        "State change of a step = ||s_t - s_(t-1)|| / ||s_(t-1)||. Evaluation starts the latent state at zero, so the "
        "first step's value only reflects that; the §5.2 checks use steps 2 to r.",
        recurrence_table(results),
        "## Health indicators",
        f"Health score {fmt(results['health_score'], 1)} % (per layer x iteration checks of §5.1 and §5.2 checks).",
        checks_table(results),
    ]
    return "\n\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def eval_results(results: dict) -> list[EvalResult]:
    """model-index entries: exact match per task (one dataset config each) and perplexity on the split scored."""
    common = dict(
        task_type="text-generation",
        dataset_type=DATASET_TYPE,
        dataset_name=DATASET_NAME,
        dataset_split=results.get("split", "test"),  # reports written before the field scored the test split
    )
    entries = [
        EvalResult(
            **common, dataset_config=task, metric_type="exact_match", metric_name="exact match", metric_value=accuracy
        )
        for task, accuracy in results["exact_match"].items()
        if task != "mean"
    ]
    entries.append(
        EvalResult(
            **common,
            metric_type="perplexity",
            metric_name=f"perplexity ({results['perplexity_on']})",
            metric_value=results["perplexity"],
        )
    )
    return entries


def build_model_card(
    results: dict,
    repo_id: str,
    training_data: str | None = None,
    template_path: str | Path = TEMPLATE_PATH,
    evaluation_method: str | None = None,
) -> ModelCard:
    """A filled model card for a MoRE checkpoint from its `more_tools.evaluation.evaluate_model` `results`."""
    config = results["config"]
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["more", "mixture-of-experts", "recurrent-experts", config["expert_type"], "custom_code"],
        eval_results=eval_results(results),
    )
    architecture = markdown_table(["field", "value"], [[name, value] for name, value in config.items()])
    if training_data is None:
        evaluation = results.get("evaluation", {})
        training_data = (
            f"Procedurally generated reasoning tasks of the MoRE repository (`more_tools/data.py`): "
            f"{evaluation.get('tasks', 'see the training arguments')}, each prompt ending in `Answer:` and followed "
            "by a short answer; train, validation and test splits share no prompt."
        )
    if evaluation_method is None:
        evaluation_method = (
            "Greedy decoding, answer = generated text before the first newline or period, compared case-insensitively "
            f"with the reference (exact match); perplexity over the {results['perplexity_on']} of the held-out "
            f"{results.get('split', 'test')} split. Metrics come from `examples/evaluate_more.py` of the MoRE "
            "repository."
        )
    diagnostics = "\n\n".join([routing_table(results), recurrence_table(results), checks_table(results)])
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_id=model_name,
        repo_id=repo_id,
        model_summary=(
            f"A {results['parameters']['total']:,}-parameter MoRE model ({results['parameters']['active']:,} active "
            f"per token) with {config['num_experts']} `{config['expert_type']}` experts per MoE layer."
        ),
        expert_type=config["expert_type"],
        router_type=config["router_type"],
        num_recurrent_steps=config["num_recurrent_steps"],
        num_moe_iterations=config["num_moe_iterations"],
        architecture_table=architecture,
        example_prompt=json.dumps(EXAMPLE_PROMPT),
        training_data=training_data,
        evaluation_method=evaluation_method,
        results_table=summary_table(results) + "\n\n" + task_table(results),
        depth_table=depth_table(results),
        diagnostics_table=diagnostics,
        limitations=(
            "A small research model trained on synthetic tasks; it is a reference for the architecture, not a "
            "general-purpose language model. Accuracy is exact match of greedy answers and says nothing about "
            "natural text."
        ),
    )


def save_model_card(model_dir: str | Path, results: dict, repo_id: str | None = None, **kwargs) -> Path:
    """Write `README.md` (the model card) into a checkpoint directory; `repo_id` defaults to the directory name."""
    model_dir = Path(model_dir)
    card = build_model_card(results, repo_id or model_dir.name, **kwargs)
    path = model_dir / "README.md"
    card.save(path)
    logger.info("Wrote model card %s", path)
    return path


def write_model_card_stub(
    output_dir: str | Path, config: MoREConfig, training_data: str, metrics: dict[str, float]
) -> Path:
    """A short `README.md` model card: what the checkpoint is, how to load it, its data and its final metrics.

    `examples/evaluate_more.py` replaces it with the full card (per-task results, depth sweep, diagnostics).
    """
    output_dir = Path(output_dir)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["more", "mixture-of-experts", "recurrent-experts", config.expert_type, "custom_code"],
    )
    summary = (
        f"A MoRE (Mixture of Recurrent Experts) model trained with `examples/train_more.py`: "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_experts} "
        f"`{config.expert_type}` experts per MoE layer (top-{config.num_experts_per_tok}), `{config.router_type}` "
        f"router, {config.num_moe_iterations} MoE iteration(s), {config.num_recurrent_steps} recurrent steps at "
        "inference. The model code ships with the weights: load it with `trust_remote_code=True`."
    )
    results = markdown_table(
        ["metric", "value"],
        sorted(metrics.items()),
        cell=lambda value: value if isinstance(value, str) else f"{value:.4g}",
    )
    content = f"""---
{card_data.to_yaml()}
---

# {output_dir.name}

{summary}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{output_dir.name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{output_dir.name}")
```

## Training data

{training_data}

## Results

{results}

Run `examples/evaluate_more.py --model_name_or_path {output_dir.name} --output_dir {output_dir.name}/eval` for the
full evaluation and model card.
"""
    path = output_dir / "README.md"
    ModelCard(content).save(path)
    return path
