"""Forward/backward of every expert type and router, gradient reach, determinism, attention backends, activation
checkpointing, recurrence depth, truncated backprop, recurrence statistics, layer-level iterations, dense layers,
shared expert and capacity."""

import pytest
import torch
from helpers import (
    EXPERT_ROUTER_PAIRS,
    EXPERT_TYPES,
    MODEL_CASES,
    RECURRENT_EXPERT_TYPES,
    VOCAB,
    clone_model,
    moe_blocks,
    random_ids,
    tiny_config,
    tiny_model,
)
from transformers.testing_utils import CaptureLogger

import modeling_more


NON_RECURRENT_EXPERT_TYPES = [name for name in EXPERT_TYPES if name not in RECURRENT_EXPERT_TYPES]


def _nonzero(t: torch.Tensor) -> bool:
    return bool(t.abs().sum() > 0)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


# The design's table (DESIGN.md §3.1), written out rather than derived from the classes under test.
DESIGN_DEPTH_TYPES = {"recurrent", "shared_recurrent", "sandwich", "sequential"}
DESIGN_FIXED_DEPTH_TYPES = {"ffn", "parallel"}


@pytest.mark.parametrize("expert_type", sorted(DESIGN_DEPTH_TYPES | DESIGN_FIXED_DEPTH_TYPES))
def test_depth_changes_exactly_the_design_recurrent_types(expert_type):
    """`num_recurrent_steps` changes the output of the design's expert-level recurrent types and of no other."""
    model = tiny_model(expert_type=expert_type)
    ids = random_ids(2, 8)
    with torch.no_grad():
        one, three = model(ids, num_recurrent_steps=1).logits, model(ids, num_recurrent_steps=3).logits
    assert torch.equal(one, three) == (expert_type in DESIGN_FIXED_DEPTH_TYPES)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_forward_backward(expert_type, router_type, iterations, top_k):
    model = tiny_model(
        train=True,
        expert_type=expert_type,
        num_experts_per_tok=top_k,
        router_type=router_type,
        num_moe_iterations=iterations,
    )
    ids = random_ids(2, 8)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 8, VOCAB)
    assert torch.isfinite(out.logits).all()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert out.z_loss is not None and torch.isfinite(out.z_loss)
    assert out.aux_loss.requires_grad and out.z_loss.requires_grad
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert _nonzero(model.model.embed_tokens.weight.grad)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_gradient_reaches_every_expert_and_router(expert_type, router_type, iterations, top_k):
    num_experts = 3  # differs from any other stacked axis here (4 norms, 3 * d gates are not leading)
    model = tiny_model(
        train=True,
        expert_type=expert_type,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        router_type=router_type,
        num_moe_iterations=iterations,
    )
    routed = []  # tokens per expert, per batch and layer (for the failure message)
    for seed in range(3):
        ids = random_ids(4, 12, seed=seed)
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        routed.append(
            [
                torch.bincount(logits.topk(top_k, -1).indices.flatten(), minlength=num_experts).tolist()
                for logits in out.router_logits
            ]
        )
    for layer_idx, block in enumerate(moe_blocks(model)):
        for part, module in (("experts", block.experts), ("gate", block.gate)):
            params = list(module.named_parameters())
            assert params, f"layer {layer_idx} {part} has no parameters"
            for name, p in params:
                where = f"layer {layer_idx} mlp.{part}.{name}"
                assert p.grad is not None, f"{where}: no gradient"
                assert torch.isfinite(p.grad).all(), f"{where}: non-finite gradient"
                assert _nonzero(p.grad), f"{where}: zero gradient"
                if part == "experts" and p.dim() >= 2 and p.shape[0] == num_experts:
                    for e in range(num_experts):
                        assert _nonzero(p.grad[e]), f"{where}: expert {e} got no gradient; routed counts {routed}"
    # Everything else too (e.g. a router cell shared by all layers and owned by the model).
    for name, p in model.named_parameters():
        assert p.grad is not None and _nonzero(p.grad), f"{name}: no gradient"


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_eval_is_deterministic(expert_type, router_type, iterations):
    model = tiny_model(
        expert_type=expert_type, router_type=router_type, num_experts_per_tok=2, num_moe_iterations=iterations
    )
    ids = random_ids(2, 8)
    with torch.no_grad():
        first = model(ids).logits
        torch.manual_seed(1234)  # a different global RNG state must not matter in eval
        second = model(ids).logits
    assert torch.equal(first, second)


@pytest.mark.parametrize("seq_len", [10, 20])  # eager: keys-major softmax below 16 keys, query-major from 16
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_eager_matches_sdpa(expert_type, padded, seq_len):
    eager = tiny_model(expert_type=expert_type, num_experts_per_tok=2, attn_implementation="eager")
    sdpa = clone_model(eager, attn_implementation="sdpa").eval()
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    ids = random_ids(2, seq_len)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        ids[0, :3] = 0
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(a[keep]).all() and torch.isfinite(b[keep]).all()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=0)


def _enable_checkpointing(model, use_reentrant):
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # Transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_gradient_checkpointing_matches(expert_type, router_type, use_reentrant):
    overrides = dict(
        expert_type=expert_type,
        router_type=router_type,
        num_experts_per_tok=2,
        train_recurrent_steps_min=3,
        train_recurrent_steps_max=3,
        latent_init_std=0.0,
        router_jitter_noise=0.0,
    )
    plain = tiny_model(train=True, **overrides)
    checkpointed = clone_model(plain)
    if use_reentrant:
        # Reentrant checkpointing would drop the router losses' gradients: MoRE refuses it with a clear error.
        with pytest.raises(ValueError, match="use_reentrant"):
            _enable_checkpointing(checkpointed, use_reentrant)
        return
    _enable_checkpointing(checkpointed, use_reentrant)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    calls = []
    # A pre-hook: checkpoint's early stop can end the recompute inside the block, before its post-hooks.
    checkpointed.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = random_ids(2, 8)
    losses = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)
        out = model(ids, labels=ids)
        # The router terms returned next to the hidden states must stay in the graph under checkpointing.
        assert out.aux_loss.requires_grad and out.z_loss.requires_grad, "aux/z loss detached from the graph"
        out.loss.backward()
        losses.append(out.loss.detach())
    assert len(calls) == 2, "activation checkpointing did not recompute the layer in backward"
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    grads_plain = dict(plain.named_parameters())
    for name, p in checkpointed.named_parameters():
        ref = grads_plain[name].grad
        assert (p.grad is None) == (ref is None), name
        if ref is not None:
            diff = (p.grad - ref).abs().max().item()
            assert diff <= 1e-5, f"{name}: gradients differ by {diff:.2e}"


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_num_recurrent_steps_changes_recurrent_output(expert_type):
    model = tiny_model(expert_type=expert_type)
    ids = random_ids(2, 8)
    with torch.no_grad():
        outs = {steps: model(ids, num_recurrent_steps=steps) for steps in (1, 3)}
    for steps, out in outs.items():
        assert out.recurrent_steps is not None
        assert float(out.recurrent_steps) == steps
    assert not torch.allclose(outs[1].logits, outs[3].logits, atol=1e-6)
    with torch.no_grad():
        default = model(ids)
    assert float(default.recurrent_steps) == model.config.num_recurrent_steps


@pytest.mark.parametrize("expert_type", NON_RECURRENT_EXPERT_TYPES)
def test_num_recurrent_steps_on_non_recurrent_warns_once(expert_type):
    """A depth argument a model cannot use is ignored, with one warning (a depth sweep on the wrong model shows)."""
    model = tiny_model(expert_type=expert_type)
    ids = random_ids(2, 8)
    modeling_more.logger.warning_once.cache_clear()
    with CaptureLogger(modeling_more.logger) as captured, torch.no_grad():
        a, b = model(ids, num_recurrent_steps=1), model(ids, num_recurrent_steps=3)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert captured.out.count("no effect") == 1 and expert_type in captured.out
    recurrent = tiny_model(expert_type="recurrent")
    with CaptureLogger(modeling_more.logger) as captured, torch.no_grad():
        recurrent(ids, num_recurrent_steps=3)
    assert "no effect" not in captured.out


@pytest.mark.parametrize("sampler", ["uniform", "poisson_lognormal"])
@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_training_depth_is_sampled_in_range(expert_type, sampler):
    model = tiny_model(
        train=True,
        expert_type=expert_type,
        train_recurrent_steps_min=1,
        train_recurrent_steps_max=3,
        recurrent_steps_sampler=sampler,
    )
    ids = random_ids(1, 4)
    seen = set()
    for _ in range(24):
        depth = float(model(ids).recurrent_steps)
        assert depth == int(depth) and 1 <= depth <= 3, depth
        seen.add(int(depth))
    assert len(seen) > 1, f"training depth never varied: {seen}"
    # Eval uses the config's fixed inference depth.
    model.eval()
    with torch.no_grad():
        assert float(model(ids).recurrent_steps) == model.config.num_recurrent_steps


@pytest.mark.parametrize("depths", [(1, 8), (3, 5), (2, 2)])
@pytest.mark.parametrize("sampler", sorted(modeling_more.DEPTH_SAMPLER_REGISTRY))
def test_depth_sampler_probabilities_match_its_draws(sampler, depths):
    """`probabilities` (compute accounting: the compute-matched baseline) is the distribution `draw` samples; the
    clipped Poisson's mean is not the range's."""
    low, high = depths
    config = tiny_config(
        expert_type="recurrent",
        recurrent_steps_sampler=sampler,
        train_recurrent_steps_min=low,
        train_recurrent_steps_max=high,
        num_recurrent_steps=high,
    )
    depth_sampler = modeling_more.get_depth_sampler(sampler)
    probabilities = depth_sampler.probabilities(config)
    torch.manual_seed(0)
    draws = torch.tensor([int(depth_sampler.draw(config)) for _ in range(20_000)])
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-12)
    assert set(draws.tolist()) <= set(probabilities)
    for depth, probability in probabilities.items():
        # 20,000 draws: a frequency's standard error is at most 0.0035.
        assert (draws == depth).float().mean().item() == pytest.approx(probability, abs=0.015), depth


def _spy_steps(model):
    """Record, per call of each MoE layer's `experts.step`, whether its output is attached to the graph."""
    records = []
    for block in moe_blocks(model):
        experts = block.experts
        original = experts.step

        def spy(*args, _original=original, **kwargs):
            output = _original(*args, **kwargs)
            records.append(any(t.requires_grad for t in _tensors(output)))
            return output

        experts.step = spy
    return records


@pytest.mark.parametrize(("backprop_steps", "expected"), [(1, [False, False, True]), (None, [True, True, True])])
@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_truncated_backprop(expert_type, backprop_steps, expected):
    model = tiny_model(train=True, expert_type=expert_type, num_backprop_steps=backprop_steps)
    records = _spy_steps(model)
    ids = random_ids(2, 8)
    out = model(ids, labels=ids, num_recurrent_steps=3)
    num_layers = len(moe_blocks(model))
    assert records == expected * num_layers
    out.loss.backward()  # the truncated graph still backpropagates, to every expert parameter (e.g. option D's FFN)
    for block in moe_blocks(model):
        for name, p in block.experts.named_parameters():
            assert p.grad is not None and _nonzero(p.grad), f"mlp.experts.{name}: no gradient"


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_recurrence_stats(expert_type, iterations):
    model = tiny_model(expert_type=expert_type, num_moe_iterations=iterations)
    ids = random_ids(2, 8)
    with torch.no_grad():
        out = model(ids, num_recurrent_steps=3, output_recurrence_stats=True)
        plain = model(ids, num_recurrent_steps=3)
    assert plain.recurrence_stats is None
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)  # statistics do not change the output
    stats = out.recurrence_stats
    assert stats is not None and len(stats) == len(moe_blocks(model)) * iterations
    for entry in stats:
        assert isinstance(entry, dict)
        change = entry["state_change"]
        assert change.shape == (3,)
        assert torch.isfinite(change).all() and (change >= 0).all()
        assert float(entry["steps"]) == 3


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_moe_iterations_double_router_logits(expert_type):
    ids = random_ids(2, 8)
    counts = {}
    for iterations in (1, 2):
        model = tiny_model(expert_type=expert_type, num_moe_iterations=iterations)
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        counts[iterations] = len(out.router_logits)
        for logits in out.router_logits:
            assert logits.shape == (2 * 8, model.config.num_experts)
    assert counts[1] == len(moe_blocks(model))
    assert counts[2] == 2 * counts[1]
    # Per-call override of the iteration count.
    with torch.no_grad():
        out = model(ids, output_router_logits=True, num_moe_iterations=3)
    assert len(out.router_logits) == 3 * counts[1]


def test_moe_iterations_change_output():
    model = tiny_model(num_moe_iterations=1)
    ids = random_ids(2, 8)
    with torch.no_grad():
        one, two = model(ids, num_moe_iterations=1).logits, model(ids, num_moe_iterations=2).logits
    assert not torch.allclose(one, two, atol=1e-6)


def test_router_logits_only_when_asked():
    model = tiny_model()
    ids = random_ids(2, 8)
    out = model(ids, labels=ids)
    assert out.router_logits is None
    assert out.aux_loss is not None  # aux terms do not depend on output_router_logits


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_dense_layers(expert_type):
    model = tiny_model(train=True, expert_type=expert_type, mlp_only_layers=[0])
    assert not isinstance(model.model.layers[0].mlp, modeling_more.MoRESparseMoeBlock)
    assert not hasattr(model.model.layers[0].mlp, "gate")
    assert isinstance(model.model.layers[1].mlp, modeling_more.MoRESparseMoeBlock)
    ids = random_ids(2, 8)
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 1
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and _nonzero(p.grad) for p in model.model.layers[0].mlp.parameters())


@pytest.mark.parametrize("gate", ["learned", "fixed"])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_shared_expert(expert_type, gate):
    model = tiny_model(
        train=True, expert_type=expert_type, shared_expert_intermediate_size=16, shared_expert_gate=gate
    )
    ids = random_ids(2, 8)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for block in moe_blocks(model):
        assert block.shared_expert is not None
        for name, p in block.shared_expert.named_parameters():
            assert p.grad is not None and _nonzero(p.grad), name
        if gate == "learned":
            assert block.shared_expert_gate.weight.grad is not None
            assert _nonzero(block.shared_expert_gate.weight.grad)
    # The shared expert contributes to the output.
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        for block in moe_blocks(model):
            block.shared_expert.down_proj.weight.mul_(10.0)
        after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-6)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_capacity_factor_drops_tokens_in_training(expert_type):
    overrides = dict(expert_type=expert_type, latent_init_std=0.0, num_experts_per_tok=1)
    dropless = tiny_model(train=True, **overrides)
    capped = tiny_model(train=True, capacity_factor=0.25, **overrides)
    capped.load_state_dict(dropless.state_dict())
    block_outputs = []
    capped.model.layers[0].mlp.register_forward_hook(lambda module, args, output: block_outputs.append(output[0]))
    ids = random_ids(2, 8)
    a = dropless(ids, labels=ids, num_recurrent_steps=2)
    # Training is otherwise deterministic here, so any difference below comes from the capacity.
    torch.testing.assert_close(dropless(ids, labels=ids, num_recurrent_steps=2).logits, a.logits, atol=0, rtol=0)
    b = capped(ids, labels=ids, num_recurrent_steps=2)
    assert torch.isfinite(b.logits).all() and torch.isfinite(b.loss)
    assert not torch.allclose(a.logits, b.logits, atol=1e-6)
    b.loss.backward()
    # Capacity ceil(0.25 * 16 tokens * top-1 / 4 experts) = 1 row per expert: at most 4 tokens get an expert output;
    # dropped tokens get exactly zero from the block (they pass through the residual).
    routed_tokens = (block_outputs[0].reshape(-1, block_outputs[0].shape[-1]).abs().sum(-1) > 0).sum().item()
    assert 1 <= routed_tokens <= 4
    # Eval is dropless unless eval_capacity_factor is set.
    dropless.eval()
    capped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropless(ids).logits, capped(ids).logits, atol=1e-6, rtol=0)


def test_eval_capacity_factor_applies_in_eval():
    dropless = tiny_model()
    capped = tiny_model(eval_capacity_factor=0.25)
    capped.load_state_dict(dropless.state_dict())
    ids = random_ids(2, 8)
    with torch.no_grad():
        a, b = dropless(ids).logits, capped(ids).logits
    assert torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_type", ["ffn", "recurrent"])
def test_capacity_counts_real_tokens_only(expert_type, top_k):
    """Under a capacity limit a left-padded row gives its real tokens the same outputs as the row alone: capacity
    comes from the real tokens, and padding never takes or shifts a slot."""
    model = tiny_model(expert_type=expert_type, eval_capacity_factor=0.5, num_experts_per_tok=top_k)
    ids = random_ids(1, 9, seed=3)
    pad = 8  # enough padding to change the capacity if it were counted: ceil(0.5 * 17 * k / 4) > ceil(0.5 * 9 * k / 4)
    padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(ids)
        batched = model(padded, attention_mask=mask)
    assert int(alone.dropped_tokens) > 0, "the capacity limit should drop something here"
    assert int(batched.dropped_tokens) == int(alone.dropped_tokens)
    torch.testing.assert_close(batched.logits[:, pad:], alone.logits, atol=1e-5, rtol=1e-5)


def kept_pairs(dispatch):
    """The (token, expert) assignments a dispatch kept."""
    rows = zip(dispatch.token_index, dispatch.expert_index, dispatch.kept, strict=True)
    return {(int(t), int(e)) for t, e, k in rows if k}


def test_capacity_gives_first_choices_priority():
    """Switch / GShard priority: every token's first choice is kept before any token's second choice."""
    num_experts, capacity = 3, 2
    # Token 0's second choice and tokens 1, 2's first choices all want expert 0, which has room for two.
    top_k_index = torch.tensor([[1, 0], [0, 2], [0, 1]])
    weights = torch.full((3, 2), 0.5)
    dispatch = modeling_more.build_dispatch(
        top_k_index, weights, None, torch.arange(3)[None], 0, capacity, num_experts
    )
    kept = kept_pairs(dispatch)
    assert kept == {(0, 1), (1, 0), (2, 0), (1, 2), (2, 1)}  # (0, 0), a second choice, is the one dropped
    assert int(dispatch.dropped) == 1
    # Within one choice rank, earlier tokens win.
    top_k_index = torch.tensor([[0, 1], [0, 2], [0, 1]])
    dispatch = modeling_more.build_dispatch(
        top_k_index, weights, None, torch.arange(3)[None], 0, capacity, num_experts
    )
    kept = kept_pairs(dispatch)
    assert (0, 0) in kept and (1, 0) in kept and (2, 0) not in kept


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_moe_block_runs_on_hidden_states_alone(expert_type):
    """`model.layers[i].mlp(hidden_states)` works like Mixtral's block: same shape out first, context optional."""
    model = tiny_model(expert_type=expert_type)
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        out = block(hidden)[0]
        settings = model.model.resolve_settings()
        explicit = block(hidden, torch.ones(2, 5, dtype=torch.bool), torch.arange(5).expand(2, -1), 0, settings)[0]
    assert out.shape == hidden.shape
    torch.testing.assert_close(out, explicit)


def test_moe_block_alone_with_a_layerwise_router():
    """A model's block runs alone from a zero router state (as its first MoE layer does); a block built outside a
    model has no shared cell and says so."""
    model = tiny_model(router_type="gru")
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, 4, model.config.hidden_size)
    with torch.no_grad():
        alone = block(hidden)[0]
        memory = modeling_more.MoRERouterMemory()
        torch.testing.assert_close(block(hidden, router_memory=memory)[0], alone)
    assert set(memory.states) == {0}  # the state this layer hands on
    outside = modeling_more.MoREIteratedMoeBlock(model.config, 0)
    with pytest.raises(ValueError, match="owned by `MoREModel`"):
        outside(hidden)
