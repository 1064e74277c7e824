"""Batched generation with left padding: every row of a padded batch generates what its prompt generates alone.

Padding must not reach an expert, a router state, an expert cache pool or a position id; any leak shows up as a row
whose tokens or scores depend on how much padding its neighbours forced on it."""

import pytest
import torch
from helpers import random_ids, tiny_model
from test_generation import FULL_PRODUCT, scale_weights


PAD = 0
LENGTHS = (3, 7, 5)  # different lengths, longest in the middle, so rows 0 and 2 carry different amounts of padding
NEW_TOKENS = 6
# fp32 runs the production kernels (grouped_mm, whose last group also carries the padding rows); the scaled weights
# amplify rounding of the different batch shapes to ~1e-4 there. fp64 runs the per-group fallback with rounding
# ~1e-15, so a padding leak far below fp32 noise still fails.
TOLERANCE = {torch.float32: 5e-4, torch.float64: 1e-9}


def _left_padded_batch(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    return ids, mask


def _prompts():
    return [random_ids(1, length, seed=20 + i) for i, length in enumerate(LENGTHS)]


def _generate(model, ids, mask, **kwargs):
    # min_new_tokens: no row stops early at eos, so the batch and the single runs produce the same number of steps.
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=PAD,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )


def _assert_rows_match_single(model, **kwargs):
    tol = TOLERANCE[model.dtype]
    prompts = _prompts()
    ids, mask = _left_padded_batch(prompts)
    batch = _generate(model, ids, mask, **kwargs)
    width = ids.shape[1]
    assert batch.sequences.shape == (len(prompts), width + NEW_TOKENS)
    for row, prompt in enumerate(prompts):
        single = _generate(model, prompt, torch.ones_like(prompt), **kwargs)
        new_tokens = batch.sequences[row, width:]
        assert torch.equal(new_tokens, single.sequences[0, prompt.shape[1] :]), f"row {row} generated other tokens"
        # Scores are the processed logits (min_new_tokens puts -inf on eos in both runs); logits are the raw ones.
        for name in ("scores", "logits"):
            got = torch.stack([step[row] for step in getattr(batch, name)])
            expected = torch.stack([step[0] for step in getattr(single, name)])
            message = f"{name} of row {row} differ from its single-prompt run"
            torch.testing.assert_close(
                got, expected, atol=tol, rtol=0, msg=lambda m, message=message: f"{message}: {m}"
            )
    return batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), FULL_PRODUCT)
def test_left_padded_batch_matches_single_prompts(expert_type, router_type, iterations, dtype):
    model = scale_weights(
        tiny_model(
            expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=2
        )
    ).to(dtype)
    batch = _assert_rows_match_single(model)
    # The rows really differ (a model that ignores its input would pass the comparison trivially).
    assert len({tuple(r) for r in batch.sequences[:, -NEW_TOKENS:].tolist()}) > 1


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("expert_type", ["recurrent", "parallel"])
def test_left_padded_batch_with_depth_and_cache_flag(expert_type, use_cache):
    """Per-call depth and the cache-free path keep rows independent of their padding too."""
    model = scale_weights(tiny_model(expert_type=expert_type, router_type="gru_token", num_experts_per_tok=2))
    _assert_rows_match_single(model, use_cache=use_cache, num_recurrent_steps=6, num_moe_iterations=2)


@pytest.mark.parametrize("expert_type", ["recurrent", "shared_recurrent", "parallel"])
def test_left_padded_beam_search_matches_single_prompts(expert_type):
    """Beam search over a padded batch: the cache is expanded per beam and reordered with padding rows inside."""
    model = scale_weights(tiny_model(expert_type=expert_type, router_type="gru_token", num_experts_per_tok=2))
    prompts = _prompts()
    ids, mask = _left_padded_batch(prompts)
    kwargs = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=PAD,
        num_beams=3,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, **kwargs)
        for row, prompt in enumerate(prompts):
            single = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
            assert torch.equal(batch.sequences[row, ids.shape[1] :], single.sequences[0, prompt.shape[1] :])
            torch.testing.assert_close(batch.sequences_scores[row], single.sequences_scores[0], atol=1e-4, rtol=0)
