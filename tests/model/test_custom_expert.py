"""A researcher's own expert type: one class plus `modeling_more.register_expert`, no edit of the model files. The
toy expert of the README (tests/model/toy_expert.py) is built, initialised, trained, saved, loaded and generated
with."""

import importlib
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, random_ids, run_without_project, tiny_config
from transformers import AutoModelForCausalLM

import configuration_more
import modeling_more
from configuration_more import MoREConfig


@pytest.fixture(scope="module")
def toy():
    """Import (so register) the toy expert; unregister afterwards so other test files see the built-in types only."""
    module = (
        importlib.reload(sys.modules["toy_expert"])
        if "toy_expert" in sys.modules
        else importlib.import_module("toy_expert")
    )
    yield module
    modeling_more.EXPERT_REGISTRY.pop("toy")


def test_unknown_expert_type_lists_valid_names():
    with pytest.raises(ValueError, match="expert_type.*'ffn'"):
        tiny_config(expert_type="toy_not_registered")


def test_registration_is_validated(toy):
    assert "toy" in configuration_more.EXPERT_TYPES and modeling_more.EXPERT_REGISTRY["toy"] is toy.ToyExperts
    assert MoREConfig(expert_type="toy").expert_type == "toy"
    with pytest.raises(ValueError, match="MoREExperts"):
        modeling_more.register_expert("not_experts", torch.nn.Linear)
    with pytest.raises(ValueError, match="already registered"):
        modeling_more.register_expert("ffn", toy.ToyExperts)
    modeling_more.register_expert("toy", toy.ToyExperts)  # a re-import registers the same class again: allowed


def test_an_iterating_expert_type_must_count_its_multiply_adds(toy):
    class Uncounted(toy.ToyExperts):
        # Back to the base class's count (every weight once), which would under-count an iterating expert.
        multiply_adds_per_token = classmethod(modeling_more.MoREExperts.multiply_adds_per_token.__func__)

    with pytest.raises(ValueError, match="multiply_adds_per_token"):
        modeling_more.register_expert("uncounted", Uncounted)
    assert "uncounted" not in modeling_more.EXPERT_REGISTRY and "uncounted" not in configuration_more.EXPERT_TYPES


def test_toy_expert_builds_initialises_trains_saves_loads_and_generates(toy, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(expert_type="toy"))
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(isinstance(e, toy.ToyExperts) for e in experts)
    # Its own initialisation hook ran (std 0.5 / sqrt(d) for the recurrent weights, initializer_range otherwise).
    d = model.config.hidden_size
    assert experts[0].w_state.std().item() == pytest.approx(0.5 / math.sqrt(d), rel=0.1)
    assert experts[0].w_input.std().item() == pytest.approx(model.config.initializer_range, rel=0.1)

    # One training step: the expert's regulariser is in the loss, gradients reach its weights, depth is sampled.
    model.train()
    ids = random_ids(2, 8)
    out = model(ids, labels=ids)
    expected = torch.stack([e.regularisation_loss() for e in experts]).mean()
    torch.testing.assert_close(out.expert_loss, expected)
    assert 2 <= float(out.recurrent_steps) <= 4  # the shared step loop's training depth range
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = experts[0].w_state.detach().clone()
    out.loss.backward()
    assert experts[0].w_state.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, experts[0].w_state)

    # Depth is a real knob of the toy (it runs the shared step loop).
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(ids, num_recurrent_steps=1).logits, model(ids, num_recurrent_steps=3).logits)

    # Save / load on the installed path: the registered class is found by name.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[0].mlp.experts, toy.ToyExperts)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)

    # Greedy generation with the cache equals recomputing the whole prefix at every step.
    prompt = ids[:, :5]
    generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False, num_recurrent_steps=3)
    expected_ids = prompt
    with torch.no_grad():
        for _ in range(4):
            next_id = loaded(expected_ids, num_recurrent_steps=3).logits[:, -1].argmax(-1, keepdim=True)
            expected_ids = torch.cat([expected_ids, next_id], dim=1)
    assert torch.equal(generated, expected_ids)


def test_readme_shows_the_toy_expert():
    """The README's example is exactly the tested module (from its imports on)."""
    source = (Path(__file__).parent / "toy_expert.py").read_text()
    code = source[source.index("import math") :]
    readme = (Path(REPO_ROOT) / "README.md").read_text()
    assert code.strip() in readme


REMOTE_SCRIPT = """
assert importlib.util.find_spec("toy_expert") is None, "toy_expert is importable"
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
experts = model.model.layers[0].mlp.experts
assert type(experts).__name__ == "ToyExperts" and type(experts).__module__.startswith("transformers_modules")
ids = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(ids, num_recurrent_steps=3).logits
generated = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, num_recurrent_steps=3)
torch.save({"logits": logits, "generated": generated}, sys.argv[4])
print("ok")
"""


def test_a_custom_expert_checkpoint_loads_with_remote_code_in_a_fresh_process(toy, tmp_path):
    """The expert's module travels with the checkpoint: a process that cannot import MoRE or the toy module loads
    it with `trust_remote_code=True`, with the same logits and the same cached greedy generation."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(expert_type="toy"))
    ids = random_ids(2, 8)
    model.train()
    model(ids, labels=ids).loss.backward()  # a trained-looking checkpoint: one SGD step off the initialisation
    with torch.no_grad():
        for param in model.parameters():
            param -= 0.1 * param.grad
    model.eval()
    path = tmp_path / "toy-checkpoint"
    model.save_pretrained(path)
    files = set(os.listdir(path))
    assert {"toy_expert.py", "modeling_more.py", "configuration_more.py", "more_expert_types.py"} <= files
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "more_expert_types.MoREConfig",
        "AutoModelForCausalLM": "more_expert_types.MoREForCausalLM",
    }
    with torch.no_grad():
        expected_logits = model(ids, num_recurrent_steps=3).logits
    expected_generated = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, num_recurrent_steps=3)

    torch.save(ids, tmp_path / "ids.pt")
    result = run_without_project(REMOTE_SCRIPT, [path, tmp_path / "ids.pt", tmp_path / "out.pt"], tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
    remote = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(remote["logits"], expected_logits, atol=1e-6, rtol=0)
    assert torch.equal(remote["generated"], expected_generated)
