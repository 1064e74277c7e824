"""Evaluate a saved MoRE model on the embedded reasoning tasks: perplexity, per-task exact match, a test-time-compute
sweep over recurrence depth, the research guide's architecture diagnostics (§5.1, §5.2), throughput and peak memory.

Writes `eval_results.json`, `eval_results.md` and plots (accuracy vs depth, expert load, routing entropy) to
`--output_dir`, and fills the checkpoint's model card (`README.md` in the model directory).

    python examples/evaluate_more.py --model_name_or_path outputs/more --output_dir outputs/more/eval
    python examples/evaluate_more.py --model_name_or_path outputs/more --output_dir outputs/more/eval \\
        --recurrent_steps_sweep 1,2,4,8,16 --moe_iterations_sweep 1,2,3
    python examples/evaluate_more.py eval_args.json          # the same arguments from a JSON file

The data arguments are those of `train_more.py` (`--tasks`, `--num_test_examples`, `--dataset_seed`, `--babi_dir`,
`--max_length`, `--answer_only_loss`, ...): with the values used for training, the test split is exactly the held-out
split the model never saw, and perplexity covers the tokens the model was trained on (the answers by default).
"""

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import evaluate
import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


EXAMPLES_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES_DIR))
sys.path.insert(0, str(EXAMPLES_DIR.parent))

import modeling_more  # noqa: E402  (registers MoRE with the Auto classes)
from benchmark_more import peak_memory  # noqa: E402
from model_card_more import render_report, save_model_card  # noqa: E402
from more_data import load_tokenizer, tokenize_qa  # noqa: E402
from more_eval import exact_match_by_task, majority_baseline  # noqa: E402
from train_more import DataArguments, fit_batch, lm_loss_sum, load_raw_datasets  # noqa: E402


logger = logging.getLogger(__name__)

METRICS_DIR = EXAMPLES_DIR / "metrics"
# Guide §5.3: "babi_multihop_accuracy" averages bAbI tasks 2, 3 and 16; arithmetic covers the guide's custom
# arithmetic data set, which holds both bare sums and word problems.
MULTIHOP_TASKS = ("babi2", "babi3", "babi16")
ARITHMETIC_TASKS = ("arithmetic", "word_problem")
# Guide §5.2 healthy ranges. Synthesis I (recurrent experts): the state changes from step to step, stably, and the
# last step still matters. Synthesis II: routing neither collapses nor turns chaotic over iterations (entropy stated
# for 8 experts, scaled by log(E) / log(8)) and gets moderately more confident.
RECURRENCE_RANGES = {
    "mean_steps": (2.0, 8.0),
    "mean_state_change": (0.1, 2.0),
    "state_change_trend": (-0.1, 0.1),
    "final_step_contribution": (0.05, 0.5),
}
ITERATION_RANGES = {"routing_entropy_mean": (1.2, 2.5), "routing_maxprob_trend": (0.0, 0.3)}


@dataclass
class CheckpointArguments:
    model_name_or_path: str = field(metadata={"help": "Directory of a saved MoRE model and its tokenizer."})
    output_dir: str = field(metadata={"help": "Where the JSON, Markdown and plots go."})
    write_model_card: bool = field(
        default=True, metadata={"help": "Fill README.md in the model directory with these results."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository id shown in the model card's loading snippet."}
    )


@dataclass
class EvaluationArguments:
    eval_batch_size: int = field(default=32, metadata={"help": "Examples per forward / generate call."})
    recurrent_steps_sweep: str = field(
        default="1,2,4,8,16",
        metadata={"help": "Expert recurrence depths of the test-time-compute sweep (recurrent expert types only)."},
    )
    moe_iterations_sweep: str = field(
        default="1,2,3", metadata={"help": "MoE-block iteration counts of the sweep (Synthesis II; every type)."}
    )
    sweep_examples: int | None = field(
        default=None, metadata={"help": "Test examples used by the sweep (default: all)."}
    )
    throughput_repeats: int = field(default=3, metadata={"help": "Timed forward passes for tokens/s."})


# ---------------------------------------------------------------------------------------------------------------------
# Size, speed, memory
# ---------------------------------------------------------------------------------------------------------------------


# The config fields a report (and the model card built from it) shows.
REPORT_CONFIG_FIELDS = (
    "expert_type",
    "router_type",
    "num_experts",
    "num_experts_per_tok",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "recurrent_intermediate_size",
    "num_recurrent_steps",
    "num_moe_iterations",
)


def count_parameters(model) -> dict[str, int]:
    """Total parameters and those a token uses (active): all but the experts it is not routed to
    (`MoREPreTrainedModel.num_parameters(active=True)`)."""
    return {"total": model.num_parameters(), "active": model.num_parameters(active=True)}


def _forward_inputs(batch: dict) -> dict:
    """A plain forward of `batch`: no labels (no loss), no cache."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


@torch.no_grad()
def tokens_per_second(model, batch: dict, repeats: int) -> float:
    """Forward throughput over the real (unpadded) tokens of `batch`, after one warm-up pass."""
    inputs = _forward_inputs(batch)
    model(**inputs)
    start = time.perf_counter()
    for _ in range(repeats):
        model(**inputs)
    elapsed = time.perf_counter() - start
    return float(batch["attention_mask"].sum()) * repeats / elapsed


@torch.no_grad()
def peak_memory_mb(model, batch: dict) -> float:
    """Peak memory of one forward pass over `batch`: the weights plus the most tensor memory alive at once."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + peak_memory(partial(model, **_forward_inputs(batch)), batch["input_ids"].device)) / 2**20


# ---------------------------------------------------------------------------------------------------------------------
# Perplexity and diagnostics: one pass over the test texts
# ---------------------------------------------------------------------------------------------------------------------


def text_batches(dataset, tokenizer, batch_size: int, max_length: int, device, answer_only: bool) -> list[dict]:
    """bos + prompt + answer + eos of every example, right-padded to the longest text of its batch; labels on every
    token, or on the answer and eos only."""
    tokenized = tokenize_qa(dataset, tokenizer, max_length=max_length, answer_only_loss=answer_only)
    tokenized = tokenized.with_format("torch")
    batches = [fit_batch(tokenized[start : start + batch_size]) for start in range(0, len(tokenized), batch_size)]
    return [{name: tensor.to(device) for name, tensor in batch.items()} for batch in batches]


def moe_layer_iterations(config, num_moe_iterations: int) -> list[tuple[int, int]]:
    """(layer, iteration) of each entry of `outputs.router_logits`: MoE layers in order, iterations inside."""
    moe_layers = [i for i in range(config.num_hidden_layers) if i not in config.mlp_only_layers]
    return [(layer, iteration) for layer in moe_layers for iteration in range(num_moe_iterations)]


@torch.no_grad()
def perplexity_and_diagnostics(model, batches: list[dict]) -> dict:
    """Perplexity of the labelled tokens, routing statistics per MoE layer x iteration (`routing_statistics` over all
    real tokens), the expert-utilisation metric with its health checks, and the recurrence statistics (batch means)."""
    nll, count = 0.0, 0
    logits_per_entry, masks, recurrence = None, [], None
    for batch in tqdm(batches, desc="perplexity + diagnostics", leave=False):
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            output_router_logits=True,
            output_recurrence_stats=True,
        )
        batch_nll, batch_count = lm_loss_sum(outputs.logits, batch["labels"])
        nll += float(batch_nll)
        count += int(batch_count)
        masks.append(batch["attention_mask"].reshape(-1).bool())
        if logits_per_entry is None:
            logits_per_entry = [[] for _ in outputs.router_logits]
            recurrence = [[] for _ in outputs.recurrence_stats]
        for entry, logits in zip(logits_per_entry, outputs.router_logits, strict=True):
            entry.append(logits.float())
        for entry, stats in zip(recurrence, outputs.recurrence_stats, strict=True):
            entry.append(stats)
    mask = torch.cat(masks)
    moe_layers = model.config.num_hidden_layers - len(model.config.mlp_only_layers)
    entries = moe_layer_iterations(model.config, len(logits_per_entry) // moe_layers)
    top_k = model.config.num_experts_per_tok
    routing, metric_logits, metric_layers = [], [], []
    for index, ((layer, iteration), chunks) in enumerate(zip(entries, logits_per_entry, strict=True)):
        logits = torch.cat(chunks)
        stats = modeling_more.routing_statistics(logits, top_k, mask)
        routing.append({"layer": layer, "iteration": iteration, **_to_python(stats)})
        metric_logits.append(logits[mask].numpy())
        metric_layers.append(np.full(int(mask.sum()), index))
    utilization = evaluate.load(str(METRICS_DIR / "expert_utilization")).compute(
        router_logits=np.concatenate(metric_logits), layers=np.concatenate(metric_layers), top_k=top_k
    )
    utilization.pop("per_layer")  # `routing` holds the same numbers per layer x iteration
    return {
        "perplexity": math.exp(nll / max(count, 1)),
        "routing": routing,
        "expert_utilization": utilization,
        "recurrence": [
            {"layer": layer, "iteration": iteration, **_mean_stats(per_batch)}
            for (layer, iteration), per_batch in zip(entries, recurrence, strict=True)
        ],
    }


def _mean_stats(per_batch: list[dict]) -> dict:
    """Mean over batches of each statistic (scalars stay scalars, per-step vectors stay vectors)."""
    names = [name for name in per_batch[0] if name != "steps_per_token"]  # per-token detail: not a summary
    return {name: _to_python(torch.stack([stats[name].float() for stats in per_batch]).mean(0)) for name in names}


def _to_python(value):
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    return value


def architecture_checks(routing: list[dict], recurrence: list[dict], num_experts: int) -> dict[str, dict]:
    """The guide's §5.2 indicators with their healthy ranges: Synthesis I per MoE layer (averaged over iterations),
    Synthesis II per MoE layer when the block iterates.

    The first expert step starts from the zero latent state of evaluation, so its relative change is not a
    measurement of the recurrence; state-change indicators use steps 2..r and need r >= 2 (3 for the trend).
    """
    checks = {}
    with_steps = [stats for stats in recurrence if len(stats.get("state_change", [])) >= 2]
    if with_steps:
        changes = [stats["state_change"][1:] for stats in with_steps]
        values = {
            "mean_steps": np.mean([stats["steps"] for stats in with_steps]),
            "mean_state_change": np.mean([np.mean(change) for change in changes]),
            "final_step_contribution": np.mean([stats["final_step_contribution"] for stats in with_steps]),
        }
        if all(len(change) >= 2 for change in changes):
            values["state_change_trend"] = np.mean([np.polyfit(range(len(c)), c, 1)[0] for c in changes])
        checks.update({name: _check(value, RECURRENCE_RANGES[name]) for name, value in values.items()})
    layers = sorted({row["layer"] for row in routing})
    per_layer = [[row for row in routing if row["layer"] == layer] for layer in layers]
    if per_layer and len(per_layer[0]) > 1:
        scale = math.log(num_experts) / math.log(8)
        low, high = ITERATION_RANGES["routing_entropy_mean"]
        entropy = np.mean([row["router_entropy"] for rows in per_layer for row in rows])
        trend = np.mean([rows[-1]["max_prob"] - rows[0]["max_prob"] for rows in per_layer])
        checks["routing_entropy_mean"] = _check(entropy, (low * scale, high * scale))
        checks["routing_maxprob_trend"] = _check(trend, ITERATION_RANGES["routing_maxprob_trend"])
    return checks


def _check(value: float, bounds: tuple[float, float]) -> dict:
    return {"value": float(value), "range": list(bounds), "healthy": bool(bounds[0] <= value <= bounds[1])}


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy and the test-time-compute sweep
# ---------------------------------------------------------------------------------------------------------------------


def task_group_accuracy(exact_match: dict[str, float], tasks: tuple[str, ...]) -> float | None:
    """Mean exact match over the tasks of a group that were evaluated (None when none was)."""
    present = [exact_match[task] for task in tasks if task in exact_match]
    return float(np.mean(present)) if present else None


def depth_sweep(
    model, tokenizer, dataset, args: EvaluationArguments, max_new_tokens: int
) -> dict[str, dict[int, dict]]:
    """Exact match by task at each inference depth: `num_recurrent_steps` for recurrent expert types (the others
    ignore it) and `num_moe_iterations` for every type."""
    expert_class = modeling_more.get_expert_class(model.config.expert_type)
    sweeps = {"num_moe_iterations": _int_list(args.moe_iterations_sweep)}
    if issubclass(expert_class, modeling_more.MoRERecurrentExperts):
        sweeps["num_recurrent_steps"] = _int_list(args.recurrent_steps_sweep)
    if args.sweep_examples is not None:
        dataset = dataset.select(range(min(args.sweep_examples, len(dataset))))
    results = {}
    for name, depths in sweeps.items():
        results[name] = {
            depth: exact_match_by_task(
                model, tokenizer, dataset, args.eval_batch_size, max_new_tokens, **{name: depth}
            )
            for depth in tqdm(depths, desc=f"sweep {name}", leave=False)
        }
    return results


def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


# ---------------------------------------------------------------------------------------------------------------------
# Everything for one model
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_model(model, tokenizer, dataset, args: EvaluationArguments, data_args: DataArguments) -> dict:
    """Every metric of this script for one model in eval mode on the test `dataset` (task, prompt, answer, text),
    tokenized as in training (`data_args.max_length`, perplexity on the answers with `data_args.answer_only_loss`)."""
    model.eval()
    device = next(model.parameters()).device
    batches = text_batches(
        dataset, tokenizer, args.eval_batch_size, data_args.max_length, device, data_args.answer_only_loss
    )
    diagnostics = perplexity_and_diagnostics(model, batches)
    exact_match = exact_match_by_task(model, tokenizer, dataset, args.eval_batch_size, data_args.max_new_tokens)
    return model_report(
        model,
        diagnostics,
        perplexity_on="answers" if data_args.answer_only_loss else "texts",
        exact_match=exact_match,
        depth_sweep=depth_sweep(model, tokenizer, dataset, args, data_args.max_new_tokens),
        multihop_accuracy=task_group_accuracy(exact_match, MULTIHOP_TASKS),
        arithmetic_accuracy=task_group_accuracy(exact_match, ARITHMETIC_TASKS),
        tokens_per_second=tokens_per_second(model, batches[0], args.throughput_repeats),
        peak_memory_mb=peak_memory_mb(model, batches[0]),
    )


def model_report(
    model,
    diagnostics: dict,
    *,
    perplexity_on: str,
    exact_match: dict,
    depth_sweep: dict,
    multihop_accuracy: float | None = None,
    arithmetic_accuracy: float | None = None,
    tokens_per_second: float | None = None,
    peak_memory_mb: float | None = None,
) -> dict:
    """The report of one model (what `eval_results.json` holds): its config and parameters, the accuracies and depth
    sweeps given, `perplexity_and_diagnostics` output with the architecture checks and one health score; what was not
    measured stays None."""
    config = model.config
    checks = architecture_checks(diagnostics["routing"], diagnostics["recurrence"], config.num_experts)
    utilization = diagnostics["expert_utilization"]
    # One health score over both sections of the guide: the share of §5.1 (per layer x iteration) and §5.2 checks
    # that fall inside their healthy ranges.
    passed = utilization["checks_passed"] + sum(check["healthy"] for check in checks.values())
    return {
        "config": {name: getattr(config, name) for name in REPORT_CONFIG_FIELDS},
        "parameters": count_parameters(model),
        "perplexity": diagnostics["perplexity"],
        "perplexity_on": perplexity_on,
        "exact_match": exact_match,
        "multihop_accuracy": multihop_accuracy,
        "arithmetic_accuracy": arithmetic_accuracy,
        "tokens_per_second": tokens_per_second,
        "peak_memory_mb": peak_memory_mb,
        "depth_sweep": depth_sweep,
        "routing": diagnostics["routing"],
        "expert_utilization": utilization,
        "recurrence": diagnostics["recurrence"],
        "architecture_checks": checks,
        "health_score": 100.0 * passed / (utilization["num_checks"] + len(checks)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


def plot_depth_sweep(sweeps: dict[str, dict[int, dict]], path: Path, label: str = "mean") -> None:
    """Exact match against inference depth: one panel per swept knob, the mean bold and every task thin."""
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 3.6), squeeze=False)
    for ax, (name, by_depth) in zip(axes[0], sweeps.items(), strict=True):
        depths = sorted(by_depth, key=int)
        tasks = [task for task in by_depth[depths[0]] if task != "mean"]
        for task in tasks:
            ax.plot(depths, [by_depth[d][task] for d in depths], lw=0.8, alpha=0.5, label=task)
        ax.plot(depths, [by_depth[d]["mean"] for d in depths], "k-o", lw=2, label=label)
        ax.set(xlabel=name, ylabel="exact match", title=f"test-time compute: {name}", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_expert_load(routing: list[dict], path: Path) -> None:
    """Share of assignments per expert for every MoE layer x iteration (balanced = 1/E everywhere), every cell
    labelled with its share."""
    load = np.array([row["load"] for row in routing])  # (layers x iterations, experts)
    rows, experts = load.shape
    fig, ax = plt.subplots(figsize=(3.5 + 0.7 * experts, 1.6 + 0.45 * rows))
    image = ax.imshow(load, cmap="viridis", vmin=0, vmax=max(float(load.max()), 1e-9), aspect="auto")
    for (row, expert), share in np.ndenumerate(load):
        ax.text(
            expert,
            row,
            f"{share:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if share < 0.6 * load.max() else "black",
        )
    ax.set_xticks(range(experts), [str(e) for e in range(experts)])
    ax.set_yticks(range(rows), [f"layer {r['layer']}, iteration {r['iteration'] + 1}" for r in routing])
    ax.set(xlabel="expert", title=f"expert load (balanced = {1 / experts:.3f})")
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_routing_entropy(routing: list[dict], num_experts: int, healthy: tuple[float, float], path: Path) -> None:
    """Routing entropy per iteration (numbered from 1), one line per MoE layer, against the guide's healthy band and
    the uniform-routing maximum log(E); entropy lies in [0, log E], so the band is drawn inside it."""
    maximum = math.log(num_experts)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for layer in sorted({row["layer"] for row in routing}):
        rows = [row for row in routing if row["layer"] == layer]
        ax.plot([r["iteration"] + 1 for r in rows], [r["router_entropy"] for r in rows], "-o", label=f"layer {layer}")
    ax.axhspan(
        min(healthy[0], maximum), min(healthy[1], maximum), color="green", alpha=0.1, label="healthy (guide §5.1)"
    )
    ax.axhline(maximum, color="gray", ls="--", label="uniform = log E")
    ax.set_xticks(sorted({row["iteration"] + 1 for row in routing}))
    ax.set_ylim(0, max(maximum, 1e-3) * 1.05)
    ax.set(xlabel="MoE iteration", ylabel="router entropy (nats)", title="routing entropy per iteration")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(results: dict, output_dir: str | Path, name: str = "eval_results") -> None:
    """`<name>.json`, `<name>.md` and the three plots."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (output_dir / f"{name}.md").write_text(render_report(results))
    if results["depth_sweep"]:
        plot_depth_sweep(results["depth_sweep"], output_dir / "accuracy_vs_depth.png")
    plot_expert_load(results["routing"], output_dir / "expert_load.png")
    plot_routing_entropy(
        results["routing"],
        results["config"]["num_experts"],
        results["expert_utilization"]["healthy_ranges"]["router_entropy"],
        output_dir / "routing_entropy.png",
    )
    logger.info("Wrote %s.json, %s.md and plots to %s", name, name, output_dir)


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser((CheckpointArguments, DataArguments, EvaluationArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        checkpoint_args, data_args, eval_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        checkpoint_args, data_args, eval_args = parser.parse_args_into_dataclasses()
    if data_args.is_corpus:
        raise ValueError("evaluate_more.py scores reasoning tasks (exact match); a text corpus has no answers")
    set_seed(data_args.dataset_seed)

    raw_datasets = load_raw_datasets(data_args)
    tokenizer = load_tokenizer(checkpoint_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_args.model_name_or_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    logger.info("Evaluating %s on %d test examples", checkpoint_args.model_name_or_path, len(raw_datasets["test"]))
    results = evaluate_model(model, tokenizer, raw_datasets["test"], eval_args, data_args)
    results["majority_baseline"] = majority_baseline(raw_datasets["train"], raw_datasets["test"])
    results["evaluation"] = {**asdict(data_args), **asdict(eval_args)}
    write_outputs(results, checkpoint_args.output_dir)
    logger.info(
        "perplexity (%s) %.3f, exact match %.3f (majority baseline %.3f), %.0f tokens/s",
        results["perplexity_on"],
        results["perplexity"],
        results["exact_match"]["mean"],
        results["majority_baseline"]["mean"],
        results["tokens_per_second"],
    )
    if checkpoint_args.write_model_card and Path(checkpoint_args.model_name_or_path).is_dir():
        save_model_card(checkpoint_args.model_name_or_path, results, repo_id=checkpoint_args.hub_model_id)


if __name__ == "__main__":
    main()
