"""Evaluation of one saved MoRE model: perplexity, per-task exact match and its depth sweep, the research guide's
diagnostics (§5.1, §5.2), throughput and peak memory, and the report's JSON, Markdown and plots."""

import json
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm

import modeling_more
from more_tools.cards import render_report
from more_tools.data import tokenize_qa
from more_tools.metrics import architecture_checks, exact_match_by_task, expert_utilization
from more_tools.timing import peak_memory
from more_tools.training import DataArguments, fit_batch, lm_loss_sum, load_raw_datasets


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


logger = logging.getLogger(__name__)


# Guide §5.3: "babi_multihop_accuracy" averages bAbI tasks 2, 3 and 16; arithmetic covers the guide's custom
# arithmetic data set, which holds both bare sums and word problems.
MULTIHOP_TASKS = ("babi2", "babi3", "babi16")
ARITHMETIC_TASKS = ("arithmetic", "word_problem")


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
    "recurrent_attention_window",
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
    real tokens), the expert-utilisation metric with its health checks, and the recurrence statistics (per-batch means
    weighted by the batch's real tokens, so that the batch size does not change them)."""
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
    tokens = torch.stack([batch_mask.sum() for batch_mask in masks]).float()  # (batches,) real tokens each
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
    utilization = expert_utilization(
        router_logits=np.concatenate(metric_logits), layers=np.concatenate(metric_layers), top_k=top_k
    )
    utilization.pop("per_layer")  # `routing` holds the same numbers per layer x iteration
    return {
        "perplexity": math.exp(nll / max(count, 1)),
        "routing": routing,
        "expert_utilization": utilization,
        "recurrence": [
            {"layer": layer, "iteration": iteration, **_mean_stats(per_batch, tokens)}
            for (layer, iteration), per_batch in zip(entries, recurrence, strict=True)
        ],
    }


def _mean_stats(per_batch: list[dict], weights: torch.Tensor) -> dict:
    """Weighted mean over batches of each statistic, `weights` (batches,) (scalars stay scalars, per-step vectors
    stay vectors)."""
    names = [name for name in per_batch[0] if name != "steps_per_token"]  # per-token detail: not a summary

    def mean(name):
        stacked = torch.stack([stats[name].float() for stats in per_batch])  # (batches, ...)
        return (stacked * weights.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / weights.sum()

    return {name: _to_python(mean(name)) for name in names}


def _to_python(value):
    if isinstance(value, dict):
        return {key: _to_python(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else value.tolist()
    return value


def task_group_accuracy(exact_match: dict[str, float], tasks: tuple[str, ...]) -> float | None:
    """Mean exact match over the tasks of a group that were evaluated (None when none was)."""
    present = [exact_match[task] for task in tasks if task in exact_match]
    return float(np.mean(present)) if present else None


def depth_sweep(
    model, tokenizer, dataset, args: EvaluationArguments, max_new_tokens: int, max_length: int | None = None
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
                model, tokenizer, dataset, args.eval_batch_size, max_new_tokens, max_length, **{name: depth}
            )
            for depth in tqdm(depths, desc=f"sweep {name}", leave=False)
        }
    return results


def _int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


def evaluate_model(model, tokenizer, dataset, args: EvaluationArguments, data_args: DataArguments) -> dict:
    """Every metric of this script for one model in eval mode on the test `dataset` (task, prompt, answer, text),
    tokenized as in training (`data_args.max_length`, perplexity on the answers with `data_args.answer_only_loss`)."""
    model.eval()
    device = next(model.parameters()).device
    batches = text_batches(
        dataset, tokenizer, args.eval_batch_size, data_args.max_length, device, data_args.answer_only_loss
    )
    diagnostics = perplexity_and_diagnostics(model, batches)
    max_new_tokens, max_length = data_args.max_new_tokens, data_args.max_length
    exact_match = exact_match_by_task(model, tokenizer, dataset, args.eval_batch_size, max_new_tokens, max_length)
    return model_report(
        model,
        diagnostics,
        perplexity_on="answers" if data_args.answer_only_loss else "texts",
        exact_match=exact_match,
        depth_sweep=depth_sweep(model, tokenizer, dataset, args, max_new_tokens, max_length),
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
    split: str = "test",
) -> dict:
    """The report of one model (what `eval_results.json` holds): its config and parameters, the accuracies and depth
    sweeps given, `perplexity_and_diagnostics` output with the architecture checks and one health score; what was not
    measured stays None. `split`: the examples scored (`test`, or `validation` for a protocol-tuning run)."""
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
        "split": split,
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


def export_test_split(data_args: DataArguments, output_dir: str | Path) -> dict[str, Path]:
    """One `<task>.jsonl` per task of the test split; returns the paths by task."""
    test = load_raw_datasets(data_args)["test"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for row in test.select_columns(["task", "prompt", "answer"]):
        by_task.setdefault(row["task"], []).append(row)
    paths = {task: output_dir / f"{task}.jsonl" for task in by_task}
    for task, rows in by_task.items():
        paths[task].write_text("".join(json.dumps(row) + "\n" for row in rows))
    logger.info("Wrote %d test examples of %d tasks to %s", len(test), len(paths), output_dir)
    return paths
