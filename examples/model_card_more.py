"""Write the model card of an evaluated MoRE checkpoint (`more_tools.cards`), and optionally push the whole
checkpoint (weights, code, tokenizer, card) to the Hub.

    python examples/model_card_more.py --model_dir outputs/more --results_file outputs/more/eval/eval_results.json
    python examples/model_card_more.py --model_dir outputs/more --results_file outputs/more/eval/eval_results.json \\
        --hub_model_id your-name/more-recurrent --push_to_hub
"""

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi
from transformers import HfArgumentParser

from more_tools.cards import save_model_card


logger = logging.getLogger(__name__)


@dataclass
class CardArguments:
    model_dir: str = field(metadata={"help": "Saved MoRE checkpoint (save_pretrained output with its tokenizer)."})
    results_file: str = field(metadata={"help": "eval_results.json written by evaluate_more.py for this checkpoint."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id, e.g. your-name/more-small."})
    training_data: str | None = field(default=None, metadata={"help": "Training data description for the card."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the checkpoint directory (card included) to --hub_model_id."}
    )
    private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser(CardArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    results = json.loads(Path(args.results_file).read_text())
    save_model_card(args.model_dir, results, repo_id=args.hub_model_id, training_data=args.training_data)
    if args.push_to_hub:
        if args.hub_model_id is None:
            raise ValueError("--push_to_hub needs --hub_model_id")
        api = HfApi()
        api.create_repo(args.hub_model_id, private=args.private, exist_ok=True)
        api.upload_folder(folder_path=args.model_dir, repo_id=args.hub_model_id, commit_message="Upload MoRE model")
        logger.info("Pushed %s to https://huggingface.co/%s", args.model_dir, args.hub_model_id)


if __name__ == "__main__":
    main()
