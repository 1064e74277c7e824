"""Evaluation: the local `evaluate` metric modules on hand-made inputs, `examples/evaluate_more.py` on a tiny saved
model (every output field, JSON, Markdown, plots), parameter counting, and the lm-evaluation-harness task files."""

import json
import math
import os
import sys

import evaluate
import numpy as np
import pytest
import scripts
import torch
from helpers import tiny_model
from transformers import AutoModelForCausalLM

import modeling_more  # noqa: E402
from configuration_more import MoREConfig  # noqa: E402
from more_tools import evaluation
from more_tools.data import TASK_GENERATORS, build_reasoning_dataset, load_tokenizer, train_bpe_tokenizer
from more_tools.evaluation import export_test_split
from more_tools.metrics import healthy_ranges
from more_tools.training import DataArguments


METRICS = os.path.join(scripts.EXAMPLES, "metrics")
LM_EVAL_TASKS = os.path.join(scripts.EXAMPLES, "lm_eval_tasks")
TASKS = ("babi1", "babi2", "arithmetic")


# ---------------------------------------------------------------------------------------------------------------------
# answer_accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_answer_accuracy_known_values():
    metric = evaluate.load(os.path.join(METRICS, "answer_accuracy"))
    predictions = [" Kitchen.\n2 Mary went", " 12", "garden", " n,w\n", " -3"]
    references = ["kitchen", "13", "garden", "n,w", "-3"]
    tasks = ["babi1", "arithmetic", "babi1", "babi19", "algebra"]
    result = metric.compute(predictions=predictions, references=references, tasks=tasks)
    assert result["exact_match"] == pytest.approx(0.8)
    assert result["num_examples"] == 5
    assert result["per_task"] == {"babi1": 1.0, "arithmetic": 0.0, "babi19": 1.0, "algebra": 1.0}
    # add_batch accumulates like one compute call.
    for prediction, reference in zip(predictions, references, strict=True):
        metric.add_batch(predictions=[prediction], references=[reference])
    assert metric.compute()["exact_match"] == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------------------------------
# expert_utilization
# ---------------------------------------------------------------------------------------------------------------------


def test_expert_utilization_balanced_and_collapsed_assignments():
    metric = evaluate.load(os.path.join(METRICS, "expert_utilization"), "expert_ids")
    balanced = [[e] for e in range(4)] * 5
    collapsed = [[0]] * 20
    result = metric.compute(expert_ids=balanced + collapsed, layers=[0] * 20 + [1] * 20, num_experts=4)
    good, bad = result["per_layer"][0], result["per_layer"][1]
    assert good["load"] == [0.25] * 4
    assert good["load_cv"] == pytest.approx(0.0)
    assert good["effective_experts"] == pytest.approx(4.0)
    assert good["max_min_load_ratio"] == pytest.approx(1.0)
    assert all(good["checks"].values())
    assert bad["load"] == [1.0, 0.0, 0.0, 0.0]
    assert bad["load_cv"] == pytest.approx(math.sqrt(3))  # std of (1, 0, 0, 0) / its mean 1/4
    assert bad["effective_experts"] == pytest.approx(1.0)
    assert bad["max_min_load_ratio"] == math.inf
    assert bad["max_load_ratio"] == pytest.approx(4.0) and bad["min_load_ratio"] == 0.0
    assert not any(bad["checks"].values())
    assert result["health_score"] == pytest.approx(50.0)
    assert result["checks_passed"] == 4 and result["num_checks"] == 8
    assert result["healthy"] is False
    assert result["effective_experts"] == pytest.approx(2.5)  # mean over the two layers


def test_expert_utilization_hand_computed_load():
    metric = evaluate.load(os.path.join(METRICS, "expert_utilization"), "expert_ids")
    # top-2 assignments: expert 0 four times, expert 1 twice, expert 2 twice, expert 3 never.
    result = metric.compute(expert_ids=[[0, 1], [0, 2], [0, 1], [0, 2]], layers=[3] * 4, num_experts=4)
    layer = result["per_layer"][3]
    np.testing.assert_allclose(layer["load"], [0.5, 0.25, 0.25, 0.0])
    assert layer["effective_experts"] == pytest.approx(1 / (0.25 + 0.0625 + 0.0625))
    assert layer["load_cv"] == pytest.approx(np.std([0.5, 0.25, 0.25, 0.0]) / 0.25)


def test_expert_utilization_from_logits_matches_routing_statistics():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, generator=generator) * 2
    mask = torch.rand(64, generator=generator) > 0.2
    metric = evaluate.load(os.path.join(METRICS, "expert_utilization"))
    result = metric.compute(router_logits=logits[mask].numpy(), layers=[0] * int(mask.sum()), top_k=2)
    expected = modeling_more.routing_statistics(logits, 2, mask)
    layer = result["per_layer"][0]
    np.testing.assert_allclose(layer["load"], expected["load"].numpy(), atol=1e-6)
    for name in ("load_cv", "max_min_load_ratio", "effective_experts", "router_entropy", "max_prob"):
        assert layer[name] == pytest.approx(float(expected[name]), rel=1e-5), name


def test_expert_utilization_healthy_ranges_are_the_guides_for_eight_experts():
    ranges = healthy_ranges(8)
    assert ranges == {
        "load_cv": (0.0, 0.3),
        "max_load_ratio": (0.8, 1.5),
        "min_load_ratio": (0.5, 1.2),
        "effective_experts": (6.0, 8.0),
        "router_entropy": (1.5, 2.8),
    }
    four = healthy_ranges(4)
    assert four["effective_experts"] == (3.0, 4.0)
    assert four["router_entropy"][0] == pytest.approx(1.5 * math.log(4) / math.log(8))


def test_expert_ids_config_needs_the_number_of_experts():
    metric = evaluate.load(os.path.join(METRICS, "expert_utilization"), "expert_ids")
    with pytest.raises(ValueError, match="num_experts"):
        metric.compute(expert_ids=[[0]], layers=[0])


# ---------------------------------------------------------------------------------------------------------------------
# evaluate_more.py
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_type", ["ffn", "shared_recurrent"])
def test_count_parameters_active_excludes_unrouted_experts_only(expert_type):
    model = tiny_model(expert_type=expert_type, num_experts=4, num_experts_per_tok=1)
    counts = evaluation.count_parameters(model)
    d, f, f_r, layers, experts = 32, 64, 64, 2, 4
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Per expert: a gated FFN (ffn), the two d x d projections around the shared engine (shared_recurrent).
    per_expert = 3 * d * f if expert_type == "ffn" else 2 * d * d
    assert counts["total"] - counts["active"] == layers * (experts - 1) * per_expert
    if expert_type == "shared_recurrent":  # the engine is used by every token: it stays active
        engine = 6 * d * d + 3 * d * f_r + 4 * d
        assert counts["active"] >= layers * engine


def test_peak_memory_grows_with_the_batch():
    model = tiny_model()
    small = {"input_ids": torch.randint(3, 100, (1, 16)), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    large = {"input_ids": torch.randint(3, 100, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert weights_mb < evaluation.peak_memory_mb(model, small) < evaluation.peak_memory_mb(model, large)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny recurrent MoRE (2 MoE iterations) and a tokenizer trained on the tasks, saved to disk."""
    data = build_reasoning_dataset(list(TASKS), num_train=150, num_validation=0, num_test=0, seed=0)
    tokenizer = train_bpe_tokenizer(data["train"]["text"], vocab_size=300)
    config = MoREConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        expert_type="recurrent",
        num_recurrent_steps=3,
        num_moe_iterations=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("checkpoint")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_diagnostics_do_not_depend_on_the_batch_size(checkpoint):
    """The same examples in one batch, in 32 + 1 (a trailing batch of one) and in 3 x 11: every summary agrees
    (the recurrence statistics were once plain means of batch means, so the one-example batch counted 32x)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = load_tokenizer(checkpoint)
    data = build_reasoning_dataset(list(TASKS), num_train=0, num_validation=0, num_test=33, seed=1)["test"]
    results = [
        evaluation.perplexity_and_diagnostics(
            model, evaluation.text_batches(data, tokenizer, size, 256, "cpu", answer_only=True)
        )
        for size in (33, 32, 11)
    ]
    for other in results[1:]:
        assert other["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-5)
        for got, expected in zip(other["recurrence"], results[0]["recurrence"], strict=True):
            for name, value in expected.items():
                assert np.allclose(got[name], value, rtol=1e-5, atol=1e-6), name


def test_evaluate_more_writes_every_output(checkpoint, tmp_path, monkeypatch):
    output_dir = tmp_path / "eval"
    argv = [
        "evaluate_more.py",
        f"--model_name_or_path={checkpoint}",
        f"--output_dir={output_dir}",
        f"--tasks={','.join(TASKS)}",
        "--num_train_examples=60",
        "--num_validation_examples=0",
        "--num_test_examples=6",
        "--recurrent_steps_sweep=1,2",
        "--moe_iterations_sweep=1,2",
        "--throughput_repeats=1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    scripts.load("evaluate_more").main()

    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["config"]["expert_type"] == "recurrent"
    assert 0 < results["parameters"]["active"] < results["parameters"]["total"]
    assert 1 < results["perplexity"] < float("inf") and results["perplexity_on"] == "answers"
    assert set(results["majority_baseline"]) == {*TASKS, "mean"}
    assert set(results["exact_match"]) == {*TASKS, "mean"}
    assert results["exact_match"]["mean"] == pytest.approx(np.mean([results["exact_match"][t] for t in TASKS]))
    assert results["multihop_accuracy"] == results["exact_match"]["babi2"]
    assert results["arithmetic_accuracy"] == results["exact_match"]["arithmetic"]
    assert results["tokens_per_second"] > 0 and results["peak_memory_mb"] > 0
    sweep = results["depth_sweep"]
    assert set(sweep) == {"num_recurrent_steps", "num_moe_iterations"}
    assert set(sweep["num_recurrent_steps"]) == {"1", "2"} and set(sweep["num_moe_iterations"]) == {"1", "2"}
    # routing and recurrence: one row per MoE layer x iteration, in output order.
    assert [(r["layer"], r["iteration"]) for r in results["routing"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in results["routing"]:
        assert sum(row["load"]) == pytest.approx(1.0)
        assert 1 <= row["effective_experts"] <= 4 and 0 <= row["router_entropy"] <= math.log(4) + 1e-6
    for row in results["recurrence"]:
        assert row["steps"] == 3 and len(row["state_change"]) == 3
    utilization = results["expert_utilization"]
    assert {"load_cv", "effective_experts", "health_score", "healthy"} <= set(utilization)
    assert {"mean_state_change", "routing_entropy_mean", "routing_maxprob_trend"} <= set(
        results["architecture_checks"]
    )
    assert 0 <= results["health_score"] <= 100
    assert results["evaluation"]["tasks"] == ",".join(TASKS)

    report = (output_dir / "eval_results.md").read_text()
    for heading in ("Exact match by task", "Test-time compute", "Expert utilisation", "Recurrence", "Health"):
        assert heading in report
    for plot in ("accuracy_vs_depth.png", "expert_load.png", "routing_entropy.png"):
        assert (output_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "model-index" in (checkpoint / "README.md").read_text()


def test_depth_sweep_skips_recurrent_steps_for_experts_without_a_step_loop(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    model = tiny_model(vocab_size=len(tokenizer), expert_type="parallel", max_position_embeddings=256)
    test = build_reasoning_dataset(["babi1"], num_train=0, num_validation=0, num_test=2, seed=0)["test"]
    args = evaluation.EvaluationArguments(recurrent_steps_sweep="1,2", moe_iterations_sweep="1,3")
    sweep = evaluation.depth_sweep(model, tokenizer, test, args, max_new_tokens=4)
    assert set(sweep) == {"num_moe_iterations"} and set(sweep["num_moe_iterations"]) == {1, 3}


# ---------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks
# ---------------------------------------------------------------------------------------------------------------------


def test_lm_eval_yaml_for_every_task_and_both_variants():
    files = set(os.listdir(LM_EVAL_TASKS))
    for variant in ("", "_loglikelihood"):
        group = open(os.path.join(LM_EVAL_TASKS, f"more_reasoning{variant}.yaml")).read()
        for task in TASK_GENERATORS:
            name = f"more_{task}{variant}"
            assert f"{name}.yaml" in files
            text = open(os.path.join(LM_EVAL_TASKS, f"{name}.yaml")).read()
            assert f"task: {name}\n" in text and f"outputs/lm_eval_data/{task}.jsonl" in text
            assert f"  - {name}\n" in group


def test_export_writes_the_test_split_as_jsonl(tmp_path):
    data_args = DataArguments(
        tasks="babi1,algebra", num_train_examples=0, num_validation_examples=0, num_test_examples=6, dataset_seed=3
    )
    paths = export_test_split(data_args, tmp_path)
    test = build_reasoning_dataset(["babi1", "algebra"], num_train=0, num_validation=0, num_test=6, seed=3)["test"]
    rows = [json.loads(line) for task in ("babi1", "algebra") for line in paths[task].read_text().splitlines()]
    expected = [{key: example[key] for key in ("task", "prompt", "answer")} for example in test]
    assert sorted(rows, key=str) == sorted(expected, key=str)


def test_lm_eval_loads_the_tasks(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # the YAMLs read outputs/lm_eval_data relative to the working directory
    export_test_split(DataArguments(tasks="babi1,arithmetic", num_test_examples=4), "outputs/lm_eval_data")
    tasks = TaskManager(include_path=LM_EVAL_TASKS).load(["more_babi1", "more_arithmetic_loglikelihood"])["tasks"]
    babi1, arithmetic = tasks["more_babi1"], tasks["more_arithmetic_loglikelihood"]
    assert babi1.OUTPUT_TYPE == "generate_until" and arithmetic.OUTPUT_TYPE == "loglikelihood"
    docs = list(babi1.test_docs())
    assert len(docs) == 2 and babi1.doc_to_text(docs[0]).endswith("Answer:")
    assert babi1.doc_to_target(docs[0]) == docs[0]["answer"]  # the exact-match reference
    # The scored continuation is " <answer>", as in training (lm-eval adds no delimiter to it).
    doc = next(iter(arithmetic.test_docs()))
    request = arithmetic.construct_requests(doc, arithmetic.doc_to_text(doc))
    assert request.arguments == (doc["prompt"], " " + doc["answer"])
