"""`more_tools/metrics.py`: answer extraction, per-task exact match and the majority baseline on hand-made inputs, and
batched left-padded generation on a tiny model."""

import functools

import pytest
from datasets import Dataset
from helpers import tiny_model

from more_tools import metrics as more_eval
from more_tools.data import build_reasoning_dataset, train_bpe_tokenizer
from more_tools.metrics import answers_match, exact_match_by_task, extract_answer, generate_answers, majority_baseline


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        (" bathroom", "bathroom"),
        (" Bathroom.", "Bathroom"),
        (" kitchen\n4 Where is John?", "kitchen"),
        (" garden. John went", "garden"),
        ("  12 \n", "12"),
        (" -7", "-7"),
        (" s,e", "s,e"),
        ("\nbathroom", ""),
        ("", ""),
    ],
)
def test_extract_answer(generated, expected):
    assert extract_answer(generated) == expected


def test_answers_match_ignores_case_and_whitespace_only():
    assert answers_match(" Kitchen.\n2 Mary", "kitchen")
    assert answers_match(" 12", " 12 ")
    assert not answers_match(" 12", "13")
    assert not answers_match(" bath room", "bathroom")
    assert not answers_match("", "bathroom")


def _qa(rows):
    return Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(("task", "prompt", "answer"))})


def test_majority_baseline_per_task_and_mean():
    train = _qa([("a", "p", "x"), ("a", "p", "Y"), ("a", "p", "y"), ("b", "p", "z"), ("b", "p", "w")])
    test = _qa([("a", "p", "y"), ("a", "p", "x"), ("a", "p", "y"), ("b", "p", "z"), ("b", "p", "w"), ("c", "p", "x")])
    # a: "y" (twice, case-insensitive) beats "x"; b: tie goes to "z", seen first; c: never trained on.
    assert majority_baseline(train, test) == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 0.0, "mean": (2 / 3 + 0.5) / 3})


def test_exact_match_by_task_scores_generations(monkeypatch):
    answers = {"P1": "kitchen", "P2": "Garden. Mary", "P3": "12", "P4": "7"}
    monkeypatch.setattr(
        more_eval, "generate_answers", lambda model, tok, prompts, *_, **__: [answers[p] for p in prompts]
    )
    data = _qa([("babi1", "P1", "kitchen"), ("babi1", "P2", "garden"), ("math", "P3", "12"), ("math", "P4", "8")])
    # Per-task accuracy; the mean weighs tasks equally, not examples.
    assert exact_match_by_task(None, None, data) == pytest.approx({"babi1": 1.0, "math": 0.5, "mean": 0.75})
    with pytest.raises(ValueError, match="no examples"):
        exact_match_by_task(None, None, data.select([]))


@pytest.fixture(scope="module")
def tiny_setup():
    data = build_reasoning_dataset(["babi1", "arithmetic"], num_train=64, num_validation=0, num_test=6, seed=0)
    tokenizer = train_bpe_tokenizer(data["train"]["text"], vocab_size=300)
    model = tiny_model(
        expert_type="recurrent",
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model, tokenizer, data["test"]


def test_generate_answers_batched_equals_one_at_a_time(tiny_setup):
    model, tokenizer, test = tiny_setup
    prompts = test["prompt"]  # a lazy `datasets` column, as exact_match_by_task passes it
    model.train()
    # The test prompts have different lengths, so batches of 4 are left-padded.
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    batched = generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=6)
    single = [generate_answers(model, tokenizer, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert len(batched) == len(prompts)
    assert all(a == extract_answer(a) for a in batched)
    # Training mode and the tokenizer's own padding side are left as they were.
    assert model.training
    assert tokenizer.padding_side == "right"


def test_generate_answers_encodes_like_training_and_passes_generate_kwargs(tiny_setup, monkeypatch):
    model, tokenizer, test = tiny_setup
    prompts = test["prompt"][:2]
    calls = []
    original = type(model).forward

    @functools.wraps(original)  # generate() checks kwargs against forward's signature
    def spy(self, *args, **kwargs):
        calls.append((kwargs["input_ids"], kwargs.get("num_recurrent_steps"), self.training))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=3, num_recurrent_steps=5)
    # bos + prompt as `tokenize_qa` encodes it, left-padded (rows in length order).
    encoded = sorted(([tokenizer.bos_token_id, *tokenizer(p)["input_ids"]] for p in prompts), key=len)
    width = len(encoded[-1])
    assert calls[0][0].tolist() == [[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded]
    assert len(calls) > 1
    assert {steps for _, steps, _ in calls} == {5}  # every decoding step, not only the prefill
    assert not any(training for _, _, training in calls)


def test_a_prompt_longer_than_training_allowed_is_cut_as_training_cut_it(tiny_setup, monkeypatch):
    """`tokenize_qa` keeps a long prompt's last tokens (the question); generation sees the same context, not the
    whole story past the trained positions."""
    model, tokenizer, test = tiny_setup
    prompt = " ".join([test["prompt"][0]] * 8)  # far longer than 40 tokens
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    max_length, max_new_tokens = 40, 4
    assert len(prompt_ids) > max_length
    calls = []
    original = type(model).forward

    @functools.wraps(original)
    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, max_length=max_length)
    room = max_length - 1 - max_new_tokens  # bos and the answer's tokens
    assert calls[0].tolist() == [[tokenizer.bos_token_id, *prompt_ids[-room:]]]
    with pytest.raises(ValueError, match="max_length"):
        generate_answers(model, tokenizer, [prompt], max_new_tokens=8, max_length=9)
