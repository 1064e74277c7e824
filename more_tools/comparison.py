"""The comparison job (`examples/compare_more.py`): presets, variant configs at matched size and compute, the data,
one training job per variant x seed (in worker processes), statistics over seeds x examples, tables and plots."""

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import std as tqdm_std
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    PrinterCallback,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import modeling_more
from configuration_more import MoREConfig
from more_tools.cards import markdown_table, save_model_card
from more_tools.data import (
    TensorExamples,
    build_depth_dataset,
    chunk_corpus,
    load_text_corpus,
    tokenize_depth_tasks,
    train_word_level_tokenizer,
)
from more_tools.evaluation import model_report, perplexity_and_diagnostics, write_outputs
from more_tools.metrics import score_answers
from more_tools.stats import estimate_accuracy, noise_between, paired_difference, within_noise
from more_tools.training import MoRETrainer, collate


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


logger = logging.getLogger(__name__)


BASELINE = "ffn"
COMPUTE_MATCHED = "ffn_compute_matched"
COMPUTE_REFERENCE = "recurrent"  # the variant whose training FLOPs per token `ffn_compute_matched` matches
DEPTH_KNOBS = {"num_recurrent_steps": "r", "num_moe_iterations": "T"}
# In-distribution accuracy this many times along training; a multiple of 5, so that one point sits at 80 % of the
# steps and the change over the last 20 % tells whether a variant has stopped learning.
LEARNING_CURVE_POINTS = 10
FLAT_FROM = 0.8
STOP_CHECKS = 20  # the stop rule's checks along `max_steps`: every 5 %, so one sits 20 % before each
# Seconds between a worker's progress reports: one message per step would wake the main process 100+ times a second.
PROGRESS_INTERVAL = 0.5
PLOTS = ("accuracy.png", "depth.png", "accuracy_vs_flops.png", "learning_curves.png", "training.png")


@dataclass(frozen=True)
class Preset:
    """One protocol: the baseline model, the depth of recurrent variants, the data split by difficulty, the optimiser
    budget, the seeds and the inference-depth sweeps."""

    model: dict  # MoREConfig fields of the `ffn` baseline (every variant starts from them)
    recurrence: dict  # MoREConfig fields added to variants whose experts iterate (training depth, inference default)
    tasks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # task -> (training difficulties, test difficulties)
    num_train_examples: int
    num_test_per_difficulty: int
    training: dict  # TrainingArguments fields
    seeds: int
    recurrent_depths: tuple[int, ...]
    moe_iterations: tuple[int, ...]
    variants: tuple[str, ...] | None  # None: every registered variant
    max_length: int = 128
    corpus: bool = False  # pretrain on a text corpus first (--corpus_name / --corpus_file), then the tasks
    # Stop a job once it has converged (`_StopWhenConverged`): validation exact match at least this on the trained
    # difficulties, now and 20 % of its steps ago; `max_steps` is then a cap. None trains every job `max_steps`.
    stop_at_accuracy: float | None = None
    # Transformers' `attn_implementation` of the job's models (None: the model's default, SDPA). "eager" for sequences
    # shorter than 16 tokens: MoRE's eager attention then runs its softmax keys-major (`modeling_more.SHORT_SOFTMAX`),
    # where SDPA's CPU kernel is slowest.
    attn_implementation: str | None = None

    def trained(self, task: str) -> tuple[int, ...]:
        return self.tasks[task][0]

    def tested(self, task: str) -> tuple[int, ...]:
        return self.tasks[task][1]

    def describe_splits(self) -> str:
        return "; ".join(
            f"{task}: trained on {list(train)}, tested on {list(test)}" for task, (train, test) in self.tasks.items()
        )


def load_presets(directory: str | Path) -> dict[str, Preset]:
    """Every `<name>.json` of `directory` as a preset, by name. JSON lists become the preset's tuples; a file with
    `"extends": "<name>"` takes that preset and replaces the fields it names."""
    files = {path.stem: json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))}

    def fields(name: str) -> dict:
        own = dict(files[name])
        base = own.pop("extends", None)
        return own if base is None else {**fields(base), **own}

    presets = {}
    for name in files:
        values = fields(name)
        values["tasks"] = {task: (tuple(train), tuple(test)) for task, (train, test) in values["tasks"].items()}
        for key in ("recurrent_depths", "moe_iterations", "variants"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        presets[name] = Preset(**values)
    return presets


# Optimisation shared by every preset: AdamW, cosine schedule, 5 % warm-up.
TRAINING_DEFAULTS = dict(lr_scheduler_type="cosine", weight_decay=0.01)
WARMUP_FRACTION = 0.05
DECAY_FRACTION = 0.2  # `warmup_stable_decay`: the learning rate decays over the last 20 % of steps


def comparison_variants() -> dict[str, dict]:
    """MoREConfig overrides of every compared model: every registered expert type with the linear router (`ffn`
    first), the compute-matched deeper `ffn`, Synthesis II on `ffn`, the RMoE router with FFN and recurrent experts,
    and recurrent experts whose attention sees only the previous token of their segment besides their own."""
    names = sorted(modeling_more.EXPERT_REGISTRY, key=lambda name: name != BASELINE)
    variants = {name: {"expert_type": name} for name in names}
    variants[COMPUTE_MATCHED] = {"expert_type": "ffn"}  # depth set by `compute_matched_config`
    variants["ffn_synthesis2"] = {
        "expert_type": "ffn",
        "num_moe_iterations": 2,
        "train_moe_iterations_min": 1,
        "train_moe_iterations_max": 3,
    }
    variants["ffn_gru_router"] = {"expert_type": "ffn", "router_type": "gru"}
    variants["recurrent_gru_router"] = {"expert_type": "recurrent", "router_type": "gru"}
    # With one expert per layer each step moves information one token on: the layout of the recurrent nets that
    # extrapolate on prefix sums by iterating longer (README, "Prefix parity").
    variants["recurrent_local"] = {"expert_type": "recurrent", "recurrent_attention_window": 2}
    return variants


@dataclass
class CompareArguments:
    preset: str = field(
        default="default",
        metadata={
            "help": "Protocol and budget: a file of examples/configs/compare/ (smoke, quick, default, converged, "
            "full, guide, parity, parity_local, parity_local_mixture)."
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where every output goes (outputs/compare-<preset>)."}
    )
    variants: str | None = field(
        default=None, metadata={"help": "Comma-separated subset of the variants (default: the preset's)."}
    )
    seeds: int | None = field(default=None, metadata={"help": "Training seeds per variant (default: the preset's)."})
    seed_offset: int = field(
        default=0,
        metadata={
            "help": "First training seed: jobs use seeds seed_offset .. seed_offset + seeds - 1, so a run with "
            "--seed_offset 3 replicates the default run on a disjoint seed set (same data, same test examples)."
        },
    )
    max_steps: int | None = field(default=None, metadata={"help": "Override the preset's optimizer steps."})
    learning_rate: float | None = field(default=None, metadata={"help": "Override the preset's learning rate."})
    lr_scheduler_type: str | None = field(
        default=None,
        metadata={
            # "%%": argparse reads help texts as format strings (a lone "%" broke --help).
            "help": "Override the preset's learning-rate schedule (a Transformers `lr_scheduler_type`; "
            "`warmup_stable_decay` decays over the last 20 %% of steps)."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Override the preset's attention kernel (Transformers' `attn_implementation`: eager, sdpa). The "
            "default preset runs eager (its sequences are shorter than 16 tokens); sdpa reruns the README's runs made "
            "before it did."
        },
    )
    split: str = field(
        default="test",
        metadata={
            "help": "Score on 'test', or on 'validation': examples of the same difficulties drawn apart from the test "
            "split and from training, for protocol choices (e.g. the learning rate) that must never see test."
        },
    )
    match_parameters: str = field(
        default="active",
        metadata={"help": "Match each variant's 'active' parameters per token or its 'total' parameters to ffn's."},
    )
    num_workers: int = field(
        default=2, metadata={"help": "Parallel single-thread training processes (CPU); 1 trains in this process."}
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the generated train and test examples."})
    expert_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated Python modules to import first (they register extra expert types)."},
    )
    corpus_name: str | None = field(
        default=None, metadata={"help": "guide preset: a Hub text corpus to pretrain on first (e.g. wikitext)."}
    )
    corpus_config_name: str | None = field(default=None, metadata={"help": "Its configuration (wikitext-103-raw-v1)."})
    corpus_file: str | None = field(default=None, metadata={"help": "guide preset: a local .txt corpus instead."})
    corpus_steps: int = field(default=10000, metadata={"help": "guide preset: optimizer steps of corpus pretraining."})
    resume: bool = field(
        default=False,
        metadata={
            "help": "Load the results of jobs (variant x seed) that finished in an earlier run with the same settings "
            "(model, training, seed, depths, data); run the others."
        },
    )
    dry_run: bool = field(
        default=False, metadata={"help": "Run the preset's pipeline with 2 steps and a few examples (for tests)."}
    )


def is_recurrent(config: MoREConfig) -> bool:
    """Experts that iterate a latent state (their depth is `num_recurrent_steps`)."""
    return issubclass(modeling_more.get_expert_class(config.expert_type), modeling_more.MoRERecurrentExperts)


def iterates_layers(config: MoREConfig) -> bool:
    """Synthesis II: the MoE block itself is iterated (its depth is `num_moe_iterations`)."""
    return config.num_moe_iterations > 1 or config.train_moe_iterations_max is not None


def size_knob(expert_type: str) -> str:
    """The width that sizes an expert: the MLP of the Huginn block for block experts, `intermediate_size` else."""
    expert_class = modeling_more.get_expert_class(expert_type)
    if issubclass(expert_class, modeling_more.MoREHuginnExperts):
        return "recurrent_intermediate_size"
    return "intermediate_size"


def meta_model(config: MoREConfig, attn_implementation: str | None = None):
    """A weightless model of `config`, for counting; `from_config` records the attention kernel on the config it
    gets, so it gets a copy and the caller's config is left as it was."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)


def parameter_counts(config: MoREConfig) -> dict[str, int]:
    model = meta_model(config)
    return {"total": model.num_parameters(), "active": model.num_parameters(active=True)}


def training_flops_per_token(config: MoREConfig) -> float:
    """Forward + backward FLOPs per token, expected over the training depths (the config's `recurrent_steps_sampler`
    and MoE iteration draw)."""
    model = meta_model(config)
    steps = {config.num_recurrent_steps: 1.0}
    if is_recurrent(config):
        steps = modeling_more.get_depth_sampler(config.recurrent_steps_sampler).probabilities(config)
    iterations = {config.num_moe_iterations: 1.0}
    if config.train_moe_iterations_min is not None:  # drawn uniformly per batch
        drawn = range(config.train_moe_iterations_min, config.train_moe_iterations_max + 1)
        iterations = dict.fromkeys(drawn, 1.0 / len(drawn))
    return sum(
        p_steps * p_iterations * training_flops_at(model, depth, count)
        for depth, p_steps in steps.items()
        for count, p_iterations in iterations.items()
    )


def training_flops_at(model, steps: int, iterations: int) -> float:
    """Training FLOPs per token at one depth: 3x the forward, except for the expert steps and MoE iterations that
    truncated backprop (`num_backprop_steps`, `num_backprop_iterations`) runs without a graph, which cost their forward
    only."""
    config = model.config

    def forward(s: int, t: int) -> float:
        return model.flops_per_token(num_recurrent_steps=s, num_moe_iterations=t)

    total = forward(steps, iterations)
    without_graph, with_graph_iterations = 0.0, iterations
    if config.num_backprop_iterations is not None and iterations > config.num_backprop_iterations:
        with_graph_iterations = config.num_backprop_iterations
        one_iteration = total - forward(steps, iterations - 1)
        without_graph += (iterations - with_graph_iterations) * one_iteration
    if config.num_backprop_steps is not None and steps > config.num_backprop_steps:
        one_step = (total - forward(steps - 1, iterations)) / iterations  # one step of one iteration's experts
        without_graph += with_graph_iterations * (steps - config.num_backprop_steps) * one_step
    return 3 * total - 2 * without_graph


WIDTH_MULTIPLE = 4  # matched widths: fp32 rows of 16 bytes, as grouped_mm needs


def matched_config(config: MoREConfig, target: int, which: str) -> MoREConfig:
    """`config` with its size knob set so that its `which` ("active" or "total") parameter count is closest to
    `target`.

    Widths are multiples of `WIDTH_MULTIPLE` (fp32 rows of 16 bytes: grouped_mm then needs no zero-padding of the
    weights at every call). Counts grow with the knob, so a bisection finds the first width at or above the target;
    the closer of it and the width below wins. A type that is larger than the target even at the smallest width keeps
    that width (reported as a mismatch).
    """
    knob = size_knob(config.expert_type)
    fields = config.to_dict()

    def resized(units: int) -> MoREConfig:
        return MoREConfig(**{**fields, knob: WIDTH_MULTIPLE * units})

    def count(units: int) -> int:
        return parameter_counts(resized(units))[which]

    low, high = 1, 16 * config.hidden_size // WIDTH_MULTIPLE
    if count(low) == count(high):
        logger.warning(f"`{knob}` does not size {config.expert_type!r} experts: they run unmatched, at their own size")
        return config
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(middle) < target else (low, middle)
    return resized(min((low, max(low - 1, 1)), key=lambda units: abs(count(units) - target)))


def compute_matched_config(config: MoREConfig, target_flops: float) -> MoREConfig:
    """The `ffn` config with as many layers (same width) as bring its training FLOPs per token closest to the
    target's: the deeper-FFN answer to "is it the compute or the recurrence?"."""
    fields = config.to_dict()
    candidates = [
        MoREConfig(**{**fields, "num_hidden_layers": layers}) for layers in range(1, 8 * config.num_hidden_layers + 1)
    ]
    return min(candidates, key=lambda candidate: abs(training_flops_per_token(candidate) - target_flops))


def build_variant_configs(preset: Preset, names: list[str], tokenizer, match: str) -> dict[str, MoREConfig]:
    """Every requested variant's config: the preset's baseline model plus the variant's overrides (and the preset's
    recurrence fields for iterating experts), sized to the `ffn` baseline."""
    base = {
        **preset.model,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "max_position_embeddings": preset.max_length,
    }
    overrides = comparison_variants()

    def raw(name: str) -> MoREConfig:
        config = MoREConfig(**base, **overrides[name])
        if is_recurrent(config):
            config = MoREConfig(**{**config.to_dict(), **preset.recurrence})
        return config

    target = parameter_counts(raw(BASELINE))[match]
    configs = {}
    for name in names:
        config = raw(name)
        if name == COMPUTE_MATCHED:
            reference = matched_config(raw(COMPUTE_REFERENCE), target, match)
            config = compute_matched_config(config, training_flops_per_token(reference))
        elif name != BASELINE:
            config = matched_config(config, target, match)
        configs[name] = config
    return configs


@dataclass
class CompareData:
    """Everything a training job needs, built once in the main process: the tokenized train split, the test split
    (with its task and difficulty per example) and, for the guide preset, corpus blocks to pretrain on."""

    tokenizer_dir: str
    train: TensorExamples  # input_ids / attention_mask / labels, one tensor each: no per-step collation
    test: TensorExamples  # scored many times per job: batches are tensor reads, not per-example Python reads
    test_tasks: list[str]
    test_difficulties: list[int]
    in_distribution: list[int]  # test example indices of trained difficulties (the learning curves)
    # Validation examples of trained difficulties (the stop rule), if the preset stops.
    stopping: TensorExamples | None = None
    corpus_train: object | None = None


def build_data(preset: Preset, args: CompareArguments, output_dir: Path) -> CompareData:
    validation = args.split == "validation"
    stops = preset.stop_at_accuracy is not None
    try:
        raw = build_depth_dataset(
            {task: (list(train), list(test)) for task, (train, test) in preset.tasks.items()},
            num_train=preset.num_train_examples,
            num_test_per_difficulty=preset.num_test_per_difficulty,
            seed=args.dataset_seed,
            num_validation_per_difficulty=preset.num_test_per_difficulty if validation or stops else 0,
        )
    except ValueError as err:
        if not (validation or stops):
            raise
        raise ValueError(
            f"{err}. A validation split (--split validation, or the preset's stop rule) draws another "
            f"{preset.num_test_per_difficulty} examples per test difficulty, none of them a test prompt: a difficulty "
            "with fewer distinct prompts than both splits need (prefix parity at 8 bits has 256) cannot have one. "
            "Use a preset with fewer test examples per difficulty (`num_test_per_difficulty`) or without that "
            "difficulty."
        ) from err
    validation_split = raw.pop("validation", None)
    if validation:  # everything below scores the validation examples in place of the test examples
        raw["test"] = validation_split
    if stops:
        raw["validation"] = validation_split
    texts = [*raw["train"]["text"], *raw["test"]["text"]]
    corpus = None
    if preset.corpus:
        corpus = load_corpus(args)
        texts += list(corpus["text"])
    tokenizer = train_word_level_tokenizer(texts, model_max_length=preset.max_length)
    tokenizer_dir = output_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tokenized = tokenize_depth_tasks(raw, tokenizer, preset.max_length)  # in order: test_tasks etc. stay aligned
    stopping = None
    if stops:  # never the test split: on --split validation, the examples it scores
        trained = [i for i, row in enumerate(raw["validation"]) if row["difficulty"] in preset.trained(row["task"])]
        stopping = TensorExamples.from_dataset(tokenized["validation"].select(trained))
    data = CompareData(
        tokenizer_dir=str(tokenizer_dir),
        train=TensorExamples.from_dataset(tokenized["train"]),
        test=TensorExamples.from_dataset(tokenized["test"]),
        test_tasks=list(raw["test"]["task"]),
        test_difficulties=list(raw["test"]["difficulty"]),
        in_distribution=[
            i
            for i, (task, difficulty) in enumerate(zip(raw["test"]["task"], raw["test"]["difficulty"], strict=True))
            if difficulty in preset.trained(task)
        ],
        stopping=stopping,
    )
    if corpus is not None:
        data.corpus_train = TensorExamples.from_dataset(chunk_corpus(corpus, tokenizer, preset.max_length))
    return data


def data_settings(preset: Preset, args: CompareArguments) -> dict:
    """What `build_data` builds the examples, the tokenizer and the corpus blocks from (keep the two in step)."""
    settings = {
        "tasks": preset.tasks,
        "num_train_examples": preset.num_train_examples,
        "num_test_per_difficulty": preset.num_test_per_difficulty,
        "max_length": preset.max_length,
        "dataset_seed": args.dataset_seed,
        "split": args.split,
    }
    if preset.stop_at_accuracy is not None:  # the validation split is drawn, so training draws around its prompts
        settings["validation_split"] = True
    if preset.corpus:
        settings["corpus"] = [args.corpus_name, args.corpus_config_name, args.corpus_file]
    return settings


def load_corpus(args: CompareArguments):
    """The guide preset's pretraining corpus: the train split of a Hub dataset by name, or a local text file."""
    if args.corpus_name is not None:
        return load_text_corpus(args.corpus_name, args.corpus_config_name, split="train")
    if args.corpus_file is not None:
        return load_text_corpus(args.corpus_file)
    raise ValueError("--preset guide pretrains on a corpus: pass --corpus_name (e.g. wikitext) or --corpus_file")


@dataclass
class Job:
    variant: str
    seed: int
    config: dict
    output_dir: str
    save_model: bool  # the first seed keeps its model, tokenizer, model card and diagnostics
    training: dict
    corpus_steps: int
    recurrent_depths: tuple[int, ...]
    moe_iterations: tuple[int, ...]
    data_settings: dict  # what its training and test examples are built from (`data_settings`)
    stop_at_accuracy: float | None = None  # the preset's stop rule (None: train max_steps)
    attn_implementation: str | None = None  # the preset's attention kernel (None: the model's default)


class _ProgressCallback(TrainerCallback):
    """Sends the finished optimizer steps to the main process's progress bar, at most every `PROGRESS_INTERVAL`
    seconds, and the rest (with the steps a stopped job skips) when training ends."""

    def __init__(self, queue):
        self.queue = queue
        self.unsent = 0
        self.sent_at = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.unsent += 1
        if self.queue is not None and time.perf_counter() - self.sent_at >= PROGRESS_INTERVAL:
            self._send(self.unsent)

    def on_train_end(self, args, state, control, **kwargs):
        # The steps not sent yet, and those a job stopped early skips.
        if self.queue is not None:
            self._send(self.unsent + state.max_steps - state.global_step)

    def _send(self, steps):
        if steps:
            self.queue.put(steps)
        self.unsent, self.sent_at = 0, time.perf_counter()


class _EvalClock:
    """Seconds a job spends scoring during training, which its training time leaves out."""

    def __init__(self):
        self.seconds = 0.0


class _Scoring(TrainerCallback):
    """Scores `examples` (exact match, at the default depth) `points` times along training, on `clock`."""

    def __init__(self, examples, points: int, clock: _EvalClock):
        self.examples, self.points, self.clock = examples, points, clock

    def due(self, state) -> bool:
        return state.global_step % max(1, state.max_steps // self.points) == 0

    def score(self, model) -> float:
        start = time.perf_counter()
        accuracy = float(score_answers(model, self.examples).mean())
        model.train()
        self.clock.seconds += time.perf_counter() - start
        return accuracy


class _LearningCurve(_Scoring):
    """Scores the in-distribution test examples `points` times along training and where it ends, and keeps the
    training time spent so far without any scoring: accuracy against steps, FLOPs and seconds, so variants can be
    compared at equal time or compute as well as at equal steps."""

    def __init__(self, examples, points: int, clock: _EvalClock, start: float):
        super().__init__(examples, points, clock)
        self.curve: list[dict] = []
        self.start = start  # when the job's training began (before a corpus pretraining, as `train_seconds`)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (self.due(state) or state.global_step == state.max_steps or control.should_training_stop):
            return
        seconds = time.perf_counter() - self.start - self.clock.seconds
        self.curve.append({"step": state.global_step, "seconds": seconds, "accuracy": self.score(model)})


class _StopWhenConverged(_Scoring):
    """Stops training once the model has converged: every 5 % of `max_steps` (`STOP_CHECKS`) it scores the validation
    examples of the trained difficulties (exact match, at the default depth), and stops when that accuracy is at least
    `threshold` both now and at the check 20 % of the steps ago (`FLAT_FROM`), and that earlier accuracy lies within
    the test-set noise of the current one (`within_noise`; stricter than the flatness test of `convergence`): the
    curve is high and flat over the last 20 % of the steps it trained. Checks run before the learning-curve
    callback's, which then scores the model it stopped with."""

    def __init__(self, examples, threshold: float, clock: _EvalClock):
        super().__init__(examples, STOP_CHECKS, clock)
        self.threshold = threshold
        self.curve: list[dict] = []  # (step, validation accuracy) of every check

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.due(state):
            return
        accuracy = self.score(model)
        earlier = [point["accuracy"] for point in self.curve if point["step"] <= FLAT_FROM * state.global_step]
        self.curve.append({"step": state.global_step, "accuracy": accuracy})
        if not earlier or min(accuracy, earlier[-1]) < self.threshold:
            return
        if abs(accuracy - earlier[-1]) <= within_noise(accuracy, earlier[-1], len(self.examples)):
            control.should_training_stop = True


def training_arguments(training: dict, seed: int, output_dir: Path, max_steps: int) -> TrainingArguments:
    """A job's `TrainingArguments`: the preset's `training` fields over the shared optimisation defaults."""
    training = {
        **TRAINING_DEFAULTS,
        "warmup_steps": max(1, round(WARMUP_FRACTION * max_steps)),
        **training,
        "max_steps": max_steps,
    }
    if training["lr_scheduler_type"] == "warmup_stable_decay":
        training["lr_scheduler_kwargs"] = {"num_decay_steps": max(1, round(DECAY_FRACTION * max_steps))}
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=seed,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,  # the data are `TensorExamples`, which hold the model's columns only
        use_cpu=not torch.cuda.is_available(),
        **training,
    )


def train_model(model, dataset, training_args: TrainingArguments, tokenizer, queue, callbacks=()) -> list[dict]:
    """Trains `model` as a job does (`MoRETrainer`, steps reported to `queue`, plus `callbacks` in order); the loss
    logs."""
    trainer = MoRETrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=collate,
        callbacks=[_ProgressCallback(queue), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)  # the main process shows one progress bar for every job
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def depth_sweeps(config: MoREConfig, job: Job) -> dict[str, tuple[int, ...]]:
    """Inference depths a variant is scored at: expert steps for iterating experts, MoE iterations for Synthesis II."""
    sweeps = {}
    if is_recurrent(config):
        sweeps["num_recurrent_steps"] = job.recurrent_depths
    if iterates_layers(config):
        sweeps["num_moe_iterations"] = job.moe_iterations
    return sweeps


def run_job(job: Job, data: CompareData, queue=None) -> dict:
    """Trains one variant with one seed and scores it on the whole test split at its default depth and every depth
    of its sweeps. Runs in a worker process (one thread) or in the main process."""
    if torch.get_num_threads() > 1 and not torch.cuda.is_available():
        torch.set_num_threads(1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.tokenizer_dir)
    config = MoREConfig(**job.config)
    output_dir = Path(job.output_dir)
    set_seed(job.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=job.attn_implementation)
    start = time.perf_counter()
    pretraining_log = None
    if data.corpus_train is not None:  # guide preset: language-model pretraining first, logged apart (own steps)
        args = training_arguments(job.training, job.seed, output_dir / f"pretrain-seed{job.seed}", job.corpus_steps)
        pretraining_log = train_model(model, data.corpus_train, args, tokenizer, queue)
    max_steps = job.training["max_steps"]
    args = training_arguments(job.training, job.seed, output_dir / f"trainer-seed{job.seed}", max_steps)
    clock = _EvalClock()
    # With the stop rule, test accuracy at every check too, so a stopped job's last 20 % has points at both ends.
    points = LEARNING_CURVE_POINTS if job.stop_at_accuracy is None else STOP_CHECKS
    curve = _LearningCurve(data.test.select(data.in_distribution), points, clock, start)
    stop = None if job.stop_at_accuracy is None else _StopWhenConverged(data.stopping, job.stop_at_accuracy, clock)
    callbacks = [curve] if stop is None else [stop, curve]  # the stop check first: the curve scores where it stops
    logs = train_model(model, data.train, args, tokenizer, queue, callbacks)
    train_seconds = time.perf_counter() - start - clock.seconds
    scores = {"default": score_answers(model, data.test).tolist()}
    for knob, depths in depth_sweeps(config, job).items():
        scores[knob] = {str(depth): score_answers(model, data.test, **{knob: depth}).tolist() for depth in depths}
    result = {
        "variant": job.variant,
        "seed": job.seed,
        "train_seconds": train_seconds,
        "scores": scores,
        "training_log": logs,
        "learning_curve": curve.curve,
        "settings": job_settings(job),
    }
    if stop is not None:
        result["validation_curve"] = stop.curve
    if pretraining_log is not None:
        result["pretraining_log"] = pretraining_log
    if is_main_process():
        if job.save_model:
            result["diagnostics"] = save_variant(
                model, tokenizer, data, scores, output_dir, job.data_settings["split"]
            )
            result["checkpoint"] = checkpoint_digest(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(job_result_path(job)), json.dumps(result))
    return result


def job_result_path(job: Job) -> str:
    return str(Path(job.output_dir) / f"result-seed{job.seed}.json")


def job_settings(job: Job) -> dict:
    """Everything a job's result follows from, as JSON (tuples read back as lists): not where it is written, nor the
    version of the code (transformers' included)."""
    settings = dataclasses.asdict(job)
    del settings["output_dir"]
    settings["config"].pop("transformers_version", None)
    return json.loads(json.dumps(settings))


def finished_result(job: Job) -> dict | None:
    """The result an earlier run left for `job` if it was produced with the job's settings, else None (saying why:
    the job has to run again)."""
    path = Path(job_result_path(job))
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        produced_with = result.get("settings")
    except (ValueError, AttributeError) as error:  # not JSON (cut short by a crash), or not a result object
        logger.warning(
            "Running %s seed %d again: its result file %s is unreadable (%s)", job.variant, job.seed, path, error
        )
        return None
    changes = ["none recorded"] if produced_with is None else setting_changes(produced_with, job_settings(job))
    if changes:
        logger.info(
            "Running %s seed %d again: %s has other settings (%s)", job.variant, job.seed, path, "; ".join(changes)
        )
        return None
    if job.save_model and result.get("checkpoint") != checkpoint_digest(Path(job.output_dir)):
        # Its report becomes the variant's model card: it must sit next to the checkpoint it describes.
        logger.info(
            "Running %s seed %d again: the checkpoint in %s is missing or not the one it saved",
            job.variant,
            job.seed,
            job.output_dir,
        )
        return None
    return result


def checkpoint_digest(directory: Path) -> str | None:
    """SHA-256 of the weights saved in `directory` (None when there are none)."""
    path = directory / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def setting_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`name: old -> new` for every setting that differs, nested ones by dotted names."""
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += setting_changes(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def write_atomically(path: Path, text: str) -> None:
    """Replaces `path` by `text` in one step: a crash or Ctrl-C while writing leaves the old file (or none), never a
    part of the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: os.replace does not copy
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, so a power cut does not leave an empty file either
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` / torchrun (every rank trains; one writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def save_variant(model, tokenizer, data: CompareData, scores: dict, output_dir: Path, split: str) -> dict:
    """The first seed's model with its tokenizer, and an `evaluate_more`-style report of it (accuracy per task x
    difficulty, depth sweeps, routing and recurrence diagnostics of guide §5.1-5.2, with their plots)."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    batches = [
        collate(data.test.__getitems__(list(range(s, min(s + 64, len(data.test))))))
        for s in range(0, min(len(data.test), 256), 64)
    ]

    def by_cell(hits: list[int]) -> dict[str, float]:
        hits = np.asarray(hits)
        accuracy = {}
        cells = list(zip(data.test_tasks, data.test_difficulties, strict=True))
        for task, difficulty in sorted(set(cells)):
            index = [i for i, cell in enumerate(cells) if cell == (task, difficulty)]
            accuracy[f"{task}-{difficulty}"] = float(hits[index].mean())
        accuracy["mean"] = float(hits.mean())
        return accuracy

    report = model_report(
        model,
        perplexity_and_diagnostics(model, batches),
        perplexity_on="answers",
        split=split,
        exact_match=by_cell(scores["default"]),
        depth_sweep={
            knob: {int(d): by_cell(h) for d, h in sweep.items()} for knob, sweep in scores.items() if knob != "default"
        },
    )
    write_outputs(report, output_dir)
    return report


def write_card(variant_dir: Path, name: str, result: dict, preset: Preset, run: dict) -> None:
    """The model card of the variant's first-seed checkpoint, from its report."""
    report = result["diagnostics"]
    if report is None:
        return
    fixed = preset.stop_at_accuracy is None  # every job trained max_steps
    training_data = (
        f"Depth-controlled synthetic tasks of the MoRE repository (`more_tools/data.py`): "
        f"{preset.describe_splits()} ({preset.num_train_examples:,} training examples, "
        f"{preset.num_test_per_difficulty} {run.get('split', 'test')} examples per difficulty scored); "
        f"{'' if fixed else 'up to '}{run['max_steps']} steps of {run['batch_size']} examples"
        f"{'' if fixed else ', stopped once converged'}, seed {run['seeds'][0]} of {run['seeds']}; "
        f"`examples/compare_more.py --preset {run['preset']}` (variant `{name}`). The comparison over all seeds, "
        "with confidence intervals, is in `comparison.md` next to this directory."
    )
    evaluation_method = (
        "Exact match: with the reference answer fed in, every answer token and the end of sequence are the model's "
        "top prediction, which is exactly when greedy decoding produces the answer and stops "
        f"(`more_tools.metrics.score_answers`); perplexity over the answers of {report['split']} examples. Metrics "
        "come from `examples/compare_more.py` of the MoRE repository."
    )
    save_model_card(
        variant_dir,
        report,
        repo_id=f"more-{name}",
        training_data=training_data,
        evaluation_method=evaluation_method,
    )


# A worker's own state, set once by `_worker_init`: its queue to the main process's progress bar and the jobs' data.
_worker_state: dict = {}


def _worker_init(modules: list[str], queue, data: CompareData) -> None:
    # Ctrl-C reaches every process of the terminal's group: the main process alone decides, and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker's bars are off: a thread lock spares tqdm its multiprocessing one, which an ended worker would leak.
    tqdm_std.tqdm.set_lock(threading.RLock())
    torch.set_num_threads(1)
    for name in modules:
        __import__(name)
    # The data arrive once, as the worker starts. Sent with every job, their tensors' shared memory changed hands
    # (through a listener thread of the main process) just as a job ended, when a Ctrl-C ends the workers: a worker
    # ended mid-handshake made that thread print a second traceback.
    _worker_state.update(queue=queue, data=data)


def _run_job_in_worker(job: Job) -> dict:
    """`run_job` in a worker, on the data it received at start, its steps sent to the main process's progress bar."""
    return run_job(job, _worker_state["data"], _worker_state["queue"])


def _hit_matrix(runs: list[dict], select) -> np.ndarray:
    """(seeds, examples) 0/1 matrix of one variant, in seed order, from each run's scores picked by `select`."""
    return np.array([select(run["scores"]) for run in sorted(runs, key=lambda run: run["seed"])], dtype=np.int8)


def _cells(data: CompareData, preset: Preset) -> dict[tuple[str, int], np.ndarray]:
    """Test example indices of every task x difficulty."""
    tasks, difficulties = np.array(data.test_tasks), np.array(data.test_difficulties)
    return {
        (task, difficulty): np.flatnonzero((tasks == task) & (difficulties == difficulty))
        for task in preset.tasks
        for difficulty in preset.tested(task)
    }


def paired_baselines(name: str, runs: dict[str, list[dict]], hits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The hit matrices (seeds, examples; `hits` holds every variant's) a variant is compared with on the same seeds
    and examples: `ffn` at equal active parameters (`vs_ffn`, every other variant) and, for `recurrent`, the
    compute-matched deeper `ffn` at equal training FLOPs per token (`vs_compute_matched`). A baseline not run, or run
    on other seeds, is left out."""
    pairs = {"vs_ffn": BASELINE} if name != BASELINE else {}
    if name == COMPUTE_REFERENCE:
        pairs["vs_compute_matched"] = COMPUTE_MATCHED
    seeds = sorted(run["seed"] for run in runs[name])
    return {
        key: hits[other]
        for key, other in pairs.items()
        if other in runs and sorted(run["seed"] for run in runs[other]) == seeds
    }


def summarise(runs: dict[str, list[dict]], data: CompareData, preset: Preset) -> dict[str, dict]:
    """Per variant: accuracy with 95 % CI per task x difficulty, in- and out-of-distribution means, the paired
    differences to its baselines (`paired_baselines`), and the depth curves, each depth also paired with the
    variant's default depth (`vs_default_depth`: what iterating more, or less, changes on the same seeds and
    examples)."""
    cells = _cells(data, preset)
    groups = {
        "in_distribution": lambda task, difficulty: difficulty in preset.trained(task),
        "out_of_distribution": lambda task, difficulty: difficulty not in preset.trained(task),
    }

    def index_of(task: str, keep) -> np.ndarray:
        return np.concatenate(
            [index for (t, d), index in cells.items() if t == task and keep(t, d)] or [np.array([], int)]
        )

    def estimates(hits: np.ndarray, baselines: dict[str, np.ndarray]) -> dict:
        out = {}
        for task in preset.tasks:
            entry = {str(d): estimate_accuracy(hits[:, cells[(task, d)]]).to_dict() for d in preset.tested(task)}
            for group, keep in groups.items():
                index = index_of(task, keep)
                if len(index):
                    entry[group] = estimate_accuracy(hits[:, index]).to_dict()
            for key, base in baselines.items():
                entry[key] = {
                    str(d): paired_difference(hits[:, cells[(task, d)]], base[:, cells[(task, d)]]).to_dict()
                    for d in preset.tested(task)
                }
                for group, keep in groups.items():
                    index = index_of(task, keep)
                    if len(index):
                        entry[key][group] = paired_difference(hits[:, index], base[:, index]).to_dict()
            out[task] = entry
        return out

    hits = {name: _hit_matrix(variant_runs, lambda s: s["default"]) for name, variant_runs in runs.items()}
    summary = {}
    for name, variant_runs in runs.items():
        curves = {}
        for knob in DEPTH_KNOBS:
            if knob in variant_runs[0]["scores"]:
                curves[knob] = {
                    depth: estimates(
                        _hit_matrix(variant_runs, lambda s, k=knob, d=depth: s[k][d]), {"vs_default_depth": hits[name]}
                    )
                    for depth in variant_runs[0]["scores"][knob]
                }
        accuracy = estimates(hits[name], paired_baselines(name, runs, hits))
        summary[name] = {
            "accuracy": accuracy,
            "depth_curves": curves,
            "convergence": convergence(variant_runs, accuracy),
        }
    return summary


def convergence(variant_runs: list[dict], accuracy: dict) -> dict:
    """Whether a variant had stopped learning: the change of its in-distribution accuracy (mean over seeds) over the
    last 20 % of the steps, against the half-width of its final in-distribution 95 % CI (the narrowest over tasks),
    or the test-set noise of the mean where that is wider: the t interval is 0 wide when every seed scores every
    example right, and one example more would then read as learning. The noise (`noise_between`, over every seed's
    examples) takes the two means as noise of each other when either lies inside the other's Wilson interval: near 0
    or 1 the interval is one-sided, so half its width would call a value inside it a change. A change inside that
    tolerance reads as flat; a comparison of variants still learning measures how fast they escape a plateau, not
    what they can do. (The stop rule, `_StopWhenConverged`, asks more: the earlier check inside the current one's
    interval.)

    Seed by seed too: a seed whose own change (up, still learning, or down, a late collapse) exceeds the test-set noise
    between its two accuracies (`noise_between` on its examples) is not flat, however wide the variant's interval
    (with 3 bimodal seeds it can span most of [0, 1]).

    Seeds stopped by the stop rule end at different steps: each seed's window is the last 20 % of its own steps, and
    the variant's change is the mean of the seeds' changes (with equal steps, the change of the mean curve)."""
    windows = []  # (accuracy at the window's start, final accuracy, start step, final step) per seed
    for run in variant_runs:
        steps = np.array([point["step"] for point in run["learning_curve"]])
        # The last point at or before 80 % of its steps: with a stopped seed's last point off the grid, the window
        # is then at least its last 20 %.
        start = max(0, int(np.searchsorted(steps, FLAT_FROM * steps[-1], side="right")) - 1)
        curve = run["learning_curve"]
        windows.append((curve[start]["accuracy"], curve[-1]["accuracy"], int(steps[start]), int(steps[-1])))
    first, final, from_steps, to_steps = (np.array(column) for column in zip(*windows, strict=True))
    change = float(np.mean(final - first))
    entries = [entry["in_distribution"] for entry in accuracy.values() if "in_distribution" in entry]
    half_width = min((entry["ci95"][1] - entry["ci95"][0]) / 2 for entry in entries) if entries else float("nan")
    examples = sum(entry["n"] for entry in entries)  # the curve scores every in-distribution test example
    noise = noise_between(float(final.mean()), float(first.mean()), examples * len(variant_runs)) if examples else 0.0
    tolerance = max(half_width, noise)
    seeds_not_flat = [
        int(run["seed"])
        for run, before, after in zip(variant_runs, first, final, strict=True)
        if examples and abs(after - before) > noise_between(float(after), float(before), examples)
    ]
    return {
        # Means over seeds (each seed's own window where the stop rule ended them at different steps).
        "from_step": int(round(from_steps.mean())),
        "to_step": int(round(to_steps.mean())),
        "change": change,
        "ci_half_width": half_width,
        "tolerance": tolerance,
        "flat": bool(abs(change) <= tolerance),
        "seeds_not_flat": seeds_not_flat,
    }


def _ci(entry: dict | None) -> str:
    if entry is None:
        return "–"
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.2f}, {high:.2f}]"


def _delta(entry: dict | None) -> str:
    """A paired difference to ffn: marked when its interval excludes 0, else read as no difference."""
    if entry is None:
        return "–"
    low, high = entry["ci95"]
    text = f"{entry['mean']:+.3f} [{low:+.2f}, {high:+.2f}]"
    if not entry["significant"]:
        return f"{text} no difference"
    return f"**{text} {'better' if entry['mean'] > 0 else 'worse'}**"


def steps_trained(run: dict) -> int:
    """A job's optimizer steps: `max_steps`, or fewer where the stop rule ended it (its learning curve's end)."""
    return run["learning_curve"][-1]["step"]


def variant_rows(results: dict, preset: Preset) -> tuple[list[str], list[list]]:
    headers = [
        "variant",
        "active params",
        "total params",
        "FLOPs/token (inference)",
        "training FLOPs",
        "steps",
        "train s",
    ]
    headers.append(f"last {100 - round(100 * FLAT_FROM)} % of steps: Δ in-distribution (tolerance)")
    rows = []
    for name, result in results.items():
        flat = result["convergence"]
        change = f"{flat['change']:+.3f} ({flat['tolerance']:.3f})"
        moving = flat["seeds_not_flat"]
        seeds = f"; seeds not flat: {', '.join(map(str, moving))}" if moving else ""
        rows.append(
            [
                name,
                result["active_params"],
                result["total_params"],
                result["flops_per_token"],
                f"{result['training_flops']:.2e}",
                round(float(np.mean(result["steps"]))),
                f"{np.mean(result['train_seconds']):.1f}",  # a string: the cell formatter gives floats 3 decimals
                (f"{change} flat" if flat["flat"] else f"**{change} {moving_word(flat['change'])}**") + seeds,
            ]
        )
    return headers, rows


def accuracy_rows(results: dict, preset: Preset, task: str) -> tuple[list[str], list[list]]:
    """Accuracy per variant; the equal-compute columns (`recurrent` vs `ffn_compute_matched`) only when both ran."""
    equal_compute = any("vs_compute_matched" in result["accuracy"][task] for result in results.values())
    headers = ["variant", "in-distribution", "Δ vs ffn", "out-of-distribution", "Δ vs ffn"]
    if equal_compute:
        headers += [f"in-distribution Δ vs {COMPUTE_MATCHED}", f"out-of-distribution Δ vs {COMPUTE_MATCHED}"]
    headers += [f"difficulty {d}" for d in preset.tested(task)]
    rows = []
    for name, result in results.items():
        entry = result["accuracy"][task]
        versus = entry.get("vs_ffn", {})
        row = [
            name,
            _ci(entry.get("in_distribution")),
            _delta(versus.get("in_distribution")) if versus else "(baseline)" if name == BASELINE else "–",
            _ci(entry.get("out_of_distribution")),
            _delta(versus.get("out_of_distribution")) if versus else "–",
        ]
        if equal_compute:
            matched = entry.get("vs_compute_matched", {})
            row += [_delta(matched.get("in_distribution")), _delta(matched.get("out_of_distribution"))]
        rows.append(row + [_ci(entry[str(d)]) for d in preset.tested(task)])
    return headers, rows


def depth_rows(results: dict, preset: Preset, task: str, versus_default: bool = False) -> tuple[list[str], list[list]]:
    """Accuracy at every inference depth, per variant x difficulty (mean [95 % CI]), or with `versus_default` its
    paired difference to the variant's default depth."""
    depths = sorted({(knob, int(d)) for r in results.values() for knob, c in r["depth_curves"].items() for d in c})
    headers = ["variant", "difficulty"] + [f"{DEPTH_KNOBS[knob]}={depth}" for knob, depth in depths]
    rows = []
    for name, result in results.items():
        curves = result["depth_curves"]
        if not curves:
            continue
        for difficulty in preset.tested(task):
            cells = []
            for knob, depth in depths:
                curve = curves.get(knob, {}).get(str(depth))
                if curve is None:
                    cells.append("–")
                elif versus_default:
                    cells.append(_delta(curve[task]["vs_default_depth"][str(difficulty)]))
                else:
                    cells.append(_ci(curve[task][str(difficulty)]))
            rows.append([name, difficulty, *cells])
    return headers, rows


def moving_word(change: float) -> str:
    """How a learning curve that is not flat moved over the last steps: up (learning) or down."""
    return "still learning" if change > 0 else "falling"


def steps_budget(preset: Preset, run: dict) -> str:
    if preset.stop_at_accuracy is None:
        return f"{run['max_steps']} optimizer steps (equal steps = equal data)"
    return (
        f"up to {run['max_steps']} optimizer steps, each job stopped once converged (validation exact match on the "
        f"trained difficulties >= {preset.stop_at_accuracy} at a check every {100 // STOP_CHECKS} % of the steps and "
        f"at the check {100 - round(100 * FLAT_FROM)} % of its steps earlier, that earlier accuracy within the "
        "test-set noise of the current one; `steps`: mean over seeds)"
    )


def render_comparison(results: dict, preset: Preset, run: dict) -> str:
    validation = run.get("split") == "validation"
    scored = (
        "; the validation split, drawn apart from the test split, which this run did not read" if validation else ""
    )
    parts = [
        "# MoRE comparison",
        f"Preset `{run['preset']}`: {len(run['seeds'])} seeds per variant ({run['seeds']}), "
        f"{steps_budget(preset, run)} x {run['batch_size']} examples for every variant, "
        f"parameters matched on **{run['match_parameters']}** counts to `ffn` "
        f"(`{COMPUTE_MATCHED}`: training FLOPs per token matched to `recurrent` instead); "
        f"{preset.describe_splits()}, with "
        f"{preset.num_test_per_difficulty} examples each (the same for every variant{scored}); wall time "
        f"{run['wall_seconds'] / 60:.1f} min on {run['device']}"
        + (
            f" ({run['reused_jobs']} of the jobs reused by --resume, not trained in that time)."
            if run["reused_jobs"]
            else "."
        ),
        "Accuracy: greedy exact match, mean over seeds x examples [95 % t interval over seeds and examples]. "
        "Δ vs ffn: paired over the same seeds and examples; **bold** where its 95 % CI excludes 0, else no "
        f"difference. Δ vs {COMPUTE_MATCHED} (`{COMPUTE_REFERENCE}` only): the same at equal training FLOPs per "
        "token.",
        markdown_table(*variant_rows(results, preset)),
    ]
    for task in preset.tasks:
        parts += [f"## {task}", markdown_table(*accuracy_rows(results, preset, task))]
        headers, rows = depth_rows(results, preset, task)
        if rows:
            parts += [f"### {task}: accuracy by inference depth (r = expert steps, T = MoE iterations)"]
            parts += [markdown_table(headers, rows)]
            parts += [
                f"### {task}: Δ vs the default depth (paired over the same seeds and examples; the default is the "
                "config's `num_recurrent_steps` / `num_moe_iterations`)",
                markdown_table(*depth_rows(results, preset, task, versus_default=True)),
            ]
    return "\n\n".join(parts) + "\n"


def _legend_outside(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_accuracy_by_difficulty(results: dict, preset: Preset, path: Path) -> None:
    """Accuracy (95 % CI) against difficulty, one panel per task; the trained difficulties are shaded."""
    fig, axes = plt.subplots(1, len(preset.tasks), figsize=(5 * len(preset.tasks) + 2.5, 4), squeeze=False)
    for ax, task in zip(axes[0], preset.tasks, strict=True):
        ax.axvspan(min(preset.trained(task)) - 0.5, max(preset.trained(task)) + 0.5, color="0.92")
        for index, (name, result) in enumerate(results.items()):
            entries = [result["accuracy"][task][str(d)] for d in preset.tested(task)]
            means = np.array([e["mean"] for e in entries])
            errors = np.array([[e["mean"] - e["ci95"][0], e["ci95"][1] - e["mean"]] for e in entries]).T
            offset = (index - len(results) / 2) * 0.04
            x = np.array(preset.tested(task)) + offset
            ax.errorbar(x, means, yerr=errors, fmt="-o", ms=3, capsize=2, color=f"C{index % 10}", label=name)
        ax.set(xlabel="difficulty (shaded: trained)", ylabel="exact match", title=task, ylim=(0, 1.02))
        ax.set_xticks(preset.tested(task))
    _legend_outside(axes[0][-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth_curves(results: dict, preset: Preset, path: Path) -> None:
    """Accuracy against inference depth with 95 % CI bands: a row per iterating variant, a column per task, a line per
    difficulty (dashed: harder than trained)."""
    panels = [(name, knob) for name, r in results.items() for knob in r["depth_curves"]]
    if not panels:
        return
    fig, axes = plt.subplots(
        len(panels), len(preset.tasks), figsize=(4.5 * len(preset.tasks) + 2.5, 3 * len(panels)), squeeze=False
    )
    for row, (name, knob) in enumerate(panels):
        curve = results[name]["depth_curves"][knob]
        depths = sorted(curve, key=int)
        for column, task in enumerate(preset.tasks):
            ax = axes[row][column]
            for index, difficulty in enumerate(preset.tested(task)):
                entries = [curve[d][task][str(difficulty)] for d in depths]
                x = [int(d) for d in depths]
                means = [e["mean"] for e in entries]
                style = "-" if difficulty in preset.trained(task) else "--"
                ax.plot(x, means, style, marker="o", ms=3, color=f"C{index}", label=f"difficulty {difficulty}")
                ax.fill_between(
                    x, [e["ci95"][0] for e in entries], [e["ci95"][1] for e in entries], color=f"C{index}", alpha=0.15
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks([int(d) for d in depths], [str(d) for d in depths])
            ax.set(
                ylim=(0, 1.02),
                xlabel=f"{knob} ({DEPTH_KNOBS[knob]}) at inference",
                ylabel="exact match",
                title=f"{name}: {task}",
            )
    _legend_outside(axes[0][-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_flops(results: dict, preset: Preset, path: Path) -> None:
    """In- and out-of-distribution accuracy (95 % CI) against the total training FLOPs of each variant."""
    groups = ("in_distribution", "out_of_distribution")
    fig, axes = plt.subplots(1, len(preset.tasks), figsize=(5 * len(preset.tasks) + 2.5, 4), squeeze=False)
    for ax, task in zip(axes[0], preset.tasks, strict=True):
        for index, (name, result) in enumerate(results.items()):
            for group, marker in zip(groups, ("o", "s"), strict=True):
                entry = result["accuracy"][task].get(group)
                if entry is None:
                    continue
                error = [[entry["mean"] - entry["ci95"][0]], [entry["ci95"][1] - entry["mean"]]]
                label = name if group == groups[0] else None
                ax.errorbar(
                    result["training_flops"],
                    entry["mean"],
                    yerr=error,
                    fmt=marker,
                    color=f"C{index % 10}",
                    capsize=2,
                    label=label,
                    mfc="white" if group == groups[1] else None,
                )
        ax.set_xscale("log")
        ax.set(
            xlabel="training FLOPs (circles: trained difficulties, squares: harder)",
            ylabel="exact match",
            title=task,
            ylim=(0, 1.02),
        )
    _legend_outside(axes[0][-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _carried_mean(curves: list[list[dict]], steps: np.ndarray, key: str) -> np.ndarray:
    """(points,) mean over seeds of `key` at each of `steps`, each seed at its last point up to the step."""
    return np.mean([[[p[key] for p in curve if p["step"] <= step][-1] for step in steps] for curve in curves], axis=0)


def plot_learning_curves(runs: dict[str, list[dict]], results: dict, path: Path) -> None:
    """In-distribution accuracy along training (mean over seeds) against training FLOPs and against training seconds:
    where the equal-steps ranking differs from an equal-compute or equal-time one, the curves show it. A seed the stop
    rule ended counts from then on with the model it stopped with (its accuracy, seconds and FLOPs stay)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for index, (name, variant_runs) in enumerate(runs.items()):
        curves = [run["learning_curve"] for run in variant_runs]
        steps = np.array(sorted({point["step"] for curve in curves for point in curve}))
        accuracy, seconds = (_carried_mean(curves, steps, key) for key in ("accuracy", "seconds"))
        # A corpus pretraining (guide preset) comes before the first task step: its FLOPs are where the curve starts.
        pretraining = results[name].get("pretraining_flops", 0.0)
        flops_per_step = (results[name]["training_flops"] - pretraining) / np.mean(results[name]["steps"])
        trained = np.mean([np.minimum(steps, steps_trained(run)) for run in variant_runs], axis=0)
        flops = pretraining + flops_per_step * trained
        for ax, x in zip(axes, (flops, seconds), strict=True):
            ax.plot(x, accuracy, "-o", ms=3, color=f"C{index % 10}", label=name)
    axes[0].set(xlabel="training FLOPs", ylabel="exact match, trained difficulties", ylim=(0, 1.02))
    axes[1].set(xlabel="training seconds (one CPU thread)", ylabel="exact match, trained difficulties", ylim=(0, 1.02))
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs time")
    _legend_outside(axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(runs: dict[str, list[dict]], path: Path) -> None:
    """Language-model loss along training of every variant (mean over seeds; a seed the stop rule ended counts with
    its last logged loss from then on)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for index, (name, variant_runs) in enumerate(runs.items()):
        logs = [run["training_log"] for run in variant_runs]
        steps = np.array(sorted({entry["step"] for log in logs for entry in log}))
        losses = _carried_mean(logs, steps, "lm_loss")
        ax.plot(steps, losses, color=f"C{index % 10}", label=name)
    ax.set(xlabel="step", ylabel="answer loss (mean over seeds)", title="training", yscale="log")
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resolve_variants(args: CompareArguments, preset: Preset) -> list[str]:
    known = comparison_variants()
    if args.variants is not None:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
    else:
        names = list(preset.variants or known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"Unknown variants {unknown}; valid variants: {list(known)}")
    if COMPUTE_MATCHED in names and "recurrent" not in modeling_more.EXPERT_REGISTRY:
        raise ValueError(f"{COMPUTE_MATCHED} matches the compute of `recurrent`, which is not registered")
    return names


def run_jobs(jobs: list[Job], data: CompareData, num_workers: int, modules: list[str]) -> list[dict]:
    """Every job, in parallel single-thread worker processes (or here with one worker), with one progress bar over
    all optimizer steps."""
    total = sum(job.training["max_steps"] + (job.corpus_steps if data.corpus_train is not None else 0) for job in jobs)
    progress = tqdm(total=total, desc="training (all variants x seeds)", unit="step", smoothing=0.05)
    if num_workers <= 1:
        results = []
        for job in jobs:
            progress.set_postfix_str(f"{job.variant} seed {job.seed}")
            results.append(run_job(job, data, _InlineProgress(progress)))
        progress.close()
        return results
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()  # one item per optimizer step of any worker
    # Costliest jobs first (training FLOPs per token), so the last minutes do not wait on one slow variant.
    costs = [training_flops_per_token(MoREConfig(**job.config)) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -costs[i])
    executor = ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_worker_init, initargs=(modules, queue, data)
    )
    results = {}
    listener = threading.Thread(target=_forward_steps, args=(queue, progress), daemon=True)
    listener.start()
    try:
        # Workers start on submit and inherit the environment: their own bars (weights saving, diagnostics) stay off;
        # this process's bar is already built (tqdm reads the variable when it is imported).
        with _environment(TQDM_DISABLE="1"):
            futures = {executor.submit(_run_job_in_worker, jobs[i]): i for i in order}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()  # re-raises a worker's exception here
            progress.set_postfix_str(f"done {jobs[i].variant} seed {jobs[i].seed}")
        # The workers exit on their own, having sent every step (ended, they would leak what they hold: semaphores);
        # the end mark then follows their last step through the queue.
        executor.shutdown()
        queue.put(None)
        listener.join()
        queue.close()
    except BaseException:  # Ctrl-C or a failed job: stop now, keeping the result files of the finished jobs
        _stop_workers(executor)
        # A worker ended mid-write may hold the queue's lock: end the listener if the mark gets through, and never
        # wait for it at exit (the listener is a daemon thread).
        queue.put(None)
        queue.cancel_join_thread()
        finished = ", ".join(f"{jobs[i].variant} seed {jobs[i].seed}" for i in sorted(results)) or "none"
        logger.warning(
            "Stopped with %d of %d jobs finished (%s); --resume reuses them", len(results), len(jobs), finished
        )
        raise
    finally:
        progress.close()
    return [results[i] for i in range(len(jobs))]


@contextlib.contextmanager
def _environment(**variables: str):
    """Environment variables set for the duration (and for the processes started meanwhile)."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def _forward_steps(queue, progress) -> None:
    """Moves the steps the workers report to the progress bar, until the end mark (None)."""
    for steps in iter(queue.get, None):
        progress.update(steps)


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Ends the running jobs at once and cancels the others. ProcessPoolExecutor would wait for running jobs (an hour
    on the guide preset); Python 3.14's `terminate_workers` does this."""
    workers = list((executor._processes or {}).values())  # None once shut down
    for process in workers:
        process.terminate()
    for process in workers:
        process.join()
    executor.shutdown(cancel_futures=True)


class _InlineProgress:
    """The queue interface of `_ProgressCallback` for jobs run in the main process."""

    def __init__(self, progress):
        self.progress = progress

    def put(self, steps: int) -> None:
        self.progress.update(steps)


def dry_run_preset(preset: Preset, tiny_model: dict) -> Preset:
    """The preset's pipeline at a few steps and examples, on `tiny_model` (the default preset's model) narrowed
    further, keeping the preset's expert count (tests exercise the GPU presets this way on CPU)."""
    return dataclasses.replace(
        preset,
        model={
            **preset.model,
            **{k: v for k, v in tiny_model.items() if k not in ("num_experts", "num_experts_per_tok")},
            "hidden_size": 32,
            "intermediate_size": 64,
        },
        num_train_examples=32,
        num_test_per_difficulty=2,
        training={**preset.training, "max_steps": 2, "per_device_train_batch_size": 4, "bf16": False},
        seeds=1,
        recurrent_depths=preset.recurrent_depths[:2],
        moe_iterations=preset.moe_iterations[:2],
        max_length=64,
    )
