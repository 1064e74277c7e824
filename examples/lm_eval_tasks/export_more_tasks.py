"""Write the test split of the embedded reasoning tasks as JSONL files for lm-evaluation-harness (one file per task,
`{"task", "prompt", "answer"}` per line), where the task YAMLs of this directory read them.

    python examples/lm_eval_tasks/export_more_tasks.py                 # -> outputs/lm_eval_data/<task>.jsonl
    lm_eval --model hf --model_args pretrained=outputs/more,trust_remote_code=True,add_bos_token=True \\
        --include_path examples/lm_eval_tasks --tasks more_reasoning,more_reasoning_loglikelihood

The data arguments are `train_more.py`'s (`--tasks`, `--num_test_examples`, `--dataset_seed`, `--babi_dir`): with the
values used for training, the files hold the test split the model never saw, the one `evaluate_more.py` scores.
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_more import DataArguments, load_raw_datasets  # noqa: E402


logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    output_dir: str = field(
        default="outputs/lm_eval_data", metadata={"help": "Where the JSONL files go (the YAMLs read this path)."}
    )


def export_test_split(data_args: DataArguments, output_dir: str | Path) -> dict[str, Path]:
    """One `<task>.jsonl` per task of the test split; returns the paths by task."""
    test = load_raw_datasets(data_args)["test"]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[dict]] = {}
    for row in test.select_columns(["task", "prompt", "answer"]):
        by_task.setdefault(row["task"], []).append(row)
    paths = {task: output_dir / f"{task}.jsonl" for task in by_task}
    for task, rows in by_task.items():
        paths[task].write_text("".join(json.dumps(row) + "\n" for row in rows))
    logger.info("Wrote %d test examples of %d tasks to %s", len(test), len(paths), output_dir)
    return paths


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser((DataArguments, ExportArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        data_args, export_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        data_args, export_args = parser.parse_args_into_dataclasses()
    export_test_split(data_args, export_args.output_dir)


if __name__ == "__main__":
    main()
