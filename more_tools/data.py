"""Offline data for MoRE: procedural reasoning tasks, the original bAbI format, text corpora and a BPE tokenizer.

Everything here runs without the Hugging Face Hub and is seeded and deterministic:

- **Reasoning tasks** (`TASK_GENERATORS`, `build_reasoning_dataset`): bAbI-style stories (tasks 1, 2, 3, 7, 14, 15,
  16 and 19 of Weston et al., 2015, in the numbered story/question shape of the bAbI v1.2 files), the research guide's
  2-4 digit arithmetic and word problems, and simple linear equations. Answers are correct by construction.
- **Depth-controlled tasks** (`DEPTH_TASK_GENERATORS`, `build_depth_dataset`): pointer chasing (difficulty = hops),
  digit addition (difficulty = digits) and prefix parity (difficulty = bits), split by difficulty, with a word-level
  tokenizer (`train_word_level_tokenizer`); the main job (`compare_more.py`) uses them. Their prompts end where the
  answer starts (no `Answer:` cue), so the first computation step happens where the answer is predicted. Prefix
  parity has a target at every prompt position instead (`PER_POSITION_TASKS`, `tokenize_per_position`).
- **Original bAbI files** (`parse_babi_file`, `load_babi_dir`): the `qaN_*_train.txt` / `qaN_*_test.txt` files of
  bAbI v1.2, turned into the same prompt/answer examples.
- **Text corpora** (`load_text_corpus`, `chunk_corpus`): a Hub dataset such as WikiText-103 or local `.txt` files,
  tokenized, joined with an eos token at each document boundary and cut into fixed-length blocks.
- **Tokenizers** (`train_bpe_tokenizer`, `load_tokenizer`) and **QA tokenization** (`tokenize_qa`, and
  `tokenize_depth_tasks` for splits that mix prompt/answer and per-position tasks).

Prompt/answer convention: every reasoning example is a dict with `task`, `prompt` and `answer`. The prompt ends with
`"Answer:"` (no trailing space), the answer is one short word or number without surrounding spaces, and the training
text is `prompt + " " + answer`, e.g.

    1 Mary moved to the bathroom.
    2 John went to the hallway.
    3 Where is Mary?
    Answer: bathroom

Arithmetic, word problems and algebra use `"Question: <question>\\nAnswer:"`, the research guide's evaluation format.
The space before the answer belongs to the answer side, which is how a byte-level BPE tokenizer splits it
(`"Ġbathroom"`) and what a model generates after the prompt `"...Answer:"`.
"""

import itertools
import operator
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from datasets import Dataset, DatasetDict, Features, Value, concatenate_datasets, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging


logger = logging.get_logger(__name__)

Example = dict[str, str]
TaskGenerator = Callable[[random.Random], Example]

ANSWER_CUE = "Answer:"
QA_COLUMNS = ("task", "prompt", "answer", "text")
QA_FEATURES = Features({column: Value("string") for column in QA_COLUMNS})
# Insertion order fixes the ids: pad 0, bos 1, eos 2, unk 3.
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IGNORE_INDEX = -100
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")  # what tokenization keeps: the causal LM's inputs

# Rejection sampling (a story with nothing to ask, a prompt already drawn) gives up after this many draws, so a
# request the generator cannot satisfy fails loudly instead of looping forever.
_MAX_ATTEMPTS = 1000

# ---------------------------------------------------------------------------------------------------------------------
# Vocabularies (those of the bAbI v1.2 English tasks)
# ---------------------------------------------------------------------------------------------------------------------

BABI_ACTORS = ("Mary", "John", "Daniel", "Sandra")
BABI_PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
BABI_OBJECTS = ("football", "apple", "milk")
MOVE_VERBS = ("moved to", "went to", "went back to", "journeyed to", "travelled to")
TAKE_VERBS = ("got", "picked up", "grabbed", "took")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
GIVE_VERBS = ("passed", "handed", "gave")
COUNT_WORDS = ("none", "one", "two", "three")

TIME_ACTORS = ("Bill", "Fred", "Julie", "Mary")
TIME_PLACES = ("cinema", "school", "park", "office", "kitchen", "bedroom")
TIMES = ("yesterday", "this morning", "this afternoon", "this evening")  # in chronological order

DEDUCTION_NAMES = ("Gertrude", "Winona", "Emily", "Jessica")
SPECIES_PLURALS = {"mouse": "mice", "cat": "cats", "sheep": "sheep", "wolf": "wolves"}

INDUCTION_NAMES = ("Lily", "Bernhard", "Brian", "Julius", "Greg")
INDUCTION_SPECIES = ("frog", "lion", "swan", "rhino")
COLORS = ("green", "white", "yellow", "gray")

PATH_PLACES = ("office", "hallway", "kitchen", "garden", "bedroom", "bathroom")
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
OPPOSITE_DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east"}

# ---------------------------------------------------------------------------------------------------------------------
# Example formatting
# ---------------------------------------------------------------------------------------------------------------------


def _babi_prompt(numbered_lines: list[str]) -> str:
    """bAbI lines ("ID text", the question last) followed by the answer cue."""
    return "\n".join([*numbered_lines, ANSWER_CUE])


def _babi_example(task: str, sentences: list[str], question: str, answer: str) -> Example:
    """One story followed by its question, numbered from 1 as a bAbI v1.2 story."""
    lines = [f"{number} {sentence}" for number, sentence in enumerate([*sentences, question], start=1)]
    return {"task": task, "prompt": _babi_prompt(lines), "answer": answer}


def _question_example(task: str, question: str, answer: str) -> Example:
    """The research guide's evaluation format: "Question: ...\\nAnswer:"."""
    return {"task": task, "prompt": f"Question: {question}\n{ANSWER_CUE}", "answer": answer}


def _with_text(example: Example) -> Example:
    """Adds the training text `prompt + " " + answer`."""
    return {**example, "text": f"{example['prompt']} {example['answer']}"}


# ---------------------------------------------------------------------------------------------------------------------
# bAbI worlds: people moving between places and carrying objects (tasks 1, 2, 3, 7)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _BabiWorld:
    """The state a bAbI story describes so far."""

    actor_place: dict[str, str] = field(default_factory=dict)
    carrier: dict[str, str] = field(default_factory=dict)  # object -> actor carrying it
    object_place: dict[str, str] = field(default_factory=dict)  # object -> place it lies in, when not carried
    trail: dict[str, list[str]] = field(default_factory=dict)  # object -> places it has been, in order

    def locate(self, obj: str) -> str | None:
        """Where `obj` is now, or None while the story has not mentioned it."""
        if obj in self.carrier:
            return self.actor_place[self.carrier[obj]]
        return self.object_place.get(obj)


def _move_options(world: _BabiWorld) -> list[tuple[str, ...]]:
    return [(actor, place) for actor in BABI_ACTORS for place in BABI_PLACES if world.actor_place.get(actor) != place]


def _move(world: _BabiWorld, rng: random.Random, actor: str, place: str) -> str:
    world.actor_place[actor] = place
    for obj, carrier in world.carrier.items():
        if carrier == actor:
            world.trail[obj].append(place)
    return f"{actor} {rng.choice(MOVE_VERBS)} the {place}."


def _take_options(world: _BabiWorld) -> list[tuple[str, ...]]:
    # An object the story has not mentioned yet can be found wherever its taker is (bAbI introduces objects that way).
    return [
        (actor, obj)
        for actor, place in world.actor_place.items()
        for obj in BABI_OBJECTS
        if obj not in world.carrier and world.object_place.get(obj, place) == place
    ]


def _take(world: _BabiWorld, rng: random.Random, actor: str, obj: str) -> str:
    world.object_place.pop(obj, None)
    world.carrier[obj] = actor
    world.trail.setdefault(obj, [world.actor_place[actor]])
    return f"{actor} {rng.choice(TAKE_VERBS)} the {obj} there."


def _drop_options(world: _BabiWorld) -> list[tuple[str, ...]]:
    return [(actor, obj) for obj, actor in world.carrier.items()]


def _drop(world: _BabiWorld, rng: random.Random, actor: str, obj: str) -> str:
    del world.carrier[obj]
    world.object_place[obj] = world.actor_place[actor]
    return f"{actor} {rng.choice(DROP_VERBS)} the {obj}."


def _give_options(world: _BabiWorld) -> list[tuple[str, ...]]:
    return [
        (actor, obj, other)
        for obj, actor in world.carrier.items()
        for other, place in world.actor_place.items()
        if other != actor and place == world.actor_place[actor]
    ]


def _give(world: _BabiWorld, rng: random.Random, actor: str, obj: str, other: str) -> str:
    world.carrier[obj] = other
    return f"{actor} {rng.choice(GIVE_VERBS)} the {obj} to {other}."


class _BabiAction(NamedTuple):
    """What can happen next in a world (`options`) and how one option changes it and reads (`apply`)."""

    options: Callable[[_BabiWorld], list[tuple[str, ...]]]
    apply: Callable[..., str]


_BABI_ACTIONS = {
    "move": _BabiAction(_move_options, _move),
    "take": _BabiAction(_take_options, _take),
    "drop": _BabiAction(_drop_options, _drop),
    "give": _BabiAction(_give_options, _give),
}


def _simulate_babi_story(
    rng: random.Random, action_weights: dict[str, float], num_sentences: int
) -> tuple[list[str], _BabiWorld]:
    """Draws `num_sentences` valid actions (kind by weight among the possible kinds, then one option uniformly)."""
    world = _BabiWorld()
    sentences = []
    for _ in range(num_sentences):
        # Moving is always possible, so there is always a choice.
        possible = [(kind, options) for kind in action_weights if (options := _BABI_ACTIONS[kind].options(world))]
        kind, options = rng.choices(possible, weights=[action_weights[kind] for kind, _ in possible])[0]
        sentences.append(_BABI_ACTIONS[kind].apply(world, rng, *rng.choice(options)))
    return sentences, world


Question = Callable[[random.Random, _BabiWorld], tuple[str, str] | None]


def _ask_where_is_actor(rng: random.Random, world: _BabiWorld) -> tuple[str, str] | None:
    if not world.actor_place:
        return None
    actor = rng.choice(list(world.actor_place))
    return f"Where is {actor}?", world.actor_place[actor]


def _ask_where_is_object(rng: random.Random, world: _BabiWorld) -> tuple[str, str] | None:
    known = [obj for obj in BABI_OBJECTS if world.locate(obj) is not None]
    if not known:
        return None
    obj = rng.choice(known)
    return f"Where is the {obj}?", world.locate(obj)


def _ask_where_was_object_before(rng: random.Random, world: _BabiWorld) -> tuple[str, str] | None:
    # Only places an object visited once: "before the kitchen" would be ambiguous after two visits to the kitchen.
    candidates = [
        (obj, index)
        for obj, trail in world.trail.items()
        for index in range(1, len(trail))
        if trail.count(trail[index]) == 1
    ]
    if not candidates:
        return None
    obj, index = rng.choice(candidates)
    trail = world.trail[obj]
    return f"Where was the {obj} before the {trail[index]}?", trail[index - 1]


def _ask_how_many_carried(rng: random.Random, world: _BabiWorld) -> tuple[str, str] | None:
    if not world.actor_place:
        return None
    actor = rng.choice(list(world.actor_place))
    count = sum(carrier == actor for carrier in world.carrier.values())
    return f"How many objects is {actor} carrying?", COUNT_WORDS[count]


def _world_task_example(
    task: str,
    rng: random.Random,
    action_weights: dict[str, float],
    num_sentences: tuple[int, int],
    ask: Question,
) -> Example:
    """Simulates stories until `ask` finds a question the story answers."""
    for _ in range(_MAX_ATTEMPTS):
        sentences, world = _simulate_babi_story(rng, action_weights, rng.randint(*num_sentences))
        question_answer = ask(rng, world)
        if question_answer is not None:
            return _babi_example(task, sentences, *question_answer)
    raise RuntimeError(f"{task}: no story with a question to ask in {_MAX_ATTEMPTS} draws")


def generate_babi1(rng: random.Random) -> Example:
    """bAbI task 1, single supporting fact: "Mary moved to the bathroom. ... Where is Mary?" -> "bathroom"."""
    return _world_task_example("babi1", rng, {"move": 1.0}, (2, 8), _ask_where_is_actor)


def generate_babi2(rng: random.Random) -> Example:
    """bAbI task 2, two supporting facts: "John got the milk there. John went to the office. Where is the milk?"."""
    return _world_task_example("babi2", rng, {"move": 2.0, "take": 1.0, "drop": 0.5}, (4, 12), _ask_where_is_object)


def generate_babi3(rng: random.Random) -> Example:
    """bAbI task 3, three supporting facts: "Where was the football before the kitchen?" (the object's trail)."""
    weights = {"move": 3.0, "take": 1.0, "drop": 0.5}
    return _world_task_example("babi3", rng, weights, (6, 16), _ask_where_was_object_before)


def generate_babi7(rng: random.Random) -> Example:
    """bAbI task 7, counting: "How many objects is Daniel carrying?" -> "none", "one", "two" or "three"."""
    weights = {"move": 2.0, "take": 2.0, "drop": 1.0, "give": 1.0}
    return _world_task_example("babi7", rng, weights, (4, 12), _ask_how_many_carried)


# ---------------------------------------------------------------------------------------------------------------------
# bAbI tasks 14, 15, 16, 19
# ---------------------------------------------------------------------------------------------------------------------


def generate_babi14(rng: random.Random) -> Example:
    """bAbI task 14, time reasoning: "Yesterday Julie went to the office. Julie went to the school this morning.
    Where was Julie before the school?" -> "office".

    Each person is in a different place at each time they are mentioned, so "before the <place>" has one answer.
    """
    actors = rng.sample(TIME_ACTORS, rng.randint(2, len(TIME_ACTORS)))
    facts = []
    for position, actor in enumerate(actors):
        # The first person is the one asked about and needs at least two moments.
        times = sorted(rng.sample(range(len(TIMES)), rng.randint(2 if position == 0 else 1, len(TIMES))))
        facts.append((actor, times, rng.sample(TIME_PLACES, len(times))))
    sentences = []
    for actor, times, places in facts:
        for time, place in zip(times, places, strict=True):
            verb = rng.choice(MOVE_VERBS)
            if rng.random() < 0.5:
                sentences.append(f"{actor} {verb} the {place} {TIMES[time]}.")
            else:
                sentences.append(f"{TIMES[time].capitalize()} {actor} {verb} the {place}.")
    rng.shuffle(sentences)
    actor, _, places = facts[0]
    index = rng.randrange(1, len(places))
    return _babi_example("babi14", sentences, f"Where was {actor} before the {places[index]}?", places[index - 1])


def generate_babi15(rng: random.Random) -> Example:
    """bAbI task 15, basic deduction: "Sheep are afraid of wolves. Gertrude is a sheep. What is Gertrude afraid of?"
    -> "wolf"."""
    species = list(SPECIES_PLURALS)
    fears = {animal: rng.choice([other for other in species if other != animal]) for animal in species}
    members = {name: rng.choice(species) for name in DEDUCTION_NAMES}
    sentences = [
        f"{SPECIES_PLURALS[animal].capitalize()} are afraid of {SPECIES_PLURALS[feared]}."
        for animal, feared in fears.items()
    ]
    sentences += [f"{name} is a {animal}." for name, animal in members.items()]
    rng.shuffle(sentences)
    name = rng.choice(DEDUCTION_NAMES)
    return _babi_example("babi15", sentences, f"What is {name} afraid of?", fears[members[name]])


def generate_babi16(rng: random.Random) -> Example:
    """bAbI task 16, basic induction: "Lily is a swan. Lily is white. Bernhard is a swan. What color is Bernhard?"
    -> "white".

    All members of a species share a color and at least one other member of the asked person's species shows it.
    """
    query, *others = rng.sample(INDUCTION_NAMES, len(INDUCTION_NAMES))
    members = {name: rng.choice(INDUCTION_SPECIES) for name in [query, *others]}
    members[rng.choice(others)] = members[query]
    colors = {animal: rng.choice(COLORS) for animal in INDUCTION_SPECIES}
    sentences = [f"{name} is a {animal}." for name, animal in members.items()]
    sentences += [f"{name} is {colors[members[name]]}." for name in others]
    rng.shuffle(sentences)
    return _babi_example("babi16", sentences, f"What color is {query}?", colors[members[query]])


def generate_babi19(rng: random.Random) -> Example:
    """bAbI task 19, path finding: "The kitchen is north of the office. ... How do you go from the kitchen to the
    garden?" -> "s,e" (one letter per step).

    The places form a tree on a grid (each new place next to a placed one, on a free cell), so the stated relations
    are geometrically consistent and the path between two places is unique; questions ask for two-step paths, as in
    bAbI.
    """
    places = rng.sample(PATH_PLACES, len(PATH_PLACES))
    cells = {places[0]: (0, 0)}
    neighbors: dict[str, dict[str, str]] = {places[0]: {}}  # place -> {neighbor: direction from place to neighbor}
    sentences = []
    for place in places[1:]:
        occupied = set(cells.values())
        options = [
            (anchor, direction)
            for anchor, (x, y) in cells.items()
            for direction, (dx, dy) in DIRECTIONS.items()
            if (x + dx, y + dy) not in occupied
        ]
        anchor, direction = rng.choice(options)
        dx, dy = DIRECTIONS[direction]
        cells[place] = (cells[anchor][0] + dx, cells[anchor][1] + dy)
        neighbors[place] = {anchor: OPPOSITE_DIRECTIONS[direction]}
        neighbors[anchor][place] = direction
        # bAbI states each relation from either side.
        if rng.random() < 0.5:
            sentences.append(f"The {place} is {direction} of the {anchor}.")
        else:
            sentences.append(f"The {anchor} is {OPPOSITE_DIRECTIONS[direction]} of the {place}.")
    rng.shuffle(sentences)
    # In a tree, a neighbor's neighbor (other than the start) is exactly two steps away.
    paths = [
        (start, middle, end)
        for start in places
        for middle in neighbors[start]
        for end in neighbors[middle]
        if end != start
    ]
    start, middle, end = rng.choice(paths)
    answer = f"{neighbors[start][middle][0]},{neighbors[middle][end][0]}"
    return _babi_example("babi19", sentences, f"How do you go from the {start} to the {end}?", answer)


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic, word problems, algebra
# ---------------------------------------------------------------------------------------------------------------------

_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _random_operand(rng: random.Random) -> int:
    # Digits first, so 2- and 3-digit operands are as common as 4-digit ones (uniform over 10..9999 is 90% 4-digit).
    digits = rng.randint(2, 4)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def generate_arithmetic(rng: random.Random) -> Example:
    """The research guide's arithmetic: "What is 345 + 78?" with 2-4 digit operands; differences are non-negative."""
    a, b = _random_operand(rng), _random_operand(rng)
    symbol = rng.choice("+-")
    if symbol == "-" and a < b:
        a, b = b, a
    return _question_example("arithmetic", f"What is {a} {symbol} {b}?", str(_OPERATIONS[symbol](a, b)))


class _WordProblem(NamedTuple):
    template: str
    symbol: str  # the operation that answers it, a key of _OPERATIONS


# The first three are the research guide's templates.
_WORD_PROBLEMS = (
    _WordProblem("If you have {a} {items} and buy {b} more, how many do you have?", "+"),
    _WordProblem("A store had {a} {items}. They sold {b}. How many are left?", "-"),
    _WordProblem("You walked {a} steps yesterday and {b} steps today. Total?", "+"),
    _WordProblem(
        "{name} has {a} {items}. {pronoun} gives {b} to {other}. How many {items} does {name} have now?", "-"
    ),
    _WordProblem("{name} has {a} {items}. {other} gives {name} {b} more. How many {items} does {name} have now?", "+"),
    _WordProblem("{name} has {a} bags with {b} {items} in each bag. How many {items} does {name} have?", "*"),
)
_OPERAND_RANGES = {"+": (10, 999), "-": (10, 999), "*": (2, 12)}
_PEOPLE = {"Tom": "He", "Anna": "She", "Ben": "He", "Lucy": "She", "Sam": "He", "Emma": "She"}
_ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books")


def generate_word_problem(rng: random.Random) -> Example:
    """Arithmetic word problems: "Tom has 12 apples. He gives 5 to Anna. How many apples does Tom have now?" -> "7"."""
    problem = rng.choice(_WORD_PROBLEMS)
    a, b = (rng.randint(*_OPERAND_RANGES[problem.symbol]) for _ in range(2))
    if problem.symbol == "-" and a < b:
        a, b = b, a
    name, other = rng.sample(list(_PEOPLE), 2)
    question = problem.template.format(
        a=a, b=b, name=name, pronoun=_PEOPLE[name], other=other, items=rng.choice(_ITEMS)
    )
    return _question_example("word_problem", question, str(_OPERATIONS[problem.symbol](a, b)))


# Left-hand side template and its value as a function of (a, b, x).
_LINEAR_EQUATIONS: tuple[tuple[str, Callable[[int, int, int], int]], ...] = (
    ("{a}x + {b}", lambda a, b, x: a * x + b),
    ("{a}x - {b}", lambda a, b, x: a * x - b),
    ("{a}(x + {b})", lambda a, b, x: a * (x + b)),
)


def generate_algebra(rng: random.Random) -> Example:
    """Linear equations with an integer solution: "Solve for x: 3x + 5 = 20" -> "5"."""
    left, value = rng.choice(_LINEAR_EQUATIONS)
    a, b, x = rng.randint(2, 9), rng.randint(1, 50), rng.randint(-10, 20)
    return _question_example("algebra", f"Solve for x: {left.format(a=a, b=b)} = {value(a, b, x)}", str(x))


TASK_GENERATORS: dict[str, TaskGenerator] = {
    "babi1": generate_babi1,
    "babi2": generate_babi2,
    "babi3": generate_babi3,
    "babi7": generate_babi7,
    "babi14": generate_babi14,
    "babi15": generate_babi15,
    "babi16": generate_babi16,
    "babi19": generate_babi19,
    "arithmetic": generate_arithmetic,
    "word_problem": generate_word_problem,
    "algebra": generate_algebra,
}


def get_task_generator(name: str) -> TaskGenerator:
    """The generator registered as `name` in `TASK_GENERATORS`; a `ValueError` lists the valid names otherwise."""
    if name not in TASK_GENERATORS:
        raise ValueError(f"Unknown reasoning task {name!r}; valid names: {', '.join(TASK_GENERATORS)}")
    return TASK_GENERATORS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Depth-controlled synthetic tasks: the difficulty is a number of sequential computation steps
# ---------------------------------------------------------------------------------------------------------------------

DifficultyGenerator = Callable[[random.Random, int], Example]

POINTER_VARIABLES = tuple("abcdefghijklmnopqrstuvwxyz")
POINTER_VALUES = tuple("0123456789")
POINTER_CHAINS = 4  # chains per prompt: guessing among chain starts scores 1 / POINTER_CHAINS at every difficulty


def generate_pointer_chase(rng: random.Random, hops: int, num_chains: int = POINTER_CHAINS) -> Example:
    """Multi-hop variable binding: `a = 7 ; b = a ; c = b ; ... ? c`, answered by following `hops` assignments.

    The prompt holds `num_chains` chains of exactly `hops` statements each, with distinct variables and distinct
    values, shuffled together; the question asks for the last variable of one chain. Every chain has the same length
    and its own value, so neither the prompt length nor a guess among the chain values (1 / num_chains) tells the
    answer without following the pointers.
    """
    if hops < 1:
        raise ValueError(f"hops must be >= 1, got {hops}")
    if not 1 <= num_chains <= len(POINTER_VALUES) or num_chains * hops > len(POINTER_VARIABLES):
        raise ValueError(
            f"num_chains={num_chains} chains of hops={hops} need num_chains <= {len(POINTER_VALUES)} values and "
            f"num_chains * hops <= {len(POINTER_VARIABLES)} variables"
        )
    variables = rng.sample(POINTER_VARIABLES, num_chains * hops)
    values = rng.sample(POINTER_VALUES, num_chains)
    statements, ends = [], []
    for chain, value in enumerate(values):
        names = variables[chain * hops : (chain + 1) * hops]
        statements.append(f"{names[0]} = {value}")
        statements += [f"{name} = {previous}" for previous, name in zip(names, names[1:], strict=False)]
        ends.append((names[-1], value))
    rng.shuffle(statements)
    query, answer = rng.choice(ends)
    # The prompt ends with the queried variable itself: the first lookup starts where the answer is predicted.
    return {"task": "pointer", "prompt": f"{' ; '.join(statements)} ; ? {query}", "answer": answer}


def generate_digit_addition(rng: random.Random, digits: int) -> Example:
    """Addition of two `digits`-digit numbers, one token per digit and every number least significant digit first
    (`"3 2 1 + 6 5 4 ="` is 123 + 456), so each answer digit depends on the aligned operand digits and one carry.

    The answer has `digits + 1` digits (a leading zero when there is no final carry): its length tells nothing.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    low = 0 if digits == 1 else 10 ** (digits - 1)
    a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)

    def reversed_digits(number: int, width: int) -> str:
        return " ".join(str(number).zfill(width)[::-1])

    prompt = f"{reversed_digits(a, digits)} + {reversed_digits(b, digits)} ="
    return {"task": "addition", "prompt": prompt, "answer": reversed_digits(a + b, digits + 1)}


def generate_prefix_parity(rng: random.Random, bits: int) -> Example:
    """Prefix parity (cumulative XOR) of `bits` random bits, `"1 0 1 1"` -> `"1 1 0 1"`: the target of each bit is the
    parity of the bits up to it (Schwarzschild et al., 2021), so the last one takes `bits` sequential XORs.

    The answer has one target per prompt bit and is scored at the bits themselves (`PER_POSITION_TASKS`): the model
    never reads the earlier targets, from which each target would be one XOR away, whatever the string's length.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    string = [rng.randint(0, 1) for _ in range(bits)]
    targets = itertools.accumulate(string, operator.xor)
    return {"task": "parity", "prompt": " ".join(map(str, string)), "answer": " ".join(map(str, targets))}


DEPTH_TASK_GENERATORS: dict[str, DifficultyGenerator] = {
    "pointer": generate_pointer_chase,
    "addition": generate_digit_addition,
    "parity": generate_prefix_parity,
}
# Tasks whose answer holds one target per prompt token, tokenized by `tokenize_per_position` instead of `tokenize_qa`.
PER_POSITION_TASKS = frozenset({"parity"})


def get_depth_task_generator(name: str) -> DifficultyGenerator:
    """The generator registered as `name` in `DEPTH_TASK_GENERATORS`; a `ValueError` lists valid names otherwise."""
    if name not in DEPTH_TASK_GENERATORS:
        raise ValueError(f"Unknown depth task {name!r}; valid names: {', '.join(DEPTH_TASK_GENERATORS)}")
    return DEPTH_TASK_GENERATORS[name]


DEPTH_COLUMNS = ("task", "difficulty", "prompt", "answer", "text")
DEPTH_FEATURES = Features({**{c: Value("string") for c in DEPTH_COLUMNS}, "difficulty": Value("int32")})


def build_depth_dataset(
    difficulties: dict[str, tuple[list[int], list[int]]],
    num_train: int,
    num_test_per_difficulty: int,
    seed: int = 0,
    num_validation_per_difficulty: int = 0,
) -> DatasetDict:
    """Train and test splits of depth-controlled tasks, split by difficulty (e.g. train on 1..K, test on 1..2K).

    Args:
        difficulties: task name -> (training difficulties, test difficulties).
        num_train: Training examples; they cycle through every task x training difficulty (balanced).
        num_test_per_difficulty: Test examples of every task x test difficulty (distinct prompts).
        seed: Seed of every split.
        num_validation_per_difficulty: With a positive count, a `validation` split of the test cells, disjoint from
            the test split and from training prompts: for choices such as the learning rate, never made on test.

    No training prompt is a test or validation prompt (a training prompt may repeat where a difficulty has few distinct
    prompts), and no validation prompt is a test prompt.
    The test split is drawn first from its own seeded stream, so it depends only on `seed` and the test cells: every
    variant and every training seed is scored on the same examples.

    Returns:
        A `DatasetDict` with `train`, `test` (and `validation`) splits and the columns `task`, `difficulty`,
        `prompt`, `answer`, `text`.
    """
    if not difficulties or any(not train or not test for train, test in difficulties.values()):
        raise ValueError(f"every task needs training and test difficulties, got {difficulties}")
    generators = {task: get_depth_task_generator(task) for task in difficulties}
    held_out: set[str] = set()  # test and validation prompts

    def draw(split: str, cells: list[tuple[str, int]], size: int) -> Dataset:
        rng = random.Random(f"more-depth/{seed}/{split}")
        examples = []
        for index in range(size):
            task, difficulty = cells[index % len(cells)]
            generate = lambda r, t=task, d=difficulty: generators[t](r, d)  # noqa: E731
            if split != "train":
                example = _draw_unseen(task, generate, rng, held_out)
            else:
                example = _draw_outside(task, generate, rng, held_out)
            examples.append({**_with_text(example), "difficulty": difficulty})
        return Dataset.from_dict({c: [e[c] for e in examples] for c in DEPTH_COLUMNS}, features=DEPTH_FEATURES)

    test_cells = [(task, d) for task, (_, test) in difficulties.items() for d in test]
    train_cells = [(task, d) for task, (train, _) in difficulties.items() for d in train]
    splits = {"test": draw("test", test_cells, num_test_per_difficulty * len(test_cells))}
    if num_validation_per_difficulty:  # after the test split, so the test split does not change with it
        splits["validation"] = draw("validation", test_cells, num_validation_per_difficulty * len(test_cells))
    return DatasetDict({"train": draw("train", train_cells, num_train), **splits})


def _draw_outside(task: str, generate: TaskGenerator, rng: random.Random, excluded: set[str]) -> Example:
    """Draws from `generate` until its prompt is not in `excluded` (repeats among the draws are allowed)."""
    for _ in range(_MAX_ATTEMPTS):
        example = generate(rng)
        if example["prompt"] not in excluded:
            return example
    raise ValueError(f"Task {task!r} only draws prompts of the test split; it has too few distinct prompts")


def train_word_level_tokenizer(texts: Iterable[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (`tokenizers.models.WordLevel`) over the whitespace-separated words of `texts`.

    For synthetic tasks whose words are symbols (variables, digits, `=`, `;`): one token per symbol, no subword
    pieces to learn. Special tokens and ids as `train_bpe_tokenizer` (pad 0, bos 1, eos 2, unk 3); words are added in
    sorted order, so the vocabulary does not depend on the order of `texts`. Decoding joins words with spaces.
    """
    words = sorted({word for text in texts for word in text.split()})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({word: len(vocab) + index for index, word in enumerate(w for w in words if w not in vocab)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    # No clean-up of "spaces before punctuation": `? c` must decode as written.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Datasets of reasoning tasks
# ---------------------------------------------------------------------------------------------------------------------


def _qa_dataset(examples: list[Example]) -> Dataset:
    """A `Dataset` with the `task`, `prompt`, `answer`, `text` columns (typed, so an empty split works too)."""
    rows = [_with_text(example) for example in examples]
    return Dataset.from_dict({column: [row[column] for row in rows] for column in QA_COLUMNS}, features=QA_FEATURES)


def build_reasoning_dataset(
    tasks: list[str], num_train: int, num_validation: int, num_test: int, seed: int = 0
) -> DatasetDict:
    """Generates train/validation/test splits of procedural reasoning examples.

    Example `i` of a split comes from `tasks[i % len(tasks)]`, so tasks are interleaved and balanced (repeat a name to
    weight it). Every prompt appears once in the whole `DatasetDict`, so no split shares an example with another.
    Splits are drawn test first, then validation, then train, each from its own seeded stream: for a given seed the
    evaluation splits do not change when only `num_train` does.

    Returns:
        A `DatasetDict` whose splits have the columns `task`, `prompt`, `answer` and `text` (`prompt + " " + answer`).
    """
    if not tasks:
        raise ValueError("tasks must name at least one reasoning task")
    generators = [get_task_generator(task) for task in tasks]
    sizes = {"test": num_test, "validation": num_validation, "train": num_train}
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"split sizes must be non-negative, got {sizes}")
    seen: set[str] = set()
    splits = {}
    for split, size in sizes.items():
        # A string seed is hashed with SHA-512 by `random`, so streams are stable across processes and platforms.
        rng = random.Random(f"more-reasoning/{seed}/{split}")
        examples = []
        for index in range(size):
            task = tasks[index % len(tasks)]
            examples.append(_draw_unseen(task, generators[index % len(tasks)], rng, seen))
        splits[split] = _qa_dataset(examples)
    return DatasetDict({split: splits[split] for split in ("train", "validation", "test")})


def _draw_unseen(task: str, generate: TaskGenerator, rng: random.Random, seen: set[str]) -> Example:
    """Draws from `generate` until its prompt is not in `seen`, then records it."""
    for _ in range(_MAX_ATTEMPTS):
        example = generate(rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            return example
    raise ValueError(f"Task {task!r} keeps repeating prompts after {len(seen)} distinct examples; ask for fewer")


# ---------------------------------------------------------------------------------------------------------------------
# Original bAbI v1.2 files
# ---------------------------------------------------------------------------------------------------------------------

_BABI_FILE_NAME = re.compile(r"qa(\d+)_.+_(train|test)\.txt")


def _babi_task_name(path: Path) -> str:
    """The task of a bAbI file: "babi1" (the generators' name) for `qa1_*_train.txt`, else the file's stem."""
    match = _BABI_FILE_NAME.fullmatch(path.name)
    return f"babi{match.group(1)}" if match else path.stem


def _parse_babi_stories(path: Path, task_name: str) -> list[list[Example]]:
    """The examples of a bAbI file, grouped by story (so splits can keep a story's questions together)."""
    stories: list[list[Example]] = []
    statements: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            number, _, text = line.partition(" ")
            if not number.isdigit():
                raise ValueError(f"{path}:{line_number}: expected 'ID text', got {line!r}")
            if number == "1":
                stories.append([])
                statements = []
            elif not stories:
                raise ValueError(f"{path}:{line_number}: the first story must start at ID 1")
            if "\t" in text:
                # "ID question?\tanswer\tsupporting fact IDs"; the original files put a space before the first tab.
                question, answer = (part.strip() for part in text.split("\t")[:2])
                prompt = _babi_prompt([*statements, f"{number} {question}"])
                stories[-1].append({"task": task_name, "prompt": prompt, "answer": answer})
            else:
                statements.append(f"{number} {text.strip()}")
    return stories


def parse_babi_file(path: str | Path, task_name: str | None = None) -> list[Example]:
    """Reads a bAbI v1.2 file (`qaN_*_train.txt` or `qaN_*_test.txt`) into prompt/answer examples.

    Each question becomes one example whose prompt is the story's statements so far, with their original IDs (earlier
    questions are left out, so IDs can skip), then the numbered question and `"Answer:"`; the answer is the file's.

    Args:
        path: The file. Lines are "ID text"; a question line is "ID question?\\tanswer\\tsupporting IDs"; IDs restart
            at 1 with each new story.
        task_name: The `task` column; defaults to "babiN" for a `qaN_*` file (the generators' names), else the stem.
    """
    path = Path(path)
    task = task_name if task_name is not None else _babi_task_name(path)
    return [example for story in _parse_babi_stories(path, task) for example in story]


def _babi_files(directory: Path, split: str) -> dict[int, Path]:
    """Task number -> the `qaN_*_{split}.txt` file of `directory`."""
    files = {}
    for path in sorted(directory.glob(f"qa*_{split}.txt")):
        match = _BABI_FILE_NAME.fullmatch(path.name)
        if match:
            files[int(match.group(1))] = path
    return files


def load_babi_dir(
    directory: str | Path, tasks: Iterable[int] | None = None, validation_fraction: float = 0.1, seed: int = 0
) -> DatasetDict:
    """Loads bAbI v1.2 tasks from a directory such as `tasks_1-20_v1-2/en` into train/validation/test splits.

    Args:
        directory: Holds `qaN_<name>_train.txt` and `qaN_<name>_test.txt`.
        tasks: Task numbers to load (e.g. `[1, 2, 3, 16]`); default: every task with a train file.
        validation_fraction: Share of each task's train stories moved to validation. Whole stories move, so a story's
            questions never straddle train and validation; the choice is a seeded shuffle, the same on every run.
        seed: Seed of that shuffle.

    Returns:
        A `DatasetDict` with the columns of `build_reasoning_dataset`; the test split is the test files.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    directory = Path(directory)
    train_files, test_files = _babi_files(directory, "train"), _babi_files(directory, "test")
    task_numbers = sorted(train_files) if tasks is None else list(tasks)
    missing = [number for number in task_numbers if number not in train_files or number not in test_files]
    if not task_numbers or missing:
        raise FileNotFoundError(
            f"No qaN_*_train.txt and qaN_*_test.txt files for bAbI tasks {missing or 'any'} in {directory}; "
            f"train files found for tasks {sorted(train_files)}, test files for {sorted(test_files)}"
        )
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for number in task_numbers:
        task = f"babi{number}"
        stories = _parse_babi_stories(train_files[number], task)
        order = list(range(len(stories)))
        random.Random(f"more-babi/{seed}/{number}").shuffle(order)
        validation = set(order[: round(validation_fraction * len(stories))])
        for index, story in enumerate(stories):
            splits["validation" if index in validation else "train"].extend(story)
        splits["test"].extend(example for story in _parse_babi_stories(test_files[number], task) for example in story)
    return DatasetDict({split: _qa_dataset(examples) for split, examples in splits.items()})


# ---------------------------------------------------------------------------------------------------------------------
# Text corpora
# ---------------------------------------------------------------------------------------------------------------------


def load_text_corpus(
    name_or_path: str | Path,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    sample_by: str = "line",
    **load_kwargs,
) -> Dataset:
    """Loads one split of a text corpus as a `Dataset` with a single `text` column.

    Args:
        name_or_path: A local `.txt` file or a directory searched recursively for `.txt` files (read with the `text`
            builder of `datasets`), or else a Hub dataset name such as `"wikitext"`.
        config_name: The Hub dataset's configuration, e.g. `"wikitext-103-raw-v1"`.
        split: The split to load.
        text_column: The Hub dataset's text column (renamed to `text`).
        sample_by: For local files: one document per `"line"`, `"paragraph"` (blank-line separated) or `"document"`
            (file); `chunk_corpus` puts an eos token after each.
        load_kwargs: Passed to `datasets.load_dataset` (e.g. `cache_dir`, `revision`).
    """
    path = Path(name_or_path)
    if path.exists():
        files = sorted(str(file) for file in path.rglob("*.txt")) if path.is_dir() else [str(path)]
        if not files:
            raise FileNotFoundError(f"No .txt files under {path}")
        dataset = load_dataset("text", data_files={split: files}, split=split, sample_by=sample_by, **load_kwargs)
    else:
        dataset = load_dataset(str(name_or_path), config_name, split=split, **load_kwargs)
    if text_column not in dataset.column_names:
        raise ValueError(f"{name_or_path} has no column {text_column!r}; columns: {dataset.column_names}")
    dataset = dataset.select_columns([text_column])
    return dataset if text_column == "text" else dataset.rename_column(text_column, "text")


def chunk_corpus(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    batch_size: int = 1000,
    num_proc: int | None = None,
) -> Dataset:
    """Tokenizes documents, ends each with eos, concatenates them and cuts fixed-length blocks (research guide §4.1).

    Blank documents (WikiText's empty lines) are skipped. As in Transformers' `run_clm.py`, documents are joined within
    each `map` batch of `batch_size` documents and the batch's last partial block is dropped, which keeps `map`
    parallel and cacheable.

    Returns:
        A `Dataset` with `input_ids`, `attention_mask` (all ones) and `labels` (a copy of `input_ids`; the model
        shifts them), each `block_size` long.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("chunk_corpus needs a tokenizer with an eos token to mark document boundaries")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos = tokenizer.eos_token_id

    def tokenize_and_group(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        documents = [text for text in batch[text_column] if text.strip()]
        # Documents are longer than the model's context by design here: silence the tokenizer's length warning.
        encoded = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"] if documents else []
        stream = [token for ids in encoded for token in (*ids, eos)]
        blocks = [stream[start : start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    return dataset.map(
        tokenize_and_group,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing and chunking into blocks of {block_size}",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer with the `tokenizers` library.

    Special tokens: pad `<pad>` (id 0), bos `<s>` (1), eos `</s>` (2), unk `<unk>` (3; byte-level BPE never needs
    it). Digits are split one per token, so numbers are read digit by digit as arithmetic needs. Encoding adds no
    special tokens by itself (as GPT-2); `tokenize_qa` and `chunk_corpus` add bos/eos where they belong. Training is
    deterministic for the same texts. `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it.
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length, **SPECIAL_TOKENS)


def load_tokenizer(name_or_path: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` that makes sure a pad token exists.

    A tokenizer without one (GPT-2) pads with its eos token, which needs no new embedding row; padding is masked by
    `attention_mask` and labels, never by token id, so eos is still learned where it ends a text.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer {name_or_path} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer %s has no pad token: padding with its eos token %r", name_or_path, tokenizer.eos_token)
    return tokenizer


def tokenize_qa(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    answer_only_loss: bool = True,
    pad_to_longest: bool = True,
) -> Dataset | DatasetDict:
    """Turns prompt/answer examples into equal-length causal LM inputs: bos + prompt + " " + answer + eos, then pads.

    The prompt and `" " + answer` are tokenized separately and concatenated, so the prompt/answer boundary is exact
    and the answer tokens are those a model generates after the prompt. A prompt too long for `max_length` loses its
    oldest tokens (the start of the story), keeping the question and the whole answer.

    Args:
        dataset: Has `prompt` and `answer` columns (`build_reasoning_dataset`, `load_babi_dir`).
        tokenizer: Needs pad and eos tokens (`load_tokenizer` provides pad); bos is added when it has one.
        max_length: The most tokens an example keeps (and, without `pad_to_longest`, the length of every example).
        answer_only_loss: Labels are -100 on bos and prompt tokens, so the loss covers only the answer and eos.
            Without it every real token is a label. Padding is always -100.
        pad_to_longest: Right-pad to the longest example of the dataset (of each split of a `DatasetDict`) rather
            than to `max_length`: the same rows up to that length, so batches cut to their longest row (`fit_batch`)
            are the same, and the collator stacks short rows when examples are short. False pads to `max_length`.

    Returns:
        The dataset with only `input_ids`, `attention_mask` and `labels`.
    """
    if pad_to_longest and isinstance(dataset, DatasetDict):
        return DatasetDict(
            {name: tokenize_qa(split, tokenizer, max_length, answer_only_loss) for name, split in dataset.items()}
        )

    def build(prompt_ids: list[int], answer_ids: list[int], bos: list[int], eos: int):
        target = [*answer_ids, eos]
        room = max_length - len(bos) - len(target)
        if room < 0:
            raise ValueError(f"max_length={max_length} cannot hold bos, answer and eos ({len(bos) + len(target)})")
        truncated = len(prompt_ids) > room
        context = [*bos, *prompt_ids[len(prompt_ids) - room :]] if truncated else [*bos, *prompt_ids]
        context_labels = [IGNORE_INDEX] * len(context) if answer_only_loss else context
        return [*context, *target], [*context_labels, *target], truncated

    tokenized = _tokenize_pairs(
        dataset, tokenizer, max_length, build, answer_prefix=" ", desc="Tokenizing prompt/answer pairs"
    )
    if not pad_to_longest or len(tokenized) == 0:
        return tokenized
    longest = max(map(sum, tokenized["attention_mask"]))
    if longest == max_length:
        return tokenized
    return tokenized.map(
        lambda batch: {name: [row[:longest] for row in rows] for name, rows in batch.items()},
        batched=True,
        desc="Cutting the padding no example uses",
    )


class TensorExamples(torch.utils.data.Dataset):
    """Equal-length tokenized examples held as one tensor per column (`input_ids`, `attention_mask`, `labels`).

    For training tiny models, where the data path is a visible share of a step: a DataLoader batch is one
    `index_select` per column (`__getitems__` returns the batch itself), where a `datasets.Dataset` hands the
    collator Python lists to stack at every step. `more_tools.training.collate` takes either. With `Trainer`, set
    `remove_unused_columns=False` (its column filter expects a list of examples; these columns are the model's).

    >>> examples = TensorExamples.from_dataset(tokenize_qa(raw, tokenizer, 64))
    >>> examples.__getitems__([0, 5])["input_ids"].shape  # (2, longest example)
    """

    def __init__(self, columns: dict[str, torch.Tensor]):
        sizes = {name: tensor.shape[0] for name, tensor in columns.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"Every column needs one row per example; got rows per column {sizes}.")
        self.columns = columns

    @classmethod
    def from_dataset(cls, dataset: Dataset, columns: Iterable[str] = MODEL_COLUMNS) -> "TensorExamples":
        """The `columns` of a tokenized dataset whose rows have one length (`tokenize_qa`, `chunk_corpus`)."""
        return cls(dict(dataset.with_format("torch", columns=list(columns))[:]))

    def __len__(self) -> int:
        return next(iter(self.columns.values())).shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of `indices`: (len(indices), length) per column."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {name: tensor.index_select(0, index) for name, tensor in self.columns.items()}

    def select(self, indices: Iterable[int]) -> "TensorExamples":
        """The examples `indices`, in that order (as `datasets.Dataset.select`)."""
        return TensorExamples(self.__getitems__(list(indices)))


def tokenize_per_position(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset | DatasetDict:
    """Turns per-position examples (`PER_POSITION_TASKS`) into fixed-length causal LM inputs bos + prompt + eos, with
    the answer's k-th token as the target of the prompt's k-th token.

    The logits at position t predict the label at t + 1, so `bos b1 ... bn eos` gets the labels
    `-100 -100 p1 ... pn` (`-100 p1 ... pn` without bos): each target is predicted at its own bit from the prompt up
    to it, never from earlier targets, and the eos only carries the last target. Columns and padding as `tokenize_qa`,
    so the loss trains on every target and `more_tools.metrics.score_answers` asks for all of them.

    Raises:
        ValueError: An answer has not one token per prompt token, or bos + prompt + eos exceed `max_length` (cutting
            the prompt would cut targets).
    """

    def build(prompt_ids: list[int], answer_ids: list[int], bos: list[int], eos: int):
        if len(answer_ids) != len(prompt_ids):
            raise ValueError(f"{len(answer_ids)} targets for {len(prompt_ids)} prompt tokens: need one per token")
        if len(bos) + len(prompt_ids) + 1 > max_length:
            raise ValueError(f"max_length={max_length} cannot hold bos, {len(prompt_ids)} prompt tokens and eos")
        return [*bos, *prompt_ids, eos], [IGNORE_INDEX] * (len(bos) + 1) + answer_ids, False

    return _tokenize_pairs(dataset, tokenizer, max_length, build, desc="Tokenizing per-position targets")


def _tokenize_pairs(dataset, tokenizer, max_length: int, build: Callable, desc: str, answer_prefix: str = ""):
    """What `tokenize_qa` and `tokenize_per_position` share: the prompts and `answer_prefix + answer`s tokenized in
    batches, each pair turned into `(input_ids, labels, truncated)` by `build(prompt_ids, answer_ids, bos, eos)`,
    right-padded to `max_length` (padding: pad token, mask 0, label -100); only the three model columns stay."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("Tokenizing needs a tokenizer with pad and eos tokens (load_tokenizer adds a pad token)")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        answers = [f"{answer_prefix}{answer}" for answer in batch["answer"]]
        answers = tokenizer(answers, add_special_tokens=False)["input_ids"]
        columns: dict[str, list[list[int]]] = {name: [] for name in MODEL_COLUMNS}
        truncated = 0
        for prompt_ids, answer_ids in zip(prompts, answers, strict=True):
            input_ids, labels, cut = build(prompt_ids, answer_ids, bos, eos)
            padding = max_length - len(input_ids)
            columns["input_ids"].append(input_ids + [pad] * padding)
            columns["attention_mask"].append([1] * len(input_ids) + [0] * padding)
            columns["labels"].append(labels + [IGNORE_INDEX] * padding)
            truncated += cut
        if truncated:
            logger.warning(
                "Cut the start of %d of %d prompts to fit max_length=%d", truncated, len(prompts), max_length
            )
        return columns

    columns = dataset.column_names
    remove_columns = next(iter(columns.values())) if isinstance(columns, dict) else columns
    return dataset.map(encode, batched=True, remove_columns=remove_columns, desc=desc)


def tokenize_depth_tasks(
    dataset: Dataset | DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset | DatasetDict:
    """Depth-task examples (`build_depth_dataset`) as model inputs in their order: per-position tasks by
    `tokenize_per_position`, the others by `tokenize_qa` (answer-only loss), so a split may mix both."""
    if isinstance(dataset, DatasetDict):
        return DatasetDict({name: tokenize_depth_tasks(part, tokenizer, max_length) for name, part in dataset.items()})
    per_position = [task in PER_POSITION_TASKS for task in dataset["task"]]
    mixed = len(set(per_position)) == 2
    parts, order = [], []
    for tokenize, kind in ((tokenize_qa, False), (tokenize_per_position, True)):
        index = [i for i, flag in enumerate(per_position) if flag == kind]
        if index:
            # Concatenated rows need one length: that of `tokenize_per_position`'s rows, max_length.
            extra = {"pad_to_longest": False} if mixed and not kind else {}
            parts.append(tokenize(dataset.select(index), tokenizer, max_length, **extra))
            order += index
    if len(parts) == 1:
        return parts[0]
    # The concatenation groups the examples by tokenization: each goes back to its place in the dataset.
    return concatenate_datasets(parts).select(sorted(range(len(order)), key=order.__getitem__))
