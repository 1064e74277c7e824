"""`parallel` experts: the LSTM scan (custom autograd Function, static layout) equals the previous implementation.

The reference below is the implementation the scan replaced (data-dependent padded segments, autograd through a
per-position loop), kept here verbatim in spirit and compared in float64, outputs and gradients.
"""

import pytest
import torch
from helpers import tiny_config

import modeling_more


def reference_pad_segments(x, segment):
    """The former `pad_segments`: rows sorted by segment id into (segments, max_len, ...)."""
    _, compact, counts = torch.unique_consecutive(segment, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(segment.shape[0]) - starts[compact]
    padded = x.new_zeros(counts.shape[0], int(counts.max()), *x.shape[1:])
    padded[compact, slot] = x
    valid = torch.zeros(padded.shape[:2], dtype=torch.bool)
    valid[compact, slot] = True
    return padded, (compact, slot), valid, starts


def reference_lstm(experts, x, dispatch):
    """The former `MoREParallelExperts._lstm` (without a cache): one autograd step per position."""
    x_proj = modeling_more.grouped_linear(x, experts.lstm_w_ih, dispatch.offs)
    x_proj = x_proj + experts.lstm_bias[dispatch.group_index]
    padded, (seg, slot), valid, first = reference_pad_segments(x_proj, dispatch.segment)
    seg_expert = dispatch.expert_index[first]
    counts = torch.bincount(seg_expert, minlength=experts.num_experts + 1)[: experts.num_experts]
    seg_offs = torch.cumsum(counts, 0).to(torch.int32)
    seg_offs[-1] = padded.shape[0]
    h = x.new_zeros(padded.shape[0], experts.hidden_size)
    c = torch.zeros_like(h)
    outputs = []
    for t in range(padded.shape[1]):
        h_new, c_new = modeling_more._grouped_lstm_cell(padded[:, t], h, c, experts.lstm_w_hh, seg_offs)
        step_valid = valid[:, t, None]
        h, c = torch.where(step_valid, h_new, h), torch.where(step_valid, c_new, c)
        outputs.append(h)
    return torch.stack(outputs, dim=1)[seg, slot]


def routed(top_k, capacity, batch=3, seq=7, seed=0):
    """Parallel experts in float64 and a dispatch with padding, uneven segments and (optionally) capacity drops."""
    torch.manual_seed(seed)
    config = tiny_config(expert_type="parallel", num_experts_per_tok=top_k)
    experts = modeling_more.MoREParallelExperts(config).double()
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.3)
    tokens = batch * seq
    logits = torch.randn(tokens, config.num_experts) + torch.tensor([2.0, 0.0, 0.0, -1.0])  # uneven loads
    weights, index = torch.softmax(logits, -1).topk(top_k, dim=-1)
    token_mask = torch.ones(batch, seq, dtype=torch.bool)
    token_mask[0, :3] = False  # left padding
    position_ids = (token_mask.long().cumsum(-1) - 1).clamp_min(0)
    dispatch = modeling_more.build_dispatch(
        index,
        weights.double(),
        token_mask.reshape(-1),
        position_ids,
        0,
        capacity,
        config.num_experts,
        keep_dropped=True,
    )
    x = torch.randn(tokens, config.hidden_size, dtype=torch.float64)[dispatch.token_index].requires_grad_()
    return experts, dispatch, x


@pytest.mark.parametrize("top_k,capacity", [(1, None), (2, None), (2, 4)])
def test_scan_equals_previous_implementation(top_k, capacity):
    experts, dispatch, x = routed(top_k, capacity)
    kept = dispatch.kept[:, None].double()
    assert bool(dispatch.kept.all()) is False  # dropped rows take part (padding, capacity)
    grad_out = torch.randn(x.shape[0], experts.hidden_size, dtype=torch.float64)
    params = [x, experts.lstm_w_ih, experts.lstm_w_hh, experts.lstm_bias]

    new = experts._lstm(x, dispatch, None)
    new_grads = torch.autograd.grad((new * kept * grad_out).sum(), params)
    old = reference_lstm(experts, x, dispatch)
    old_grads = torch.autograd.grad((old * kept * grad_out).sum(), params)

    torch.testing.assert_close(new * kept, old * kept, rtol=1e-12, atol=1e-12)
    assert new.abs().sum() > 0
    for name, a, b in zip(["x", "lstm_w_ih", "lstm_w_hh", "lstm_bias"], new_grads, old_grads, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "valid,active",
    [
        ([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], (2, 2, 2)),  # static schedule: every expert at every step
        ([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], (2, 1, 1)),  # the second expert stops after one step
        ([[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]], (2, 1, 0)),  # no expert runs the last step
    ],
)
def test_scan_gradcheck_with_initial_state(valid, active):
    """The Function's backward (including the initial-state gradients a cache read feeds) against finite
    differences, with invalid (padded) steps in the middle of segments' time axes and experts leaving the schedule."""
    torch.manual_seed(0)
    segments, steps, hidden, experts = 4, 3, 2, 2
    x_proj = torch.randn(segments, steps, 4 * hidden, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor(valid, dtype=torch.bool)
    h = torch.randn(segments, hidden, dtype=torch.float64, requires_grad=True)
    c = torch.randn(segments, hidden, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(experts, 4 * hidden, hidden, dtype=torch.float64, requires_grad=True)
    # Valid steps as flat indices grouped by expert (segments 0-1, 2-3), plus one step that never runs (a dropped row).
    rows = torch.cat([valid.flatten().nonzero()[:, 0], torch.tensor([segments * steps + 1])])
    per_expert = valid.view(experts, -1).sum(1)
    row_offs = torch.cumsum(per_expert, 0).to(torch.int32)
    row_offs[-1] = rows.shape[0]

    def scan(x_proj, h, c, w_hh):
        return modeling_more.MoRELSTMScan.apply(x_proj, valid, h, c, w_hh, active, rows, row_offs)

    assert torch.autograd.gradcheck(scan, (x_proj, h, c, w_hh))


def test_cpu_schedule_equals_static_schedule(monkeypatch):
    """Longest-first expert order with finished experts skipped (CPU) gives the static schedule's outputs and
    gradients (every expert at each of seq_len steps, as on GPU and under compile), cache state included."""
    experts, dispatch, x = routed(top_k=2, capacity=4)
    seq_len = 7
    schedule = modeling_more.MoREParallelExperts._scan_schedule
    order, active = schedule(torch.tensor([[1, 5], [0, 0], [7, 2], [3, 3]]), seq_len)
    assert order.tolist() == [2, 0, 3, 1] and active == (3, 3, 3, 2, 2, 1, 1)
    results = {}
    for name in ("cpu", "static"):
        if name == "static":
            monkeypatch.setattr(modeling_more, "host_reads_free", lambda tensor: False)
            assert schedule(torch.tensor([[1, 5], [0, 0], [7, 2], [3, 3]]), seq_len) == (None, (4,) * seq_len)
        pool = modeling_more.MoREExpertPool()
        out = experts._lstm(x, dispatch, pool) * dispatch.kept[:, None]
        grads = torch.autograd.grad(out.sum(), [x, experts.lstm_w_hh])
        state = pool.entries["experts"]
        results[name] = (out, *grads, state.h, state.c)
    for a, b in zip(*results.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
