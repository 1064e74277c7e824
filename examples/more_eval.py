"""Generation-based exact match for prompt/answer reasoning data, and the majority-answer baseline it must beat.

Prompts follow `more_data`'s convention: they end with `"Answer:"`, the model was trained on
`bos + prompt + " " + answer + eos`, so greedy generation after `bos + prompt` should produce `" answer"` then eos.

    from more_eval import exact_match_by_task, majority_baseline
    scores = exact_match_by_task(model, tokenizer, data["test"], num_recurrent_steps=8)
    baseline = majority_baseline(data["train"], data["test"])
"""

from collections import Counter, defaultdict
from collections.abc import Iterable

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def extract_answer(generated: str) -> str:
    """The answer in a generated continuation (research guide §7.5): its first line, up to the first period, stripped.

    Case is kept; `answers_match` compares case-insensitively. `examples/metrics/answer_accuracy` holds a copy of
    this function (metric modules must be self-contained) that a test keeps identical.
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
    **generate_kwargs,
) -> list[str]:
    """Greedy answers to `prompts`, in order, each passed through `extract_answer`.

    Every prompt is encoded as in training (`more_data.tokenize_qa`: bos, if the tokenizer has one, then the prompt
    without special tokens); batches are left-padded, so each row generates what its prompt alone would. Prompts are
    batched by length to waste little compute on padding. The model runs in eval mode (deterministic latent init,
    dropless routing) and gets its training mode back afterwards. `generate_kwargs` go to `generate()`, e.g.
    `num_recurrent_steps=8` or `num_moe_iterations=2`.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("generate_answers needs a tokenizer with a pad token (more_data.load_tokenizer adds one)")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    # list(): a `datasets` column is a lazy sequence the tokenizer does not accept.
    encoded = [[*bos, *ids] for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
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
    **generate_kwargs,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on a dataset with `task`, `prompt` and `answer` columns.

    Returns accuracy in [0, 1] per task plus `mean` over tasks (each task counts once, whatever its size).
    """
    predictions = generate_answers(model, tokenizer, dataset["prompt"], batch_size, max_new_tokens, **generate_kwargs)
    hits = (answers_match(p, r) for p, r in zip(predictions, dataset["answer"], strict=True))
    return _accuracy_by_task(dataset["task"], hits)


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
