"""Model cards: a saved checkpoint gets a card with model-index results, the remote-code loading snippet and the
diagnostics; the card round-trips through `ModelCard.load`, offline."""

import json
import sys

import pytest
import scripts
import torch
from helpers import tiny_model
from huggingface_hub import ModelCard

from more_tools import cards, evaluation
from more_tools.data import build_reasoning_dataset, train_bpe_tokenizer
from more_tools.training import DataArguments


REPO_ID = "your-name/more-tiny"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny sequential-expert checkpoint saved with its tokenizer, and its `evaluate_model` results."""
    data = build_reasoning_dataset(["babi1", "algebra"], num_train=100, num_validation=0, num_test=4, seed=0)
    tokenizer = train_bpe_tokenizer(data["train"]["text"], vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), expert_type="sequential", max_position_embeddings=256)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    args = evaluation.EvaluationArguments(recurrent_steps_sweep="1,2", moe_iterations_sweep="1", throughput_repeats=1)
    results = evaluation.evaluate_model(model, tokenizer, data["test"], args, DataArguments(max_length=256))
    return path, json.loads(json.dumps(results))  # as read back from eval_results.json


def test_card_round_trips_with_model_index(evaluated):
    path, results = evaluated
    card_path = cards.save_model_card(path, results, repo_id=REPO_ID)
    assert card_path == path / "README.md"
    card = ModelCard.load(card_path)

    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "sequential" in card.data.tags and "custom_code" in card.data.tags
    assert card.data.model_name == "more-tiny"
    scores = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores == {
        ("babi1", "exact_match"): results["exact_match"]["babi1"],
        ("algebra", "exact_match"): results["exact_match"]["algebra"],
        (None, "perplexity"): results["perplexity"],
    }
    assert all(r.dataset_split == "test" and r.task_type == "text-generation" for r in card.data.eval_results)
    # Regenerating from the loaded card's text gives the same card.
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()


def test_card_text_has_loading_snippet_depth_and_diagnostics(evaluated):
    path, results = evaluated
    card = cards.build_model_card(results, REPO_ID, training_data="Forty babi1 stories.")
    text = card.text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "num_recurrent_steps=16" in text and "num_moe_iterations=2" in text
    assert "Forty babi1 stories." in text
    assert "num_recurrent_steps=1" in text and "num_recurrent_steps=2" in text  # the depth sweep table
    assert "load CV" in text and "state change per step" in text and "healthy" in text
    assert "{{" not in text, "every template variable is filled"
    # The prompt of the snippet is valid Python: it runs against the checkpoint.
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0].replace(REPO_ID, str(path))
    namespace = {}
    exec(snippet, namespace)  # noqa: S102 - our own template
    assert isinstance(namespace["output"], torch.Tensor)


def test_card_cli_writes_the_card_without_pushing(evaluated, tmp_path, monkeypatch):
    path, results = evaluated
    results_file = tmp_path / "eval_results.json"
    results_file.write_text(json.dumps(results))
    monkeypatch.setattr(sys, "argv", ["model_card_more.py", f"--model_dir={path}", f"--results_file={results_file}"])
    scripts.load("model_card_more").main()
    card = ModelCard.load(path / "README.md")
    assert card.data.model_name == path.name
