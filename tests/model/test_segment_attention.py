"""Attention inside Huginn experts (`segment_layout` + `segment_causal_attention`) against causal attention run on
each segment alone, for every CPU layout and for group sizes on both sides of the padding to a multiple of 16, with
and without a window (`recurrent_attention_window`)."""

import pytest
import torch
import torch.nn.functional as F

import modeling_more


HEADS, HEAD_DIM, BATCH = 2, 8, 3


def routed_rows(counts, seq_len, generator):
    """segment (rows,) and position (rows,) sorted by (segment, position), segment = expert * BATCH + sequence, with
    counts[expert][sequence] rows at random distinct positions below `seq_len`."""
    segments, positions = [], []
    for expert, per_sequence in enumerate(counts):
        for sequence, count in enumerate(per_sequence):
            chosen = torch.randperm(seq_len, generator=generator)[:count].sort().values
            segments.append(torch.full((count,), expert * BATCH + sequence))
            positions.append(chosen)
    return torch.cat(segments), torch.cat(positions)


def per_segment_attention(q, k, v, segment, scaling, position=None, window=None):
    """Each segment attended alone: causal, or with `window` over `position` (keys less than `window` back)."""
    out = torch.empty_like(q)
    for value in segment.unique():
        rows = (segment == value).nonzero().squeeze(1)
        qs, ks, vs = (t[rows].transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
        if window is None:
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)
        else:
            pos = position[rows]
            mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)  # (n, n)
            attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scaling)
        out[rows] = attended.transpose(0, 1)
    return out


def assert_same_values_and_gradients(out, reference, inputs, generator):
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    grad = torch.randn(out.shape, generator=generator)
    got = torch.autograd.grad((out * grad).sum(), inputs)
    want = torch.autograd.grad((reference * grad).sum(), inputs)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize(
    "rows,expected", [(1, 1), (8, 8), (9, 16), (14, 16), (16, 16), (17, 17), (24, 24), (25, 32), (40, 40), (41, 48)]
)
def test_padded_group_size(rows, expected):
    assert modeling_more.padded_group_size(rows) == expected


# counts[expert][sequence] -> how rows are grouped and the group size. A few long segments attend per segment, many
# short ones per sequence under a block mask; groups of 14 and 25 rows are padded (to 16 and 32), 16, 17 and 5 are
# not. A dispatch is complete when every sequence holds the same rows; then per-sequence groups that need no padding
# take the static layout ("sequences").
CASES = {
    "segments of 14 padded to 16": ([[14, 13, 12], [1, 0, 0]], "segment", 16),
    "segments of 17 kept": ([[17, 17, 17], [0, 0, 0]], "segment", 17),
    "sequences of 14 padded to 16": ([[7, 5, 2], [7, 9, 12]], "sequence", 16),
    "sequences of 25 padded to 32": ([[12, 11, 3], [13, 14, 22]], "sequence", 32),
    "sequences of 16 kept": ([[8, 8, 1], [8, 8, 15]], "sequence", 16),
    "sequences of 5 kept": ([[3, 2, 1], [2, 3, 4]], "sequence", 5),
}
PARAMS = [
    (case, complete)
    for case, (counts, _, _) in CASES.items()
    for complete in (False, True)
    if not complete or len({sum(column) for column in zip(*counts, strict=True)}) == 1
]


@pytest.mark.parametrize("case,complete", PARAMS)
def test_segment_attention_matches_each_segment_alone(case, complete):
    counts, groups, width = CASES[case]
    generator = torch.Generator().manual_seed(0)
    segment, position = routed_rows(counts, seq_len=32, generator=generator)
    q, k, v = (torch.randn(segment.shape[0], HEADS, HEAD_DIM, generator=generator, requires_grad=True) for _ in "qkv")
    layout = modeling_more.segment_layout(segment, position, BATCH, complete=complete)
    if groups == "sequence" and complete and width == sum(column[0] for column in counts):
        assert layout.kind == "sequences"
    else:
        assert layout.kind == "segments" and (layout.mask is not None) == (groups == "sequence")
        assert layout.slots[2] == width
    out = modeling_more.segment_causal_attention(q, k, v, layout, HEAD_DIM**-0.5)
    reference = per_segment_attention(q, k, v, segment, HEAD_DIM**-0.5)
    assert_same_values_and_gradients(out, reference, (q, k, v), generator)


@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("case,complete", PARAMS)
def test_windowed_attention_matches_each_segment_alone(case, complete, window):
    """`recurrent_attention_window`: every layout (the per-sequence ones here, and the flat one of a cache) keeps each
    row to the keys of its segment less than `window` positions back, the positions being the tokens' own (a segment's
    rows need not be adjacent tokens)."""
    counts, _, _ = CASES[case]
    generator = torch.Generator().manual_seed(1)
    segment, position = routed_rows(counts, seq_len=32, generator=generator)
    q, k, v = (torch.randn(segment.shape[0], HEADS, HEAD_DIM, generator=generator, requires_grad=True) for _ in "qkv")
    reference = per_segment_attention(q, k, v, segment, HEAD_DIM**-0.5, position, window)
    layout = modeling_more.segment_layout(segment, position, BATCH, complete=complete, window=window)
    assert layout.mask is not None  # causal groups without a mask cannot hold the window
    out = modeling_more.segment_causal_attention(q, k, v, layout, HEAD_DIM**-0.5)
    assert_same_values_and_gradients(out, reference, (q, k, v), generator)
    # The flat layout of decoding, with nothing cached yet: the same result.
    empty = segment[:0]
    flat = modeling_more.segment_layout(segment, position, BATCH, cached=(empty, empty), window=window)
    assert flat.kind == "flat"
    cached = (k[:0].detach(), v[:0].detach())
    out = modeling_more.segment_causal_attention(q, k, v, flat, HEAD_DIM**-0.5, cached)
    reference = per_segment_attention(q, k, v, segment, HEAD_DIM**-0.5, position, window)
    assert_same_values_and_gradients(out, reference, (q, k, v), generator)
