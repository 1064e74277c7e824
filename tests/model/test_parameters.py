"""Parameter counts of every expert type and router against the formulas in the README's expert table."""

import pytest
from helpers import EXPERT_TYPES, ROUTER_TYPES, moe_blocks, tiny_model


D, F, FR, E, G, H = 32, 64, 48, 4, 16, 24  # hidden, d_ff, recurrent d_ff, experts, parallel gate, router hidden


def huginn_block(d, f_r):
    """|R|: adapter 2d^2 + qkv 3d^2 + out d^2 + gated MLP 3 d f_r + 4 norms."""
    return 6 * d * d + 3 * d * f_r + 4 * d


# Parameters of ONE expert (all experts together for shared_recurrent), as in the README.
EXPERT_FORMULAS = {
    "ffn": lambda d, f, f_r, e, g: e * 3 * d * f,
    "recurrent": lambda d, f, f_r, e, g: e * huginn_block(d, f_r),
    "shared_recurrent": lambda d, f, f_r, e, g: huginn_block(d, f_r) + 2 * e * d * d,
    "sandwich": lambda d, f, f_r, e, g: e * (2 * d * f + 6 * f * f + 6 * f),
    "parallel": lambda d, f, f_r, e, g: e * (3 * d * f + 8 * d * d + 4 * d + g * d + g + 2 * g + 2),
    "sequential": lambda d, f, f_r, e, g: e * (3 * d * f + 8 * d * d + 5 * d + 1),
}


def router_params(router_type, d, e, h):
    """Per-layer router parameters (the layerwise routers' shared cell is counted once per model)."""
    if router_type == "linear":
        return e * d
    per_layer = h * d + e * h  # input projection + head
    if router_type.endswith("_token"):
        per_layer += _cell(router_type.removesuffix("_token"), h)
    return per_layer


def _cell(kind, h):
    gates = 3 if kind == "gru" else 1
    return gates * (2 * h * h + 2 * h)


def sized_model(expert_type, **overrides):
    """A tiny model of `expert_type` whose sizes (D, F, FR, E, G) are all different, so a formula mixing them fails."""
    return tiny_model(
        expert_type=expert_type,
        hidden_size=D,
        intermediate_size=F,
        recurrent_intermediate_size=FR,
        num_experts=E,
        parallel_gate_hidden_size=G,
        **overrides,
    )


def test_formulas_cover_every_registered_type():
    assert set(EXPERT_FORMULAS) == set(EXPERT_TYPES)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_expert_parameters_match_formula(expert_type):
    model = sized_model(expert_type)
    expected = EXPERT_FORMULAS[expert_type](D, F, FR, E, G)
    for block in moe_blocks(model):
        assert sum(p.numel() for p in block.experts.parameters()) == expected


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_router_parameters_match_formula(router_type):
    model = tiny_model(router_type=router_type, hidden_size=D, num_experts=E, router_hidden_size=H)
    for block in moe_blocks(model):
        assert sum(p.numel() for p in block.gate.parameters()) == router_params(router_type, D, E, H)
    shared = model.model.router_cell
    if router_type in ("gru", "rnn"):
        assert sum(p.numel() for p in shared.parameters()) == _cell(router_type, H)
    else:
        assert shared is None


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_total_parameters_add_up(expert_type):
    """Embedding (tied head) + per layer (attention, 2 norms, router, experts) + final norm: nothing hidden."""
    layers, vocab = 2, 100
    model = tiny_model(expert_type=expert_type, hidden_size=D, intermediate_size=F, num_experts=E)
    f_r = model.config.recurrent_intermediate_size
    attention = 4 * D * D
    per_layer = attention + 2 * D + E * D + EXPERT_FORMULAS[expert_type](D, F, f_r, E, 64)
    expected = vocab * D + layers * per_layer + D
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.lm_head.weight is model.model.embed_tokens.weight


# Multiply-adds of ONE expert on one routed token at r steps, as in the README's compute column.
EXPERT_MADDS = {
    "ffn": lambda d, f, f_r, g, r: 3 * d * f,
    "recurrent": lambda d, f, f_r, g, r: r * (6 * d * d + 3 * d * f_r),
    "shared_recurrent": lambda d, f, f_r, g, r: 2 * d * d + r * (6 * d * d + 3 * d * f_r),
    "sandwich": lambda d, f, f_r, g, r: 2 * d * f + 3 * f * f + r * 3 * f * f,
    "parallel": lambda d, f, f_r, g, r: 3 * d * f + 8 * d * d + g * d + 2 * g,
    "sequential": lambda d, f, f_r, g, r: 3 * d * f + r * (8 * d * d + d),
}


def test_compute_formulas_cover_every_registered_type():
    assert set(EXPERT_MADDS) == set(EXPERT_TYPES)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_active_parameters_leave_out_the_unrouted_experts(expert_type):
    top_k = 2
    model = sized_model(expert_type, num_experts_per_tok=top_k)
    per_expert = EXPERT_FORMULAS[expert_type](D, F, FR, 1, G)
    if expert_type == "shared_recurrent":  # the engine is shared: only the projections belong to one expert
        per_expert = 2 * D * D
    layers = len(moe_blocks(model))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(active=True) == model.num_parameters() - layers * (E - top_k) * per_expert


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_active_trainable_parameters_leave_out_frozen_weights(expert_type):
    """`only_trainable=True` counts no frozen weight: frozen experts are neither in the total nor among the unrouted
    ones taken out of it (the count once went negative)."""
    top_k = 2
    model = sized_model(expert_type, num_experts_per_tok=top_k)
    for block in moe_blocks(model):
        block.experts.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.num_parameters(only_trainable=True) == trainable
    assert model.num_parameters(only_trainable=True, active=True) == trainable
    for block in moe_blocks(model):
        block.experts.requires_grad_(True)
    assert model.num_parameters(only_trainable=True, active=True) == model.num_parameters(active=True)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("steps", [1, 3])
def test_flops_per_token_follow_the_readme_formulas(expert_type, steps):
    vocab, layers, top_k, iterations = 100, 2, 2, 2
    model = sized_model(expert_type, num_experts_per_tok=top_k)
    attention, router = 4 * D * D, E * D
    expert = EXPERT_MADDS[expert_type](D, F, FR, G, steps)
    expected = 2 * (vocab * D + layers * (attention + iterations * (router + top_k * expert)))
    assert model.flops_per_token(num_recurrent_steps=steps, num_moe_iterations=iterations) == expected
    # The config's depth is the default.
    config = model.config
    assert model.flops_per_token() == model.flops_per_token(config.num_recurrent_steps, config.num_moe_iterations)


def test_flops_count_dense_layers_shared_experts_and_the_layerwise_router_cell():
    model = tiny_model(
        hidden_size=D,
        intermediate_size=F,
        num_experts=E,
        router_type="gru",
        router_hidden_size=H,
        shared_expert_intermediate_size=F,
        mlp_only_layers=[0],
    )
    dense, attention = 3 * D * F, 4 * D * D
    router = H * D + E * H + _cell("gru", H)  # input projection + head, then the shared cell once per layer
    shared = 3 * D * F + D  # shared expert and its gate
    expected = 2 * (100 * D + 2 * attention + dense + router + 3 * D * F + shared)
    assert model.flops_per_token() == expected
