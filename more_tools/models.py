"""The model side of `examples/train_more.py`: its `ModelArguments`, the config they build (preset, named fields,
`--config_overrides`, tokenizer ids) and the model they load (fresh, from a checkpoint, sharded for TP / EP)."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import ParallelismConfig
from accelerate.utils import DistributedType
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase, TrainingArguments
from transformers.distributed import DistributedConfig

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)
from configuration_more import EXPERT_TYPES, ROUTER_TYPES, MoREConfig
from more_tools.data import load_tokenizer, train_bpe_tokenizer
from more_tools.training import PRESETS, DataArguments


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
    accelerate 1.15.0 and 1.16.0 (CI runs `tests/model/test_parallel.py`'s Trainer case on the oldest and the newest).
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


# ---------------------------------------------------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------------------------------------------------


# The guide's alias names (`d_model`, `top_k`, ...) -> the config fields they set.
FIELD_OF_ALIAS = {**MoREConfig.attribute_map, "top_k": "num_experts_per_tok"}


def _config_field_names() -> set[str]:
    return set(MoREConfig().to_dict()) | set(FIELD_OF_ALIAS)


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
    sources = [json.loads(Path(model_args.config_json).read_text()) if model_args.config_json is not None else {}]
    sources.append(parse_config_overrides(model_args.config_overrides))
    for source in sources:
        unknown = sorted(set(source) - _config_field_names())
        if unknown:
            raise ValueError(f"Unknown MoREConfig fields {unknown}; see `configuration_more.MoREConfig`")
        # Under their field names: MoREConfig applies an alias after its field, so an alias from an earlier source
        # would otherwise win over the field named by a later one.
        updates.update({FIELD_OF_ALIAS.get(name, name): value for name, value in source.items()})
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


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
