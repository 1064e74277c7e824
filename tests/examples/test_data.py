"""Tests of `more_tools/data.py`: task generators (checked against independent solvers), dataset splits, the bAbI
file parser, text chunking, tokenizer training and QA tokenization. Everything runs offline on files written here."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections import deque
from fractions import Fraction
from pathlib import Path


os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from more_tools.data import (
    TASK_GENERATORS,
    build_reasoning_dataset,
    chunk_corpus,
    get_task_generator,
    load_babi_dir,
    load_text_corpus,
    load_tokenizer,
    parse_babi_file,
    tokenize_qa,
    train_bpe_tokenizer,
)


ALL_TASKS = sorted(TASK_GENERATORS)
EXAMPLES_PER_TASK = 300

# ---------------------------------------------------------------------------------------------------------------------
# Independent solvers: each reads only the prompt text and recomputes the answer.
# ---------------------------------------------------------------------------------------------------------------------

MOVE_VERB = "(?:moved to|went to|went back to|journeyed to|travelled to)"
MOVE = re.compile(rf"(\w+) {MOVE_VERB} the (\w+)\.")
TAKE = re.compile(r"(\w+) (?:got|picked up|grabbed|took) the (\w+) there\.")
DROP = re.compile(r"(\w+) (?:dropped|put down|discarded|left) the (\w+)\.")
GIVE = re.compile(r"(\w+) (?:passed|handed|gave) the (\w+) to (\w+)\.")
NUMBER_WORDS = ["none", "one", "two", "three"]


def babi_lines(prompt: str) -> tuple[list[str], str]:
    """(statements, question) of a numbered bAbI prompt; IDs must increase (parsed files may skip IDs)."""
    *lines, cue = prompt.split("\n")
    assert cue == "Answer:"
    texts, last = [], 0
    for line in lines:
        number, text = line.split(" ", 1)
        assert int(number) > last
        last = int(number)
        texts.append(text)
    return texts[:-1], texts[-1]


def replay_world(statements: list[str]) -> tuple[dict, dict, dict, dict]:
    """Replays moves and object handling; returns (actor location, object carrier, where dropped objects lie, the
    places each object has been, consecutive repeats merged). Asserts that every action is physically possible."""
    location, carrier, lying, trail = {}, {}, {}, {}

    def visit(obj, place):
        if not trail.setdefault(obj, []) or trail[obj][-1] != place:
            trail[obj].append(place)

    for sentence in statements:
        if match := MOVE.fullmatch(sentence):
            actor, place = match.groups()
            location[actor] = place
            for obj in [obj for obj, holder in carrier.items() if holder == actor]:
                visit(obj, place)
        elif match := TAKE.fullmatch(sentence):
            actor, obj = match.groups()
            assert obj not in carrier and lying.get(obj, location[actor]) == location[actor]
            carrier[obj] = actor
            lying.pop(obj, None)
            visit(obj, location[actor])
        elif match := DROP.fullmatch(sentence):
            actor, obj = match.groups()
            assert carrier.pop(obj) == actor
            lying[obj] = location[actor]
        elif match := GIVE.fullmatch(sentence):
            actor, obj, other = match.groups()
            assert carrier[obj] == actor and location[other] == location[actor]
            carrier[obj] = other
        else:
            raise AssertionError(f"unexpected sentence {sentence!r}")
    return location, carrier, lying, trail


def solve_babi1(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    location, *_ = replay_world(statements)
    return location[re.fullmatch(r"Where is (\w+)\?", question)[1]]


def solve_babi2(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    location, carrier, lying, _ = replay_world(statements)
    obj = re.fullmatch(r"Where is the (\w+)\?", question)[1]
    return location[carrier[obj]] if obj in carrier else lying[obj]


def solve_babi3(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    *_, trail = replay_world(statements)
    obj, place = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question).groups()
    visits = [index for index, visited in enumerate(trail[obj]) if visited == place]
    assert len(visits) == 1 and visits[0] > 0, "the question must have exactly one answer"
    return trail[obj][visits[0] - 1]


def solve_babi7(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    _, carrier, _, _ = replay_world(statements)
    actor = re.fullmatch(r"How many objects is (\w+) carrying\?", question)[1]
    return NUMBER_WORDS[sum(holder == actor for holder in carrier.values())]


TIME_ORDER = {"yesterday": 0, "this morning": 1, "this afternoon": 2, "this evening": 3}
TIME = "yesterday|this morning|this afternoon|this evening"
TIME_LAST = re.compile(rf"(\w+) {MOVE_VERB} the (\w+) ({TIME})\.")
TIME_FIRST = re.compile(rf"(Yesterday|This morning|This afternoon|This evening) (\w+) {MOVE_VERB} the (\w+)\.")


def solve_babi14(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    timeline: dict[str, dict[int, str]] = {}
    for sentence in statements:
        if match := TIME_LAST.fullmatch(sentence):
            actor, place, time = match.groups()
        else:
            time, actor, place = TIME_FIRST.fullmatch(sentence).groups()
        moments = timeline.setdefault(actor, {})
        assert TIME_ORDER[time.lower()] not in moments, "one place per person and time"
        moments[TIME_ORDER[time.lower()]] = place
    actor, place = re.fullmatch(r"Where was (\w+) before the (\w+)\?", question).groups()
    places = [visited for _, visited in sorted(timeline[actor].items())]
    assert places.count(place) == 1 and places.index(place) > 0
    return places[places.index(place) - 1]


SINGULAR = {"mice": "mouse", "cats": "cat", "sheep": "sheep", "wolves": "wolf"}


def solve_babi15(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    fears, kinds = {}, {}
    for sentence in statements:
        if match := re.fullmatch(r"(\w+) are afraid of (\w+)\.", sentence):
            fears[SINGULAR[match[1].lower()]] = SINGULAR[match[2]]
        else:
            name, animal = re.fullmatch(r"(\w+) is an? (\w+)\.", sentence).groups()
            kinds[name] = animal
    return fears[kinds[re.fullmatch(r"What is (\w+) afraid of\?", question)[1]]]


def solve_babi16(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    species, colors = {}, {}
    for sentence in statements:
        if match := re.fullmatch(r"(\w+) is an? (\w+)\.", sentence):
            species[match[1]] = match[2]
        else:
            name, color = re.fullmatch(r"(\w+) is (\w+)\.", sentence).groups()
            colors[name] = color
    query = re.fullmatch(r"What color is (\w+)\?", question)[1]
    assert query not in colors
    evidence = {colors[name] for name in colors if species.get(name) == species[query]}
    assert len(evidence) == 1, "induction needs exactly one observed color for the species"
    return evidence.pop()


OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}


def solve_babi19(prompt: str) -> str:
    statements, question = babi_lines(prompt)
    graph: dict[str, dict[str, str]] = {}
    for sentence in statements:
        place, direction, reference = re.fullmatch(
            r"The (\w+) is (north|south|east|west) of the (\w+)\.", sentence
        ).groups()
        graph.setdefault(reference, {})[place] = direction[0]
        graph.setdefault(place, {})[reference] = OPPOSITE[direction][0]
    start, goal = re.fullmatch(r"How do you go from the (\w+) to the (\w+)\?", question).groups()
    # Breadth-first search that also counts shortest paths: the answer must be the only one.
    paths = {start: [[]]}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for there, step in graph[here].items():
            if there not in paths:
                paths[there] = []
                queue.append(there)
            if not paths[there] or len(paths[there][0]) == len(paths[here][0]) + 1:
                paths[there].extend(path + [step] for path in paths[here])
    assert len(paths[goal]) == 1
    return ",".join(paths[goal][0])


def solve_arithmetic(prompt: str) -> str:
    a, symbol, b = re.fullmatch(r"Question: What is (\d+) ([+-]) (\d+)\?\nAnswer:", prompt).groups()
    assert 2 <= len(a) <= 4 and 2 <= len(b) <= 4
    result = int(a) + int(b) if symbol == "+" else int(a) - int(b)
    assert result >= 0
    return str(result)


# The first keyword found decides the operation.
WORD_PROBLEM_KEYWORDS = [
    (r"in each", lambda a, b: a * b),
    (r"gives \d+ to", lambda a, b: a - b),
    (r"sold", lambda a, b: a - b),
    (r"more", lambda a, b: a + b),
    (r"Total", lambda a, b: a + b),
]


def solve_word_problem(prompt: str) -> str:
    question = re.fullmatch(r"Question: (.+)\nAnswer:", prompt)[1]
    a, b = (int(number) for number in re.findall(r"\d+", question))
    operation = next(operation for keyword, operation in WORD_PROBLEM_KEYWORDS if re.search(keyword, question))
    assert operation(a, b) >= 0
    return str(operation(a, b))


def solve_algebra(prompt: str) -> str:
    left, right = re.fullmatch(r"Question: Solve for x: (.+) = (-?\d+)\nAnswer:", prompt).groups()
    expression = re.sub(r"(\d)(?=[x(])", r"\1*", left)  # implicit multiplication: "3x" -> "3*x", "3(" -> "3*("
    assert re.fullmatch(r"[0-9x+\-*() ]+", expression)

    def evaluate(x):
        return eval(expression, {"__builtins__": {}}, {"x": Fraction(x)})

    # The left side is linear in x: value(x) = slope * x + intercept.
    intercept = evaluate(0)
    solution = (int(right) - intercept) / (evaluate(1) - intercept)
    assert solution.denominator == 1
    return str(solution.numerator)


SOLVERS = {
    "babi1": solve_babi1,
    "babi2": solve_babi2,
    "babi3": solve_babi3,
    "babi7": solve_babi7,
    "babi14": solve_babi14,
    "babi15": solve_babi15,
    "babi16": solve_babi16,
    "babi19": solve_babi19,
    "arithmetic": solve_arithmetic,
    "word_problem": solve_word_problem,
    "algebra": solve_algebra,
}


def generate(task: str, seed: int, count: int = EXAMPLES_PER_TASK) -> list[dict]:
    rng = random.Random(seed)
    return [TASK_GENERATORS[task](rng) for _ in range(count)]


# ---------------------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------------------


def test_every_task_has_a_solver():
    assert set(SOLVERS) == set(TASK_GENERATORS)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="valid names") as error:
        get_task_generator("babi99")
    for name in TASK_GENERATORS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="babi99"):
        build_reasoning_dataset(["babi1", "babi99"], 2, 0, 0, seed=0)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_generator_is_deterministic(task):
    assert generate(task, seed=7, count=20) == generate(task, seed=7, count=20)
    assert generate(task, seed=7, count=20) != generate(task, seed=8, count=20)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_generator_follows_the_prompt_answer_convention(task):
    examples = generate(task, seed=1)
    for example in examples:
        assert set(example) == {"task", "prompt", "answer"}
        assert example["task"] == task
        assert example["prompt"].endswith("\nAnswer:")
        assert example["answer"] and not re.search(r"\s", example["answer"])
        if task.startswith("babi"):
            # Generated stories are numbered 1, 2, 3, ... as one bAbI story with the question last.
            numbers = [int(line.split(" ", 1)[0]) for line in example["prompt"].split("\n")[:-1]]
            assert numbers == list(range(1, len(numbers) + 1))
        else:
            assert example["prompt"].startswith("Question: ")
    assert len({example["answer"] for example in examples}) > 1, "a constant answer teaches nothing"


@pytest.mark.parametrize("task", ALL_TASKS)
def test_generator_answers_are_correct(task):
    for example in generate(task, seed=2):
        assert SOLVERS[task](example["prompt"]) == example["answer"], example["prompt"]


# ---------------------------------------------------------------------------------------------------------------------
# Reasoning datasets
# ---------------------------------------------------------------------------------------------------------------------


def test_reasoning_dataset_splits_are_disjoint_balanced_and_formatted():
    dataset = build_reasoning_dataset(ALL_TASKS, num_train=110, num_validation=33, num_test=22, seed=0)
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 110, "validation": 33, "test": 22}
    prompts = {}
    for split, rows in dataset.items():
        assert rows.column_names == ["task", "prompt", "answer", "text"]
        assert [row["text"] for row in rows] == [f"{row['prompt']} {row['answer']}" for row in rows]
        # Interleaved round-robin over the task list.
        assert list(rows["task"]) == [ALL_TASKS[index % len(ALL_TASKS)] for index in range(len(rows))]
        prompts[split] = list(rows["prompt"])
        assert len(set(prompts[split])) == len(rows)
        for row in rows:
            assert SOLVERS[row["task"]](row["prompt"]) == row["answer"]
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])


def test_reasoning_dataset_is_deterministic():
    first = build_reasoning_dataset(["babi1", "arithmetic"], 20, 6, 6, seed=3)
    again = build_reasoning_dataset(["babi1", "arithmetic"], 20, 6, 6, seed=3)
    other_seed = build_reasoning_dataset(["babi1", "arithmetic"], 20, 6, 6, seed=4)
    more_train = build_reasoning_dataset(["babi1", "arithmetic"], 40, 6, 6, seed=3)
    for split in ("train", "validation", "test"):
        assert first[split].to_dict() == again[split].to_dict()
        assert first[split].to_dict() != other_seed[split].to_dict()
    # Evaluation splits do not move when only the train size changes.
    assert first["test"].to_dict() == more_train["test"].to_dict()
    assert first["validation"].to_dict() == more_train["validation"].to_dict()
    assert list(more_train["train"]["prompt"])[:20] == list(first["train"]["prompt"])


def test_reasoning_dataset_is_the_same_in_another_process():
    """Nothing may depend on Python's per-process string hashing (set iteration order)."""

    def fingerprint(dataset_dict: dict) -> str:
        return hashlib.sha256(json.dumps(dataset_dict, sort_keys=True).encode()).hexdigest()

    code = (
        "import hashlib, json, sys\n"
        "from more_tools.data import TASK_GENERATORS, build_reasoning_dataset\n"
        "dataset = build_reasoning_dataset(sorted(TASK_GENERATORS), 22, 11, 11, seed=5)\n"
        "data = {split: rows.to_dict() for split, rows in dataset.items()}\n"
        "sys.stdout.write(hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest())\n"
    )
    fingerprints = set()
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True, timeout=120
        )
        fingerprints.add(result.stdout.strip())
    dataset = build_reasoning_dataset(ALL_TASKS, 22, 11, 11, seed=5)
    fingerprints.add(fingerprint({split: rows.to_dict() for split, rows in dataset.items()}))
    assert len(fingerprints) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Original bAbI files
# ---------------------------------------------------------------------------------------------------------------------

# Two stories in the bAbI v1.2 format: a space before the first tab, supporting fact IDs after the answer.
BABI_FILE = (
    "1 Mary moved to the bathroom.\n"
    "2 John went to the hallway.\n"
    "3 Where is Mary? \tbathroom\t1\n"
    "4 Daniel went back to the hallway.\n"
    "5 Sandra moved to the garden.\n"
    "6 Where is Daniel? \thallway\t4\n"
    "1 Sandra travelled to the office.\n"
    "2 Where is Sandra? \toffice\t1\n"
    "3 Sandra went to the kitchen.\n"
    "4 John journeyed to the garden.\n"
    "5 Where is Sandra? \tkitchen\t3\n"
)
BABI_EXAMPLES = [
    ("1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary?\nAnswer:", "bathroom"),
    (
        "1 Mary moved to the bathroom.\n2 John went to the hallway.\n4 Daniel went back to the hallway.\n"
        "5 Sandra moved to the garden.\n6 Where is Daniel?\nAnswer:",
        "hallway",
    ),
    ("1 Sandra travelled to the office.\n2 Where is Sandra?\nAnswer:", "office"),
    (
        "1 Sandra travelled to the office.\n3 Sandra went to the kitchen.\n4 John journeyed to the garden.\n"
        "5 Where is Sandra?\nAnswer:",
        "kitchen",
    ),
]


def test_parse_babi_file(tmp_path):
    path = tmp_path / "qa1_single-supporting-fact_train.txt"
    path.write_text(BABI_FILE, encoding="utf-8")
    examples = parse_babi_file(path)
    assert examples == [{"task": "babi1", "prompt": prompt, "answer": answer} for prompt, answer in BABI_EXAMPLES]
    # Same shape as the generated task: the generator's independent solver answers the parsed prompts.
    assert [solve_babi1(example["prompt"]) for example in examples] == [answer for _, answer in BABI_EXAMPLES]
    assert {example["task"] for example in parse_babi_file(path, task_name="single")} == {"single"}


def write_babi_story_file(path: Path, stories: list[tuple[str, str, str]]) -> None:
    """One two-question story per (actor, first place, second place), in the bAbI v1.2 format."""
    lines = []
    for actor, first, second in stories:
        lines += [
            f"1 {actor} moved to the {first}.",
            f"2 Where is {actor}? \t{first}\t1",
            f"3 {actor} went to the {second}.",
            f"4 Where is {actor}? \t{second}\t3",
        ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_load_babi_dir(tmp_path):
    actors, places = ["Mary", "John", "Daniel", "Sandra"], ["bathroom", "hallway", "garden", "office", "kitchen"]
    stories = [(actor, place, "bedroom") for actor in actors for place in places]  # 20 distinct stories
    write_babi_story_file(tmp_path / "qa1_single-supporting-fact_train.txt", stories)
    write_babi_story_file(tmp_path / "qa1_single-supporting-fact_test.txt", stories[:3])
    write_babi_story_file(tmp_path / "qa2_two-supporting-facts_train.txt", stories[:4])
    write_babi_story_file(tmp_path / "qa2_two-supporting-facts_test.txt", stories[:2])

    dataset = load_babi_dir(tmp_path, tasks=[1], validation_fraction=0.25, seed=0)
    assert {split: len(rows) for split, rows in dataset.items()} == {"train": 30, "validation": 10, "test": 6}
    assert set(dataset["train"]["task"]) == {"babi1"}
    train_file = parse_babi_file(tmp_path / "qa1_single-supporting-fact_train.txt")
    assert sorted([*dataset["train"]["prompt"], *dataset["validation"]["prompt"]]) == sorted(
        example["prompt"] for example in train_file
    )
    assert list(dataset["test"]["prompt"]) == [
        example["prompt"] for example in parse_babi_file(tmp_path / "qa1_single-supporting-fact_test.txt")
    ]
    for rows in dataset.values():
        assert [row["text"] for row in rows] == [f"{row['prompt']} {row['answer']}" for row in rows]
    # Whole stories move to validation: a story's first line never appears in both splits.
    first_lines = {split: {prompt.split("\n")[0] for prompt in dataset[split]["prompt"]} for split in dataset}
    assert not first_lines["train"] & first_lines["validation"]

    again = load_babi_dir(tmp_path, tasks=[1], validation_fraction=0.25, seed=0)
    assert again["validation"].to_dict() == dataset["validation"].to_dict()
    other_seed = load_babi_dir(tmp_path, tasks=[1], validation_fraction=0.25, seed=1)
    assert other_seed["validation"].to_dict() != dataset["validation"].to_dict()

    everything = load_babi_dir(tmp_path)
    assert set(everything["test"]["task"]) == {"babi1", "babi2"}
    with pytest.raises(FileNotFoundError, match="qaN"):
        load_babi_dir(tmp_path, tasks=[5])


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reasoning_texts():
    return list(build_reasoning_dataset(ALL_TASKS, 220, 0, 0, seed=11)["train"]["text"])


@pytest.fixture(scope="module")
def tokenizer(reasoning_texts):
    return train_bpe_tokenizer(reasoning_texts, vocab_size=400, model_max_length=256)


def test_bpe_tokenizer_special_tokens_and_round_trips(tokenizer, reasoning_texts, tmp_path):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(tokenizer) == 400 and tokenizer.model_max_length == 256
    samples = [*reasoning_texts[:50], "Unseen: 12345 + héllo 日本\n\ttabs"]
    for text in samples:
        ids = tokenizer(text)["input_ids"]
        assert not {0, 1, 2, 3} & set(ids), "encoding adds no special tokens by itself"
        assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize("Answer: 12345")[-5:] == ["1", "2", "3", "4", "5"], "digits are single tokens"

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2, 3)
    assert reloaded.model_max_length == 256
    for text in samples:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_bpe_tokenizer_training_is_deterministic(tokenizer, reasoning_texts):
    again = train_bpe_tokenizer(reasoning_texts, vocab_size=400, model_max_length=256)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(reasoning_texts, vocab_size=100)


def test_load_tokenizer_adds_missing_pad_token(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "with_pad")
    assert load_tokenizer(tmp_path / "with_pad").pad_token_id == 0

    # A GPT-2-like tokenizer: eos but no pad token.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(
        tmp_path / "no_pad"
    )
    assert AutoTokenizer.from_pretrained(tmp_path / "no_pad").pad_token is None
    loaded = load_tokenizer(tmp_path / "no_pad")
    assert (loaded.pad_token, loaded.pad_token_id) == ("</s>", 2)


# ---------------------------------------------------------------------------------------------------------------------
# Text corpora
# ---------------------------------------------------------------------------------------------------------------------


def expected_blocks(tokenizer, documents: list[str], block_size: int) -> list[list[int]]:
    stream = []
    for document in documents:
        stream += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [
        stream[start : start + block_size] for start in range(0, len(stream) // block_size * block_size, block_size)
    ]


def test_chunk_corpus_on_a_local_text_file(tokenizer, reasoning_texts, tmp_path):
    documents = [text.replace("\n", " ") for text in reasoning_texts[:40]]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(documents[:20] + [""] + documents[20:]) + "\n", encoding="utf-8")
    corpus = load_text_corpus(path, cache_dir=str(tmp_path / "cache"))
    assert corpus.column_names == ["text"]
    assert [text for text in corpus["text"] if text] == documents

    chunks = chunk_corpus(corpus, tokenizer, block_size=32)
    assert chunks.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(chunks) > 10
    assert list(chunks["input_ids"]) == expected_blocks(tokenizer, documents, 32)
    for row in chunks:
        assert len(row["input_ids"]) == 32 and row["attention_mask"] == [1] * 32 and row["labels"] == row["input_ids"]

    # An eos token closes every document, and nothing else is an eos token.
    stream = [token for row in chunks for token in row["input_ids"]]
    boundaries = []
    position = 0
    for document in documents:
        position += len(tokenizer(document, add_special_tokens=False)["input_ids"])
        boundaries.append(position)
        position += 1
    eos_positions = [index for index, token in enumerate(stream) if token == tokenizer.eos_token_id]
    assert eos_positions == [boundary for boundary in boundaries if boundary < len(stream)]


def test_chunk_corpus_on_a_directory_of_documents(tokenizer, reasoning_texts, tmp_path):
    corpus_dir = tmp_path / "corpus"
    (corpus_dir / "part").mkdir(parents=True)
    (corpus_dir / "a.txt").write_text("\n".join(reasoning_texts[:10]), encoding="utf-8")
    (corpus_dir / "part" / "b.txt").write_text("\n".join(reasoning_texts[10:20]), encoding="utf-8")
    corpus = load_text_corpus(corpus_dir, sample_by="document", cache_dir=str(tmp_path / "cache"))
    assert len(corpus) == 2
    chunks = chunk_corpus(corpus, tokenizer, block_size=16)
    assert list(chunks["input_ids"]) == expected_blocks(tokenizer, list(corpus["text"]), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No .txt files"):
        load_text_corpus(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------------------
# QA tokenization
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_to_longest", [True, False])
@pytest.mark.parametrize("answer_only_loss", [True, False])
def test_tokenize_qa_masks_exactly_the_prompt(tokenizer, answer_only_loss, pad_to_longest):
    dataset = build_reasoning_dataset(ALL_TASKS, 44, 0, 0, seed=12)["train"]
    max_length = 256
    tokenized = tokenize_qa(
        dataset, tokenizer, max_length=max_length, answer_only_loss=answer_only_loss, pad_to_longest=pad_to_longest
    )
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    width = max(map(sum, tokenized["attention_mask"])) if pad_to_longest else max_length
    for example, row in zip(dataset, tokenized, strict=True):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + example["answer"], add_special_tokens=False)["input_ids"]
        real = 1 + len(prompt) + len(answer) + 1
        assert real < max_length, "this test wants no truncation"
        padding = width - real
        assert row["input_ids"] == [1, *prompt, *answer, 2] + [0] * padding
        assert row["attention_mask"] == [1] * real + [0] * padding
        context_labels = [-100] * (1 + len(prompt)) if answer_only_loss else [1, *prompt]
        assert row["labels"] == context_labels + [*answer, 2] + [-100] * padding
        # The boundary is exact: the prompt positions decode to the prompt, the rest to " " + answer.
        assert tokenizer.decode(row["input_ids"][1 : 1 + len(prompt)]) == example["prompt"]
        assert tokenizer.decode(row["input_ids"][1 + len(prompt) : real - 1]) == " " + example["answer"]
        assert tokenizer.decode(row["input_ids"][:real]) == f"<s>{example['text']}</s>"


def test_tokenize_qa_truncates_the_prompt_start_and_keeps_the_answer(tokenizer):
    dataset = build_reasoning_dataset(["babi3"], 4, 0, 0, seed=13)
    for index, example in enumerate(dataset["train"]):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(" " + example["answer"], add_special_tokens=False)["input_ids"]
        max_length = 1 + 5 + len(answer) + 1
        row = tokenize_qa(dataset["train"].select([index]), tokenizer, max_length)[0]
        assert row["input_ids"] == [1, *prompt[-5:], *answer, 2]
        assert row["labels"] == [-100] * 6 + [*answer, 2]
    splits = tokenize_qa(dataset, tokenizer, max_length=64, pad_to_longest=False)
    assert set(splits) == {"train", "validation", "test"} and len(splits["train"][0]["input_ids"]) == 64
    # Padded to the longest example of each split by default.
    splits = tokenize_qa(dataset, tokenizer, max_length=64)
    for split in (split for split in splits.values() if len(split)):
        assert len(split[0]["input_ids"]) == max(map(sum, split["attention_mask"])) <= 64
    with pytest.raises(ValueError, match="max_length"):
        tokenize_qa(dataset["train"], tokenizer, max_length=2)
