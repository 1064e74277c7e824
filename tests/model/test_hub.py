"""save_pretrained / from_pretrained: files written, identical logits, tied weights, and remote code loading in a
fresh process where MoRE is not importable."""

import json
import os
import sys

import pytest
import torch
from helpers import EXPERT_ROUTER_PAIRS, MODEL_CASES, REPO_ROOT, random_ids, run_without_project, tiny_model
from transformers import AutoModelForCausalLM

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)


def _save(tmp_path, name="ckpt", **overrides):
    model = tiny_model(num_experts_per_tok=2, **overrides)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def test_save_writes_weights_config_and_code(tmp_path):
    _, path = _save(tmp_path)
    files = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "configuration_more.py", "modeling_more.py"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "more"
    auto_map = config["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_more.MoREConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_more.MoREForCausalLM"
    # The copied code is the project's code.
    for name in ("configuration_more.py", "modeling_more.py"):
        with open(os.path.join(REPO_ROOT, name)) as source:
            assert (path / name).read_text() == source.read()


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_round_trip_logits_and_tied_weights(tmp_path, expert_type, router_type, iterations):
    model, path = _save(tmp_path, expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert type(loaded) is type(model)
    assert not loaded.training
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # Non-persistent buffers (rotary frequencies) are not in the checkpoint: loading must rebuild them.
    loaded_buffers = dict(loaded.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(loaded_buffers[name], buffer), f"buffer {name} differs after from_pretrained"
    ids = random_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_untied_round_trip(tmp_path):
    model, path = _save(tmp_path, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


REMOTE_SCRIPT = """
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM

ids = torch.load(sys.argv[2])
for path in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "modeling_more" not in sys.modules
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model(ids).logits
    torch.save(logits, os.path.join(path, "remote_logits.pt"))
print("ok")
"""


# Loading an `ffn` checkpoint with these overrides leaves backbone weights missing or unused (same-named weights of
# another shape fail in Transformers' own size check).
OTHER_ARCHITECTURES = [
    {"expert_type": "recurrent"},
    {"expert_type": "sandwich"},
    {"expert_type": "parallel"},
    {"router_type": "gru"},
    {"mlp_only_layers": [0]},
]


@pytest.mark.parametrize("overrides", OTHER_ARCHITECTURES, ids=[str(o) for o in OTHER_ARCHITECTURES])
def test_checkpoint_of_another_architecture_is_refused(tmp_path, overrides):
    _, path = _save(tmp_path)
    with pytest.raises(ValueError, match="do not fit the model its config builds"):
        AutoModelForCausalLM.from_pretrained(path, **overrides)
    # Asked for the report, the caller decides.
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **overrides)
    assert info["missing_keys"] or info["unexpected_keys"]


def test_base_model_checkpoint_loads_with_a_new_head(tmp_path):
    """A backbone saved alone (`MoREModel`) loads into `MoREForCausalLM`, the untied head initialised."""
    model = tiny_model(tie_word_embeddings=False)
    model.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, param in model.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], param, atol=0, rtol=0)


def test_fresh_process_keeps_an_environment_inside_the_repository(tmp_path):
    """A virtual environment inside the repository (a `.venv` there) keeps its packages in the process that cannot
    import MoRE: here the running environment lies inside the directory passed as the repository."""
    environment_parent = os.path.dirname(os.path.realpath(sys.prefix))
    result = run_without_project("import torch, transformers\nprint('ok')", [], tmp_path, repo_root=environment_parent)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_remote_code_in_fresh_process(tmp_path):
    """Load every checkpoint with `trust_remote_code=True` in a subprocess that cannot import the project."""
    pairs = EXPERT_ROUTER_PAIRS
    expected, paths = {}, []
    ids = random_ids(2, 8)
    for expert_type, router_type in pairs:
        model, path = _save(tmp_path, f"{expert_type}-{router_type}", expert_type=expert_type, router_type=router_type)
        with torch.no_grad():
            expected[path] = model(ids).logits
        paths.append(path)
    torch.save(ids, tmp_path / "ids.pt")
    result = run_without_project(REMOTE_SCRIPT, [tmp_path / "ids.pt", *paths], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout
    for path in paths:
        remote = torch.load(path / "remote_logits.pt")
        torch.testing.assert_close(remote, expected[path], atol=1e-6, rtol=0, msg=lambda m, p=path: f"{p.name}: {m}")
