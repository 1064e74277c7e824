"""Write the test split of the embedded reasoning tasks as JSONL files for lm-evaluation-harness (one file per task,
`{"task", "prompt", "answer"}` per line), where the task YAMLs of this directory read them.

    python examples/lm_eval_tasks/export_more_tasks.py                 # -> outputs/lm_eval_data/<task>.jsonl
    lm_eval --model hf --model_args pretrained=outputs/more,trust_remote_code=True,add_bos_token=True \\
        --include_path examples/lm_eval_tasks --tasks more_reasoning,more_reasoning_loglikelihood

The data arguments are `train_more.py`'s (`--tasks`, `--num_test_examples`, `--dataset_seed`, `--babi_dir`): with the
values used for training, the files hold the test split the model never saw, the one `evaluate_more.py` scores.
"""

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from more_tools.evaluation import export_test_split
from more_tools.training import DataArguments


logger = logging.getLogger(__name__)


@dataclass
class ExportArguments:
    output_dir: str = field(
        default="outputs/lm_eval_data", metadata={"help": "Where the JSONL files go (the YAMLs read this path)."}
    )


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
