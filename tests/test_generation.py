"""Decoding with the cache equals full recomputation; greedy generate with and without cache agree; the recurrence
depth passed to `generate` reaches every decoding step."""

import functools

import pytest
import torch
from helpers import EXPERT_ROUTER_PAIRS, EXPERT_TYPES, RECURRENT_EXPERT_TYPES, VOCAB, random_ids, tiny_model


PREFILL, DECODE = 6, 8


def _scale_weights(model, factor=8.0):
    """Make routing and outputs sensitive (tiny random init is close to uniform routing and tiny logits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "norm" not in name and "embed" not in name:
                p.mul_(factor)
    return model


CACHE_CASES = [(e, r, 1) for e, r in EXPERT_ROUTER_PAIRS] + [(e, "linear", 2) for e in RECURRENT_EXPERT_TYPES]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), CACHE_CASES)
def test_cached_decoding_matches_recomputation(expert_type, router_type, iterations, top_k):
    model = tiny_model(
        expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=top_k
    )
    ids = random_ids(2, PREFILL)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert out.cache is not None and out.cache.get_seq_length() == PREFILL
        torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, atol=1e-4, rtol=0)
        for step in range(DECODE):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            out = model(next_token, cache=out.cache, use_cache=True)
            assert out.cache.get_seq_length() == ids.shape[1]
            full = model(ids, use_cache=False).logits[:, -1]
            diff = (out.logits[:, -1] - full).abs().max().item()
            assert diff <= 1e-4, f"decode step {step}: cached logits differ from recomputation by {diff:.2e}"


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_cached_decoding_with_left_padding(expert_type, router_type):
    model = tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2)
    ids = random_ids(2, PREFILL, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for step in range(4):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            out = model(next_token, attention_mask=mask, cache=out.cache, use_cache=True)
            full = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            diff = (out.logits[:, -1] - full).abs().max().item()
            assert diff <= 1e-4, f"decode step {step}: cached logits differ from recomputation by {diff:.2e}"


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_greedy_generate_with_and_without_cache(expert_type, router_type):
    model = _scale_weights(tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2))
    ids = random_ids(2, PREFILL, seed=2)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, PREFILL + 8)
    assert torch.equal(cached[:, :PREFILL], ids)
    assert torch.equal(cached, uncached)
    # Not a degenerate model that repeats one token.
    assert len(set(cached[:, PREFILL:].flatten().tolist())) > 1


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_beam_search_with_and_without_cache(expert_type, router_type):
    """Beam search reorders the cache (expert pools and router states included)."""
    model = _scale_weights(tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2))
    ids = random_ids(2, PREFILL, seed=2)
    kwargs = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2
    )
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, PREFILL + 6)
    assert torch.equal(cached, uncached)


def _spy_forward(model):
    """Record the `num_recurrent_steps` every forward call receives (signature kept for generate's kwarg check)."""
    calls = []
    original = model.forward

    @functools.wraps(original)
    def spy(*args, **kwargs):
        calls.append(kwargs.get("num_recurrent_steps"))
        return original(*args, **kwargs)

    model.forward = spy
    return calls


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_generate_num_recurrent_steps(expert_type):
    model = _scale_weights(tiny_model(expert_type=expert_type))
    calls = _spy_forward(model)
    ids = random_ids(1, PREFILL, seed=4)
    kwargs = dict(
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    results = {}
    with torch.no_grad():
        for steps in (1, 6):
            calls.clear()
            results[steps] = model.generate(ids, num_recurrent_steps=steps, **kwargs)
            assert calls == [steps] * 8, f"num_recurrent_steps={steps} did not reach every step: {calls}"
        calls.clear()
        default = model.generate(ids, **kwargs)
        assert calls == [None] * 8
    logits = {steps: torch.stack(r.logits) for steps, r in results.items()}
    assert not torch.allclose(logits[1], logits[6], atol=1e-4), "depth passed to generate had no effect"
    # The per-call depth also differs from the config default (4): generate must not silently use the default.
    assert not torch.allclose(logits[6], torch.stack(default.logits), atol=1e-6)
    # And the generated logits equal a direct forward at the same depth (first step = prefill).
    with torch.no_grad():
        direct = model(ids, num_recurrent_steps=6).logits[:, -1]
    torch.testing.assert_close(logits[6][0], direct, atol=1e-4, rtol=0)


def test_generate_ffn_ignores_depth():
    model = tiny_model(expert_type="ffn")
    ids = random_ids(1, PREFILL, seed=4)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, num_recurrent_steps=1)
        b = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, num_recurrent_steps=6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_cache_read_at_deeper_depth_is_finite(expert_type):
    """A cache written at depth 2 and read at depth 5 (inference deeper than the prefill) works."""
    model = tiny_model(expert_type=expert_type)
    ids = random_ids(2, PREFILL)
    with torch.no_grad():
        out = model(ids, use_cache=True, num_recurrent_steps=2)
        out = model(ids[:, -1:], cache=out.cache, use_cache=True, num_recurrent_steps=5)
    assert out.logits.shape == (2, 1, VOCAB)
    assert torch.isfinite(out.logits).all()
