"""Transformers' recorded outputs: per-layer attention maps and attention-interface kwargs."""

import pytest
import torch
from helpers import random_ids, tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


@pytest.mark.parametrize("seq_len", [6, 20])  # computed keys-major below 16 keys, query-major from 16
def test_output_attentions_returns_per_layer_maps(seq_len):
    model = tiny_model(attn_implementation="eager")
    ids = random_ids(2, seq_len)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: padded keys get no attention
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    config = model.config
    assert len(out.attentions) == config.num_hidden_layers
    for maps in out.attentions:
        assert maps.shape == (2, config.num_attention_heads, seq_len, seq_len)
        torch.testing.assert_close(maps.sum(-1)[1], torch.ones(config.num_attention_heads, seq_len))
        assert torch.all(maps[1].triu(1) == 0)  # causal
        assert torch.all(maps[0].triu(1)[:, 2:] == 0) and torch.all(maps[0, :, 2:, :2] == 0)  # real queries of row 0
    # Attention maps are not recorded unless asked.
    assert model(ids).attentions is None


def test_attention_kwargs_reach_the_attention_interface():
    seen = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("marker"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("more_test_recording", recording_attention)
    model = tiny_model(attn_implementation="more_test_recording")
    with torch.no_grad():
        model(random_ids(1, 4), marker="here")
    assert seen == ["here"] * model.config.num_hidden_layers
