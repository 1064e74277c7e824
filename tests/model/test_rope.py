"""RoPE the Transformers v5 way: `rope_parameters` with Transformers' RoPE types, legacy `rope_theta` configs load."""

import pytest
import torch
from helpers import clone_model, random_ids, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama import modeling_llama

import modeling_more
from configuration_more import MoREConfig


@pytest.mark.parametrize("expert_type", ["ffn", "recurrent"])
def test_dynamic_rope_scaling_changes_only_long_context_logits(expert_type):
    """Dynamic NTK scaling leaves sequences within max_position_embeddings (64) alone and changes longer ones, in the
    backbone and in attention inside recurrent experts."""
    base = tiny_model(expert_type=expert_type)
    scaled = tiny_model(expert_type=expert_type, rope_parameters={"rope_type": "dynamic", "factor": 4.0})
    scaled.load_state_dict(base.state_dict())
    ids = random_ids(1, 96)
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids[:, :48]).logits, base(ids[:, :48]).logits)
        assert not torch.allclose(scaled(ids).logits, base(ids).logits, atol=1e-5)


def test_linear_rope_scaling_reaches_the_experts():
    base = tiny_model(expert_type="recurrent")
    scaled = tiny_model(expert_type="recurrent", rope_parameters={"rope_type": "linear", "factor": 2.0})
    expert_rotary = scaled.model.layers[0].mlp.experts.rotary
    reference = base.model.layers[0].mlp.experts.rotary
    torch.testing.assert_close(expert_rotary.inv_freq, reference.inv_freq / 2)
    torch.testing.assert_close(scaled.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq / 2)


def test_legacy_rope_theta_config_loads(tmp_path):
    """A config.json written before `rope_parameters` (a top-level `rope_theta`) keeps its base."""
    model = tiny_model()
    config = model.config.to_dict()
    del config["rope_parameters"]
    config["rope_theta"] = 500.0
    legacy = MoREConfig.from_dict(config)
    assert legacy.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    old = AutoModelForCausalLM.from_config(legacy)
    head_dim = legacy.hidden_size // legacy.num_attention_heads
    expected = 1.0 / (500.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.testing.assert_close(old.model.rotary_emb.inv_freq, expected)
    assert MoREConfig(rope_theta=500.0).rope_parameters["rope_theta"] == 500.0
    # Round trip keeps the scaling.
    scaled = clone_model(tiny_model(rope_parameters={"rope_type": "linear", "factor": 2.0}))
    scaled.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rope_parameters["factor"] == 2.0
    ids = random_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, scaled(ids).logits)


@pytest.mark.parametrize("rope_parameters", [{"rope_type": "bogus"}, {"rope_type": "linear"}], ids=["type", "missing"])
def test_bad_rope_parameters_raise(rope_parameters):
    with pytest.raises(ValueError, match="rope_parameters"):
        tiny_config(rope_parameters=rope_parameters)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    ],
    ids=["default", "linear", "yarn"],
)
def test_rotary_matches_transformers_llama(rope_parameters):
    """MoRE's rotary (`signed_sin` and a roll instead of `rotate_half`) rotates queries and keys exactly as Llama's
    does, for Transformers' RoPE types (yarn: an attention scaling other than 1)."""
    config = tiny_config(rope_parameters=rope_parameters, max_position_embeddings=64)
    head_dim = config.hidden_size // config.num_attention_heads
    llama_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=64,
        rope_parameters=rope_parameters,
    )
    position_ids = torch.arange(40).view(2, 20)
    x = torch.randn(2, 20, config.hidden_size)
    q, k = torch.randn(2, 2, config.num_attention_heads, 20, head_dim).unbind(0)
    ours = modeling_more.apply_rotary_pos_emb(
        q, k, *modeling_more.MoRERotaryEmbedding(config, head_dim)(x, position_ids)
    )
    reference = modeling_llama.apply_rotary_pos_emb(
        q, k, *modeling_llama.LlamaRotaryEmbedding(llama_config)(x, position_ids)
    )
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
