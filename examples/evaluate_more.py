"""Evaluate a saved MoRE model on the embedded reasoning tasks: perplexity, per-task exact match, a test-time-compute
sweep over recurrence depth, the research guide's architecture diagnostics (§5.1, §5.2), throughput and peak memory.

Writes `eval_results.json`, `eval_results.md` and plots (accuracy vs depth, expert load, routing entropy) to
`--output_dir`, and fills the checkpoint's model card (`README.md` in the model directory).

    python examples/evaluate_more.py --model_name_or_path outputs/more --output_dir outputs/more/eval
    python examples/evaluate_more.py --model_name_or_path outputs/more --output_dir outputs/more/eval \\
        --recurrent_steps_sweep 1,2,4,8,16 --moe_iterations_sweep 1,2,3
    python examples/evaluate_more.py eval_args.json          # the same arguments from a JSON file

The data arguments are those of `train_more.py` (`--tasks`, `--num_test_examples`, `--dataset_seed`, `--babi_dir`,
`--max_length`, `--answer_only_loss`, ...): with the values used for training, the test split is exactly the held-out
split the model never saw, and perplexity covers the tokens the model was trained on (the answers by default).
"""

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)
from more_tools.cards import save_model_card
from more_tools.data import load_tokenizer
from more_tools.evaluation import EvaluationArguments, evaluate_model, write_outputs
from more_tools.metrics import majority_baseline
from more_tools.training import DataArguments, load_raw_datasets


logger = logging.getLogger(__name__)


@dataclass
class CheckpointArguments:
    model_name_or_path: str = field(metadata={"help": "Directory of a saved MoRE model and its tokenizer."})
    output_dir: str = field(metadata={"help": "Where the JSON, Markdown and plots go."})
    write_model_card: bool = field(
        default=True, metadata={"help": "Fill README.md in the model directory with these results."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository id shown in the model card's loading snippet."}
    )


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser((CheckpointArguments, DataArguments, EvaluationArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        checkpoint_args, data_args, eval_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        checkpoint_args, data_args, eval_args = parser.parse_args_into_dataclasses()
    if data_args.is_corpus:
        raise ValueError("evaluate_more.py scores reasoning tasks (exact match); a text corpus has no answers")
    set_seed(data_args.dataset_seed)

    raw_datasets = load_raw_datasets(data_args)
    tokenizer = load_tokenizer(checkpoint_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_args.model_name_or_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    logger.info("Evaluating %s on %d test examples", checkpoint_args.model_name_or_path, len(raw_datasets["test"]))
    results = evaluate_model(model, tokenizer, raw_datasets["test"], eval_args, data_args)
    results["majority_baseline"] = majority_baseline(raw_datasets["train"], raw_datasets["test"])
    results["evaluation"] = {**asdict(data_args), **asdict(eval_args)}
    write_outputs(results, checkpoint_args.output_dir)
    logger.info(
        "perplexity (%s) %.3f, exact match %.3f (majority baseline %.3f), %.0f tokens/s",
        results["perplexity_on"],
        results["perplexity"],
        results["exact_match"]["mean"],
        results["majority_baseline"]["mean"],
        results["tokens_per_second"],
    )
    if checkpoint_args.write_model_card and Path(checkpoint_args.model_name_or_path).is_dir():
        save_model_card(checkpoint_args.model_name_or_path, results, repo_id=checkpoint_args.hub_model_id)


if __name__ == "__main__":
    main()
