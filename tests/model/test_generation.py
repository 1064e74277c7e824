"""Decoding with the cache equals full recomputation; greedy and beam generate with and without cache agree; the
recurrence depth passed to `generate` reaches every decoding step; a cache read deeper than it was written follows
the documented policy (missing steps / iterations use the latest cached one of that token)."""

import copy
import functools

import pytest
import torch
from helpers import (
    EXPERT_ROUTER_PAIRS,
    EXPERT_TYPES,
    RECURRENT_EXPERT_TYPES,
    ROUTER_TYPES,
    VOCAB,
    assert_left_padded_decoding_matches_recomputation,
    random_ids,
    tiny_model,
)

import modeling_more


PREFILL, DECODE = 6, 8
# Every expert type x every router type x Synthesis II off/on: a new registry entry is covered automatically.
FULL_PRODUCT = [(e, r, t) for e in EXPERT_TYPES for r in ROUTER_TYPES for t in (1, 2)]
# Expert types that cache per-step attention keys/values (they override `write_cache`): the only ones whose cache
# content depends on the recurrence depth, so the only ones where the deeper-read policy is observable.
STEP_CACHED_EXPERT_TYPES = [
    name
    for name in EXPERT_TYPES
    if issubclass(modeling_more.EXPERT_REGISTRY[name], modeling_more.MoRERecurrentExperts)
    and modeling_more.EXPERT_REGISTRY[name].write_cache is not modeling_more.MoRERecurrentExperts.write_cache
]


def scale_weights(model, factor=8.0):
    """Make routing and outputs sensitive (tiny random init is close to uniform routing and tiny logits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "norm" not in name and "embed" not in name:
                p.mul_(factor)
    return model


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), FULL_PRODUCT)
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
    assert_left_padded_decoding_matches_recomputation(model)


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), FULL_PRODUCT)
def test_greedy_generate_with_and_without_cache(expert_type, router_type, iterations):
    model = scale_weights(
        tiny_model(
            expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=2
        )
    )
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


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), FULL_PRODUCT)
def test_beam_search_with_and_without_cache(expert_type, router_type, iterations):
    """Beam search (3 beams) reorders the cache (expert pools, LSTM and router states included)."""
    model = scale_weights(
        tiny_model(
            expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=2
        )
    )
    ids = random_ids(2, PREFILL, seed=2)
    kwargs = dict(
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        num_beams=3,
        num_return_sequences=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.shape == (4, PREFILL + 6)
    assert torch.equal(cached.sequences, uncached.sequences)
    # The beam scores agree too: a cache reordered to the wrong beam could still pick the same tokens by chance.
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)


def _spy_forward(model, names=("num_recurrent_steps", "num_moe_iterations")):
    """Record, per forward call, the depth kwargs it receives (signature kept for generate's kwarg check)."""
    calls = []
    original = model.forward

    @functools.wraps(original)
    def spy(*args, **kwargs):
        calls.append(tuple(kwargs.get(name) for name in names))
        return original(*args, **kwargs)

    model.forward = spy
    return calls


GENERATE_KWARGS = dict(
    max_new_tokens=8,
    min_new_tokens=8,
    do_sample=False,
    pad_token_id=0,
    output_logits=True,
    return_dict_in_generate=True,
)


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_generate_num_recurrent_steps(expert_type):
    model = scale_weights(tiny_model(expert_type=expert_type))
    calls = _spy_forward(model, ("num_recurrent_steps",))
    ids = random_ids(1, PREFILL, seed=4)
    results = {}
    with torch.no_grad():
        for steps in (1, 6):
            calls.clear()
            results[steps] = model.generate(ids, num_recurrent_steps=steps, **GENERATE_KWARGS)
            # 8 calls = prefill + 7 decoding steps: a kwarg dropped after prefill would show up as None here.
            assert calls == [(steps,)] * 8, f"num_recurrent_steps={steps} did not reach every step: {calls}"
        calls.clear()
        default = model.generate(ids, **GENERATE_KWARGS)
        assert calls == [(None,)] * 8
    logits = {steps: torch.stack(r.logits) for steps, r in results.items()}
    assert not torch.allclose(logits[1], logits[6], atol=1e-4), "depth passed to generate had no effect"
    # The per-call depth also differs from the config default (4): generate must not silently use the default.
    assert not torch.allclose(logits[6], torch.stack(default.logits), atol=1e-6)
    # And the generated logits equal a direct forward at the same depth (first step = prefill).
    with torch.no_grad():
        direct = model(ids, num_recurrent_steps=6).logits[:, -1]
    torch.testing.assert_close(logits[6][0], direct, atol=1e-4, rtol=0)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_generate_num_moe_iterations(expert_type):
    """Layer-level depth (Synthesis II) passed to generate reaches every step and changes every expert type."""
    model = scale_weights(tiny_model(expert_type=expert_type))
    calls = _spy_forward(model, ("num_moe_iterations",))
    ids = random_ids(1, PREFILL, seed=5)
    results = {}
    with torch.no_grad():
        for iterations in (1, 3):
            calls.clear()
            results[iterations] = model.generate(ids, num_moe_iterations=iterations, **GENERATE_KWARGS)
            assert calls == [(iterations,)] * 8, f"num_moe_iterations={iterations} did not reach every step: {calls}"
    logits = {t: torch.stack(r.logits) for t, r in results.items()}
    assert not torch.allclose(logits[1], logits[3], atol=1e-4), "num_moe_iterations passed to generate had no effect"
    # Every decoding step ran at 3 iterations: the whole generated sequence equals a cache-free greedy rollout where
    # each forward is told the depth explicitly.
    ids_3 = results[3].sequences
    with torch.no_grad():
        full = model(ids_3[:, :-1], num_moe_iterations=3, use_cache=False).logits[:, PREFILL - 1 :]
    torch.testing.assert_close(logits[3][:, 0], full[0], atol=1e-4, rtol=0)


def test_generate_depth_kwargs_together():
    """Both depth kwargs at once reach every step as given (neither swallowed by GenerationConfig)."""
    model = tiny_model(expert_type="recurrent")
    calls = _spy_forward(model)
    with torch.no_grad():
        model.generate(random_ids(1, PREFILL), num_recurrent_steps=3, num_moe_iterations=2, **GENERATE_KWARGS)
    assert calls == [(3, 2)] * 8
    assert not hasattr(model.generation_config, "num_recurrent_steps")
    assert not hasattr(model.generation_config, "num_moe_iterations")


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


# ---------------------------------------------------------------------------------------------------------------------
# Depth policy: a cache written at depth r and read at r' > r uses, for missing steps, the latest step of that token
# ---------------------------------------------------------------------------------------------------------------------

LOW, HIGH = 2, 4


def _spy_pool_reads(monkeypatch):
    """Record (cache entry, step_idx, keys, values) for every `MoREExpertKVCache.read` that returns cached rows."""
    reads = []
    original = modeling_more.MoREExpertKVCache.read

    def read(self, step_idx, batch_size):
        result = original(self, step_idx, batch_size)
        if result is not None:
            reads.append((self, step_idx, result[0], result[1]))
        return result

    monkeypatch.setattr(modeling_more.MoREExpertKVCache, "read", read)
    return reads


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("expert_type", STEP_CACHED_EXPERT_TYPES)
def test_deeper_read_returns_latest_cached_step(monkeypatch, expert_type, iterations):
    """The pool itself: decoding at depth 4 over a prefix cached at depth 2 reads, at steps 3 and 4, exactly the
    prefix's step-2 keys/values, and afterwards stores the prefix rows padded with their step 2."""
    model = tiny_model(expert_type=expert_type, num_moe_iterations=iterations, num_experts_per_tok=2)
    ids = random_ids(2, PREFILL, seed=6)
    with torch.no_grad():
        out = model(ids, use_cache=True, num_recurrent_steps=LOW)
        pools = {key: pool.entries["experts"] for key, pool in out.cache.expert_pools.items()}  # keys and values
        written = {key: (pool.keys, pool.values, len(pool)) for key, pool in pools.items() if len(pool)}
        assert written and all(k.shape[1] == LOW for k, _, _ in written.values())
        reads = _spy_pool_reads(monkeypatch)
        model(ids[:, -1:], cache=out.cache, use_cache=True, num_recurrent_steps=HIGH)
    by_pool = {id(pool): key for key, pool in pools.items()}
    seen = set()
    for pool, step, keys, values in reads:
        key = by_pool[id(pool)]
        prefix_keys, prefix_values, _ = written[key]
        expected = min(step, LOW - 1)  # the latest step the prefix token computed
        assert torch.equal(keys, prefix_keys[:, expected]), f"pool {key} step {step}: wrong cached keys"
        assert torch.equal(values, prefix_values[:, expected]), f"pool {key} step {step}: wrong cached values"
        seen.add((key, step))
    assert seen == {(key, step) for key in written for step in range(HIGH)}, "not every (pool, step) was read"
    # After the deeper call the pool holds HIGH steps: prefix rows repeat their last step, new rows have their own.
    padding = [min(s, LOW - 1) for s in range(HIGH)]
    for key, (prefix_keys, prefix_values, rows) in written.items():
        pool = pools[key]
        assert pool.keys.shape[1] == HIGH and len(pool) > rows
        assert torch.equal(pool.keys[:rows], prefix_keys[:, padding])
        assert torch.equal(pool.values[:rows], prefix_values[:, padding])
        assert not torch.allclose(pool.keys[rows:, HIGH - 1], pool.keys[rows:, LOW - 1]), "new rows lost their steps"


@pytest.mark.parametrize(("expert_type", "router_type"), [(e, r) for e in EXPERT_TYPES for r in ROUTER_TYPES])
def test_deeper_read_matches_manual_recomputation(expert_type, router_type):
    """End to end, against an independently built reference. With one layer and one iteration the backbone keys and
    values and the router inputs do not depend on depth, and expert steps 1..2 of a token are the same whatever the
    total depth. So decoding at depth 4 over a depth-2 prefill must equal decoding at depth 4 over a depth-4 prefill
    whose cached steps 3..4 were overwritten with step 2 (the policy, written out by hand)."""
    model = scale_weights(
        tiny_model(expert_type=expert_type, router_type=router_type, num_hidden_layers=1, num_experts_per_tok=2)
    )
    ids = random_ids(2, PREFILL, seed=7)
    token = random_ids(2, 1, seed=8)
    with torch.no_grad():
        shallow = model(ids, use_cache=True, num_recurrent_steps=LOW).cache
        deep = model(ids, use_cache=True, num_recurrent_steps=HIGH).cache
        reference = copy.deepcopy(deep)
        padding = [min(s, LOW - 1) for s in range(HIGH)]
        for pool in reference.expert_pools.values():
            kv = pool.entries.get("experts")
            if isinstance(kv, modeling_more.MoREExpertKVCache) and len(kv):
                kv.keys, kv.values = kv.keys[:, padding], kv.values[:, padding]
        got = model(token, cache=shallow, use_cache=True, num_recurrent_steps=HIGH).logits
        expected = model(token, cache=reference, use_cache=True, num_recurrent_steps=HIGH).logits
        with_deep_prefix = model(token, cache=deep, use_cache=True, num_recurrent_steps=HIGH).logits
        recomputed = model(torch.cat([ids, token], 1), use_cache=False, num_recurrent_steps=HIGH).logits[:, -1:]
    # Same arithmetic on the same cached numbers: equal to float rounding (they are bit-equal today).
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    if expert_type in STEP_CACHED_EXPERT_TYPES:
        # The policy is observable here (so the check above is not vacuous): prefix steps 3..4 computed for real give
        # other logits, by more than 10x the tolerance above.
        assert (got - with_deep_prefix).abs().max() > 1e-5
    else:
        # Nothing depth-dependent is cached (LSTM and router states do not depend on the expert depth).
        torch.testing.assert_close(got, recomputed, atol=1e-4, rtol=0)


def _has_cross_token_state(expert_type, router_type):
    """Whether a prefill leaves per-(layer, iteration) expert or router state in the cache."""
    model = tiny_model(expert_type=expert_type, router_type=router_type, num_hidden_layers=1)
    with torch.no_grad():
        cache = model(random_ids(1, 3), use_cache=True).cache
    return any(pool.entries for pool in cache.expert_pools.values())


STATEFUL_PAIRS = [(e, r) for e in EXPERT_TYPES for r in ROUTER_TYPES if _has_cross_token_state(e, r)]


@pytest.mark.parametrize(("expert_type", "router_type"), STATEFUL_PAIRS)
def test_deeper_iteration_read_starts_from_latest_earlier_iteration(expert_type, router_type):
    """Layer-level policy: a cache written with 1 iteration and read with 2 starts iteration 2 from the prefix's
    iteration-1 state (pool, LSTM state, router state) as it was after the prefill, not after this call wrote to it."""
    model = scale_weights(tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2))
    ids = random_ids(2, PREFILL, seed=9)
    token = random_ids(2, 1, seed=10)
    with torch.no_grad():
        cache = model(ids, use_cache=True, num_moe_iterations=1).cache
        reference, empty = copy.deepcopy(cache), copy.deepcopy(cache)
        for layer, _ in list(cache.expert_pools):
            reference.expert_pools[(layer, 1)] = reference.expert_pools[(layer, 0)].copy()
            empty.expert_pools[(layer, 1)] = modeling_more.MoREExpertPool()
        got = model(token, cache=cache, use_cache=True, num_moe_iterations=2).logits
        expected = model(token, cache=reference, use_cache=True, num_moe_iterations=2).logits
        without_state = model(token, cache=empty, use_cache=True, num_moe_iterations=2).logits
    # The policy is observable for these pairs: starting iteration 2 from nothing gives other logits.
    assert not torch.allclose(expected, without_state, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Each decoded token is cached once per (layer, iteration).
    for (layer, iteration), pool in cache.expert_pools.items():
        kv = pool.entries.get("experts")
        if isinstance(kv, modeling_more.MoREExpertKVCache):
            assert len(kv) == len(reference.expert_pools[(layer, iteration)].entries["experts"]), (layer, iteration)


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_crop_equals_a_shorter_prefill(expert_type, router_type):
    """`MoRECache.crop` (assisted decoding) keeps exactly the first tokens' state: decoding after a crop equals
    recomputation. Caches holding recurrent states that summarise every token refuse, and lose nothing."""
    model = scale_weights(tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2))
    ids = random_ids(2, PREFILL, seed=11)
    keep = PREFILL - 2
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        croppable = all(e.croppable for pool in cache.expert_pools.values() for e in pool.entries.values())
        if not croppable:
            before = copy.deepcopy(cache)
            with pytest.raises(ValueError, match="can't be cropped"):
                cache.crop(keep - PREFILL)
            assert cache.get_seq_length() == PREFILL
            after = model(ids[:, -1:], cache=cache, use_cache=True).logits
            torch.testing.assert_close(after, model(ids[:, -1:], cache=before, use_cache=True).logits)
            return
        cache.crop(keep - PREFILL)  # a negative count: the tokens to remove
        got = model(ids[:, keep : keep + 1], cache=cache, use_cache=True).logits
        expected = model(ids[:, : keep + 1], use_cache=False).logits[:, -1:]
    assert cache.get_seq_length() == keep + 1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("expert_type", STEP_CACHED_EXPERT_TYPES)
def test_crop_to_no_token_then_prefill_at_fewer_steps(expert_type, iterations):
    """A cache cropped to no token keeps no step count: prefilling through it again at fewer steps than it was written
    at equals a prefill without a cache (the emptied pools once kept their old step axis, and the next write failed
    to concatenate rows of another depth)."""
    model = tiny_model(expert_type=expert_type, num_moe_iterations=iterations, num_experts_per_tok=2)
    ids = random_ids(2, PREFILL, seed=12)
    with torch.no_grad():
        cache = model(ids, use_cache=True, num_recurrent_steps=HIGH).cache
        cache.crop(-PREFILL)
        got = model(ids, cache=cache, use_cache=True, num_recurrent_steps=LOW).logits
        expected = model(ids, use_cache=False, num_recurrent_steps=LOW).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_crop_of_no_token_is_a_no_op(expert_type, router_type):
    """`crop(0)` removes nothing, so it leaves every cache as it was, one that refuses a real crop included (as
    Transformers' layers do); `is_croppable`, which generation asks before it relies on `crop` (assisted decoding,
    the deferred stop check), is False exactly where a real crop refuses."""
    model = scale_weights(tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2))
    ids = random_ids(2, PREFILL, seed=13)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        croppable = all(e.croppable for pool in cache.expert_pools.values() for e in pool.entries.values())
        assert cache.is_croppable == croppable
        before = copy.deepcopy(cache)
        cache.crop(0)
        assert cache.get_seq_length() == PREFILL
        got = model(ids[:, -1:], cache=cache, use_cache=True).logits
        expected = model(ids[:, -1:], cache=before, use_cache=True).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("expert_type", "router_type"), STATEFUL_PAIRS)
def test_shallower_call_keeps_deeper_iterations_complete(expert_type, router_type):
    """Layer-level policy across calls: a token decoded with 1 iteration over a cache written with 2 never ran
    iteration 2, so a later call with 2 iterations reads it there at its latest earlier iteration: its iteration-1
    keys/values join the iteration-2 pool, and a state after the last token (LSTM, router) is iteration 1's. Without
    this the token was missing from iteration 2 for good."""
    model = scale_weights(
        tiny_model(expert_type=expert_type, router_type=router_type, num_hidden_layers=1, num_experts_per_tok=2)
    )
    ids = random_ids(2, PREFILL, seed=14)
    shallow_token, token = random_ids(2, 1, seed=15), random_ids(2, 1, seed=16)
    with torch.no_grad():
        prefilled = model(ids, use_cache=True, num_moe_iterations=2).cache
        cache = model(shallow_token, cache=copy.deepcopy(prefilled), use_cache=True, num_moe_iterations=1).cache
        # The policy written out by hand, from the prefill's iteration-2 pool and what iteration 1 gained since.
        reference, stale = copy.deepcopy(cache), copy.deepcopy(cache)
        deep = reference.expert_pools[(0, 1)]
        deep.entries = {name: entry.copy() for name, entry in prefilled.expert_pools[(0, 1)].entries.items()}
        stale.expert_pools[(0, 1)] = deep.copy()
        for name, entry in reference.expert_pools[(0, 0)].entries.items():
            if isinstance(entry, modeling_more.MoREExpertKVCache):
                kv, new = deep.entries[name], slice(len(prefilled.expert_pools[(0, 0)].entries[name]), None)
                for field in ("expert", "batch", "position", "keys", "values"):  # same depth: same step axis
                    setattr(kv, field, torch.cat([getattr(kv, field), getattr(entry, field)[new]]))
            else:
                deep.entries[name] = entry.copy()
        got = model(token, cache=cache, use_cache=True, num_moe_iterations=2).logits
        expected = model(token, cache=reference, use_cache=True, num_moe_iterations=2).logits
        without = model(token, cache=stale, use_cache=True, num_moe_iterations=2).logits
    # Same arithmetic on the same cached numbers: equal to float rounding (they are bit-equal today).
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The policy is observable for these pairs: iteration 2 without the shallow token gives other logits, by more
    # than 10x the tolerance above.
    assert (expected - without).abs().max() > 1e-5
