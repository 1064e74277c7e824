"""The comparison job (`examples/compare_more.py`): size matching, the §5.3 table for every registered expert type
(smoke preset), its files, and the improvement arithmetic."""

import json
import os
import sys

import pytest


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)

import compare_more  # noqa: E402
import modeling_more  # noqa: E402


class _Tokenizer:
    """What `build_config` reads from a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self):
        return 300


def _config(name):
    preset = compare_more.PRESETS["smoke"]
    overrides = compare_more.comparison_variants()[name]
    return compare_more.variant_config(preset, overrides, _Tokenizer(), max_length=160)


def test_variants_cover_every_expert_type_synthesis2_and_recurrent_routers():
    variants = compare_more.comparison_variants()
    assert next(iter(variants)) == compare_more.BASELINE
    assert {v["expert_type"] for v in variants.values()} == set(modeling_more.EXPERT_REGISTRY)
    for name in modeling_more.EXPERT_REGISTRY:
        assert variants[name] == {"expert_type": name}
    assert any(v.get("num_moe_iterations", 1) > 1 for v in variants.values())
    assert {"gru", "gru_token"} <= {v.get("router_type") for v in variants.values()}


@pytest.mark.parametrize("which", ["active", "total"])
def test_matched_configs_are_within_one_percent_of_the_baseline(which):
    target = compare_more.parameter_counts(_config("ffn"))[which]
    for name in compare_more.comparison_variants():
        config = _config(name)
        matched = compare_more.matched_config(config, target, which)
        assert compare_more.parameter_counts(matched)[which] == pytest.approx(target, rel=0.01), name
        # Only the size knob moved.
        knob = compare_more.size_knob(config.expert_type)
        changed = {k for k, v in matched.to_dict().items() if config.to_dict()[k] != v}
        assert changed <= {knob}, (name, changed)


def test_shared_recurrent_grows_its_engine_to_match_total_parameters():
    target = compare_more.parameter_counts(_config("ffn"))
    by_active = compare_more.matched_config(_config("shared_recurrent"), target["active"], "active")
    by_total = compare_more.matched_config(_config("shared_recurrent"), target["total"], "total")
    # One engine serves all experts: at equal total size it is much wider and every token uses all of it.
    assert by_total.recurrent_intermediate_size > 4 * by_active.recurrent_intermediate_size
    assert compare_more.parameter_counts(by_total)["active"] > target["active"]


def test_variant_configs_follow_train_more():
    config = _config("ffn_gru_token_router")
    assert (config.expert_type, config.router_type, config.num_moe_iterations) == ("ffn", "gru_token", 1)
    assert config.hidden_size == 32 and config.router_hidden_size == 16  # the smoke preset's config_overrides
    assert config.vocab_size == 300 and config.max_position_embeddings == 160
    assert _config("ffn_synthesis2").num_moe_iterations == 2


def test_relative_change_is_the_guides_improvement():
    assert compare_more.relative_change(0.6, 0.4) == pytest.approx(50.0)
    assert compare_more.relative_change(9.0, 10.0) == pytest.approx(-10.0)
    assert compare_more.relative_change(0.5, 0.0) is None and compare_more.relative_change(None, 0.5) is None


def _run(tmp_path, monkeypatch, *extra):
    output_dir = tmp_path / "compare"
    argv = ["compare_more.py", "--preset=smoke", f"--output_dir={output_dir}", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    compare_more.main()
    return output_dir, json.loads((output_dir / "comparison.json").read_text())


def _check_outputs(output_dir, comparison, variants):
    results = comparison["results"]
    assert list(results) == variants
    baseline_active = results["ffn"]["parameters"]["active"]
    for name, result in results.items():
        assert result["parameters"]["active"] == pytest.approx(baseline_active, rel=0.01), name
        for key in ("perplexity", "tokens_per_second", "peak_memory_mb", "health_score", "train_seconds"):
            assert result[key] is not None and result[key] > 0, (name, key)
        assert set(result["exact_match"]) == {"babi1", "babi2", "arithmetic", "mean"}
        variant_dir = output_dir / name
        for file in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "eval_results.json"):
            assert (variant_dir / file).exists(), (name, file)
    assert set(comparison["majority_baseline"]) == {"babi1", "babi2", "arithmetic", "mean"}
    report = (output_dir / "comparison.md").read_text()
    table = report.split("\n\n")[2].splitlines()
    assert table[0].startswith("| variant | experts | router | T | total params | active params |")
    assert [line.split(" | ")[0].strip("| ") for line in table[2:]] == variants
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "majority baseline" in report and "Test-time compute" in report
    assert set(comparison["training_logs"]) == set(variants)
    assert all("lm_loss" in entry and "load_cv" in entry for entry in comparison["training_logs"]["ffn"])
    for plot in ("accuracy.png", "depth.png", "training.png"):
        assert (output_dir / plot).read_bytes()[:4] == b"\x89PNG"


def test_compare_smoke_preset_every_variant(tmp_path, monkeypatch):
    output_dir, comparison = _run(tmp_path, monkeypatch, "--max_steps=2")
    _check_outputs(output_dir, comparison, list(compare_more.comparison_variants()))
    results = comparison["results"]
    assert results["ffn_synthesis2"]["config"]["num_moe_iterations"] == 2
    assert results["recurrent_gru_router"]["config"]["router_type"] == "gru"
    assert "num_recurrent_steps" in results["recurrent"]["depth_sweep"]
    assert "num_recurrent_steps" not in results["ffn"]["depth_sweep"]
    assert comparison["run"]["max_steps"] == 2


def test_compare_subset_of_variants(tmp_path, monkeypatch):
    output_dir, comparison = _run(tmp_path, monkeypatch, "--variants=sandwich,ffn", "--max_steps=1")
    # The baseline sets the size target whether or not it runs first.
    _check_outputs(output_dir, comparison, ["sandwich", "ffn"])


def test_unknown_variant_and_match_mode_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid variants"):
        _run(tmp_path, monkeypatch, "--variants=ffn,lstm")
    with pytest.raises(ValueError, match="active' or 'total'"):
        _run(tmp_path, monkeypatch, "--match_parameters=flops")
