"""Router losses (load balancing, z-loss) with padding, the LM loss, and their weight under gradient accumulation."""

import pytest
import torch
import torch.nn.functional as F
from helpers import EXPERT_ROUTER_PAIRS, EXPERT_TYPES, ROUTER_TYPES, VOCAB, random_ids, tiny_model

from modeling_more import load_balancing_loss, router_z_loss


def _balanced(num_tokens=8, num_experts=4, top_k=1):
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    index = (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)[None, :]) % num_experts
    return probs, index


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_uniform_is_one(top_k):
    probs, index = _balanced(top_k=top_k)
    assert load_balancing_loss(probs, index).item() == pytest.approx(1.0, abs=1e-6)
    mask = torch.ones(probs.shape[0], dtype=torch.bool)
    assert load_balancing_loss(probs, index, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_skewed_is_above_one():
    logits = torch.zeros(8, 4)
    logits[:, 0] = 3.0
    probs = logits.softmax(-1)
    index = torch.zeros(8, 1, dtype=torch.long)
    loss = load_balancing_loss(probs, index)
    # E * f_0 * P_0 with f_0 = 1: all routing on the most probable expert.
    assert loss.item() == pytest.approx(4 * probs[0, 0].item(), rel=1e-6)
    assert loss.item() > 1.5


def test_load_balancing_matches_switch_formula():
    torch.manual_seed(0)
    probs = torch.randn(16, 4).softmax(-1)
    index = probs.topk(2, dim=-1).indices
    fraction = torch.stack([(index == e).float().sum() for e in range(4)]) / (16 * 2)
    expected = 4 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, index), expected)


def test_load_balancing_ignores_masked_tokens():
    probs, index = _balanced()
    base = load_balancing_loss(probs, index, torch.ones(8, dtype=torch.bool))
    skew_logits = torch.zeros(5, 4)
    skew_logits[:, 2] = 4.0
    probs_all = torch.cat([probs, skew_logits.softmax(-1)])
    index_all = torch.cat([index, torch.full((5, 1), 2)])
    mask = torch.cat([torch.ones(8, dtype=torch.bool), torch.zeros(5, dtype=torch.bool)])
    torch.testing.assert_close(load_balancing_loss(probs_all, index_all, mask), base, atol=1e-6, rtol=0)
    # Sanity: without the mask the skewed tokens do count.
    assert load_balancing_loss(probs_all, index_all).item() > base.item() + 0.1


def test_router_z_loss_ignores_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)
    padded = torch.cat([logits, torch.full((3, 4), 50.0)])
    mask = torch.cat([torch.ones(6, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)])
    torch.testing.assert_close(router_z_loss(padded, mask), expected)
    assert router_z_loss(padded).item() > expected.item() + 100


def _left_padded(batch=3, seq=10):
    ids = random_ids(batch, seq, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_model_aux_losses_exclude_padding(expert_type, router_type):
    model = tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2)
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    token_mask = mask.reshape(-1).bool()
    aux_terms, z_terms, unmasked_aux = [], [], []
    for logits in out.router_logits:
        assert torch.isfinite(logits[token_mask]).all()
        probs = logits.float().softmax(-1)
        index = probs.topk(2, dim=-1).indices
        aux_terms.append(load_balancing_loss(probs, index, token_mask))
        z_terms.append(router_z_loss(logits, token_mask))
        unmasked_aux.append(load_balancing_loss(probs, index))
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)
    torch.testing.assert_close(out.aux_loss, torch.stack(aux_terms).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.z_loss, torch.stack(z_terms).mean(), atol=1e-6, rtol=0)
    assert torch.isfinite(out.loss)
    # The padded tokens would have changed the loss: the mask matters here.
    assert not torch.allclose(out.aux_loss, torch.stack(unmasked_aux).mean(), atol=1e-7, rtol=0)


@pytest.mark.parametrize(("expert_type", "router_type"), EXPERT_ROUTER_PAIRS)
def test_padding_does_not_change_real_tokens(expert_type, router_type):
    """Left padding does not change the logits of the real tokens."""
    model = tiny_model(expert_type=expert_type, router_type=router_type, num_experts_per_tok=2)
    ids, mask = _left_padded()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            keep = mask[row].bool()
            alone = model(ids[row : row + 1, keep])
            torch.testing.assert_close(padded.logits[row, keep], alone.logits[0], atol=1e-5, rtol=0)


def _manual_lm_loss(logits, labels, reduction="mean"):
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100, reduction=reduction
    )


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_lm_loss_shifts_labels_and_ignores_minus_100(expert_type):
    model = tiny_model(expert_type=expert_type, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, 2:5] = -100
    labels[1, -1] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    config = model.config
    expected = (
        _manual_lm_loss(out.logits, labels)
        + config.router_aux_loss_coef * out.aux_loss
        + config.router_z_loss_coef * out.z_loss
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.lm_loss, _manual_lm_loss(out.logits, labels), atol=1e-6, rtol=0)
    # Sanity: the unshifted loss is a different number, so the comparison above checks the shift.
    unshifted = F.cross_entropy(out.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    assert not torch.allclose(unshifted, _manual_lm_loss(out.logits, labels), atol=1e-4)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_gradient_accumulation_keeps_weights(expert_type):
    """Trainer-style accumulation: micro-batch losses with `num_items_in_batch` sum to the full-batch loss; the aux
    terms keep their configured weight once (a mean over micro-batches, not a sum)."""
    model = tiny_model(expert_type=expert_type, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    config = model.config
    ids = random_ids(4, 8, seed=5)
    labels = ids.clone()
    # The same number of label tokens in each half (so token-share weighting equals a plain mean).
    labels[0, 1:3] = -100
    labels[3, 4:6] = -100
    num_items = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        full = model(ids, labels=labels)
        halves = [model(ids[s], labels=labels[s], num_items_in_batch=num_items) for s in (slice(0, 2), slice(2, 4))]
    lm_parts = [
        _manual_lm_loss(h.logits, labels[s], "sum") / num_items
        for h, s in zip(halves, (slice(0, 2), slice(2, 4)), strict=True)
    ]
    full_lm = _manual_lm_loss(full.logits, labels)
    torch.testing.assert_close(sum(lm_parts), full_lm, atol=1e-5, rtol=0)
    aux_parts = [h.loss - lm for h, lm in zip(halves, lm_parts, strict=True)]
    expected = sum(
        config.router_aux_loss_coef * h.aux_loss + config.router_z_loss_coef * h.z_loss for h in halves
    ) / len(halves)
    torch.testing.assert_close(sum(aux_parts), expected, atol=1e-5, rtol=0)
    # Summing the unscaled terms (each micro-batch at full weight) would double the weight.
    assert not torch.allclose(sum(aux_parts), 2 * expected, atol=1e-5, rtol=0)


def test_gradient_accumulation_unequal_micro_batches():
    """With unequal label counts the aux weight of each micro-batch is its share of the label tokens: the
    accumulated sum is a convex combination of the micro-batch terms (total weight one)."""
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    config = model.config
    ids = random_ids(4, 8, seed=6)
    labels = ids.clone()
    labels[0, 1:7] = -100
    num_items = (labels[:, 1:] != -100).sum()
    parts, terms, shares = [], [], []
    with torch.no_grad():
        for s in (slice(0, 2), slice(2, 4)):
            out = model(ids[s], labels=labels[s], num_items_in_batch=num_items)
            parts.append(out.loss - _manual_lm_loss(out.logits, labels[s], "sum") / num_items)
            terms.append(config.router_aux_loss_coef * out.aux_loss + config.router_z_loss_coef * out.z_loss)
            shares.append((labels[s][:, 1:] != -100).sum() / num_items)
    assert sum(shares) == pytest.approx(1.0)
    expected = sum(share * term for share, term in zip(shares, terms, strict=True))
    torch.testing.assert_close(sum(parts), expected, atol=1e-5, rtol=0)
    assert min(terms) - 1e-6 <= sum(parts) <= max(terms) + 1e-6


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(5), torch.tensor(0)], ids=["alone", "5", "0"])
@pytest.mark.parametrize("regularised", [True, False])
def test_batch_without_label_tokens(num_items_in_batch, regularised):
    """All labels -100: LM loss 0 with zero gradients, not NaN. Alone the batch keeps its router terms; under
    accumulation its share of the label tokens, and so of the router terms, is 0 (also when no micro-batch has any)."""
    coef = 0.1 if regularised else 0.0
    model = tiny_model(
        train=True,
        expert_type="shared_recurrent",
        router_aux_loss_coef=coef,
        router_z_loss_coef=coef,
        router_entropy_floor=1.0,
        router_entropy_coef=coef,
        projection_orthogonality_coef=coef,
    )
    ids = random_ids(2, 6)
    out = model(ids, labels=torch.full_like(ids, -100), num_items_in_batch=num_items_in_batch)
    terms = torch.stack([out.aux_loss, out.z_loss, out.entropy_loss])
    assert torch.isfinite(terms).all()
    weighted = coef * terms.sum()
    if out.expert_loss is not None:  # None with the orthogonality penalty off
        weighted = weighted + out.expert_loss
    expected = weighted if num_items_in_batch is None else torch.zeros(())
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected, atol=1e-7, rtol=0)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.any() for g in grads) == (regularised and num_items_in_batch is None)
