"""No host syncs in the MoE block of `ffn`, `recurrent` and `shared_recurrent` experts, in training (forward and
backward) and in cached decoding.

On CPU nothing waits, so the test counts the calls that would read a device tensor back to the host on a GPU
(`.item()`, `.tolist()`, `int()`, `float()`, `bool()`, `__index__`) while a block runs, and during the backward pass.
It runs the accelerator path: `modeling_more.host_reads_free` (True on CPU in eager mode, where MoRE sizes some work by
the data) is patched to False, as it is on a GPU and under compile.
"""

import contextlib

import pytest
import torch
from helpers import random_ids, tiny_model

import modeling_more


SYNC_METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Yields a list that collects the names of host reads made while `state["on"]` is True."""
    calls, state = [], {"on": False}
    monkeypatch.setattr(modeling_more, "host_reads_free", lambda tensor: False)
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if state["on"]:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # Counted: the MoE blocks (the iterated block inherits this forward) and the router losses from their reports.
    for owner, name in ((modeling_more.MoRESparseMoeBlock, "forward"), (modeling_more, "summarise_reports")):
        monkeypatch.setattr(owner, name, _counting(getattr(owner, name), state))
    yield calls, state


def _counting(function, state):
    def counted(*args, **kwargs):
        state["on"] = True
        try:
            return function(*args, **kwargs)
        finally:
            state["on"] = False

    return counted


def padded_batch():
    ids = random_ids(batch=2, seq=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: dropped rows in every block
    return ids, mask


@pytest.mark.parametrize("expert_type", ["ffn", "recurrent", "shared_recurrent"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_training_step_block_has_no_host_reads(expert_type, capacity_factor, monkeypatch):
    model = tiny_model(train=True, expert_type=expert_type, num_experts_per_tok=2, capacity_factor=capacity_factor)
    ids, mask = padded_batch()
    with counting_host_reads(monkeypatch) as (calls, state):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        assert calls == []
        state["on"] = True  # the whole backward pass
        out.loss.backward()
        state["on"] = False
    assert calls == []
    assert model.model.layers[0].mlp.experts.down_proj.grad is not None


@pytest.mark.parametrize("expert_type", ["ffn", "recurrent", "shared_recurrent"])
def test_cached_decoding_block_has_no_host_reads(expert_type, monkeypatch):
    model = tiny_model(expert_type=expert_type, num_experts_per_tok=2)
    ids, mask = padded_batch()
    with torch.no_grad(), counting_host_reads(monkeypatch) as (calls, _):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)  # prefill, then two decoding steps
        for _ in range(2):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
    assert calls == []
    if expert_type != "ffn":
        assert any(len(pool.entries["experts"]) > 0 for pool in out.cache.expert_pools.values())  # cached path ran


def test_the_counter_sees_host_reads(monkeypatch):
    """The counter is live inside a block: a block that reads a tensor back to the host is caught."""
    model = tiny_model(expert_type="ffn")
    ids, mask = padded_batch()
    experts_forward = modeling_more.MoREFFNExperts.forward

    def reading_forward(self, x, dispatch, settings=None, pool=None):
        int(dispatch.offs[-1])
        return experts_forward(self, x, dispatch, settings, pool)

    monkeypatch.setattr(modeling_more.MoREFFNExperts, "forward", reading_forward)
    with counting_host_reads(monkeypatch) as (calls, _):
        model(input_ids=ids, attention_mask=mask)
    assert calls == ["__int__"] * model.config.num_hidden_layers
