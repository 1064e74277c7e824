"""The guide's architecture diagnostics (§5.1-5.2) in the model's outputs: shapes for every model, known values on
hand-made routings, and dropped-token accounting under a capacity limit."""

import math

import pytest
import torch
from helpers import MODEL_CASES, RECURRENT_EXPERT_TYPES, moe_blocks, random_ids, tiny_model

from modeling_more import routing_statistics


ROUTING_KEYS = {"load", "load_cv", "max_min_load_ratio", "effective_experts", "router_entropy", "max_prob"}
RECURRENCE_KEYS = {
    "steps",
    "steps_per_token",
    "state_change",
    "final_step_contribution",
    "refinement_magnitude",
    "refinement_consistency",
}


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_every_diagnostic_has_its_shape(expert_type, router_type, iterations):
    num_experts, steps, batch, seq = 4, 3, 2, 6
    model = tiny_model(expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations)
    out = model(
        random_ids(batch, seq),
        num_recurrent_steps=steps,
        output_router_logits=True,
        output_recurrence_stats=True,
    )
    entries = model.config.num_hidden_layers * iterations  # one per MoE layer and iteration
    assert len(out.router_logits) == len(out.routing_stats) == entries
    for stats in out.routing_stats:
        assert set(stats) == ROUTING_KEYS | {"dropped_tokens"}
        assert stats["load"].shape == (num_experts,)
        assert torch.isclose(stats["load"].sum(), torch.tensor(1.0))
        for key in ROUTING_KEYS - {"load"}:
            assert stats[key].dim() == 0 and not torch.isnan(stats[key]), key
        assert 1 <= stats["effective_experts"] <= num_experts
    assert out.dropped_tokens == 0  # dropless by default
    if iterations > 1:
        assert len(out.iteration_stats) == model.config.num_hidden_layers
        for layer in out.iteration_stats:
            assert layer["router_entropy"].shape == layer["max_prob"].shape == (iterations,)
        # Recomputed from the router logits the model returns (layer-major, one per iteration).
        for layer, logits in zip(out.iteration_stats, _per_layer(out.router_logits, iterations), strict=True):
            max_prob = torch.stack([torch.softmax(entry, -1).max(-1).values.mean() for entry in logits])
            torch.testing.assert_close(layer["max_prob"], max_prob)
            torch.testing.assert_close(layer["max_prob_trend"], max_prob[-1] - max_prob[0])
    else:
        assert out.iteration_stats is None
    assert len(out.recurrence_stats) == entries
    for stats in out.recurrence_stats:
        if expert_type in RECURRENT_EXPERT_TYPES:
            assert RECURRENCE_KEYS <= set(stats)
            assert stats["state_change"].shape == (steps,)
            assert stats["steps_per_token"].shape == (batch * seq,)
            assert float(stats["steps"]) == steps
        if expert_type == "shared_recurrent":
            assert stats["projection_orthogonality"].dim() == stats["projection_divergence"].dim() == 0
        if expert_type == "parallel":
            assert 0 <= float(stats["recurrent_branch_weight"]) <= 1
    if expert_type in RECURRENT_EXPERT_TYPES:
        assert float(out.recurrent_steps) == steps
    else:
        assert out.recurrent_steps is None


def _per_layer(entries, iterations):
    return [entries[i : i + iterations] for i in range(0, len(entries), iterations)]


def test_routing_statistics_known_values():
    eye = torch.eye(4) * 20  # each token sure of one expert
    balanced = routing_statistics(eye.repeat(2, 1), top_k=1)
    assert torch.allclose(balanced["load"], torch.full((4,), 0.25))
    assert float(balanced["load_cv"]) == pytest.approx(0.0)
    assert float(balanced["max_min_load_ratio"]) == pytest.approx(1.0)
    assert float(balanced["effective_experts"]) == pytest.approx(4.0)
    assert float(balanced["max_prob"]) == pytest.approx(1.0, abs=1e-6)
    assert float(balanced["router_entropy"]) == pytest.approx(0.0, abs=1e-5)

    collapsed = routing_statistics(eye[:1].repeat(8, 1), top_k=1)
    assert float(collapsed["effective_experts"]) == pytest.approx(1.0)
    assert math.isinf(float(collapsed["max_min_load_ratio"]))
    assert float(collapsed["load_cv"]) == pytest.approx(math.sqrt(3))  # std/mean of (1, 0, 0, 0)

    uniform = routing_statistics(torch.zeros(5, 4), top_k=1)
    assert float(uniform["router_entropy"]) == pytest.approx(math.log(4))

    # Padding is excluded: the masked rows would otherwise collapse the load onto expert 0.
    logits = torch.cat([eye, eye[:1].repeat(4, 1)])
    mask = torch.tensor([True] * 4 + [False] * 4)
    assert float(routing_statistics(logits, 1, mask)["effective_experts"]) == pytest.approx(4.0)


def test_dropped_tokens_match_capacity_arithmetic():
    """Under capacity factor c each expert keeps ceil(c * tokens * top_k / experts) rows; the rest are counted."""
    model = tiny_model(train=True, capacity_factor=0.5, num_experts_per_tok=2, latent_init_std=0.0)
    ids = random_ids(2, 10)
    out = model(ids, output_router_logits=True)
    tokens, experts, top_k = ids.numel(), 4, 2
    capacity = math.ceil(0.5 * tokens * top_k / experts)
    expected_total = 0
    for logits, stats in zip(out.router_logits, out.routing_stats, strict=True):
        counts = torch.bincount(logits.topk(top_k, -1).indices.flatten(), minlength=experts)
        expected = int((counts - capacity).clamp_min(0).sum())
        assert int(stats["dropped_tokens"]) == expected
        expected_total += expected
    assert expected_total > 0, "the capacity limit should drop something here"
    assert int(out.dropped_tokens) == expected_total
    # Dropless in eval (eval_capacity_factor is None).
    model.eval()
    assert int(model(ids).dropped_tokens) == 0


def test_dropped_tokens_ignore_padding():
    model = tiny_model(train=True, capacity_factor=100.0)
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert int(model(ids, attention_mask=mask).dropped_tokens) == 0


def test_projection_statistics_known_values():
    model = tiny_model(expert_type="shared_recurrent")
    experts = moe_blocks(model)[0].experts
    with torch.no_grad():
        eye = torch.eye(experts.hidden_size)
        experts.w_in.copy_(eye.expand_as(experts.w_in))
        experts.w_out.copy_(eye.expand_as(experts.w_out))
    stats = experts.weight_statistics()
    assert float(stats["projection_orthogonality"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["projection_divergence"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        experts.w_in[1].neg_()  # opposite projections: cosine -1, divergence 2 for each pair with expert 1
        experts.w_out[1].neg_()
    pairs = 4 * 3
    expected = (2 * 3 * 2) / pairs  # 6 ordered pairs involve expert 1 out of 12, each with divergence 2
    assert float(experts.weight_statistics()["projection_divergence"]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_refinement_statistics_are_consistent(expert_type):
    model = tiny_model(expert_type=expert_type)
    out = model(random_ids(2, 8), num_recurrent_steps=4, output_recurrence_stats=True)
    for stats in out.recurrence_stats:
        assert -1 <= float(stats["refinement_consistency"]) <= 1
        assert float(stats["refinement_magnitude"]) > 0
        # Shares of the new state: finite from the zero eval state (the first step writes all of it, unless the
        # loop starts from the expert's FFN output as option D and the sandwich do).
        assert torch.isfinite(stats["state_change"]).all()
        if expert_type in ("recurrent", "shared_recurrent"):
            assert float(stats["state_change"][0]) == pytest.approx(1.0)


def test_option_d_statistics_measure_the_hidden_state():
    """Option D's loop state packs the LSTM's (h, c); its statistics are the guide's, on the output h only."""
    model = tiny_model(expert_type="sequential")
    experts = moe_blocks(model)[0].experts
    steps = []  # (state before, state after) of every step of layer 0
    step = experts.step

    def recording_step(state, *args):
        new = step(state, *args)
        steps.append((state.detach(), new.detach()))
        return new

    experts.step = recording_step
    with torch.no_grad():
        out = model(random_ids(2, 8), num_recurrent_steps=3, output_recurrence_stats=True)
    d = experts.hidden_size
    expected = [((new[:, :d] - old[:, :d]).norm(dim=-1) / new[:, :d].norm(dim=-1)).mean() for old, new in steps]
    stats = out.recurrence_stats[0]
    torch.testing.assert_close(stats["state_change"], torch.stack(expected))
    torch.testing.assert_close(stats["final_step_contribution"], expected[-1])  # the last step's share of h_T
    moved = (steps[-1][1][:, :d] - steps[0][0][:, :d]).norm(dim=-1).mean()
    torch.testing.assert_close(stats["refinement_magnitude"], moved)
