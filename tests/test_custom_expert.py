"""A researcher's own expert type: one class plus `modeling_more.register_expert`, no edit of the model files. The
toy expert of the README (tests/toy_expert.py) is built, initialised, trained, saved, loaded and generated with."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_config
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
    configuration_more.EXPERT_TYPES.remove("toy")


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
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert code.strip() in readme
