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
tokenizer and a model-card stub, and loads with `AutoModelForCausalLM` / `AutoTokenizer`. The pieces other scripts
share live in `more_tools`: `ModelArguments` and the config / model building in `more_tools.models`, `PRESETS`,
`DataArguments`, the datasets, `MoRETrainer` and `CurriculumCallback` in `more_tools.training`.
"""

import logging
import math
import sys

import datasets
import transformers
from transformers import (
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from more_tools.cards import write_model_card_stub
from more_tools.metrics import exact_match_metrics
from more_tools.models import ModelArguments, ShardedModelParallelismConfig, build_config, build_tokenizer, load_model
from more_tools.training import (
    CurriculumCallback,
    DataArguments,
    MoRETrainer,
    build_datasets,
    collate,
    data_summary,
    load_raw_datasets,
    parse_curriculum,
    resume_checkpoint,
)


logger = logging.getLogger(__name__)


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

    resume = resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
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
