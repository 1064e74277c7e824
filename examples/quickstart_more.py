"""Build a tiny MoRE model, train it a few steps on the embedded reasoning data, save it and generate.

python examples/quickstart_more.py                      # defaults below
python examples/quickstart_more.py --expert_type sandwich --max_steps 50
python examples/quickstart_more.py args.json            # the same arguments from a JSON file
"""

import logging
import sys
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)
from configuration_more import EXPERT_TYPES, ROUTER_TYPES, MoREConfig
from more_tools.data import build_reasoning_dataset, tokenize_qa, train_bpe_tokenizer


logger = logging.getLogger(__name__)


@dataclass
class QuickstartArguments:
    expert_type: str = field(default="recurrent", metadata={"help": f"One of {list(EXPERT_TYPES)}."})
    router_type: str = field(default="linear", metadata={"help": f"One of {ROUTER_TYPES}."})
    tasks: str = field(default="babi1,arithmetic", metadata={"help": "Comma-separated embedded task names."})
    num_train_examples: int = field(default=2000, metadata={"help": "Generated training examples."})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_experts: int = field(default=4, metadata={"help": "Experts per MoE layer."})
    num_recurrent_steps: int = field(default=2, metadata={"help": "Expert recurrence depth at inference."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Examples per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    max_length: int = field(default=160, metadata={"help": "Tokens per example (longer are truncated)."})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "Where the model and tokenizer go."})
    seed: int = field(default=0, metadata={"help": "Seed for data, init and training."})


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser(QuickstartArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    set_seed(args.seed)

    data = build_reasoning_dataset(
        args.tasks.split(","), num_train=args.num_train_examples, num_validation=50, num_test=50, seed=args.seed
    )
    tokenizer = train_bpe_tokenizer(data["train"]["text"], vocab_size=512)
    config = MoREConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=4,
        num_experts=args.num_experts,
        expert_type=args.expert_type,
        router_type=args.router_type,
        num_recurrent_steps=args.num_recurrent_steps,
        train_recurrent_steps_min=1,
        train_recurrent_steps_max=args.num_recurrent_steps,
        max_position_embeddings=args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    logger.info(f"MoRE {args.expert_type}/{args.router_type}: {model.num_parameters():,} parameters")

    train = tokenize_qa(data["train"], tokenizer, max_length=args.max_length, answer_only_loss=False)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
    )
    keep = ["input_ids", "attention_mask", "labels"]
    train = train.remove_columns([c for c in train.column_names if c not in keep])
    Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator).train()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)

    model.eval()
    for example in data["validation"].select(range(3)):
        inputs = tokenizer(tokenizer.bos_token + example["prompt"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        logger.info(f"[{example['task']}] expected {example['answer']!r}, generated {answer.strip()!r}")
    logger.info(f"Saved model and tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main()
