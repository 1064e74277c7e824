"""Training pieces of the examples: model presets, the data arguments and splits, batching, the length/depth
curriculum and `MoRETrainer` (the research guide's MoE health metrics in the training logs)."""

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    default_data_collator,
)
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import IntervalStrategy, sort_checkpoints

from more_tools.data import (
    IGNORE_INDEX,
    TASK_GENERATORS,
    build_reasoning_dataset,
    chunk_corpus,
    load_babi_dir,
    load_text_corpus,
    tokenize_qa,
)


logger = logging.getLogger(__name__)


# MoREConfig keyword arguments of each model size; the tokenizer sets vocab_size and the special token ids, and
# `--max_length` sets max_position_embeddings.
PRESETS: dict[str, dict] = {
    # 0.25M (FFN experts) to 0.45M (recurrent experts) parameters with a 350-token vocabulary: minutes on a CPU.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=1,
        router_hidden_size=32,
        num_recurrent_steps=2,
        train_recurrent_steps_min=1,
        train_recurrent_steps_max=3,
    ),
    # Between the two: a GPU model for the embedded tasks or a short WikiText run.
    "small": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_experts=8,
        num_experts_per_tok=1,
        router_hidden_size=64,
        num_recurrent_steps=4,
        train_recurrent_steps_min=2,
        train_recurrent_steps_max=4,
    ),
    # The research guide's base configuration (§3.1): 12 layers, d_model 512, 8 heads of 64, 8 experts, top-1,
    # capacity factor 1.0, GELU, aux and z-loss weights 1e-3; recurrent depth 2-4 in training (§3.2).
    "base": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_experts=8,
        num_experts_per_tok=1,
        capacity_factor=1.0,
        hidden_act="gelu",
        router_aux_loss_coef=1e-3,
        router_z_loss_coef=1e-3,
        expert_dropout=0.0,
        num_recurrent_steps=4,
        train_recurrent_steps_min=2,
        train_recurrent_steps_max=4,
    ),
}


# Health metrics of the MoE layers, averaged over layers x iterations and over the micro-batches of a logging window.
ROUTING_METRICS = ("load_cv", "effective_experts", "router_entropy")


@dataclass
class DataArguments:
    tasks: str = field(
        default="babi1,babi2,babi3,babi16,arithmetic,algebra",
        metadata={"help": f"Comma-separated embedded reasoning tasks, from {list(TASK_GENERATORS)}."},
    )
    num_train_examples: int = field(default=20000, metadata={"help": "Generated training examples."})
    num_validation_examples: int = field(default=500, metadata={"help": "Generated validation examples."})
    num_test_examples: int = field(default=500, metadata={"help": "Generated test examples (exact match)."})
    dataset_seed: int = field(
        default=0, metadata={"help": "Seed of the generated examples and of the bAbI validation split (not --seed)."}
    )
    babi_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the bAbI v1.2 files (e.g. tasks_1-20_v1-2/en); --tasks then names bAbI tasks."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "A text corpus from the Hub (e.g. wikitext) instead of reasoning tasks."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Its configuration (e.g. wikitext-103-raw-v1)."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "A local .txt file or directory of them as the training corpus."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A local .txt file or directory of them as the validation corpus."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained tokenizer (e.g. gpt2). Default: the one of --model_name_or_path, else a BPE "
            "tokenizer trained on the training texts."
        },
    )
    tokenizer_vocab_size: int = field(default=512, metadata={"help": "Vocabulary of a newly trained BPE tokenizer."})
    max_length: int = field(
        default=256, metadata={"help": "Tokens per example (reasoning: prompts lose their start) or per corpus block."}
    )
    answer_only_loss: bool = field(
        default=True, metadata={"help": "Reasoning tasks: train on the answer tokens only (else on every token)."}
    )
    curriculum: str | None = field(
        default=None,
        metadata={
            "help": "Length/depth curriculum as 'step:max_length:recurrent_steps,...' (guide §7.4: "
            "'0:128:1,10000:256:2,20000:512:4,30000:512:8'); from each step on, batches are cut to max_length "
            "tokens and training depth is drawn up to recurrent_steps; '-' keeps a value unchanged."
        },
    )
    eval_exact_match: bool = field(
        default=False,
        metadata={"help": "After training, score greedy answers on the test split against the majority baseline."},
    )
    exact_match_num_recurrent_steps: int | None = field(
        default=None, metadata={"help": "Recurrence depth for --eval_exact_match (default: the config's)."}
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Generated tokens per answer for --eval_exact_match."})

    @property
    def is_corpus(self) -> bool:
        return self.dataset_name is not None or self.train_file is not None


def _task_list(text: str) -> list[str]:
    return [task.strip() for task in text.split(",") if task.strip()]


def load_raw_datasets(data_args: DataArguments) -> DatasetDict:
    """Untokenized splits: a text corpus (`text` column; train, and validation when given) or reasoning examples
    (`task`, `prompt`, `answer`, `text`; train, validation and test) from the bAbI files or the generators."""
    if data_args.is_corpus:
        if data_args.dataset_name is not None:
            splits = {"train": "train", "validation": "validation"}
            return DatasetDict(
                {
                    name: load_text_corpus(data_args.dataset_name, data_args.dataset_config_name, split=split)
                    for name, split in splits.items()
                }
            )
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        return DatasetDict({name: load_text_corpus(path) for name, path in files.items() if path is not None})
    tasks = _task_list(data_args.tasks)
    if data_args.babi_dir is not None:
        numbers = []
        for task in tasks:
            if not re.fullmatch(r"babi\d+", task):
                raise ValueError(f"With --babi_dir, --tasks must name bAbI tasks such as babi1,babi2; got {task!r}")
            numbers.append(int(task[4:]))
        return load_babi_dir(data_args.babi_dir, numbers, seed=data_args.dataset_seed)
    unknown = [task for task in tasks if task not in TASK_GENERATORS]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; valid tasks: {list(TASK_GENERATORS)}")
    return build_reasoning_dataset(
        tasks,
        num_train=data_args.num_train_examples,
        num_validation=data_args.num_validation_examples,
        num_test=data_args.num_test_examples,
        seed=data_args.dataset_seed,
    )


def build_datasets(
    data_args: DataArguments, raw_datasets: DatasetDict, tokenizer: PreTrainedTokenizerBase
) -> DatasetDict:
    """Splits of `input_ids`, `attention_mask` and `labels`, each `max_length` long (corpus blocks, or right-padded
    prompt/answer examples)."""
    if data_args.is_corpus:
        return DatasetDict(
            {name: chunk_corpus(split, tokenizer, data_args.max_length) for name, split in raw_datasets.items()}
        )
    return tokenize_qa(raw_datasets, tokenizer, data_args.max_length, answer_only_loss=data_args.answer_only_loss)


def fit_batch(batch: dict[str, torch.Tensor], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Cuts the padding columns no row of a right-padded batch uses; with `max_length`, a longer row keeps its last
    `max_length` tokens (as `tokenize_qa` does, the start of a story goes and the answer stays)."""
    lengths = batch["attention_mask"].sum(-1)
    width = int(lengths.max())
    if max_length is None or width <= max_length:
        return {name: tensor[:, :width] for name, tensor in batch.items()}
    start = (lengths - max_length).clamp_min(0)
    index = start[:, None] + torch.arange(max_length, device=start.device)
    return {name: tensor.gather(1, index) for name, tensor in batch.items()}


def collate(features: list[dict] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacks examples (or takes a batch `TensorExamples` already stacked) and drops the padding columns no example of
    the batch needs (most stories are short)."""
    return fit_batch(dict(features) if isinstance(features, Mapping) else default_data_collator(features))


@dataclass(frozen=True)
class CurriculumStage:
    start_step: int
    max_length: int | None  # None: batches keep their length
    recurrent_steps: int | None  # None: the configured training depth


def parse_curriculum(text: str) -> list[CurriculumStage]:
    """'step:max_length:recurrent_steps,...' -> stages by start step; the first stage must start at step 0."""
    stages = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(f"Curriculum stage {item!r} is not 'step:max_length:recurrent_steps'")
        step, length, depth = (None if part.strip() == "-" else int(part) for part in parts)
        if step is None or step < 0 or (length is not None and length < 1) or (depth is not None and depth < 1):
            raise ValueError(f"Curriculum stage {item!r} needs a step >= 0 and positive lengths and depths")
        stages.append(CurriculumStage(step, length, depth))
    stages.sort(key=lambda stage: stage.start_step)
    if stages[0].start_step != 0 or len({stage.start_step for stage in stages}) != len(stages):
        raise ValueError(f"Curriculum {text!r} must start at step 0 and name every step once")
    return stages


class CurriculumCallback(TrainerCallback):
    """Grows sequence length and recurrent depth with the global step (research guide §3.3 / §7.4).

    Before each optimizer step it picks the stage of `state.global_step`: `MoRETrainer` cuts the step's batches to
    its `max_length` when it fetches them, before Trainer counts their label tokens (batches are collated ahead of
    the step, so the collator could not see the change in time), and the model's `train_recurrent_steps_max`
    becomes the stage's depth (the depth is drawn per batch in [min, max], `MoREModel._sample_depth`). The stage
    follows from the step alone, so a resumed run continues the schedule where it stopped.
    """

    def __init__(self, stages: list[CurriculumStage]):
        self.stages = stages
        self.stage: CurriculumStage | None = None
        self._base_depths: tuple[int, int] | None = None

    @property
    def max_length(self) -> int | None:
        return None if self.stage is None else self.stage.max_length

    def stage_at(self, step: int) -> CurriculumStage:
        return [stage for stage in self.stages if stage.start_step <= step][-1]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        config = model.config
        if config.recurrent_steps_sampler == "fixed" and any(s.recurrent_steps is not None for s in self.stages):
            raise ValueError("A depth curriculum needs recurrent_steps_sampler 'uniform' or 'poisson_lognormal'")
        self._base_depths = (config.train_recurrent_steps_min, config.train_recurrent_steps_max)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        stage = self.stage_at(state.global_step)
        if stage == self.stage:
            return
        self.stage = stage
        base_min, base_max = self._base_depths
        depth = base_max if stage.recurrent_steps is None else stage.recurrent_steps
        # The range stays valid: its lower end comes down with an early, shallow stage.
        model.config.train_recurrent_steps_min = min(base_min, depth)
        model.config.train_recurrent_steps_max = depth
        logger.info(
            "Curriculum from step %d: max_length %s, training depth %d-%d",
            state.global_step,
            stage.max_length,
            model.config.train_recurrent_steps_min,
            depth,
        )


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the label tokens, and their count."""
    labels = labels[:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()


class MoRETrainer(Trainer):
    """`Trainer` that logs the MoE health metrics of training (guide §5.1) and applies a `CurriculumCallback`.

    Between two logging steps the trainer sums, on device: the language-model loss (`lm_loss`, token-weighted; the
    objective `loss` also holds the weighted router terms), the unweighted `aux_loss` and `z_loss` and the mean
    recurrent depth used (`recurrent_steps`, not for FFN experts) of every training micro-batch, and the routing
    statistics of every MoE layer and iteration (`load_cv`, `effective_experts`, `router_entropy`) of the micro-batches
    of logging steps only (they run with `output_router_logits=True`; every step would cost a few percent of a tiny
    model's step), so those three are means over the logged steps, the others over the whole window. `log` adds the
    means, averaged over data-parallel ranks, to the training logs, together with the curriculum's current length and
    depth. Training runs without a cache (`use_cache=False`: no step reads it). Evaluation reports the LM loss only, so
    `perplexity = exp(eval_loss)`.
    """

    def __init__(self, *args, curriculum: CurriculumCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor:
            # Trainer would take the labels away and smooth the LM loss itself: the model's loss (with the router
            # terms) and its `lm_loss` would be gone.
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} is not supported: MoRE computes its own "
                "loss (the LM loss plus the router and expert terms) from the labels. Leave it at 0."
            )
        self.curriculum = curriculum
        if curriculum is not None:
            self.add_callback(curriculum)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_counts: dict[str, int] = {}
        self._flop_parameters: int | None = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Cuts the batches of the coming optimizer step to the curriculum length before Trainer counts their label
        tokens (`num_items_in_batch`), so the loss is normalised by the tokens actually trained on."""
        max_length = None if self.curriculum is None else self.curriculum.stage_at(self.state.global_step).max_length
        if max_length is not None:
            epoch_iterator = (fit_batch(batch, max_length) for batch in epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            _, outputs = super().compute_loss(model, inputs, return_outputs=True)
            return (outputs.lm_loss, outputs) if return_outputs else outputs.lm_loss
        flags = {"use_cache": False, "output_router_logits": self._logs_next_step()}
        loss, outputs = super().compute_loss(
            model, {**inputs, **flags}, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._record_metrics(outputs, inputs["labels"], num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        """Transformers' estimate (6 x tokens x non-embedding parameters) with the parameters counted once per
        run: Trainer asks every step, and counting walks every module (a few percent of a tiny model's step)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs:
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters

    def _logs_next_step(self) -> bool:
        """Whether the optimizer step being computed ends with a training log (`DefaultFlowCallback`'s rule); always
        True unless logging follows steps."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy != IntervalStrategy.STEPS:
            return True
        return (step == 1 and args.logging_first_step) or step % max(1, int(self.state.logging_steps or 1)) == 0

    def _add_metric(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._metric_sums[name] = self._metric_sums.get(name, 0) + value
        self._metric_counts[name] = self._metric_counts.get(name, 0) + 1

    def _record_metrics(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> None:
        # The model's `lm_loss` is the summed cross-entropy over `num_items_in_batch` (the label tokens of every
        # accumulated micro-batch) when given, else over this batch's own label tokens: no second cross-entropy here.
        count = (labels[:, 1:] != IGNORE_INDEX).sum()
        divisor = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        self._add_metric("lm_loss_sum", outputs.lm_loss * divisor.clamp_min(1))
        self._add_metric("lm_tokens", count)
        for name in ("aux_loss", "z_loss", "recurrent_steps"):
            value = getattr(outputs, name)
            if value is not None:
                self._add_metric(name, value)
        if outputs.routing_stats:  # None for a model without MoE layers (every layer dense)
            for name in ROUTING_METRICS:
                self._add_metric(name, torch.stack([stats[name] for stats in outputs.routing_stats]).mean())

    def _pop_metrics(self) -> dict[str, float]:
        """Window means of the recorded metrics, averaged over ranks (every rank logs at the same steps)."""
        names = sorted(self._metric_sums)
        means = torch.stack([self._metric_sums[name] / self._metric_counts[name] for name in names])
        means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
        values = dict(zip(names, means.tolist(), strict=True))
        self._metric_sums, self._metric_counts = {}, {}
        values["lm_loss"] = values.pop("lm_loss_sum") / max(values.pop("lm_tokens"), 1.0)
        return values

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metric_sums:
            logs.update(self._pop_metrics())
            if self.curriculum is not None and self.curriculum.stage is not None:
                if self.curriculum.max_length is not None:
                    logs["curriculum_max_length"] = self.curriculum.max_length
                logs["curriculum_recurrent_steps_max"] = self.model.config.train_recurrent_steps_max
        super().log(logs, start_time)


def data_summary(data_args: DataArguments, raw_datasets: DatasetDict) -> str:
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in raw_datasets.items())
    if data_args.is_corpus:
        source = data_args.dataset_name or data_args.train_file
        return f"Text corpus `{source}` ({sizes} documents) in blocks of {data_args.max_length} tokens."
    source = (
        f"bAbI v1.2 files in `{data_args.babi_dir}`" if data_args.babi_dir else "generated by `more_tools/data.py`"
    )
    loss = "answer tokens only" if data_args.answer_only_loss else "every token"
    return f"Reasoning tasks {data_args.tasks} ({source}; {sizes} examples), loss on {loss}."


def resume_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets for a `--resume_from_checkpoint` value: "true" or "last"
    (or a JSON argument file's `true`) the last complete checkpoint of `output_dir`, "false" (or `false`) and None
    nothing, any other text the checkpoint path it names."""
    text = str(value).lower()
    if text in ("true", "last"):
        return last_complete_checkpoint(output_dir)
    return None if text in ("false", "none") else value


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-N` of `output_dir` that training can resume from (`--resume_from_checkpoint true`).

    Trainer writes a checkpoint's `trainer_state.json` last, after the weights, optimizer, scheduler and RNG states, so
    a checkpoint without a readable one was cut short (say, by kill -9 while saving): it is skipped with a warning,
    where Trainer would pick it and fail. Without any complete checkpoint this is an error, as it is for Trainer: the
    run asked to resume, and starting over instead would silently redo (and overwrite) the training.
    """
    skipped = []
    for checkpoint in reversed(sort_checkpoints(output_dir)):
        try:
            json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):  # missing, or cut short while being written
            skipped.append(checkpoint)
            continue
        if skipped:
            logger.warning(f"Resuming from {checkpoint}, skipping incomplete {skipped} (no {TRAINER_STATE_NAME})")
        return checkpoint
    incomplete = f" (only incomplete ones: {skipped})" if skipped else ""
    raise ValueError(
        f"No complete checkpoint to resume from in {output_dir}{incomplete}: pass --resume_from_checkpoint a "
        "checkpoint directory, or leave it out to train from scratch"
    )
