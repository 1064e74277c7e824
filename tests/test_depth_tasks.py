"""Depth-controlled tasks of `more_data.py` (pointer chasing, digit addition): answers against independent solvers,
difficulty controlling the hop or digit count exactly, disjoint splits, and the word-level tokenizer."""

import os
import random
import re
import sys

import pytest


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import more_data  # noqa: E402


def solve_pointer(prompt: str) -> tuple[str, int]:
    """Follows the assignments from the queried variable to a digit: (answer, hops followed)."""
    statements, query = prompt.split(" ; ? ")
    bindings = dict(statement.split(" = ") for statement in statements.split(" ; "))
    value, hops = query, 0
    while not value.isdigit():
        value, hops = bindings[value], hops + 1
    return value, hops


def solve_addition(prompt: str) -> tuple[str, int]:
    """Reads both reversed operands, adds them with Python integers: (reversed answer digits, digits per operand)."""
    left, right = prompt.removesuffix(" =").split(" + ")
    a, b = (int("".join(reversed(operand.split()))) for operand in (left, right))
    digits = len(left.split())
    return " ".join(str(a + b).zfill(digits + 1)[::-1]), digits


@pytest.mark.parametrize("hops", [1, 2, 3, 5])
def test_pointer_answers_and_hops_match_an_independent_solver(hops):
    rng = random.Random(hops)
    for _ in range(200):
        example = more_data.generate_pointer_chase(rng, hops)
        assert solve_pointer(example["prompt"]) == (example["answer"], hops)
        statements = example["prompt"].split(" ; ? ")[0].split(" ; ")
        assert len(statements) == hops * more_data.POINTER_CHAINS  # every chain as long as the asked one
        lhs = [s.split(" = ")[0] for s in statements]
        assert len(set(lhs)) == len(lhs)  # each variable assigned once
        values = [s.split(" = ")[1] for s in statements if s.split(" = ")[1].isdigit()]
        assert len(set(values)) == more_data.POINTER_CHAINS  # one distinct value per chain: guessing scores 1/chains


def test_pointer_statements_are_shuffled_and_every_chain_can_be_asked():
    rng = random.Random(0)
    first_is_value, asked_values = 0, set()
    for _ in range(300):
        example = more_data.generate_pointer_chase(rng, 3)
        first_is_value += example["prompt"].split(" ; ")[0].split(" = ")[1].isdigit()
        asked_values.add(example["answer"])
    # In chain order the first statement would always assign a digit; shuffled, about a third of them do.
    assert 50 < first_is_value < 200
    assert len(asked_values) == 10


@pytest.mark.parametrize("digits", [1, 2, 4, 7])
def test_addition_answers_and_digits_match_an_independent_solver(digits):
    rng = random.Random(digits)
    for _ in range(200):
        example = more_data.generate_digit_addition(rng, digits)
        assert solve_addition(example["prompt"]) == (example["answer"], digits)
        assert len(example["answer"].split()) == digits + 1  # the answer length tells nothing
        assert re.fullmatch(r"(\d )+\+ (\d )+=", example["prompt"])


def test_bad_difficulties_are_refused():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="hops must be >= 1"):
        more_data.generate_pointer_chase(rng, 0)
    with pytest.raises(ValueError, match="num_chains"):
        more_data.generate_pointer_chase(rng, 7, num_chains=4)  # 28 variables > 26
    with pytest.raises(ValueError, match="digits must be >= 1"):
        more_data.generate_digit_addition(rng, 0)
    with pytest.raises(ValueError, match="valid names: pointer, addition"):
        more_data.get_depth_task_generator("sorting")


def _dataset(seed=0, num_train=300):
    return more_data.build_depth_dataset(
        {"pointer": ([1, 2], [1, 2, 3, 4]), "addition": ([2], [2, 3])},
        num_train=num_train,
        num_test_per_difficulty=20,
        seed=seed,
    )


def test_depth_splits_are_disjoint_by_prompt_and_split_by_difficulty():
    dataset = _dataset()
    train, test = dataset["train"], dataset["test"]
    assert not set(train["prompt"]) & set(test["prompt"])
    assert len(set(test["prompt"])) == len(test)
    cells = {(t, d) for t, d in zip(train["task"], train["difficulty"], strict=True)}
    assert cells == {("pointer", 1), ("pointer", 2), ("addition", 2)}
    counts = {}
    for task, difficulty in zip(test["task"], test["difficulty"], strict=True):
        counts[(task, difficulty)] = counts.get((task, difficulty), 0) + 1
    assert counts == {("pointer", d): 20 for d in (1, 2, 3, 4)} | {("addition", d): 20 for d in (2, 3)}
    for example in test:  # the difficulty column is the real hop / digit count
        solve = solve_pointer if example["task"] == "pointer" else solve_addition
        assert solve(example["prompt"]) == (example["answer"], example["difficulty"])
        assert example["text"] == f"{example['prompt']} {example['answer']}"


def test_depth_test_split_depends_only_on_the_seed():
    assert _dataset(num_train=300)["test"]["prompt"] == _dataset(num_train=50)["test"]["prompt"]
    assert _dataset(seed=0)["test"]["prompt"] != _dataset(seed=1)["test"]["prompt"]


def test_a_difficulty_with_too_few_prompts_fails_loudly():
    with pytest.raises(ValueError, match="keeps repeating prompts"):
        more_data.build_depth_dataset({"addition": ([1], [1])}, num_train=10, num_test_per_difficulty=150)


def test_word_level_tokenizer_round_trips_one_token_per_word(tmp_path):
    texts = _dataset()["train"]["text"]
    tokenizer = more_data.train_word_level_tokenizer(texts)
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]
    words = sorted({word for text in texts for word in text.split()})
    assert len(tokenizer) == 4 + len(words)
    for text in texts[:50]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer("z = @", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(texts[0])["input_ids"] == tokenizer(texts[0])["input_ids"]
    assert more_data.train_word_level_tokenizer(list(reversed(texts))).get_vocab() == tokenizer.get_vocab()


def test_validation_split_is_disjoint_from_test_and_train_and_leaves_test_unchanged():
    cells = {"pointer": ([1, 2], [1, 2, 3]), "addition": ([2], [2, 3])}
    plain = more_data.build_depth_dataset(cells, num_train=300, num_test_per_difficulty=20)
    dataset = more_data.build_depth_dataset(
        cells, num_train=300, num_test_per_difficulty=20, seed=0, num_validation_per_difficulty=10
    )
    assert "validation" not in plain and dataset["test"]["prompt"] == plain["test"]["prompt"]
    validation = set(dataset["validation"]["prompt"])
    assert len(validation) == len(dataset["validation"]) == 10 * 5
    assert not validation & set(dataset["test"]["prompt"]) and not validation & set(dataset["train"]["prompt"])
    assert sorted(set(dataset["validation"]["difficulty"])) == [1, 2, 3]
