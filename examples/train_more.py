"""Train a MoRE model with the Hugging Face `Trainer`, on the embedded reasoning tasks, the original bAbI files or a
text corpus, logging the research guide's MoE health metrics and optionally following its length/depth curriculum.

    python examples/train_more.py --preset tiny --tasks babi1 --output_dir outputs/tiny --max_steps 500
    python examples/train_more.py --preset small --expert_type shared_recurrent --router_type gru \\
        --config_overrides "num_backprop_steps=2,router_entropy_floor=0.8" --output_dir outputs/small
    python examples/train_more.py --preset base --dataset_name wikitext --dataset_config_name wikitext-103-raw-v1 \\
        --tokenizer_name_or_path gpt2 --max_length 512 --curriculum "0:128:1,10000:256:2,20000:512:4,30000:512:8" \\
        --output_dir outputs/base --bf16 --activation_checkpointing
    accelerate launch --config_file examples/configs/accelerate_multi_gpu.yaml examples/train_more.py ...
    torchrun --nproc_per_node 2 examples/train_more.py --tp_size 2 --ep_size 2 --save_only_model true ...  # TP / EP
    python examples/train_more.py train_args.json          # the same arguments from a JSON file

The output directory holds the model (with `configuration_more.py` / `modeling_more.py` for `trust_remote_code`), its
tokenizer and a model-card stub, and loads with `AutoModelForCausalLM` / `AutoTokenizer`. The reusable pieces
(`PRESETS`, `build_config`, `load_raw_datasets`, `build_tokenizer`, `build_datasets`, `MoRETrainer`,
`CurriculumCallback`) are imported by `compare_more.py`.
"""

import json
import logging
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import ParallelismConfig
from accelerate.utils import DistributedType
from datasets import DatasetDict
from huggingface_hub import ModelCard, ModelCardData
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.distributed import DistributedConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import IntervalStrategy, sort_checkpoints


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_more  # noqa: E402  (registers MoRE with the Auto classes)
from configuration_more import EXPERT_TYPES, ROUTER_TYPES, MoREConfig  # noqa: E402
from more_data import (  # noqa: E402
    IGNORE_INDEX,
    TASK_GENERATORS,
    build_reasoning_dataset,
    chunk_corpus,
    load_babi_dir,
    load_text_corpus,
    load_tokenizer,
    tokenize_qa,
    train_bpe_tokenizer,
)
from more_eval import exact_match_by_task, majority_baseline  # noqa: E402


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
# ModelArguments fields that are MoREConfig fields of the same name.
NAMED_CONFIG_FIELDS = (
    "expert_type",
    "router_type",
    "num_experts",
    "num_experts_per_tok",
    "num_recurrent_steps",
    "train_recurrent_steps_min",
    "train_recurrent_steps_max",
    "num_moe_iterations",
)
# Fields that follow from the tokenizer for a freshly initialised model.
TOKENIZER_CONFIG_FIELDS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
# Health metrics of the MoE layers, averaged over layers x iterations and over the micro-batches of a logging window.
ROUTING_METRICS = ("load_cv", "effective_experts", "router_entropy")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved MoRE model to continue training from (its config wins over --preset)."},
    )
    preset: str = field(default="tiny", metadata={"help": f"Model size of a new model: one of {list(PRESETS)}."})
    expert_type: str | None = field(default=None, metadata={"help": f"One of {list(EXPERT_TYPES)} (preset: ffn)."})
    router_type: str | None = field(default=None, metadata={"help": f"One of {ROUTER_TYPES} (preset: linear)."})
    num_experts: int | None = field(default=None, metadata={"help": "Experts per MoE layer."})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "Experts per token (top-k)."})
    num_recurrent_steps: int | None = field(
        default=None, metadata={"help": "Expert recurrence depth at inference (and with the fixed sampler)."}
    )
    train_recurrent_steps_min: int | None = field(
        default=None, metadata={"help": "Smallest recurrence depth drawn per training batch."}
    )
    train_recurrent_steps_max: int | None = field(
        default=None, metadata={"help": "Largest recurrence depth drawn per training batch."}
    )
    num_moe_iterations: int | None = field(
        default=None, metadata={"help": "Synthesis II: iterations of every MoE block (1 = off)."}
    )
    config_json: str | None = field(
        default=None, metadata={"help": "A JSON file of MoREConfig fields, applied after the preset and named args."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "MoREConfig fields applied last, as 'name=value,name=value'; values are JSON (numbers, "
            "true/false, null, lists such as mlp_only_layers=[0,3]) or else strings, "
            "e.g. 'capacity_factor=1.25,num_backprop_steps=2,expert_dropout=0.1'."
        },
    )
    tp_size: int = field(
        default=1,
        metadata={
            "help": "Tensor parallelism over this many ranks (attention heads, dense and FFN-expert features); every "
            "rank of the group sees the same batch. Launch as many processes (torchrun --nproc_per_node)."
        },
    )
    ep_size: int = field(
        default=1,
        metadata={"help": "Expert parallelism: the experts of each layer split over this many ranks (= tp_size)."},
    )

    @property
    def sharded(self) -> bool:
        """Whether the model loads sharded over ranks (tensor or expert parallelism)."""
        return self.tp_size > 1 or self.ep_size > 1


class ShardedModelParallelismConfig(ParallelismConfig):
    """accelerate's `ParallelismConfig` for a model that `from_pretrained(distributed_config=...)` already sharded,
    accepted on CPU ranks (gloo) too.

    `Trainer` fills in the TP size from the model; accelerate then builds the device mesh, gives every rank of the TP
    group the same batches and does not wrap the model in DDP. None of that needs an accelerator, but accelerate 1.15
    accepts the config only for accelerator devices, FSDP or DeepSpeed; on CPU ranks this keeps its size check alone.
    `_validate_accelerator` is accelerate's private hook, the one the project overrides there: checked against
    accelerate 1.15.0 and 1.16.0 (CI runs `tests/test_parallel.py`'s Trainer case on the oldest and the newest).
    """

    def _validate_accelerator(self, accelerator):
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            return super()._validate_accelerator(accelerator)
        if self.total_size != accelerator.num_processes:
            raise ValueError(
                f"tp_size * data-parallel size = {self.total_size} must equal the number of processes "
                f"({accelerator.num_processes}): launch as many processes as --tp_size (torchrun --nproc_per_node)."
            )


def load_model(model_args: ModelArguments, config: MoREConfig, training_args: TrainingArguments):
    """The model to train: --model_name_or_path or a new one from `config`; with --tp_size / --ep_size above 1,
    loaded sharded through `from_pretrained(distributed_config=...)` (a new model is written to
    `output_dir/initial_model` first, by the main process)."""
    path = model_args.model_name_or_path
    if not model_args.sharded:
        if path is not None:
            return AutoModelForCausalLM.from_pretrained(path, config=config)
        return AutoModelForCausalLM.from_config(config)
    distributed_config = DistributedConfig(tp_size=model_args.tp_size, ep_size=model_args.ep_size)
    if path is None:
        path = str(Path(training_args.output_dir) / "initial_model")
        with training_args.main_process_first(desc="writing the initial model"):
            if training_args.should_save:
                AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, config=config, distributed_config=distributed_config)


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


# ---------------------------------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------------------------------


def _config_field_names() -> set[str]:
    return set(MoREConfig().to_dict()) | set(MoREConfig.attribute_map) | {"top_k"}


def parse_config_overrides(text: str | None) -> dict:
    """'name=value,name=value' -> {name: value}; a value is parsed as JSON when it is, else kept as a string.

    Commas inside a value (a JSON list) are kept: the text is split only before 'name='.
    """
    if not text:
        return {}
    overrides = {}
    for item in re.split(r",(?=\s*\w+\s*=)", text):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Config override {item!r} is not of the form name=value")
        value = value.strip()
        try:
            overrides[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            # Python spellings are what people type on a command line.
            overrides[name.strip()] = {"True": True, "False": False, "None": None}.get(value, value)
    return overrides


def config_updates(model_args: ModelArguments) -> dict:
    """The MoREConfig fields the arguments set, in order of precedence: named args, --config_json, overrides."""
    updates = {
        name: getattr(model_args, name) for name in NAMED_CONFIG_FIELDS if getattr(model_args, name) is not None
    }
    if model_args.config_json is not None:
        updates.update(json.loads(Path(model_args.config_json).read_text()))
    updates.update(parse_config_overrides(model_args.config_overrides))
    unknown = sorted(set(updates) - _config_field_names())
    if unknown:
        raise ValueError(f"Unknown MoREConfig fields {unknown}; see `configuration_more.MoREConfig`")
    return updates


def build_config(
    model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int
) -> MoREConfig:
    """The config of the model to train: the preset (or the config of --model_name_or_path), then `config_updates`.

    A new model takes its vocabulary and special tokens from the tokenizer; every field is validated by MoREConfig.
    """
    updates = config_updates(model_args)
    if model_args.model_name_or_path is not None:
        kwargs = AutoConfig.from_pretrained(model_args.model_name_or_path).to_dict()
    else:
        if model_args.preset not in PRESETS:
            raise ValueError(f"Unknown preset {model_args.preset!r}; valid presets: {list(PRESETS)}")
        kwargs = {
            **PRESETS[model_args.preset],
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": max_position_embeddings,
        }
    # Re-validates the whole config, so an override that conflicts with the preset fails here, not mid-training.
    config = MoREConfig(**{**kwargs, **updates})
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


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


def build_tokenizer(
    model_args: ModelArguments, data_args: DataArguments, raw_datasets: DatasetDict
) -> PreTrainedTokenizerBase:
    """--tokenizer_name_or_path, else the tokenizer saved with --model_name_or_path, else BPE on the training texts."""
    name = data_args.tokenizer_name_or_path or model_args.model_name_or_path
    if name is not None:
        return load_tokenizer(name)
    return train_bpe_tokenizer(
        raw_datasets["train"]["text"], vocab_size=data_args.tokenizer_vocab_size, model_max_length=data_args.max_length
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


# ---------------------------------------------------------------------------------------------------------------------
# Curriculum
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def write_model_card_stub(
    output_dir: str | Path, config: MoREConfig, training_data: str, metrics: dict[str, float]
) -> Path:
    """A short `README.md` model card: what the checkpoint is, how to load it, its data and its final metrics.

    `examples/evaluate_more.py` replaces it with the full card (per-task results, depth sweep, diagnostics).
    """
    output_dir = Path(output_dir)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["more", "mixture-of-experts", "recurrent-experts", config.expert_type, "custom_code"],
    )
    summary = (
        f"A MoRE (Mixture of Recurrent Experts) model trained with `examples/train_more.py`: "
        f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.num_experts} "
        f"`{config.expert_type}` experts per MoE layer (top-{config.num_experts_per_tok}), `{config.router_type}` "
        f"router, {config.num_moe_iterations} MoE iteration(s), {config.num_recurrent_steps} recurrent steps at "
        "inference. The model code ships with the weights: load it with `trust_remote_code=True`."
    )
    results = "\n".join(f"| {name} | {value:.4g} |" for name, value in sorted(metrics.items()))
    content = f"""---
{card_data.to_yaml()}
---

# {output_dir.name}

{summary}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{output_dir.name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{output_dir.name}")
```

## Training data

{training_data}

## Results

| metric | value |
|---|---|
{results}

Run `examples/evaluate_more.py --model_name_or_path {output_dir.name} --output_dir {output_dir.name}/eval` for the
full evaluation and model card.
"""
    path = output_dir / "README.md"
    ModelCard(content).save(path)
    return path


def data_summary(data_args: DataArguments, raw_datasets: DatasetDict) -> str:
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in raw_datasets.items())
    if data_args.is_corpus:
        source = data_args.dataset_name or data_args.train_file
        return f"Text corpus `{source}` ({sizes} documents) in blocks of {data_args.max_length} tokens."
    source = f"bAbI v1.2 files in `{data_args.babi_dir}`" if data_args.babi_dir else "generated by `more_data.py`"
    loss = "answer tokens only" if data_args.answer_only_loss else "every token"
    return f"Reasoning tasks {data_args.tasks} ({source}; {sizes} examples), loss on {loss}."


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


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of transformers' logging is warning: raise it so the main process reports progress.
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training arguments {training_args}")
    set_seed(training_args.seed)

    raw_datasets = load_raw_datasets(data_args)
    if data_args.eval_exact_match and "test" not in raw_datasets:
        raise ValueError("--eval_exact_match needs reasoning data with a test split, not a text corpus")
    tokenizer = build_tokenizer(model_args, data_args, raw_datasets)
    config = build_config(model_args, tokenizer, max_position_embeddings=data_args.max_length)
    if model_args.sharded and training_args.parallelism_config is None:
        training_args.parallelism_config = ShardedModelParallelismConfig()  # Trainer sets its sizes from the model
    model = load_model(model_args, config, training_args)
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 gathers a module's sharded weights for its forward and, through hooks on the tensors it returns,
        # again for its backward. A MoE block's router returns its routing in a dataclass those hooks do not see
        # into, so its weights would be missing in backward: gather each MoE block whole instead.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [modeling_more.MoRESparseMoeBlock])
    logger.info(
        f"MoRE {config.expert_type}/{config.router_type}: {model.num_parameters():,} parameters, config {config}"
    )

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = build_datasets(data_args, raw_datasets, tokenizer)
    eval_dataset = tokenized.get("validation")
    if not eval_dataset or not (training_args.do_eval or training_args.eval_strategy != "no"):
        eval_dataset = None
    curriculum = CurriculumCallback(parse_curriculum(data_args.curriculum)) if data_args.curriculum else None
    trainer = MoRETrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collate,
        curriculum=curriculum,
    )

    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last"):
        resume = last_complete_checkpoint(training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    metrics = {**train_result.metrics, "train_samples": len(tokenized["train"])}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 100.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    # Generation runs on the main process only, except under ZeRO-3 where every rank holds a shard of the weights and
    # must take part (generate() then synchronises the ranks itself).
    if data_args.eval_exact_match and (trainer.is_world_process_zero() or is_deepspeed_zero3_enabled()):
        test_metrics = exact_match_metrics(trainer.model, tokenizer, raw_datasets, data_args, training_args)
        if trainer.is_world_process_zero():
            trainer.save_metrics("test", test_metrics)
            metrics.update(test_metrics)

    if trainer.is_world_process_zero():
        card_metrics = {name: value for name, value in metrics.items() if isinstance(value, (int, float))}
        write_model_card_stub(training_args.output_dir, config, data_summary(data_args, raw_datasets), card_metrics)
        logger.info(f"Saved model, tokenizer and model card to {training_args.output_dir}")


if __name__ == "__main__":
    main()
