"""The examples' metrics: exact match of answers (greedy generation, or one teacher-forced pass), the majority-answer
baseline it must beat, and routing health (expert utilisation against the guide's §5.1 ranges, the §5.2 checks).

Prompts follow `more_tools.data`'s convention: they end with `"Answer:"`, the model was trained on
`bos + prompt + " " + answer + eos`, so greedy generation after `bos + prompt` should produce `" answer"` then eos.

    from more_tools.metrics import exact_match_by_task, majority_baseline
    scores = exact_match_by_task(model, tokenizer, data["test"], num_recurrent_steps=8)
    baseline = majority_baseline(data["train"], data["test"])
"""

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from more_tools.data import IGNORE_INDEX, TensorExamples
from more_tools.training import DataArguments, collate


logger = logging.getLogger(__name__)


def extract_answer(generated: str) -> str:
    """The answer in a generated continuation (research guide §7.5): its first line, up to the first period, stripped.

    Case is kept; `answers_match` compares case-insensitively (so does `examples/metrics/answer_accuracy`, through it).
    """
    return generated.split("\n")[0].split(".")[0].strip()


def answers_match(generated: str, reference: str) -> bool:
    """Exact match of the extracted answer and the reference, ignoring case and surrounding whitespace."""
    return extract_answer(generated).lower() == reference.strip().lower()


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 32,
    max_new_tokens: int = 8,
    max_length: int | None = None,
    **generate_kwargs,
) -> list[str]:
    """Greedy answers to `prompts`, in order, each passed through `extract_answer`.

    Every prompt is encoded as in training (`more_tools.data.tokenize_qa`: bos, if the tokenizer has one, then the
    prompt without special tokens; with `max_length`, the training length, a prompt too long to leave room for
    `max_new_tokens` keeps its last tokens, the question, as training kept them). Batches are left-padded, so each row
    generates what its prompt alone would. Prompts are batched by length to waste little compute on padding. The model
    runs in eval mode (deterministic latent init, dropless routing) and gets its training mode back afterwards.
    `generate_kwargs` go to `generate()`, e.g. `num_recurrent_steps=8` or `num_moe_iterations=2`.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "generate_answers needs a tokenizer with a pad token (more_tools.data.load_tokenizer adds one)"
        )
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    # list(): a `datasets` column is a lazy sequence the tokenizer does not accept.
    room = None if max_length is None else max_length - len(bos) - max_new_tokens
    if room is not None and room < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for a prompt besides bos and {max_new_tokens} tokens"
        )
    encoded = [
        [*bos, *(ids if room is None else ids[-room:])]
        for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    kwargs = {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **generate_kwargs,
    }
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad(
                {"input_ids": [encoded[i] for i in rows]}, padding_side="left", return_tensors="pt"
            ).to(model.device)
            with torch.no_grad():
                output = model.generate(**batch, **kwargs)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, text in zip(rows, texts, strict=True):
                answers[row] = extract_answer(text)
    finally:
        model.train(was_training)
    return answers


def _accuracy_by_task(tasks: Iterable[str], hits: Iterable[bool]) -> dict[str, float]:
    """Accuracy per task (sorted by name) and `mean`, the unweighted mean over tasks."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for task, hit in zip(tasks, hits, strict=True):
        per_task[task].append(hit)
    if not per_task:
        raise ValueError("no examples to score")
    scores = {task: sum(task_hits) / len(task_hits) for task, task_hits in sorted(per_task.items())}
    scores["mean"] = sum(scores.values()) / len(scores)
    return scores


def exact_match_by_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    batch_size: int = 32,
    max_new_tokens: int = 8,
    max_length: int | None = None,
    **generate_kwargs,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on a dataset with `task`, `prompt` and `answer` columns (prompts cut to
    the training `max_length` as `generate_answers` does).

    Returns accuracy in [0, 1] per task plus `mean` over tasks (each task counts once, whatever its size).
    """
    predictions = generate_answers(
        model, tokenizer, dataset["prompt"], batch_size, max_new_tokens, max_length, **generate_kwargs
    )
    hits = (answers_match(p, r) for p, r in zip(predictions, dataset["answer"], strict=True))
    return _accuracy_by_task(dataset["task"], hits)


@torch.no_grad()
def score_answers(model, test, batch_size: int = 256, **depth) -> np.ndarray:
    """Greedy exact match of every test example, 0/1: the answer and eos are the argmax at every answer position.

    With teacher forcing on the reference answer, all answer tokens are argmax exactly when greedy decoding produces
    the answer and then stops, so this equals greedy `generate` exact match in one forward pass per batch. Examples
    run in order of length, so a batch pads little. `test`: tokenized examples of one length, as `TensorExamples`
    (the comparison job's, scored many times) or a `datasets.Dataset` (turned into them once here).
    """
    model.eval()
    device = next(model.parameters()).device
    if not isinstance(test, TensorExamples):
        test = TensorExamples.from_dataset(test)
    order = np.argsort(test.columns["attention_mask"].sum(1).numpy(), kind="stable")
    hits = np.zeros(len(test), dtype=np.int8)
    for start in range(0, len(test), batch_size):
        index = order[start : start + batch_size]
        batch = collate(test.__getitems__(index.tolist()))  # one read of the batch's examples
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        # No cache: one forward reads nothing back, and building one costs about a tenth of the scoring.
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = model(**inputs, use_cache=False, **depth).logits
        labels = batch["labels"][:, 1:]
        correct = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE_INDEX)  # (batch, seq - 1)
        hits[index] = correct.all(dim=1).cpu().numpy()
    return hits


def majority_baseline(train_dataset: Dataset, eval_dataset: Dataset) -> dict[str, float]:
    """Accuracy of always answering a task's most frequent training answer, per task of `eval_dataset`, plus `mean`.

    Ties go to the answer seen first in training; a task absent from training scores 0.
    """
    counts: dict[str, Counter] = defaultdict(Counter)
    for task, answer in zip(train_dataset["task"], train_dataset["answer"], strict=True):
        counts[task][answer.strip().lower()] += 1
    majority = {task: counter.most_common(1)[0][0] for task, counter in counts.items()}
    hits = (
        majority.get(task) == answer.strip().lower()
        for task, answer in zip(eval_dataset["task"], eval_dataset["answer"], strict=True)
    )
    return _accuracy_by_task(eval_dataset["task"], hits)


def exact_match_metrics(
    model, tokenizer, raw_datasets: DatasetDict, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, float]:
    """Greedy exact match per task on the test split and the majority-answer baseline, logged as a table."""
    depth = {}
    if data_args.exact_match_num_recurrent_steps is not None:
        depth["num_recurrent_steps"] = data_args.exact_match_num_recurrent_steps
    accuracy = exact_match_by_task(
        model,
        tokenizer,
        raw_datasets["test"],
        batch_size=training_args.per_device_eval_batch_size,
        max_new_tokens=data_args.max_new_tokens,
        max_length=data_args.max_length,
        **depth,
    )
    baseline = majority_baseline(raw_datasets["train"], raw_datasets["test"])
    logger.info("Exact match on the test split (greedy) vs always answering the task's most frequent answer:")
    logger.info(f"{'task':<14} {'model':>8} {'majority':>9}")
    for task in accuracy:
        logger.info(f"{task:<14} {accuracy[task]:>8.3f} {baseline[task]:>9.3f}")
    metrics = {f"exact_match_{task}": value for task, value in accuracy.items()}
    metrics.update({f"majority_baseline_{task}": value for task, value in baseline.items()})
    return metrics


# Guide §5.1 healthy ranges of expert utilisation.


def entropy_scale(num_experts: int) -> float:
    """The guide states routing entropies for 8 experts; with E experts they scale by log(E) / log(8)."""
    return math.log(num_experts) / math.log(8)


# Floating point slack on the range bounds, so a perfectly balanced layer (effective experts == E) passes.
_TOLERANCE = 1e-6


def healthy_ranges(num_experts: int) -> dict[str, tuple[float, float]]:
    """The guide's §5.1 ranges (stated for 8 experts), with counts and entropies scaled to `num_experts`."""
    scale = entropy_scale(num_experts)
    return {
        "load_cv": (0.0, 0.3),
        "max_load_ratio": (0.8, 1.5),
        "min_load_ratio": (0.5, 1.2),
        "effective_experts": (6.0 / 8 * num_experts, float(num_experts)),
        "router_entropy": (1.5 * scale, 2.8 * scale),
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


def expert_utilization(layers, router_logits=None, expert_ids=None, top_k: int = 1, num_experts: int | None = None):
    """Expert utilisation per group of rows (MoE layer, or layer x iteration) from router logits or from the experts
    each token was sent to, with each group checked against `healthy_ranges` (what the `expert_utilization` metric of
    `examples/metrics` computes): means over groups, `per_layer` detail and the health score."""
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
        scale = entropy_scale(num_experts)
        low, high = ITERATION_RANGES["routing_entropy_mean"]
        entropy = np.mean([row["router_entropy"] for rows in per_layer for row in rows])
        trend = np.mean([rows[-1]["max_prob"] - rows[0]["max_prob"] for rows in per_layer])
        checks["routing_entropy_mean"] = _check(entropy, (low * scale, high * scale))
        checks["routing_maxprob_trend"] = _check(trend, ITERATION_RANGES["routing_maxprob_trend"])
    return checks


def _check(value: float, bounds: tuple[float, float]) -> dict:
    return {"value": float(value), "range": list(bounds), "healthy": bool(bounds[0] <= value <= bounds[1])}
