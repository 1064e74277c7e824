"""Depth-controlled tasks of `more_tools/data.py` (pointer chasing, digit addition, prefix parity): answers against
independent solvers, difficulty controlling the hop, digit or bit count exactly, disjoint splits, the word-level
tokenizer, and per-position targets sitting where the logits that predict them are."""

import random
import re
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from more_tools import data as more_data
from more_tools.metrics import score_answers


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


def solve_parity(prompt: str) -> tuple[str, int]:
    """Counts the ones up to every bit: (parity of each prefix, number of bits)."""
    bits = prompt.split()
    return " ".join(str(bits[: i + 1].count("1") % 2) for i in range(len(bits))), len(bits)


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


@pytest.mark.parametrize("bits", [1, 2, 8, 33])
def test_parity_answers_and_bits_match_an_independent_solver(bits):
    rng = random.Random(bits)
    strings = set()
    for _ in range(200):
        example = more_data.generate_prefix_parity(rng, bits)
        assert example["task"] == "parity" and example["task"] in more_data.PER_POSITION_TASKS
        assert solve_parity(example["prompt"]) == (example["answer"], bits)
        assert re.fullmatch(r"[01]( [01])*", example["prompt"])
        strings.add(example["prompt"])
    if 2**bits < 200:
        assert len(strings) == 2**bits  # every string can be drawn


def test_parity_difficulty_with_fewer_strings_than_test_examples_fails_loudly():
    with pytest.raises(ValueError, match="keeps repeating prompts"):  # 2^3 = 8 strings for 10 test examples
        more_data.build_depth_dataset({"parity": ([3], [3])}, num_train=10, num_test_per_difficulty=10)


def test_bad_difficulties_are_refused():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="hops must be >= 1"):
        more_data.generate_pointer_chase(rng, 0)
    with pytest.raises(ValueError, match="num_chains"):
        more_data.generate_pointer_chase(rng, 7, num_chains=4)  # 28 variables > 26
    with pytest.raises(ValueError, match="digits must be >= 1"):
        more_data.generate_digit_addition(rng, 0)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        more_data.generate_prefix_parity(rng, 0)
    with pytest.raises(ValueError, match="valid names: pointer, addition, parity"):
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


def _parity_and_addition(max_length=40):
    """A depth dataset mixing per-position parity with prompt/answer addition, its tokenizer and its tokenization."""
    dataset = more_data.build_depth_dataset(
        {"parity": ([9], [8, 12]), "addition": ([2], [2])}, num_train=30, num_test_per_difficulty=10
    )
    tokenizer = more_data.train_word_level_tokenizer([*dataset["train"]["text"], *dataset["test"]["text"]])
    return dataset, tokenizer, more_data.tokenize_depth_tasks(dataset, tokenizer, max_length)


def test_per_position_targets_sit_where_the_logits_that_predict_them_are():
    dataset, tokenizer, tokenized = _parity_and_addition(max_length=40)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ignore = more_data.IGNORE_INDEX
    checked = 0
    for split in ("train", "test"):
        for example, row in zip(dataset[split], tokenized[split], strict=True):
            if example["task"] != "parity":
                continue
            bits = example["prompt"].split()
            targets = tokenizer.convert_tokens_to_ids(solve_parity(example["prompt"])[0].split())
            padding = 40 - len(bits) - 2
            assert row["input_ids"] == [bos, *tokenizer.convert_tokens_to_ids(bits), eos] + [pad] * padding
            assert row["attention_mask"] == [1] * (len(bits) + 2) + [0] * padding
            # Bit i sits at position 1 + i; its logits predict the label one further on, at 2 + i.
            for i, target in enumerate(targets):
                assert row["input_ids"][1 + i] == tokenizer.convert_tokens_to_ids(bits[i])
                assert row["labels"][2 + i] == target
            assert row["labels"] == [ignore, ignore, *targets] + [ignore] * padding
            checked += 1
    assert checked == 30 // 2 + 2 * 10


def test_mixed_splits_keep_their_order_and_prompt_answer_tasks_tokenize_as_tokenize_qa():
    dataset, tokenizer, tokenized = _parity_and_addition()
    test = dataset["test"]
    assert test["task"][:3] == ["parity", "parity", "addition"]  # interleaved: the order is worth keeping
    addition = [i for i, task in enumerate(test["task"]) if task == "addition"]
    # Padded to max_length, the length of the per-position rows they are concatenated with.
    expected = more_data.tokenize_qa(test.select(addition), tokenizer, 40, answer_only_loss=True, pad_to_longest=False)
    assert [tokenized["test"][i] for i in addition] == list(expected)
    only_addition = more_data.tokenize_depth_tasks(test.select(addition), tokenizer, 40)
    assert list(only_addition) == list(more_data.tokenize_qa(test.select(addition), tokenizer, 40))


def test_per_position_tokenization_refuses_what_it_cannot_align():
    _, tokenizer, _ = _parity_and_addition()
    example = more_data.generate_prefix_parity(random.Random(0), 12)
    with pytest.raises(ValueError, match="cannot hold bos, 12 prompt tokens and eos"):
        more_data.tokenize_per_position(Dataset.from_list([example]), tokenizer, max_length=13)
    short = {**example, "answer": example["answer"][2:]}
    with pytest.raises(ValueError, match="11 targets for 12 prompt tokens"):
        more_data.tokenize_per_position(Dataset.from_list([short]), tokenizer, max_length=40)


class _ParityOracle(torch.nn.Module):
    """A causal LM that solves prefix parity: at every position the logits pick the parity of the ones up to it, or
    with `lag=1` of the ones before it (one position off)."""

    def __init__(self, tokenizer, lag: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # `score_answers` reads the device off a parameter
        self.zero, self.one = tokenizer.convert_tokens_to_ids(["0", "1"])
        self.vocab_size, self.lag = len(tokenizer), lag

    def forward(self, input_ids, attention_mask, use_cache):
        assert use_cache is False  # scoring is one forward: a cache would be built and never read
        ones = (input_ids == self.one).long()
        parity = (ones.cumsum(1) - self.lag * ones) % 2
        prediction = torch.where(parity.bool(), self.one, self.zero)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(prediction, self.vocab_size).float())


@pytest.mark.parametrize("tensors", [False, True], ids=["dataset", "tensor_examples"])
def test_score_answers_counts_a_parity_string_only_when_every_target_is_right(tensors):
    dataset, tokenizer, tokenized = _parity_and_addition()
    parity = [i for i, task in enumerate(dataset["test"]["task"]) if task == "parity"]
    test = tokenized["test"].select(parity)
    if tensors:  # as the comparison job holds its test examples: each hit must still land on its own example
        test = more_data.TensorExamples.from_dataset(test)
    assert score_answers(_ParityOracle(tokenizer, lag=0), test).all()
    lagged = score_answers(_ParityOracle(tokenizer, lag=1), test)
    # One position off, every bit 1 gets the previous target: only strings without a 1 pass.
    assert lagged.tolist() == ["1" not in dataset["test"][i]["prompt"] for i in parity]
