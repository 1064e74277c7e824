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
tokenizer and a model-card stub, and loads with `AutoModelForCausalLM` / `AutoTokenizer`. The training pieces other
scripts share (`PRESETS`, `DataArguments`, `load_raw_datasets`, `build_datasets`, `MoRETrainer`, `CurriculumCallback`)
live in `more_tools.training`.
"""

import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from accelerate import ParallelismConfig
from accelerate.utils import DistributedType
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)
from transformers.distributed import DistributedConfig
from transformers.integrations import is_deepspeed_zero3_enabled

import modeling_more  # registers MoRE with the Auto classes
from configuration_more import EXPERT_TYPES, ROUTER_TYPES, MoREConfig
from more_tools.cards import write_model_card_stub
from more_tools.data import load_tokenizer, train_bpe_tokenizer
from more_tools.metrics import exact_match_metrics
from more_tools.training import (
    PRESETS,
    CurriculumCallback,
    DataArguments,
    MoRETrainer,
    build_datasets,
    collate,
    data_summary,
    last_complete_checkpoint,
    load_raw_datasets,
    parse_curriculum,
)


logger = logging.getLogger(__name__)

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
