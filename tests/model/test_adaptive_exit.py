"""Adaptive per-token exit: fewer steps where states converge, honest step accounting, real compute saved."""

import pytest
import torch
from helpers import RECURRENT_EXPERT_TYPES, moe_blocks, random_ids, tiny_model


STEPS = 16


def _converging_model(expert_type):
    # Small weights make each expert's step a contraction, so latent states settle within a few steps.
    model = tiny_model(expert_type=expert_type, initializer_range=0.01)
    if expert_type == "sequential":
        # Its gated residual halves a small h at every step (a constant relative change, never converging);
        # a closed refinement gate leaves only the LSTM cell, which settles.
        with torch.no_grad():
            for block in moe_blocks(model):
                block.experts.refine_gate_bias.fill_(-10.0)
    return model


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_exit_reports_fewer_steps_on_converging_input(expert_type):
    model = _converging_model(expert_type)
    ids = random_ids(2, 8)
    with torch.no_grad():
        full = model(ids, num_recurrent_steps=STEPS, output_recurrence_stats=True)
        adaptive = model(ids, num_recurrent_steps=STEPS, adaptive_exit_threshold=1e-2, output_recurrence_stats=True)
    assert float(full.recurrent_steps) == STEPS
    assert float(adaptive.recurrent_steps) < STEPS
    for stats in adaptive.recurrence_stats:
        per_token = stats["steps_per_token"]
        assert per_token.shape == (ids.numel(),)
        assert ((per_token >= 1) & (per_token <= STEPS)).all()
    # Converged tokens barely move after their exit, so outputs stay close to the full-depth ones.
    assert (adaptive.logits - full.logits).abs().max() < 0.05


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_exit_with_threshold_zero_like_equals_full_depth(expert_type):
    model = tiny_model(expert_type=expert_type)
    ids = random_ids(2, 8)
    with torch.no_grad():
        full = model(ids, num_recurrent_steps=6).logits
        never = model(ids, num_recurrent_steps=6, adaptive_exit_threshold=1e-12).logits
    torch.testing.assert_close(never, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_exited_rows_are_not_recomputed(expert_type):
    """Count the rows each step call receives: the work shrinks with the active set."""
    model = _converging_model(expert_type)
    experts = moe_blocks(model)[0].experts
    rows_per_call = []
    original = experts.step

    def counting_step(state, *args, **kwargs):
        rows_per_call.append(state.shape[0])
        return original(state, *args, **kwargs)

    experts.step = counting_step
    ids = random_ids(2, 8)
    with torch.no_grad():
        out = model(ids, num_recurrent_steps=STEPS, adaptive_exit_threshold=1e-2, output_recurrence_stats=True)
    routed = rows_per_call[0]
    assert sum(rows_per_call) < routed * STEPS
    # The step accounting is exactly the work done.
    stats = out.recurrence_stats[0]
    assert sum(rows_per_call) == pytest.approx(float(stats["steps"]) * routed)


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_exit_respects_min_steps(expert_type):
    model = tiny_model(expert_type=expert_type, adaptive_exit_min_steps=5, adaptive_exit_threshold=1e3)
    with torch.no_grad():
        out = model(random_ids(2, 8), num_recurrent_steps=STEPS, output_recurrence_stats=True)
    for stats in out.recurrence_stats:
        real = stats["steps_per_token"]
        assert (real == 5).all()  # a huge threshold exits everyone at the first chance


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_exit_in_generate_matches_uncached(expert_type):
    """The cache stores an exited token's last keys/values for later steps, which is what recomputation sees."""
    model = _converging_model(expert_type)
    prompt = random_ids(2, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_recurrent_steps=8, adaptive_exit_threshold=1e-2)
    cached = model.generate(prompt, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_exit_threshold_is_validated():
    model = tiny_model(expert_type="recurrent")
    with pytest.raises(ValueError, match="adaptive_exit_threshold"):
        model(random_ids(1, 4), adaptive_exit_threshold=-1.0)


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_training_with_exit_and_truncated_backprop_is_refused(expert_type):
    """Truncated backprop starts the graph at one step for every row: a row that exits before it would train nothing
    (every expert weight once got no gradient when all rows exited early)."""
    model = tiny_model(train=True, expert_type=expert_type, num_backprop_steps=2)
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="adaptive exit and truncated backprop"):
        model(ids, num_recurrent_steps=6, adaptive_exit_threshold=1e3)
    with torch.no_grad():  # inference with exit stays available
        model(ids, num_recurrent_steps=6, adaptive_exit_threshold=1e3)
    model(ids, num_recurrent_steps=6).logits.sum().backward()  # and training without it


@pytest.mark.parametrize("expert_type", RECURRENT_EXPERT_TYPES)
def test_training_with_exit_gives_every_expert_weight_a_gradient(expert_type):
    model = tiny_model(train=True, expert_type=expert_type)
    model(random_ids(2, 6), num_recurrent_steps=6, adaptive_exit_threshold=1e3).logits.sum().backward()
    for block in moe_blocks(model):
        missing = [name for name, param in block.experts.named_parameters() if param.grad is None]
        assert not missing, missing
