"""Synthesis II stabilisers and regularisers: each must change what it claims to change (none is a no-op)."""

import pytest
import torch
from helpers import EXPERT_TYPES, clone_model, moe_blocks, random_ids, tiny_model

from modeling_more import load_balancing_loss, routing_entropy


def _ids():
    return random_ids(2, 8)


def test_entropy_floor_penalty_value_and_weight():
    floor, coef = 3.0, 0.5  # above log(4): the floor is always active for 4 experts
    model = tiny_model(router_entropy_floor=floor, router_entropy_coef=coef, num_moe_iterations=2)
    reference = clone_model(model)
    reference.config.router_entropy_floor = 0.0  # blocks read the floor from the (copied) config
    ids = _ids()
    out = model(ids, labels=ids, output_router_logits=True)
    base = reference(ids, labels=ids)
    assert base.entropy_loss is None
    entropies = [routing_entropy(torch.softmax(logits, -1)) for logits in out.router_logits]
    expected = torch.stack([torch.relu(floor - e) for e in entropies]).mean()
    torch.testing.assert_close(out.entropy_loss, expected)
    torch.testing.assert_close(out.loss - base.loss, coef * expected)


def test_entropy_floor_raises_routing_entropy():
    """Descending on the floor penalty alone makes routing less peaked: the penalty's gradient is real."""
    model = tiny_model(train=True, router_entropy_floor=10.0, router_entropy_coef=1.0)
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.mul_(50)  # start from peaked routing
    ids = _ids()
    optimizer = torch.optim.SGD([b.gate.weight for b in moe_blocks(model)], lr=0.5)
    before = model(ids, output_router_logits=True).routing_stats
    for _ in range(5):
        optimizer.zero_grad()
        model(ids).entropy_loss.backward()
        optimizer.step()
    after = model(ids, output_router_logits=True).routing_stats
    for b, a in zip(before, after, strict=True):
        assert a["router_entropy"] > b["router_entropy"] + 1e-3


def test_router_logits_ema_mixes_iterations():
    ema = 0.9
    model = tiny_model(num_moe_iterations=3, router_logits_ema=ema)
    plain = clone_model(model)
    plain.config.router_logits_ema = 0.0
    ids = _ids()
    smoothed = model(ids, output_router_logits=True).router_logits
    raw_first = plain(ids, output_router_logits=True).router_logits
    # Iteration 0 has no previous logits: identical. Later iterations differ.
    torch.testing.assert_close(smoothed[0], raw_first[0])
    assert not torch.allclose(smoothed[1], raw_first[1])
    # Exact recurrence: hook the router's raw logits of layer 0 and replay the EMA.
    block = moe_blocks(model)[0]
    raw = []
    original = block.gate.compute_logits

    def record(*args, **kwargs):
        logits, state = original(*args, **kwargs)
        raw.append(logits.float())
        return logits, state

    block.gate.compute_logits = record
    smoothed = model(ids, output_router_logits=True).router_logits[:3]  # layer 0's iterations
    expected = raw[0]
    for t in (1, 2):
        expected = ema * expected + (1 - ema) * raw[t]
        torch.testing.assert_close(smoothed[t], expected)


def test_z_loss_reads_the_raw_router_logits_under_ema():
    """With the logit EMA, z-loss is taken on each router's own logits (its gradient is not scaled by 1 - ema);
    load balancing uses the smoothed logits that routing actually used."""
    ema = 0.9
    model = tiny_model(num_moe_iterations=3, router_logits_ema=ema)
    raw = []
    for block in moe_blocks(model):
        with torch.no_grad():
            block.gate.weight.mul_(30)  # logits large enough for the EMA to change their log-partition
        original = block.gate.compute_logits

        def record(*args, original=original, **kwargs):
            logits, state = original(*args, **kwargs)
            raw.append(logits.float())
            return logits, state

        block.gate.compute_logits = record
    out = model(_ids(), output_router_logits=True)
    expected = torch.stack([torch.logsumexp(r, -1).pow(2).mean() for r in raw]).mean()
    torch.testing.assert_close(out.z_loss, expected)
    smoothed = [torch.softmax(logits, -1) for logits in out.router_logits]
    balance = torch.stack(
        [
            load_balancing_loss(p, logits.topk(1, -1).indices)
            for p, logits in zip(smoothed, out.router_logits, strict=True)
        ]
    ).mean()
    torch.testing.assert_close(out.aux_loss, balance)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_truncated_backprop_through_iterations(expert_type):
    model = tiny_model(train=True, expert_type=expert_type, num_moe_iterations=3, num_backprop_iterations=1)
    out = model(_ids(), output_router_logits=True)
    grads = [logits.requires_grad for logits in out.router_logits[:3]]  # layer 0
    assert grads == [False, False, True]
    full = tiny_model(train=True, expert_type=expert_type, num_moe_iterations=3)
    assert all(logits.requires_grad for logits in full(_ids(), output_router_logits=True).router_logits)


def test_randomized_iteration_count_in_training_only():
    model = tiny_model(train=True, train_moe_iterations_min=2, train_moe_iterations_max=4, num_moe_iterations=1)
    layers = model.config.num_hidden_layers
    torch.manual_seed(0)
    seen = {len(model(_ids(), output_router_logits=True).router_logits) // layers for _ in range(30)}
    assert seen == {2, 3, 4}
    # An explicit argument wins; eval uses the inference default.
    assert len(model(_ids(), output_router_logits=True, num_moe_iterations=5).router_logits) == 5 * layers
    model.eval()
    assert len(model(_ids(), output_router_logits=True).router_logits) == layers


def test_expert_dropout_drops_assignments_in_training_only():
    model = tiny_model(train=True, expert_dropout=0.5, latent_init_std=0.0)
    ids = _ids()
    torch.manual_seed(0)
    first = model(ids).logits
    second = model(ids).logits
    assert not torch.allclose(first, second), "expert dropout should make training forwards differ"
    # Dropped assignments are a regulariser, not capacity overflow.
    assert int(model(ids).dropped_tokens) == 0
    model.eval()
    no_dropout = clone_model(model)
    no_dropout.config.expert_dropout = 0.0
    torch.testing.assert_close(model(ids).logits, no_dropout(ids).logits, atol=0, rtol=0)


def test_expert_dropout_keeps_expected_output():
    """Kept assignments are rescaled by 1 / (1 - p): the mean over many draws matches the undropped block."""
    model = tiny_model(train=True, expert_dropout=0.5, num_experts_per_tok=2)
    block = moe_blocks(model)[0]
    x = torch.randn(1, 64, model.config.hidden_size)
    settings = model.model.resolve_settings(num_recurrent_steps=1)
    torch.manual_seed(0)
    with torch.no_grad():
        mean = torch.stack([block(x, None, torch.arange(64)[None], 0, settings)[0] for _ in range(400)]).mean(0)
        model.config.expert_dropout = 0.0
        reference = block(x, None, torch.arange(64)[None], 0, settings)[0]
    assert (mean - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_orthogonality_penalty_in_loss():
    coef = 0.3
    model = tiny_model(expert_type="shared_recurrent", projection_orthogonality_coef=coef)
    reference = clone_model(model)
    reference.config.projection_orthogonality_coef = 0.0
    ids = _ids()
    out = model(ids, labels=ids)
    expected = torch.stack([b.experts.orthogonality_loss() for b in moe_blocks(model)]).mean()
    torch.testing.assert_close(out.expert_loss, coef * expected)  # the expert's own weighted penalty
    torch.testing.assert_close(out.loss - reference(ids, labels=ids).loss, coef * expected)
    assert reference(ids, labels=ids).expert_loss is None
