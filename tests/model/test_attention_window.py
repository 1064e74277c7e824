"""`recurrent_attention_window` in a whole model: a window wider than any sequence changes nothing, a narrow one
changes the outputs, and decoding with the cache equals recomputation under it (left padding included)."""

import pytest
import torch
from helpers import EXPERT_TYPES, assert_left_padded_decoding_matches_recomputation, random_ids, tiny_model

import modeling_more


# Expert types whose steps attend (Huginn blocks): the only ones the window applies to.
ATTENDING_EXPERT_TYPES = [
    name for name in EXPERT_TYPES if issubclass(modeling_more.EXPERT_REGISTRY[name], modeling_more.MoREHuginnExperts)
]
SEQ = 12


def test_attending_expert_types_found():
    assert {"recurrent", "shared_recurrent"} <= set(ATTENDING_EXPERT_TYPES)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_type", ATTENDING_EXPERT_TYPES)
def test_window_wider_than_the_sequence_is_full_attention(expert_type, top_k):
    ids = random_ids(2, SEQ)
    with torch.no_grad():
        full = tiny_model(expert_type=expert_type, num_experts_per_tok=top_k)(ids, use_cache=False).logits
        model = tiny_model(expert_type=expert_type, num_experts_per_tok=top_k, recurrent_attention_window=SEQ)
        torch.testing.assert_close(model(ids, use_cache=False).logits, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("expert_type", ATTENDING_EXPERT_TYPES)
def test_narrow_window_changes_the_outputs(expert_type):
    # One expert: every token of a sequence shares its segment, so a window of 1 (each row sees itself) drops keys.
    ids = random_ids(2, SEQ)
    with torch.no_grad():
        full = tiny_model(expert_type=expert_type, num_experts=1, num_experts_per_tok=1)(ids, use_cache=False)
        model = tiny_model(expert_type=expert_type, num_experts=1, num_experts_per_tok=1, recurrent_attention_window=1)
        windowed = model(ids, use_cache=False)
    torch.testing.assert_close(windowed.logits[:, 0], full.logits[:, 0], atol=1e-5, rtol=0)  # nothing to drop
    assert (windowed.logits[:, 1:] - full.logits[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("expert_type", ATTENDING_EXPERT_TYPES)
def test_windowed_cached_decoding_matches_recomputation(expert_type, window):
    model = tiny_model(expert_type=expert_type, num_experts_per_tok=2, recurrent_attention_window=window)
    assert_left_padded_decoding_matches_recomputation(model, steps=6)
