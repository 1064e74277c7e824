"""Routers: padding never reaches router state, and the recurrent routers keep their defining structure."""

import pytest
import torch
from helpers import ROUTER_TYPES, moe_blocks, random_ids, tiny_model


@pytest.mark.parametrize("iterations", [1, 2])
@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_left_padding_does_not_change_router_decisions(router_type, iterations):
    """Left-padded input gives the real tokens the same router logits (hence top-k) as the unpadded input."""
    pad = 3
    model = tiny_model(router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=2)
    ids = random_ids(1, 7, seed=2)
    padded = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(ids, output_router_logits=True).router_logits
        batched = model(padded, attention_mask=mask, output_router_logits=True).router_logits
    for entry, (a, b) in enumerate(zip(alone, batched, strict=True)):
        torch.testing.assert_close(b[pad:], a, atol=1e-5, rtol=1e-5, msg=f"router logits entry {entry}")
        assert torch.equal(b[pad:].topk(2, -1).indices, a.topk(2, -1).indices)


@pytest.mark.parametrize("router_type", ["gru_token", "rnn_token"])
def test_tokenwise_router_state_crosses_positions(router_type):
    """A token's routing depends on earlier tokens of its sequence (and never on later ones)."""
    model = tiny_model(router_type=router_type)
    ids = random_ids(1, 6)
    changed = ids.clone()
    changed[0, 1] = (ids[0, 1] + 1 - 3) % 97 + 3
    with torch.no_grad():
        base = model(ids, output_router_logits=True).router_logits[0]
        other = model(changed, output_router_logits=True).router_logits[0]
    torch.testing.assert_close(other[0], base[0])  # before the change: causal
    assert not torch.allclose(other[2:], base[2:])  # after it: the state carried the change


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_router_state_passes_from_layer_to_layer_only_for_layerwise_routers(router_type):
    """Perturbing the router state layer 0 hands on (its own routing unchanged) changes layer 1's routing for the
    RMoE layerwise routers, and nothing for routers without a layer-to-layer state."""
    model = tiny_model(router_type=router_type)
    gate = moe_blocks(model)[0].gate
    original = gate.forward

    def perturbed(*args, **kwargs):
        *routing, state = original(*args, **kwargs)
        if state is not None:
            state = state + torch.randn_like(state)
        return *routing, state

    ids = random_ids(2, 6)
    with torch.no_grad():
        base = model(ids, output_router_logits=True).router_logits
        gate.forward = perturbed
        other = model(ids, output_router_logits=True).router_logits
    torch.testing.assert_close(other[0], base[0], atol=0, rtol=0)  # layer 0 routes as before
    changed = not torch.allclose(other[1], base[1], atol=1e-6)
    assert changed == (router_type in ("gru", "rnn"))


def test_layerwise_router_cell_is_shared_by_all_layers():
    """One cell owned by the model: changing its weights changes every layer's routing, and no layer has its own."""
    model = tiny_model(router_type="gru")
    ids = random_ids(2, 6)
    with torch.no_grad():
        base = model(ids, output_router_logits=True).router_logits
        model.model.router_cell.weight_ih.add_(0.5)
        other = model(ids, output_router_logits=True).router_logits
    for layer, (a, b) in enumerate(zip(base, other, strict=True)):
        assert not torch.allclose(a, b, atol=1e-6), f"layer {layer}"
    assert not any("cell" in name for block in moe_blocks(model) for name, _ in block.gate.named_parameters())
