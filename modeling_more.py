"""MoRE: Mixture of Recurrent Experts, one model file in the Transformers style.

Order, smallest piece first: norms, rotary and attention helpers -> grouped kernels and attention inside experts ->
dispatch -> experts (their reports, the recurrent step loop, adaptive exit; registry) -> routers (registry) -> router
losses and diagnostics (computed from the recorded pass reports) -> MoE block (one routed pass) and Synthesis II's
iterated block -> decoder layer -> cache (per-module cache entries) -> tensor and expert parallelism -> pretrained
base and outputs -> `MoREModel` -> `MoREForCausalLM` -> Auto registration.

The expert types and their designs are described in the README ("Expert types"); recurrent-depth blocks follow Huginn
(Geiping et al., 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach",
arXiv 2502.05171), routers Switch Transformer (Fedus et al., 2021), ST-MoE (Zoph et al., 2022) and RMoE (Qiu et al.,
2024, arXiv 2408.06793).
"""

import contextlib
import copy
import json
import math
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.distributed.expert_parallel import ExpertParallelLayer, MoEParamShard, apply_expert_parallelism
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard
from transformers.distributed.tensor_parallel import TensorParallelLayer
from transformers.dynamic_module_utils import get_relative_imports
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import CONFIG_NAME, can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs


if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Shard

try:  # remote code: both files live in one `transformers_modules` package
    from .configuration_more import ARCHITECTURE_FIELDS, EXPERT_TYPES, MoREConfig
except ImportError:  # installed as top-level modules
    from configuration_more import ARCHITECTURE_FIELDS, EXPERT_TYPES, MoREConfig


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Norms, rotary positions, attention helpers
# ---------------------------------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (n,) over the entries where `mask` (n,) is True (all when None); 0 when none is."""
    if mask is None:
        return values.mean()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


# PyTorch's CPU softmax is 10-20x slower over a last dimension shorter than one vector register (16 fp32) than over a
# leading one (torch 2.13, one thread, 32 x 4 x 14 rows of 14 scores: 439 against 23 us), so eager attention over
# fewer keys than this takes its softmax over a leading dimension.
SHORT_SOFTMAX = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32; `weight` is (d,) or one row per token (N, d) for grouped experts."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class MoRERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class MoRERotaryEmbedding(nn.Module):
    """Rotary cos/sin for arbitrary integer positions (a (batch, seq) grid or a flat list of routed tokens), with any
    of Transformers' RoPE types from `config.rope_parameters` (default, linear, dynamic, yarn, ...)."""

    def __init__(self, config, head_dim: int):
        super().__init__()
        # Transformers' RoPE functions read the head size from the config; experts attend with their own head size.
        self.config = copy.copy(config)
        self.config.head_dim = head_dim
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        rope_init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, self.compute_default_rope_parameters)
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, **kwargs) -> tuple[torch.Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @dynamic_rope_update  # dynamic / longrope types recompute `inv_freq` from the largest position
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, signed_sin)`, each (..., head_dim): `signed_sin` is the usual sin with its first half negated, the
        form `apply_rotary_pos_emb` takes."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (..., head_dim / 2)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((-sin, sin), dim=-1).to(x.dtype)


def apply_rotary_pos_emb(q, k, cos, signed_sin, unsqueeze_dim: int = 1):
    """Rotary on the two halves of the head dimension: Transformers' `x * cos + rotate_half(x) * sin`, written as
    `x * cos + x.roll(half) * signed_sin` (the same values): one roll replaces the chunk, negation and concatenation
    of `rotate_half` and their backward, a measurable share of a tiny model's step."""
    cos, signed_sin = cos.unsqueeze(unsqueeze_dim), signed_sin.unsqueeze(unsqueeze_dim)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, head_dim) -> (batch, kv_heads * n_rep, seq, head_dim)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    if key.shape[2] < SHORT_SOFTMAX:
        # Few keys: scores keys-major (batch, heads, keys, queries), so the softmax runs over a leading dim (see
        # `SHORT_SOFTMAX`); the weights come back as their (batch, heads, queries, keys) view.
        scores = torch.matmul(key, query.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask.transpose(2, 3)
        attn_weights = F.softmax(scores, dim=2, dtype=torch.float32).to(query.dtype).transpose(2, 3)
    else:
        attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MoREAttention(nn.Module):
    """Causal self-attention of the backbone, through Transformers' attention interface (eager, SDPA, ...)."""

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: "MoRECache | None" = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, signed_sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, signed_sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class MoREMLP(nn.Module):
    """Dense gated MLP (SwiGLU with `hidden_act="silu"`): dense layers and the shared expert."""

    def __init__(self, config: MoREConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def gated_activation(packed: torch.Tensor, act_fn) -> torch.Tensor:
    """`act(gate) * up` for the packed (rows, 2 * inter) gate/up output."""
    gate, up = packed.chunk(2, dim=-1)
    return act_fn(gate) * up


# ---------------------------------------------------------------------------------------------------------------------
# Grouped kernels: rows sorted by expert, stacked weights, no Python loop over experts
# ---------------------------------------------------------------------------------------------------------------------


GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_eager(x: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x, weight_t, offs=offs)


def _grouped_mm_fake(x: torch.Tensor, weight_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight_t.shape[2])


def _grouped_mm_weight_grad_eager(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group, `x[rows].T @ grad[rows]`: (groups, in, out); empty groups get zeros."""
    return F.grouped_mm(x.T, grad, offs=offs)


def _grouped_mm_weight_grad_fake(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, weight_t, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = torch.ops.more.grouped_mm(grad, weight_t.transpose(1, 2), offs)
    return grad_x, torch.ops.more.grouped_mm_weight_grad(x, grad, offs), None


# `grouped_mm` as opaque custom ops for `torch.compile`: Dynamo's fake-tensor rule for `grouped_mm` on CPU accepts
# bf16 only. The kernels inside are the eager `grouped_mm` (no per-group loop, no host sync). Registered once per
# process: remote code may import this file a second time under another module name.
if not hasattr(torch.ops.more, "grouped_mm"):
    torch.library.custom_op("more::grouped_mm", _grouped_mm_eager, mutates_args=())
    torch.library.register_fake("more::grouped_mm", _grouped_mm_fake)
    torch.library.custom_op("more::grouped_mm_weight_grad", _grouped_mm_weight_grad_eager, mutates_args=())
    torch.library.register_fake("more::grouped_mm_weight_grad", _grouped_mm_weight_grad_fake)
    torch.library.register_autograd("more::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype inside `torch.autocast` (grouped_mm is not autocast-enabled), else the weight's dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _align(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the inner and output sizes so rows are 16-byte aligned, as grouped_mm requires (tiny configs only)."""
    step = 16 // x.element_size()
    pad_in, pad_out = -weight.shape[2] % step, -weight.shape[1] % step
    if pad_in or pad_out:
        x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, pad_in, 0, pad_out))
    return x, weight


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) row range of each group, read back from the cumulative ends `offs` (a host sync)."""
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends, strict=True))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`x @ weight[g].T` for the rows of each group.

    x: (rows, in) sorted by group; weight: (groups, out, in); offs: (groups,) int32 cumulative row ends, the last
    equal to `rows`. One group is a plain linear layer. Inside `torch.autocast` both operands go to the autocast dtype.
    """
    dtype = matmul_dtype(x, weight)
    x, weight = x.to(dtype), weight.to(dtype)
    if weight.shape[0] == 1:
        return F.linear(x, weight[0])
    if dtype not in GROUPED_MM_DTYPES:
        # float64 (reference tests): the same result, one matmul per group, at the cost of a host sync.
        return torch.cat([F.linear(x[s:e], weight[g]) for g, (s, e) in enumerate(_group_bounds(offs))])
    out_features = weight.shape[1]
    x, weight = _align(x.contiguous(), weight)
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        out = torch.ops.more.grouped_mm(x, weight.transpose(1, 2), offs)
    else:
        out = F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    return out[:, :out_features]


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_linear`: per group, `grad[rows].T @ x[rows]` (groups, out, in).

    grad: (rows, out), x: (rows, in), both sorted by group and in one dtype; offs as in `grouped_linear`.
    """
    if offs.shape[0] == 1:
        return (grad.T @ x)[None]
    if grad.dtype not in GROUPED_MM_DTYPES:
        # float64 (reference tests): one matmul per group, a host sync.
        return torch.stack([grad[s:e].T @ x[s:e] for s, e in _group_bounds(offs)])
    out_features, in_features = grad.shape[1], x.shape[1]
    step = 16 // x.element_size()
    grad, x = F.pad(grad, (0, -out_features % step)).contiguous(), F.pad(x, (0, -in_features % step)).contiguous()
    if torch.compiler.is_compiling() and grad.dtype != torch.bfloat16:
        out = torch.ops.more.grouped_mm_weight_grad(grad, x, offs)
    else:
        out = F.grouped_mm(grad.T, x, offs=offs)
    return out[:, :out_features, :in_features]


def host_reads_free(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s data back to the host costs nothing: on CPU in eager mode, where a read waits for
    nothing, so work may be sized by the data and inputs checked by value. Never on an accelerator or under compile:
    static shapes, no host syncs."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


@dataclass
class MoRESegmentLayout:
    """How attention inside experts groups the routed rows (see `segment_layout`)."""

    kind: str  # "segments", "sequences" or "flat"
    # bool (batch, 1, q_len, k_len) for "sequences", (1, 1, rows, keys) for "flat", (groups, 1, size, size) for
    # "segments" whose groups are whole sequences (size: the group size in `slots`; None: one segment per group, plain
    # causal attention)
    mask: torch.Tensor | None = None
    order: torch.Tensor | None = None  # "sequences": (rows,) the rows grouped by sequence
    inverse: torch.Tensor | None = None  # "sequences": the inverse permutation of `order`
    slots: tuple | None = None  # "segments": (row's padded index (rows,), groups, padded group size)


# Cost of a padded attention row besides its query-key pairs (copies in and out), in query-key pairs.
SEGMENT_ROW_COST = 16
# PyTorch's CPU flash attention, measured (torch 2.13, AVX-512, forward + backward, 32 groups x 4 heads of 16): a group
# a few rows short of a multiple of 16 costs more than that multiple (0.83 ms at 14 rows, 0.46 ms at 16; 1.02 ms at 23,
# 0.96 ms at 32; 2.08 ms at 39, 1.93 ms at 48), so groups are padded up to it when that adds fewer than 8 rows.
ATTENTION_GROUP_MULTIPLE = 16


def padded_group_size(rows: int) -> int:
    """The size of an attention group holding `rows` rows: the next multiple of `ATTENTION_GROUP_MULTIPLE` when less
    than half of it short, else `rows`."""
    pad = -rows % ATTENTION_GROUP_MULTIPLE
    return rows + pad if pad < ATTENTION_GROUP_MULTIPLE // 2 else rows


def visible_keys(query_segment, query_position, key_segment, key_position, window=None):
    """Which keys each query sees (broadcast over the inputs' shapes): keys of its own segment at a lower or equal
    position and, with `window`, less than `window` positions back (`recurrent_attention_window`)."""
    visible = (key_segment == query_segment) & (key_position <= query_position)
    if window is not None:
        visible = visible & (key_position > query_position - window)
    return visible


def segment_layout(segment, position, batch_size, cached=None, complete=True, window=None):
    """Attention layout of the routed rows, built once per call and reused by every recurrent step.

    segment, position: (rows,) sorted by (segment, position), segment = expert * batch_size + sequence. `window`: the
    rows see only keys less than `window` positions back (None: every earlier position of their segment).
    - "sequences" (no cache, a complete dispatch): every sequence holds exactly top_k * seq_len rows (dropped ones
      included), so grouping rows by sequence gives a static (batch, top_k * seq_len) layout whose block mask keeps
      each segment causal: no host sync, static shapes.
    - "segments" (no cache, `host_reads_free`): groups of rows padded to the longest group (and on to
      `padded_group_size`). The groups are either the segments (causal attention within each: the work follows the
      segment sizes, good for long sequences) or the sequences (a block mask keeps each segment causal: few, dense
      groups, good for many short segments); on the CPU the layout with the fewer padded query-key pairs wins (a
      "sequences" layout when that one is complete and needs no padding). With a `window`, always the sequences:
      their mask holds it.
    - "flat" (a cache, or an expert-parallel rank's own rows off the CPU): one mask over all rows; with `cached` =
      (segment, position) of the cached rows, new rows attend to the cached rows and new rows of their segment at a
      lower or equal position.
    """
    if cached is None and host_reads_free(segment):
        _, compact, counts = torch.unique_consecutive(segment, return_inverse=True, return_counts=True)
        longest = int(counts.max())
        sequence = segment % batch_size
        per_sequence = torch.bincount(sequence, minlength=batch_size)
        longest_sequence = int(per_sequence.max())
        # Padded query-key pairs plus a per-row cost: causal segments compute about half their pairs, masked sequences
        # all of theirs.
        by_segment = counts.shape[0] * longest * ((longest + 1) // 2 + SEGMENT_ROW_COST)
        by_sequence = batch_size * longest_sequence * (longest_sequence + SEGMENT_ROW_COST)
        if by_segment <= by_sequence and window is None:  # causal groups: no mask that could hold the window
            slot = torch.arange(segment.shape[0], device=segment.device) - (torch.cumsum(counts, 0) - counts)[compact]
            width = padded_group_size(longest)
            return MoRESegmentLayout("segments", slots=(compact * width + slot, counts.shape[0], width))
        width = padded_group_size(longest_sequence)
        if not complete or width != longest_sequence:
            # Rows grouped by sequence, each sequence padded to `width` (a complete dispatch too, when that pads it);
            # a padding slot attends to itself only.
            order = torch.argsort(sequence, stable=True)
            starts = torch.cumsum(per_sequence, 0) - per_sequence
            slot = torch.empty_like(order).scatter_(
                0, order, torch.arange(order.shape[0], device=order.device) - starts[sequence[order]]
            )
            flat = sequence * width + slot
            padded = batch_size * width
            seg = (-1 - torch.arange(padded, device=segment.device)).index_copy(0, flat, segment)
            pos = torch.zeros_like(seg).index_copy_(0, flat, position.to(seg.dtype))
            seg, pos = seg.view(batch_size, -1), pos.view(batch_size, -1)
            mask = visible_keys(seg[:, :, None], pos[:, :, None], seg[:, None, :], pos[:, None, :], window)
            return MoRESegmentLayout("segments", mask=mask[:, None], slots=(flat, batch_size, width))
    if cached is not None or not complete:
        key_segment, key_position = segment, position
        if cached is not None:
            key_segment, key_position = torch.cat([cached[0], segment]), torch.cat([cached[1], position])
        mask = visible_keys(segment[:, None], position[:, None], key_segment[None], key_position[None], window)
        return MoRESegmentLayout("flat", mask=mask[None, None])  # (1, 1, rows, keys)
    order = torch.argsort(segment % batch_size, stable=True)  # (rows,) by (sequence, expert, position)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
    seg, pos = segment[order].view(batch_size, -1), position[order].view(batch_size, -1)  # (batch, top_k * seq)
    mask = visible_keys(seg[:, :, None], pos[:, :, None], seg[:, None, :], pos[:, None, :], window)  # (batch, q, k)
    return MoRESegmentLayout("sequences", mask=mask[:, None], order=order, inverse=inverse)


def segment_causal_attention(q, k, v, layout, scaling, cached=None):
    """Causal attention among the rows of each segment (one expert's tokens of one sequence).

    q, k, v: (rows, heads, head_dim), rows sorted by (segment, position); `layout` from `segment_layout`. `cached`
    optionally holds the keys and values (cached rows, heads, head_dim) of earlier tokens, in the layout's key order.
    Returns (rows, heads, head_dim).
    """
    rows, heads, head_dim = q.shape
    if layout.kind == "flat":
        if cached is not None:
            k, v = (torch.cat([c, new]) for c, new in zip(cached, (k, v), strict=True))
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, rows or keys, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, scale=scaling)
        return out[0].transpose(0, 1)  # (rows, heads, head_dim)
    if layout.kind == "segments":
        # Right-padded segments: plain causal attention keeps every real query off the padding after it (sequences:
        # the block mask does).
        flat, segments, longest = layout.slots  # flat: (rows,) group * longest + slot of each row
        # In place into the new zeros: the out-of-place copy would clone them first.
        pq, pk, pv = (
            t.new_zeros(segments * longest, heads, head_dim).index_copy_(0, flat, t).view(segments, longest, heads, -1)
            for t in (q, k, v)
        )
        causal = dict(is_causal=True) if layout.mask is None else dict(attn_mask=layout.mask)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (pq, pk, pv)), scale=scaling, **causal)
        return out.transpose(1, 2).reshape(segments * longest, heads, head_dim).index_select(0, flat)
    stacked = torch.cat([q, k, v], dim=-1)[layout.order].view(layout.mask.shape[0], -1, heads, 3 * head_dim)
    pq, pk, pv = stacked.transpose(1, 2).chunk(3, dim=-1)  # (batch, heads, top_k * seq, head_dim)
    out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=layout.mask, scale=scaling)
    return out.transpose(1, 2).reshape(rows, heads, head_dim)[layout.inverse]


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: route once, one stable sort by (expert, sequence, position), gather once, scatter-add once
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MoREDispatch:
    """Routed (token, expert) pairs sorted by (expert, sequence, position).

    Rows whose assignment was dropped (padding, capacity, expert dropout) are sorted last, carry expert id
    `num_experts` and gate weight 0, and ride in the last expert's group so every kernel sees whole groups without a
    host sync; they never reach an output, a statistic or a cache. On the CPU in eager mode, where a host read is
    free, `build_dispatch` leaves them out instead (`complete=False` when it did).
    """

    token_index: torch.Tensor  # (rows,) flat token index into (batch * seq)
    expert_index: torch.Tensor  # (rows,) 0..num_experts, num_experts = dropped
    weights: torch.Tensor  # (rows,) gate weight, 0 for dropped rows
    offs: torch.Tensor  # (num_experts,) int32 cumulative group ends, last == rows
    batch_index: torch.Tensor  # (rows,)
    position: torch.Tensor  # (rows,) rotary position of the token
    cache_index: torch.Tensor  # (rows,) index of the token in the cached sequence
    batch_size: int
    num_experts: int
    seq_len: int  # tokens per sequence in this call
    dropped: torch.Tensor | None = None  # () real (token, expert) pairs dropped by the capacity limit
    complete: bool = True  # every (token, slot) pair is a row: each sequence holds top_k * seq_len rows
    rows_cut: int = 0  # dropped rows `build_dispatch` left out (CPU eager only), after the rows here

    @property
    def kept(self) -> torch.Tensor:
        return self.expert_index < self.num_experts

    @property
    def group_index(self) -> torch.Tensor:
        """Weight group of each row (dropped rows use the last expert's weights)."""
        return self.expert_index.clamp(max=self.num_experts - 1)

    @property
    def segment(self) -> torch.Tensor:
        """Attention segment of each row: one per (expert, sequence); dropped rows form their own segments."""
        return self.expert_index * self.batch_size + self.batch_index

    def subset(self, index: torch.Tensor) -> "MoREDispatch":
        """The rows `index` (ascending, so still sorted by expert) as a dispatch of their own (incomplete)."""
        expert = self.expert_index[index]
        offs = _group_ends(expert, self.num_experts)
        offs[-1] = index.shape[0]
        return replace(
            self,
            token_index=self.token_index[index],
            expert_index=expert,
            weights=self.weights[index],
            offs=offs,
            batch_index=self.batch_index[index],
            position=self.position[index],
            cache_index=self.cache_index[index],
            complete=False,
        )


def _group_ends(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative row counts per expert (num_experts,) int32 for sorted expert ids in [0, num_experts].

    One binary search per expert in the sorted ids (no host read on any device, unlike bincount on GPU).
    """
    bounds = torch.arange(num_experts, device=expert.device, dtype=expert.dtype)
    return torch.searchsorted(expert, bounds, right=True, out_int32=True)


def build_dispatch(
    top_k_index,
    top_k_weights,
    token_mask,
    position_ids,
    cache_offset,
    capacity,
    num_experts,
    assignment_mask=None,
    keep_dropped=False,
):
    """Sort (token, slot) pairs once by (expert, sequence, position).

    top_k_index, top_k_weights: (tokens, top_k); token_mask: (tokens,) bool, False for padding; position_ids:
    (batch, seq). `capacity` (int, () tensor or None) caps the rows kept per expert. Priority (Switch / GShard): every
    token's first choice before any token's second choice, and so on; within one choice rank, earlier tokens (in
    flat batch-major order) first. `assignment_mask` (tokens, top_k) bool drops single assignments (expert dropout)
    before the capacity count; padding (False in `token_mask`) never takes a slot. On the CPU in eager mode the
    dropped rows are left out unless `keep_dropped` (the static layout every other device runs).
    """
    batch_size, seq_len = position_ids.shape
    num_tokens, top_k = top_k_index.shape
    expert = top_k_index  # (tokens, top_k)
    if token_mask is not None:
        expert = torch.where(token_mask[:, None], expert, num_experts)
    if assignment_mask is not None:
        expert = torch.where(assignment_mask, expert, num_experts)
    expert = expert.reshape(-1)  # (pairs,) token-major: pair p is token p // top_k's slot p % top_k
    dropped = expert.new_zeros(())  # a device tensor either way: counting never syncs with the host
    if capacity is not None:
        # Rank of each pair within its expert (Switch Transformer's cumsum over one-hot), counted choice-major so that
        # all first choices outrank all second choices.
        choice_major = expert.view(num_tokens, top_k).t().reshape(-1)  # (top_k * tokens,)
        one_hot = F.one_hot(choice_major, num_experts + 1)  # (pairs, experts + 1)
        rank = (torch.cumsum(one_hot, 0) * one_hot).sum(-1) - 1
        rank = rank.view(top_k, num_tokens).t().reshape(-1)  # back to (token, slot) order
        overflow = (rank >= capacity) & (expert < num_experts)
        dropped = overflow.sum()
        expert = torch.where(overflow, num_experts, expert)
    expert, order = torch.sort(expert, stable=True)  # pairs ascend by token already: stable keeps (sequence, position)
    offs = _group_ends(expert, num_experts)
    complete, rows_cut, all_kept = True, 0, False
    if not keep_dropped and host_reads_free(order):
        # CPU eager: the dropped rows (sorted last; padding, capacity, expert dropout) are cut off for one free host
        # read, so no expert spends work on them. Off the CPU and under compile they stay (static shapes, no sync).
        kept = int(offs[-1])
        if 0 < kept < order.shape[0]:
            order, expert, complete, rows_cut = order[:kept], expert[:kept], False, order.shape[0] - kept
        all_kept = kept == order.shape[0]
    token_index = order if top_k == 1 else torch.div(order, top_k, rounding_mode="floor")
    # index_select: its backward is one index_add, where indexing's is an accumulating index_put.
    weights = top_k_weights.reshape(-1).index_select(0, order)
    if not all_kept:
        weights = torch.where(expert < num_experts, weights, 0.0)
        offs[-1] = expert.shape[0]  # dropped rows ride in the last group
    batch_index = torch.div(token_index, seq_len, rounding_mode="floor")
    cache_index = token_index % seq_len + cache_offset
    return MoREDispatch(
        token_index=token_index,
        expert_index=expert,
        weights=weights,
        offs=offs,
        batch_index=batch_index,
        position=position_ids.reshape(-1).index_select(0, token_index),
        cache_index=cache_index,
        batch_size=batch_size,
        num_experts=num_experts,
        seq_len=seq_len,
        dropped=dropped,
        complete=complete,
        rows_cut=rows_cut,
    )


@dataclass
class MoREExpertReport:
    """What experts return with their rows (README, "Diagnostics")."""

    steps_taken: torch.Tensor | None = None  # (rows,) steps each routed row ran; None: the experts do not iterate
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # means over kept rows (`output_recurrence_stats`)


# ---------------------------------------------------------------------------------------------------------------------
# Experts: stacked weights over all experts of a layer, computed for all routed rows at once
# ---------------------------------------------------------------------------------------------------------------------


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded (DTensor) parameter gathered from its ranks, any other tensor as it is."""
    return tensor.full_tensor() if torch.distributed.is_available() and isinstance(tensor, DTensor) else tensor


def plan_under(prefix: str, plan: dict[str, str]) -> dict[str, str]:
    """A parallel plan whose names are relative to `prefix` ("" names the module itself), made absolute."""
    return {".".join(part for part in (prefix, name) if part): style for name, style in plan.items()}


class MoREExperts(nn.Module):
    """Base class: `forward(x, dispatch, settings=None, pool=None)` maps routed rows (rows, hidden) to expert outputs
    (rows, hidden) and a `MoREExpertReport`. `settings` are the call's frozen `MoREForwardSettings` (None: the
    config's inference defaults), `pool` the cache's `MoREExpertPool` of this layer and iteration (None: no cache).

    A new expert type is a subclass plus `register_expert(name, cls)`; the hooks below let the model, its
    initialisation, its loss, its compute count and its diagnostics pick it up without edits elsewhere.

    `tp_plan` / `ep_plan` say how the stacked weights shard under tensor / expert parallelism (names relative to the
    experts module, "" = the module itself; see "Tensor and expert parallelism" below). Weights a plan leaves out stay
    replicated.
    """

    tp_plan: dict[str, str] = {}
    ep_plan: dict[str, str] = {}
    uses_recurrent_steps = False  # whether `num_recurrent_steps` / adaptive exit change what the experts compute

    def __init__(self, config: MoREConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size

    def initialize_parameters(self, std: float) -> None:
        """Initialise this module's own parameters (sub-modules get their own call): biases zero, others
        normal(std). Called by `_init_weights`, so loaded weights are left alone (`transformers.initialization`)."""
        for name, param in self.named_parameters(recurse=False):
            if name.endswith("bias"):
                init.zeros_(param)
            else:
                init.normal_(param, mean=0.0, std=std)

    def regularisation_loss(self) -> torch.Tensor | None:
        """Weighted penalty on this layer's expert weights, added to the training loss (`expert_loss`); None = none."""
        return None

    def weight_statistics(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the weights themselves, added to `recurrence_stats` (none by default)."""
        return {}

    @classmethod
    def parameters_per_expert(cls, config: MoREConfig, names: set[str] | None = None) -> int:
        """Parameters that belong to one expert (weights shared by all experts, e.g. one engine, excluded); with
        `names`, of those parameters only (e.g. the trainable ones).

        Measured by building the module with 1 and 2 experts on the meta device, so a new expert type needs no formula.
        """
        counts = []
        for num_experts in (1, 2):
            single = copy.copy(config)
            single.num_experts, single.num_experts_per_tok = num_experts, 1
            with torch.device("meta"):
                counts.append({name: p.numel() for name, p in cls(single).named_parameters()})
        return sum(counts[1][name] - counts[0][name] for name in counts[1] if names is None or name in names)

    @classmethod
    def multiply_adds_per_token(cls, config: MoREConfig, num_steps: int) -> int:
        """Multiply-adds of one expert on one routed token at `num_steps` recurrent steps, attention scores excluded.

        Default: every weight of one expert is used once (true of single-pass experts); recurrent experts override it.
        """
        return cls.parameters_per_expert(config)


class MoREFFNExperts(MoREExperts):
    """Standard MoE experts: a gated FFN per expert, weights stacked as in Transformers' Mixtral."""

    # TP: every rank holds a slice of every expert's intermediate features; EP: whole experts per rank.
    tp_plan = {"gate_up_proj": "packed_colwise", "down_proj": "rowwise", "": "more_tp_experts"}
    ep_plan = {"gate_up_proj": "grouped_gemm", "down_proj": "grouped_gemm", "": "more_ep_experts"}

    def __init__(self, config: MoREConfig):
        super().__init__(config)
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_size, self.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, self.intermediate_size))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        x: torch.Tensor,
        dispatch: MoREDispatch,
        settings: "MoREForwardSettings | None" = None,
        pool: "MoREExpertPool | None" = None,
    ) -> tuple[torch.Tensor, MoREExpertReport]:
        hidden = gated_activation(grouped_linear(x, self.gate_up_proj, dispatch.offs), self.act_fn)  # (rows, inter)
        return grouped_linear(hidden, self.down_proj, dispatch.offs), MoREExpertReport()

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        return 3 * config.hidden_size * config.intermediate_size


class MoRERecurrentExperts(MoREExperts):
    """Shared machinery of every expert that iterates a latent state over r weight-tied steps.

    Subclasses define `encode` (expert input -> static input of the loop), `initial_state`, `step` and `decode`.
    This class owns the step loop: depth, truncated backprop (early steps under `no_grad`), latent state
    initialisation (normal(latent_init_std) in training, zeros in eval) and the recurrence statistics.
    """

    uses_recurrent_steps = True

    def encode(self, x, dispatch):
        return x

    def initial_state(self, static, dispatch):
        std = self.config.latent_init_std
        if self.training and std > 0:
            # Drawn for the dropped rows `build_dispatch` left out too (they come last): the same values and the same
            # RNG stream with and without them.
            if dispatch.rows_cut:
                rows = static.shape[0]
                shape = (rows + dispatch.rows_cut, *static.shape[1:])
                return torch.randn(shape, dtype=static.dtype, device=static.device)[:rows] * std
            return torch.randn_like(static) * std
        return torch.zeros_like(static)

    def prepare(self, static, dispatch, pool, exit):
        """Per-call inputs every step reuses, built once before the loop (None by default; Huginn experts build their
        attention layout and rotary here). `exit` is the call's `MoREAdaptiveExit` or None."""
        return None

    def step(self, state, static, dispatch, step_idx, prepared):
        raise NotImplementedError

    def decode(self, state, static, dispatch):
        return state

    def observed_state(self, state):
        """The part of the loop state (rows, ...) that statistics and adaptive exit measure: the hidden state the
        expert outputs, without extra cell state a loop may carry (README, "Diagnostics")."""
        return state

    def forward(
        self,
        x: torch.Tensor,
        dispatch: MoREDispatch,
        settings: "MoREForwardSettings | None" = None,
        pool: "MoREExpertPool | None" = None,
    ) -> tuple[torch.Tensor, MoREExpertReport]:
        settings = settings if settings is not None else MoREForwardSettings.from_config(self.config)
        static = self.encode(x, dispatch)
        state = initial = self.initial_state(static, dispatch)
        steps, backprop = settings.num_recurrent_steps, self.config.num_backprop_steps
        first_grad_step = 0 if backprop is None else max(0, steps - backprop)
        grad_enabled = torch.is_grad_enabled()
        kept = dispatch.kept
        exit = None
        if settings.exit_threshold is not None:
            exit = MoREAdaptiveExit(dispatch, settings.exit_threshold, self.config.adaptive_exit_min_steps)
        prepared = self.prepare(static, dispatch, pool, exit)
        changes, deltas = [], []
        for step_idx in range(steps):
            if step_idx == first_grad_step > 0 and grad_enabled and initial.requires_grad:
                # Truncated backprop: the steps run without a graph pass the gradient straight through to the initial
                # state (same value, identity Jacobian), so what `encode` computes before the loop (option D's FFN,
                # the sandwich expansion) keeps learning when no kept step reads it.
                state = state + (initial - initial.detach())
            with torch.set_grad_enabled(grad_enabled and step_idx >= first_grad_step):
                if exit is not None:
                    new_state = exit.step(self, state, static, step_idx, prepared)
                else:
                    new_state = self.step(state, static, dispatch, step_idx, prepared)
            if settings.output_recurrence_stats:
                new_h, old_h = self.observed_state(new_state), self.observed_state(state)
                changes.append(masked_mean(_row_change(new_h, old_h), kept))
                deltas.append((new_h - old_h).detach())
            state = new_state
            if exit is not None and exit.done:
                break  # every token has exited: the remaining steps cost nothing
        report = MoREExpertReport(
            exit.steps_taken if exit is not None else torch.full((state.shape[0],), float(steps), device=state.device)
        )
        if settings.output_recurrence_stats:
            report.stats = self._recurrence_stats(changes, deltas, state, initial, kept)
        if pool is not None:
            self.write_cache(pool, dispatch)
        return self.decode(state, static, dispatch), report

    def _recurrence_stats(self, changes, deltas, state, initial, kept) -> dict[str, torch.Tensor]:
        """The recurrence diagnostics (README, "Diagnostics") over routed rows."""
        stats = {"state_change": torch.stack(changes).detach()}  # (steps run,)
        # Share of the final state written by the last step (final-step contribution).
        stats["final_step_contribution"] = changes[-1].detach()
        # Refinement (designed for `sequential`, computed for every recurrent type): how far the loop moved the state
        # from its start (mean norm), and whether successive steps move it in the same direction (mean cosine).
        moved = (self.observed_state(state.detach()) - self.observed_state(initial.detach())).float().norm(dim=-1)
        stats["refinement_magnitude"] = masked_mean(moved, kept)
        if len(deltas) > 1:
            pairs = zip(deltas, deltas[1:], strict=False)
            cosines = [F.cosine_similarity(a.float(), b.float(), dim=-1) for a, b in pairs]  # (rows,) each
            stats["refinement_consistency"] = masked_mean(torch.stack(cosines).mean(0), kept)
        else:
            stats["refinement_consistency"] = state.new_zeros((), dtype=torch.float)
        return stats

    def write_cache(self, pool, dispatch):
        """Experts that keep per-step state for decoding store it here (see `MoREHuginnExperts`)."""


class MoREAdaptiveExit:
    """Per-token adaptive exit of a recurrent loop: after `min_steps`, a row whose relative latent change falls below
    `threshold` leaves the active set and keeps its state; a step runs the active rows only.

    Huginn experts also keep here the latest keys/values of every row: exited rows keep offering them to the rows that
    still iterate (the cache's depth policy).
    """

    def __init__(self, dispatch: MoREDispatch, threshold: float, min_steps: int):
        self.dispatch = dispatch  # the full dispatch
        self.threshold, self.min_steps = threshold, min_steps
        self.active = dispatch.kept.nonzero().squeeze(1)  # (active rows,)
        self.steps_taken = torch.zeros(dispatch.expert_index.shape[0], device=dispatch.expert_index.device)  # (rows,)
        self.latest_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, heads, head_dim) each

    @property
    def done(self) -> bool:
        return self.active.numel() == 0

    def step(self, experts, state, static, step_idx, prepared):
        """One step of `experts` for the active rows; updates the active set."""
        active = self.active
        if active.numel() == 0:  # no kept row at all (e.g. all padding): nothing runs, the loop stops after this step
            return state
        old = state[active]
        new = experts.step(old, _take_rows(static, active), self.dispatch.subset(active), step_idx, prepared)
        self.steps_taken = self.steps_taken.index_add(0, active, torch.ones_like(active, dtype=torch.float))
        change = _row_change(experts.observed_state(new), experts.observed_state(old))  # (active rows,)
        self.active = active[(change >= self.threshold) | (step_idx + 1 < self.min_steps)]
        return state.index_copy(0, active, new)


def _take_rows(static, index):
    """Rows `index` of the loop's static input (a tensor or a tuple of tensors)."""
    if isinstance(static, tuple):
        return tuple(t[index] for t in static)
    return static[index]


def _row_change(new, old):
    """||new - old|| / ||new|| per row (rows,): the share of the new state written by this step (the
    final-step contribution; finite from the zero eval state)."""
    return (new - old).float().norm(dim=-1) / new.float().norm(dim=-1).clamp_min(1e-6)


class MoREHuginnExperts(MoRERecurrentExperts):
    """Huginn-style recurrent block (Geiping et al., 2025) with weights stacked over `num_groups` weight groups.

    One step: `s = adapter([s; x])`, `s = norm(attn(norm(s)) + s)`, `s = norm(mlp(norm(s)) + s)`. Attention runs among
    the tokens routed to the same expert in the same sequence, causal, with rotary at their original positions.
    `expert_type="recurrent"` gives every expert its own block (num_groups = num_experts).
    """

    # EP shards the experts' blocks (the norms stack experts on dim 1); under TP the blocks stay replicated.
    ep_plan = dict.fromkeys(("adapter", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "grouped_gemm") | {
        "norms": "more_experts_dim1",
        "": "more_ep_experts",
    }

    def __init__(self, config: MoREConfig, num_groups: int | None = None):
        super().__init__(config)
        groups = self.num_experts if num_groups is None else num_groups
        d, heads = config.hidden_size, config.recurrent_num_heads
        self.num_heads, self.head_dim = heads, d // heads
        self.scaling = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        inter = config.recurrent_intermediate_size
        self.adapter = nn.Parameter(torch.empty(groups, d, 2 * d))
        self.qkv_proj = nn.Parameter(torch.empty(groups, 3 * d, d))
        self.o_proj = nn.Parameter(torch.empty(groups, d, d))
        self.gate_up_proj = nn.Parameter(torch.empty(groups, 2 * inter, d))
        self.down_proj = nn.Parameter(torch.empty(groups, d, inter))
        self.norms = nn.Parameter(torch.ones(4, groups, d))  # pre-attn, post-attn, pre-mlp, post-mlp
        self.act_fn = ACT2FN[config.hidden_act]
        self.rotary = MoRERotaryEmbedding(config, self.head_dim)

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        d = config.hidden_size
        # Per step: adapter 2d^2, qkv 3d^2, out d^2, gated MLP 3 d f_r.
        return num_steps * (6 * d * d + 3 * d * config.recurrent_intermediate_size)

    def initialize_parameters(self, std: float) -> None:
        super().initialize_parameters(std)
        init.ones_(self.norms)
        # Xavier-uniform adapter, with per-expert fans.
        bound = math.sqrt(6.0 / (self.adapter.shape[1] + self.adapter.shape[2]))
        init.uniform_(self.adapter, -bound, bound)

    def _group_offs(self, dispatch):
        return dispatch.offs

    def encode(self, x, dispatch):
        """The loop's static input: the rows and each of their four norm weights (rows, d), gathered once per call
        rather than at every norm of every step; as part of the static input they follow the rows that still iterate
        under adaptive exit. One gather per norm, not one (rows, 4, d) gather split at every step: that split's
        backward would stack the four gradients again at every step."""
        if self.norms.shape[1] == 1:
            return (x, *(norm.expand(x.shape[0], -1) for norm in self.norms))
        return (x, *(norm.index_select(0, dispatch.group_index) for norm in self.norms))

    def initial_state(self, static, dispatch):
        return super().initial_state(static[0], dispatch)

    def prepare(self, static, dispatch, pool, exit):
        """Rotary of every routed row and the attention layout (with the cached rows), built once for all steps."""
        kv_cache = None if pool is None else pool.entry("experts", MoREExpertKVCache)
        cached = None if kv_cache is None else kv_cache.read(0, dispatch.batch_size)  # positions: the same every step
        layout = segment_layout(
            dispatch.segment,
            dispatch.cache_index,
            dispatch.batch_size,
            None if cached is None else cached[2:],
            dispatch.complete,
            self.config.recurrent_attention_window,
        )
        # fp32 (the rotary's own precision), cast to the queries' dtype where applied
        cos, signed_sin = self.rotary(static[0].float(), dispatch.position)  # (rows, head_dim) each
        return MoREStepAttention(layout, cos, signed_sin, kv_cache, dispatch.batch_size, exit)

    def step(self, state, static, dispatch, step_idx, prepared):
        x, pre_attn, post_attn, pre_mlp, post_mlp = static  # (rows, d) each
        offs = self._group_offs(dispatch)
        state = grouped_linear(torch.cat([state, x], dim=-1), self.adapter, offs)
        attn = self._attention(rms_norm(state, pre_attn, self.eps), prepared, step_idx, offs)
        state = rms_norm(attn + state, post_attn, self.eps)
        hidden = gated_activation(
            grouped_linear(rms_norm(state, pre_mlp, self.eps), self.gate_up_proj, offs), self.act_fn
        )
        return rms_norm(grouped_linear(hidden, self.down_proj, offs) + state, post_mlp, self.eps)

    def _attention(self, x, prepared, step_idx, offs):
        rows = x.shape[0]
        q, k, v = grouped_linear(x, self.qkv_proj, offs).view(rows, 3, self.num_heads, self.head_dim).unbind(1)
        cos, signed_sin = prepared.cos.to(q.dtype), prepared.signed_sin.to(q.dtype)
        exit = prepared.exit
        if exit is not None:
            cos, signed_sin = cos[exit.active], signed_sin[exit.active]
        q, k = apply_rotary_pos_emb(q, k, cos, signed_sin)  # (rows, heads, head_dim)
        if exit is not None:
            # Adaptive exit: exited rows keep offering the keys/values of their last computed step (the cache's
            # depth policy); only the rows still iterating ask queries.
            if exit.latest_kv is None:
                exit.latest_kv = (k.new_zeros(exit.dispatch.expert_index.shape[0], *k.shape[1:]),) * 2
            k, v = (t.index_copy(0, exit.active, new) for t, new in zip(exit.latest_kv, (k, v), strict=True))
            exit.latest_kv = (k, v)
            q = torch.zeros_like(k).index_copy_(0, exit.active, q)  # in place: the new zeros need no clone
        cached = None
        if prepared.kv_cache is not None:
            prepared.kv_cache.stage(step_idx, k, v)
            cached = prepared.kv_cache.read(step_idx, prepared.batch_size)
        kv_cached = None if cached is None else cached[:2]
        out = segment_causal_attention(q, k, v, prepared.layout, self.scaling, kv_cached)
        if exit is not None:
            out = out[exit.active]
        return grouped_linear(out.reshape(rows, -1), self.o_proj, offs)

    def write_cache(self, pool, dispatch):
        pool.entry("experts", MoREExpertKVCache).commit(dispatch)


@dataclass
class MoREStepAttention:
    """What attention inside Huginn experts reuses at every step of one call."""

    layout: MoRESegmentLayout  # of every routed row (and the cached rows)
    cos: torch.Tensor  # (rows, head_dim) fp32 rotary of every routed row
    signed_sin: torch.Tensor  # as `MoRERotaryEmbedding` returns it
    kv_cache: "MoREExpertKVCache | None"  # the cache's keys/values of this layer and iteration
    batch_size: int
    exit: MoREAdaptiveExit | None  # the rows still iterating, and the latest keys/values of the others


class MoRESharedRecurrentExperts(MoREHuginnExperts):
    """One Huginn engine per layer; expert i differs only by its projections W_in^i, W_out^i (README, "Expert
    types": Synthesis I, shallow specialisation)."""

    # EP shards the projections; the one engine stays replicated (its gradient is summed over the EP group).
    ep_plan = {"w_in": "grouped_gemm", "w_out": "grouped_gemm", "": "more_ep_experts"}

    def __init__(self, config: MoREConfig):
        super().__init__(config, num_groups=1)
        d = config.hidden_size
        self.w_in = nn.Parameter(torch.empty(self.num_experts, d, d))
        self.w_out = nn.Parameter(torch.empty(self.num_experts, d, d))
        self.projection_dropout = nn.Dropout(config.projection_dropout)

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        return 2 * config.hidden_size**2 + super().multiply_adds_per_token(config, num_steps)  # W_in, W_out + engine

    def encode(self, x, dispatch):
        return super().encode(self.projection_dropout(grouped_linear(x, self.w_in, dispatch.offs)), dispatch)

    def decode(self, state, static, dispatch):
        return grouped_linear(state, self.w_out, dispatch.offs)

    def initialize_parameters(self, std: float) -> None:
        super().initialize_parameters(std)
        for weight in (self.w_in, self.w_out):  # the projections start orthogonal
            init.copy_(weight, torch.linalg.qr(torch.randn_like(weight, dtype=torch.float32))[0].to(weight))

    def regularisation_loss(self) -> torch.Tensor | None:
        coef = self.config.projection_orthogonality_coef
        return coef * self.orthogonality_loss() if coef > 0 else None

    def orthogonality_loss(self) -> torch.Tensor:
        """Mean ||W W^T - I||_F^2 / d over both projections of every expert (keeps them near-orthogonal)."""
        eye = torch.eye(self.hidden_size, device=self.w_in.device, dtype=torch.float32)
        weights = torch.cat([full_tensor(self.w_in), full_tensor(self.w_out)]).float()  # (2 * experts, d, d)
        gram = weights @ weights.transpose(1, 2)
        return (gram - eye).pow(2).sum(dim=(1, 2)).mean() / self.hidden_size

    @torch.no_grad()
    def weight_statistics(self) -> dict[str, torch.Tensor]:
        """Shared-block diagnostics (README, "Diagnostics"): `projection_orthogonality` (the orthogonality penalty's
        value, 0 = orthogonal) and `projection_divergence` (mean over expert pairs of 1 - cosine similarity of their
        flattened W_in and W_out; 0 = identical experts)."""
        divergence = []
        for weight in (self.w_in, self.w_out):
            flat = F.normalize(full_tensor(weight).float().flatten(1), dim=-1)  # (experts, d * d)
            cosine = flat @ flat.T
            experts = flat.shape[0]  # all of them, also when expert parallelism shards the weights
            pairs = ~torch.eye(experts, dtype=torch.bool, device=flat.device)
            divergence.append((1 - cosine[pairs]).mean() if experts > 1 else cosine.new_zeros(()))
        return {
            "projection_orthogonality": self.orthogonality_loss(),
            "projection_divergence": torch.stack(divergence).mean(),
        }


def _grouped_bias(bias: torch.Tensor, dispatch: MoREDispatch) -> torch.Tensor:
    """Per-row bias (rows, out) from stacked biases (experts, out): `index_select`, whose backward is one
    `index_add`, not advanced indexing's accumulating `index_put`."""
    return bias.index_select(0, dispatch.group_index)


def _grouped_lstm_cell(x_proj, h, c, w_hh, offs):
    """One LSTM-cell step for rows grouped by expert; x_proj already holds `x @ W_ih^T + b` (rows, 4 * hidden)."""
    gates = x_proj + grouped_linear(h, w_hh, offs)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class MoRESandwichExperts(MoRERecurrentExperts):
    """Option B (README, "Expert types"): expand d -> d_ff, activation, r GRU-cell steps in d_ff, contract d_ff -> d.

    The expanded features are both the GRU's initial state and its input at every step (re-injection, as the
    Huginn adapter re-injects the input), so the GRU refines the FFN's hidden features.
    """

    ep_plan = dict.fromkeys(
        ("expand", "contract", "gru_w_ih", "gru_w_hh", "gru_ih_bias", "gru_hh_bias"), "grouped_gemm"
    )
    ep_plan |= {"": "more_ep_experts"}

    def __init__(self, config: MoREConfig):
        super().__init__(config)
        d, inter, experts = config.hidden_size, config.intermediate_size, config.num_experts
        self.expand = nn.Parameter(torch.empty(experts, inter, d))
        self.contract = nn.Parameter(torch.empty(experts, d, inter))
        self.gru_w_ih = nn.Parameter(torch.empty(experts, 3 * inter, inter))
        self.gru_w_hh = nn.Parameter(torch.empty(experts, 3 * inter, inter))
        self.gru_ih_bias = nn.Parameter(torch.zeros(experts, 3 * inter))
        self.gru_hh_bias = nn.Parameter(torch.zeros(experts, 3 * inter))
        self.act_fn = ACT2FN[config.hidden_act]

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        d, f = config.hidden_size, config.intermediate_size
        return 2 * d * f + 3 * f * f + num_steps * 3 * f * f  # expand + contract, GRU input once, GRU state per step

    def encode(self, x, dispatch):
        expanded = self.act_fn(grouped_linear(x, self.expand, dispatch.offs))  # (rows, d_ff)
        # The GRU input is the same at every step: project it once.
        input_gates = grouped_linear(expanded, self.gru_w_ih, dispatch.offs)
        input_gates = input_gates + _grouped_bias(self.gru_ih_bias, dispatch)
        return expanded, input_gates

    def initial_state(self, static, dispatch):
        return static[0]

    def step(self, state, static, dispatch, step_idx, prepared):
        gi = static[1]  # (rows, 3 * d_ff)
        gh = grouped_linear(state, self.gru_w_hh, dispatch.offs) + _grouped_bias(self.gru_hh_bias, dispatch)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        reset, update = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        candidate = torch.tanh(i_n + reset * h_n)
        return (1 - update) * candidate + update * state

    def decode(self, state, static, dispatch):
        return grouped_linear(state, self.contract, dispatch.offs)


class MoRESequentialExperts(MoRERecurrentExperts):
    """Option D (README, "Expert types"): FFN, then r LSTM-cell refinement steps with a sigmoid-gated residual.

    The loop state packs the LSTM's (h, c) as one (rows, 2 * hidden) tensor.
    """

    tp_plan = plan_under("ffn", MoREFFNExperts.tp_plan)  # the FFN splits as `ffn` experts do, the LSTM is replicated
    ep_plan = plan_under("ffn", dict.fromkeys(("gate_up_proj", "down_proj"), "grouped_gemm")) | dict.fromkeys(
        ("lstm_w_ih", "lstm_w_hh", "lstm_bias", "refine_gate", "refine_gate_bias"), "grouped_gemm"
    )
    ep_plan |= {"": "more_ep_experts"}

    def __init__(self, config: MoREConfig):
        super().__init__(config)
        d, experts = config.hidden_size, config.num_experts
        self.ffn = MoREFFNExperts(config)
        self.lstm_w_ih = nn.Parameter(torch.empty(experts, 4 * d, d))
        self.lstm_w_hh = nn.Parameter(torch.empty(experts, 4 * d, d))
        self.lstm_bias = nn.Parameter(torch.zeros(experts, 4 * d))
        self.refine_gate = nn.Parameter(torch.empty(experts, d))
        self.refine_gate_bias = nn.Parameter(torch.zeros(experts))

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        d = config.hidden_size
        return 3 * d * config.intermediate_size + num_steps * (8 * d * d + d)  # FFN, then per step LSTM 8d^2 + gate d

    def encode(self, x, dispatch):
        return self.ffn(x, dispatch)[0]

    def initial_state(self, static, dispatch):
        return torch.cat([static, torch.zeros_like(static)], dim=-1)

    def step(self, state, static, dispatch, step_idx, prepared):
        h, c = state.chunk(2, dim=-1)
        x_proj = grouped_linear(h, self.lstm_w_ih, dispatch.offs) + _grouped_bias(self.lstm_bias, dispatch)
        h_new, c = _grouped_lstm_cell(x_proj, h, c, self.lstm_w_hh, dispatch.offs)
        gate_logit = (h * self.refine_gate.index_select(0, dispatch.group_index)).sum(-1, keepdim=True)
        gate = torch.sigmoid(gate_logit + _grouped_bias(self.refine_gate_bias, dispatch)[:, None])  # (rows, 1)
        return torch.cat([gate * h_new + (1 - gate) * h, c], dim=-1)

    def observed_state(self, state):
        return state[:, : self.hidden_size]  # h, without the LSTM cell state c

    def decode(self, state, static, dispatch):
        return self.observed_state(state)


class MoRELSTMScan(torch.autograd.Function):
    """An LSTM over the time axis of padded segments, each segment with its expert's recurrent weights.

    Segments are grouped by expert, the same number per expert, and the experts ordered so that at step t only the
    first `active[t]` of them have rows left: a step reads only those experts' recurrent weights (each step is
    memory-bound, it re-reads a (4 * hidden, hidden) weight for a few rows). Backward runs the recurrence in reverse
    and computes the recurrent weight gradient once, as one grouped matmul over the valid positions only, instead of
    one (experts, 4 * hidden, hidden) gradient per position.
    """

    @staticmethod
    def forward(ctx, x_proj, valid, h, c, w_hh, active, rows, row_offs):
        """x_proj: (segments, T, 4 * hidden) input gates with bias; valid: (segments, T) bool, invalid steps keep the
        state; h, c: (segments, hidden) initial state; w_hh: (experts, 4 * hidden, hidden); active: T ints, the
        experts with a valid step at t lead the order; rows: flat indices (segment * T + t) of the valid steps, grouped
        by expert, any index >= segments * T standing for a step that never runs; row_offs: (experts,) int32
        cumulative ends of `rows`. Returns every step's h (segments, T, hidden) and the final h and c."""
        segments, steps, hidden = x_proj.shape[0], x_proj.shape[1], h.shape[-1]
        per_expert = segments // w_hh.shape[0]
        keep = any(ctx.needs_input_grad)
        outputs = x_proj.new_zeros(segments, steps, hidden)
        if keep:
            acts = torch.zeros_like(x_proj)
            h_prev, c_prev, tanh_cs = (x_proj.new_zeros(segments, steps, hidden) for _ in range(3))
        h, c = h.clone(), c.clone()
        for t, num in enumerate(active):
            n = num * per_expert
            if n:
                h_t, c_t = h[:n], c[:n]
                # One batched matmul: every expert has per_expert segments. (n, 4 * hidden)
                recurrent = torch.bmm(h_t.view(num, per_expert, hidden), w_hh[:num].transpose(1, 2)).flatten(0, 1)
                i, f, g, o = (x_proj[:n, t] + recurrent).chunk(4, dim=-1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c_new = f * c_t + i * g
                tanh_c = torch.tanh(c_new)
                if keep:
                    acts[:n, t] = torch.cat([i, f, g, o], dim=-1)
                    h_prev[:n, t], c_prev[:n, t], tanh_cs[:n, t] = h_t, c_t, tanh_c
                step_valid = valid[:n, t, None]
                h[:n], c[:n] = torch.where(step_valid, o * tanh_c, h_t), torch.where(step_valid, c_new, c_t)
            outputs[:, t] = h
        if keep:
            ctx.save_for_backward(acts, h_prev, c_prev, tanh_cs, valid, w_hh, rows, row_offs)
            ctx.active = active
        return outputs, h, c

    @staticmethod
    def backward(ctx, grad_outputs, grad_h, grad_c):
        acts, h_prev, c_prev, tanh_cs, valid, w_hh, rows, row_offs = ctx.saved_tensors
        per_expert = acts.shape[0] // w_hh.shape[0]
        dh, dc = grad_h.clone(), grad_c.clone()
        grad_x = torch.zeros_like(acts)
        for t in reversed(range(len(ctx.active))):
            num = ctx.active[t]
            n = num * per_expert
            dh += grad_outputs[:, t]  # segments without a step at t carried their state into this output
            if not n:
                continue
            step_valid = valid[:n, t, None]
            i, f, g, o = acts[:n, t].chunk(4, dim=-1)
            tanh_c = tanh_cs[:n, t]
            dh_new, dc_new = torch.where(step_valid, dh[:n], 0.0), torch.where(step_valid, dc[:n], 0.0)
            dc_total = dc_new + dh_new * o * (1 - tanh_c**2)
            d_gates = torch.cat(
                [
                    dc_total * g * i * (1 - i),
                    dc_total * c_prev[:n, t] * f * (1 - f),
                    dc_total * i * (1 - g**2),
                    dh_new * tanh_c * o * (1 - o),
                ],
                dim=-1,
            )  # (n, 4 * hidden), zero at invalid steps
            grad_x[:n, t] = d_gates
            dc[:n] = torch.where(step_valid, dc_total * f, dc[:n])
            d_state = torch.bmm(d_gates.view(num, per_expert, -1), w_hh[:num]).flatten(0, 1)  # (n, hidden)
            dh[:n] = torch.where(step_valid, d_state, dh[:n])
        # The valid steps, grouped by expert, in one grouped matmul (steps that never ran read a zero row).
        num_slots = acts.shape[0] * acts.shape[1]
        grad_rows, h_rows = (F.pad(s.flatten(0, 1), (0, 0, 0, 1))[rows.clamp(max=num_slots)] for s in (grad_x, h_prev))
        grad_w = grouped_weight_grad(grad_rows, h_rows, row_offs)
        return grad_x, None, dh, dc, grad_w, None, None, None


class MoREParallelExperts(MoREExperts):
    """Option C (README, "Expert types"): FFN branch || LSTM branch, mixed per token by a softmax gate (d -> 64 -> 2).

    The LSTM runs over the tokens routed to the expert in each sequence, in time order; its (h, c) per
    (expert, sequence) is cached for decoding.
    """

    tp_plan = plan_under("ffn", MoREFFNExperts.tp_plan)  # the FFN branch splits as `ffn` experts do
    ep_plan = plan_under("ffn", dict.fromkeys(("gate_up_proj", "down_proj"), "grouped_gemm")) | dict.fromkeys(
        ("lstm_w_ih", "lstm_w_hh", "lstm_bias", "gate_in", "gate_in_bias", "gate_out", "gate_out_bias"), "grouped_gemm"
    )
    ep_plan |= {"": "more_ep_experts"}

    def __init__(self, config: MoREConfig):
        super().__init__(config)
        d, experts, gate_hidden = config.hidden_size, config.num_experts, config.parallel_gate_hidden_size
        self.ffn = MoREFFNExperts(config)
        self.lstm_w_ih = nn.Parameter(torch.empty(experts, 4 * d, d))
        self.lstm_w_hh = nn.Parameter(torch.empty(experts, 4 * d, d))
        self.lstm_bias = nn.Parameter(torch.zeros(experts, 4 * d))
        self.gate_in = nn.Parameter(torch.empty(experts, gate_hidden, d))
        self.gate_in_bias = nn.Parameter(torch.zeros(experts, gate_hidden))
        self.gate_out = nn.Parameter(torch.empty(experts, 2, gate_hidden))
        self.gate_out_bias = nn.Parameter(torch.zeros(experts, 2))

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):
        d, g = config.hidden_size, config.parallel_gate_hidden_size
        return 3 * d * config.intermediate_size + 8 * d * d + g * d + 2 * g  # FFN, one LSTM step, gate

    def forward(
        self,
        x: torch.Tensor,
        dispatch: MoREDispatch,
        settings: "MoREForwardSettings | None" = None,
        pool: "MoREExpertPool | None" = None,
    ) -> tuple[torch.Tensor, MoREExpertReport]:
        ffn_out = self.ffn(x, dispatch)[0]
        lstm_out = self._lstm(x, dispatch, pool)
        hidden = F.relu(grouped_linear(x, self.gate_in, dispatch.offs) + _grouped_bias(self.gate_in_bias, dispatch))
        w2 = self.gate_out.index_select(0, dispatch.group_index)  # (rows, 2, gate_hidden)
        gates = F.softmax(torch.einsum("rh,rkh->rk", hidden, w2) + _grouped_bias(self.gate_out_bias, dispatch), dim=-1)
        report = MoREExpertReport()
        if settings is not None and settings.output_recurrence_stats:
            report.stats["recurrent_branch_weight"] = masked_mean(gates[:, 1].detach(), dispatch.kept)
        return gates[:, :1] * ffn_out + gates[:, 1:] * lstm_out, report

    # A deliberate graph break: the scan is a Python loop over positions, which Dynamo would unroll into a graph that
    # grows with the sequence (inductor compiled a tiny model at 128 tokens for over 17 minutes). It runs eagerly
    # between two compiled graphs instead, with the CPU schedule on CPU.
    @torch.compiler.disable
    def _lstm(self, x, dispatch, pool):
        # One dtype for the whole scan (the autocast dtype inside autocast): its backward runs outside autocast.
        dtype = matmul_dtype(x, self.lstm_w_hh)
        x_proj = grouped_linear(x, self.lstm_w_ih, dispatch.offs) + _grouped_bias(self.lstm_bias, dispatch)
        x_proj = x_proj.to(dtype)
        batch, experts = dispatch.batch_size, self.num_experts
        # Layout: one segment per (expert, sequence), grouped by expert (batch segments each), with a time slot per
        # row. Dropped rows go to one extra segment that never runs and outputs zeros.
        segments, seq_len = experts * batch, dispatch.seq_len
        segment = torch.where(dispatch.kept, dispatch.segment, segments)  # (rows,)
        counts = torch.zeros(segments + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, segment, torch.ones_like(segment)
        )
        slot = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[segment]
        order, active = self._scan_schedule(counts[:segments].view(experts, batch), seq_len)
        steps = len(active)
        slot = slot.clamp(max=steps - 1)  # only the extra segment can hold more rows than time slots
        h = x_proj.new_zeros(segments, self.hidden_size)
        c = torch.zeros_like(h)
        state_cache = None if pool is None else pool.entry("experts", MoRESegmentStateCache)
        if state_cache is not None:
            h, c = state_cache.read(h, c)
        w_hh = self.lstm_w_hh.to(dtype)
        if order is not None:  # segments, states and weights in scan order
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(experts, device=x.device))
            place = torch.full((segments + 1,), segments, device=x.device)  # segment id -> id in scan order
            place[:segments] = (rank[:, None] * batch + torch.arange(batch, device=x.device)).flatten()
            segment = place[segment]
            h, c = (s.view(experts, batch, -1)[order].flatten(0, 1) for s in (h, c))
            w_hh = w_hh[order]
        padded = x_proj.new_zeros(segments + 1, steps, x_proj.shape[-1]).index_put((segment, slot), x_proj)
        valid = torch.zeros(segments + 1, steps, dtype=torch.bool, device=x.device)
        valid = valid.index_put((segment, slot), dispatch.kept)
        # The valid steps as flat (segment * steps + slot) indices grouped by expert in scan order, for the weight
        # gradient; dropped rows point past the end.
        rows, _ = torch.sort(segment * steps + slot)
        row_offs = _group_ends(torch.div(rows, batch * steps, rounding_mode="floor"), experts)
        row_offs[-1] = rows.shape[0]
        outputs, h, c = MoRELSTMScan.apply(padded[:segments], valid[:segments], h, c, w_hh, active, rows, row_offs)
        if order is not None:
            h, c = (s.view(experts, batch, -1)[rank].flatten(0, 1) for s in (h, c))
        if state_cache is not None:
            state_cache.write(h, c, experts)
        return F.pad(outputs, (0, 0, 0, 0, 0, 1))[segment, slot]  # (rows, hidden)

    @staticmethod
    def _scan_schedule(lengths: torch.Tensor, seq_len: int) -> tuple[torch.Tensor | None, tuple[int, ...]]:
        """(expert order, experts active at each step) for segment lengths (experts, batch).

        Under compile or off the CPU: no order and every expert at each of seq_len steps (static, no host sync). On
        CPU reading the lengths back costs nothing and each step is memory-bound, so experts run longest first and a
        step reads only the weights of experts with a row left: as many steps as the longest segment.
        """
        experts = lengths.shape[0]
        if not host_reads_free(lengths):
            return None, (experts,) * seq_len
        longest = lengths.amax(1)  # (experts,)
        order = torch.argsort(longest, descending=True, stable=True)
        longest = longest[order].tolist()
        return order, tuple(sum(n > t for n in longest) for t in range(max(1, longest[0])))


# The expert-type registry is `configuration_more.EXPERT_TYPES` itself (one dict for the config's validation and the
# model's classes); the built-in types' class names become their classes here.
EXPERT_REGISTRY: dict[str, type[MoREExperts]] = EXPERT_TYPES
EXPERT_REGISTRY.update({name: globals()[cls] for name, cls in EXPERT_REGISTRY.items() if isinstance(cls, str)})


def get_expert_class(name: str) -> type[MoREExperts]:
    if name not in EXPERT_REGISTRY:
        raise ValueError(f"Unknown expert_type {name!r}; valid names: {sorted(EXPERT_REGISTRY)}.")
    return EXPERT_REGISTRY[name]


def register_expert(name: str, cls: type[MoREExperts]) -> None:
    """Make `cls` the expert type `name`: `MoREConfig(expert_type=name)` validates and every model built from it
    uses `cls`. Call it when the module defining `cls` is imported, so every process importing it (workers, a later
    `from_pretrained`) knows the type. Re-registering the same class (a re-import) is allowed."""
    if not (isinstance(cls, type) and issubclass(cls, MoREExperts)):
        raise ValueError(f"register_expert({name!r}, ...) needs a subclass of MoREExperts, got {cls!r}.")
    if not (isinstance(name, str) and name):
        raise ValueError(f"register_expert needs a non-empty string name, got {name!r}.")
    counts_once = cls.multiply_adds_per_token.__func__ is MoREExperts.multiply_adds_per_token.__func__
    if cls.uses_recurrent_steps and counts_once:
        # The default counts every weight once: for experts that iterate it would under-count r steps silently.
        raise ValueError(
            f"register_expert({name!r}, {cls.__qualname__}): an expert type that iterates (`uses_recurrent_steps`) "
            "must define the classmethod `multiply_adds_per_token(config, num_steps)`, its multiply-adds per routed "
            "token at `num_steps` steps (FLOPs accounting: `flops_per_token`, the main job's compute matching)."
        )
    existing = EXPERT_REGISTRY.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"expert_type {name!r} is already registered to {existing.__qualname__}.")
    EXPERT_REGISTRY[name] = cls


# ---------------------------------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MoRERouting:
    """The routing of one routed pass, as the block and the losses read it."""

    logits: torch.Tensor  # (tokens, experts) fp32, as used for routing (after the EMA across iterations)
    probs: torch.Tensor  # (tokens, experts) fp32 softmax
    top_k_weights: torch.Tensor  # (tokens, top_k)
    top_k_index: torch.Tensor  # (tokens, top_k)
    raw_logits: torch.Tensor  # (tokens, experts) fp32, this router's own output (before the EMA)


class MoRERouter(nn.Module):
    """Base router: subclasses compute logits (tokens, experts) and may carry a state; this class adds jitter,
    the EMA of logits across Synthesis II iterations, softmax, top-k and optional top-k renormalisation."""

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok

    def compute_logits(self, x, token_mask, state, cache_pool):
        """x (batch, seq, hidden), token_mask (batch, seq) or None -> (logits (tokens, experts), next state)."""
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        previous_logits: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        cache_pool: "MoREExpertPool | None" = None,
    ) -> tuple[torch.Tensor, ...]:
        """hidden_states (batch, seq, hidden); previous_logits: the previous iteration's (tokens, experts) or None;
        `state`: a layerwise router's state from the previous layer / iteration (tokens, router_hidden) or None.

        Returns plain tensors, so that hooks (output recording, ZeRO-3) see each: (logits, raw_logits, probs,
        top_k_weights, top_k_index, next state or None); `output_router_logits` records the first.
        """
        jitter, ema = self.config.router_jitter_noise, self.config.router_logits_ema
        if self.training and jitter > 0:
            # Switch Transformer's multiplicative input jitter, on the router input only.
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
        logits, state = self.compute_logits(hidden_states, token_mask, state, cache_pool)  # (tokens, experts)
        raw = logits = logits.float()
        if previous_logits is not None and ema > 0:
            # Synthesis II stabiliser: routing moves smoothly from one iteration to the next.
            logits = ema * previous_logits + (1 - ema) * logits
        probs = F.softmax(logits, dim=-1)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)  # (tokens, top_k)
        if self.config.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, raw, probs, top_k_weights, top_k_index, state


class MoRELinearRouter(MoRERouter):
    """Softmax over a linear layer (Switch / Mixtral)."""

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def compute_logits(self, x, token_mask, state, cache_pool):
        return F.linear(x.reshape(-1, x.shape[-1]), self.weight), state


ROUTER_CELLS = {"gru": nn.GRUCell, "rnn": nn.RNNCell}


class MoRELayerwiseRecurrentRouter(MoRERouter):
    """RMoE (Qiu et al., arXiv 2408.06793): one recurrent cell shared by all layers (owned by `MoREModel`), a
    per-layer input projection and head; each token's cell state passes from layer to layer (and iteration to
    iteration). No state crosses tokens, so decoding needs no router cache."""

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.input_weight = nn.Parameter(torch.empty(config.router_hidden_size, config.hidden_size))
        self.head = nn.Linear(config.router_hidden_size, config.num_experts, bias=False)
        self._shared_cell = ()

    def share_cell(self, cell: nn.Module) -> None:
        """Use `cell`, which `MoREModel` owns. Kept in a tuple, so that it is not registered again here: its weights
        appear once in the state dict, under `model.router_cell`."""
        self._shared_cell = (cell,)

    def compute_logits(self, x, token_mask, state, cache_pool):
        if not self._shared_cell:
            raise ValueError(
                f"router_type {self.config.router_type!r} shares one cell across layers, owned by `MoREModel`: build "
                "the block as part of a model (`MoREModel(config).layers[i].mlp`)."
            )
        (cell,) = self._shared_cell
        x = x.reshape(-1, x.shape[-1])
        if state is None:  # the first MoE layer
            state = x.new_zeros(x.shape[0], cell.hidden_size)
        state = cell(F.linear(x, self.input_weight), state)  # (tokens, router_hidden)
        return self.head(state), state


class MoRETokenwiseRecurrentRouter(MoRERouter):
    """The RMoE seed's variant: a per-layer cell whose state runs across the positions of each sequence. Padding
    tokens never update it; the state after the last token is cached per (layer, iteration) for decoding."""

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        cell_type = config.router_type.removesuffix("_token")
        self.input_weight = nn.Parameter(torch.empty(config.router_hidden_size, config.hidden_size))
        self.cell = ROUTER_CELLS[cell_type](config.router_hidden_size, config.router_hidden_size)
        self.head = nn.Linear(config.router_hidden_size, config.num_experts, bias=False)

    def compute_logits(self, x, token_mask, state, cache_pool):
        batch = x.shape[0]
        inputs = F.linear(x, self.input_weight)  # (batch, seq, router_hidden)
        mask = None if token_mask is None else token_mask[..., None]  # (batch, seq, 1)
        state_cache = None if cache_pool is None else cache_pool.entry("router", MoRERouterStateCache)
        hidden = None if state_cache is None else state_cache.hidden
        if hidden is None:
            hidden = inputs.new_zeros(batch, self.cell.hidden_size)
        outputs = []
        for t in range(inputs.shape[1]):
            new = self.cell(inputs[:, t], hidden)
            hidden = new if mask is None else torch.where(mask[:, t], new, hidden)
            outputs.append(hidden)
        if state_cache is not None:
            state_cache.hidden = hidden
        return self.head(torch.stack(outputs, dim=1).flatten(0, 1)), state


ROUTER_REGISTRY: dict[str, type[MoRERouter]] = {
    "linear": MoRELinearRouter,
    "gru": MoRELayerwiseRecurrentRouter,
    "rnn": MoRELayerwiseRecurrentRouter,
    "gru_token": MoRETokenwiseRecurrentRouter,
    "rnn_token": MoRETokenwiseRecurrentRouter,
}


def get_router_class(name: str) -> type[MoRERouter]:
    if name not in ROUTER_REGISTRY:
        raise ValueError(f"Unknown router_type {name!r}; valid names: {sorted(ROUTER_REGISTRY)}.")
    return ROUTER_REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------------------
# Training depth samplers (`recurrent_steps_sampler`)
# ---------------------------------------------------------------------------------------------------------------------


class MoREDepthSampler:
    """How a training batch's recurrent depth is drawn: `draw` takes it from the global torch RNG as a (1,) tensor,
    which the model broadcasts from rank 0, or returns a Python int when nothing is drawn; `probabilities` is the exact
    distribution {depth: probability}, for compute accounting."""

    def draw(self, config: MoREConfig) -> int | torch.Tensor:
        raise NotImplementedError

    def probabilities(self, config: MoREConfig) -> dict[int, float]:
        raise NotImplementedError


class MoREFixedDepth(MoREDepthSampler):
    """Always `num_recurrent_steps`."""

    def draw(self, config):
        return config.num_recurrent_steps

    def probabilities(self, config):
        return {config.num_recurrent_steps: 1.0}


class MoREUniformDepth(MoREDepthSampler):
    """Uniform over [train_recurrent_steps_min, train_recurrent_steps_max]."""

    def draw(self, config):
        return torch.randint(config.train_recurrent_steps_min, config.train_recurrent_steps_max + 1, (1,))

    def probabilities(self, config):
        depths = range(config.train_recurrent_steps_min, config.train_recurrent_steps_max + 1)
        return dict.fromkeys(depths, 1.0 / len(depths))


class MoREPoissonLogNormalDepth(MoREDepthSampler):
    """Huginn's: Poisson with a log-normal rate whose mean is the range's mean, clipped to the range (the clipping
    moves the depths' mean off the range's mean)."""

    sigma = 0.5
    quadrature_nodes = 64  # Gauss-Hermite nodes over the log-normal rate: exact to float precision here

    def draw(self, config):
        low, high, sigma = config.train_recurrent_steps_min, config.train_recurrent_steps_max, self.sigma
        rate = torch.exp(torch.randn(1) * sigma + math.log((low + high) / 2) - sigma**2 / 2)
        return torch.poisson(rate).long().clamp(low, high)

    def probabilities(self, config):
        low, high, sigma = config.train_recurrent_steps_min, config.train_recurrent_steps_max, self.sigma
        if low == high:
            return {low: 1.0}
        nodes, weights = np.polynomial.hermite.hermgauss(self.quadrature_nodes)
        probabilities = dict.fromkeys(range(low, high + 1), 0.0)
        for node, weight in zip(nodes.tolist(), weights.tolist(), strict=True):
            # The expectation over the rate's normal draw z: z = sqrt(2) * node with weight / sqrt(pi).
            log_rate = math.sqrt(2) * sigma * node + math.log((low + high) / 2) - sigma**2 / 2
            rate, weight = math.exp(log_rate), weight / math.sqrt(math.pi)
            pmf = [math.exp(k * log_rate - rate - math.lgamma(k + 1)) for k in range(high)]  # P(k), k < high
            for depth in range(low, high):
                probabilities[depth] += weight * (sum(pmf[: low + 1]) if depth == low else pmf[depth])
            probabilities[high] += weight * (1.0 - sum(pmf))  # every draw >= high is clipped to it
        return probabilities


DEPTH_SAMPLER_REGISTRY = {
    "fixed": MoREFixedDepth(),
    "uniform": MoREUniformDepth(),
    "poisson_lognormal": MoREPoissonLogNormalDepth(),
}


def get_depth_sampler(name: str) -> MoREDepthSampler:
    if name not in DEPTH_SAMPLER_REGISTRY:
        raise ValueError(f"Unknown recurrent_steps_sampler {name!r}; valid names: {sorted(DEPTH_SAMPLER_REGISTRY)}.")
    return DEPTH_SAMPLER_REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------------------
# Router losses and diagnostics (per layer and iteration)
# ---------------------------------------------------------------------------------------------------------------------


def load_balancing_loss(probs, top_k_index, token_mask=None):
    """Switch Transformer loss `E * sum_e f_e * P_e` over real tokens; 1.0 at perfectly uniform routing.

    probs: (tokens, experts); top_k_index: (tokens, top_k); token_mask: (tokens,) bool or None.
    """
    (num_tokens, top_k), num_experts = top_k_index.shape, probs.shape[-1]
    if token_mask is None:
        weight, denom = probs.new_ones(num_tokens * top_k), max(num_tokens, 1)
        mean_prob = probs.mean(0)  # (experts,)
    else:
        mask = token_mask.to(probs.dtype)
        weight, denom = mask[:, None].expand(-1, top_k).reshape(-1), mask.sum().clamp_min(1)  # (tokens * top_k,)
        mean_prob = (probs * mask[:, None]).sum(0) / denom
    # Assignments per expert, counted on an (experts,) vector: no (tokens, experts) one-hot, nothing to backpropagate.
    counts = probs.new_zeros(num_experts).scatter_add_(0, top_k_index.reshape(-1), weight)
    fraction = counts / (denom * top_k)  # share of assignments per expert
    return num_experts * (fraction * mean_prob).sum()


def routing_entropy(probs, token_mask=None):
    """Mean per-token entropy (nats) of the routing distribution over real tokens; differentiable."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)  # (tokens,)
    return masked_mean(entropy, token_mask)


def router_z_loss(logits, token_mask=None):
    """ST-MoE router z-loss: mean squared log-partition over real tokens."""
    return masked_mean(torch.logsumexp(logits, dim=-1).pow(2), token_mask)


def routing_statistics(logits, top_k, token_mask=None) -> dict[str, torch.Tensor]:
    """Expert-utilisation diagnostics (README, "Diagnostics") for one layer and iteration, over real tokens.

    logits: (tokens, experts). Returns `load` (experts,) share of top-k assignments, `load_cv` (std / mean of the
    load; 0 = balanced), `max_min_load_ratio` (inf when an expert gets nothing), `effective_experts` (inverse HHI
    of the load; `experts` when balanced), `router_entropy` (mean per-token entropy of the routing distribution,
    nats) and `max_prob` (mean top-1 probability).
    """
    logits = logits.detach().float()
    if token_mask is not None:
        logits = logits[token_mask.reshape(-1)]
    num_experts = logits.shape[-1]
    probs = F.softmax(logits, dim=-1)  # (tokens, experts)
    index = probs.topk(top_k, dim=-1).indices  # (tokens, top_k)
    counts = torch.bincount(index.reshape(-1), minlength=num_experts).float()  # (experts,)
    load = counts / counts.sum().clamp_min(1)
    return {
        "load": load,
        "load_cv": load.std(unbiased=False) / load.mean(),
        "max_min_load_ratio": load.max() / load.min(),
        "effective_experts": 1.0 / load.pow(2).sum().clamp_min(1e-12),
        "router_entropy": routing_entropy(probs) if probs.shape[0] else probs.new_zeros(()),
        "max_prob": probs.max(-1).values.mean() if probs.shape[0] else probs.new_zeros(()),
    }


def summarise_reports(
    reports: tuple, config: MoREConfig, token_mask: torch.Tensor | None, output_router_logits: bool
) -> dict[str, object]:
    """The router losses and diagnostics of one call, from the recorded `moe_reports` (per MoE layer, one
    `MoREPassReport` per iteration); `token_mask` (tokens,) marks real tokens (None = all).

    Losses are means over MoE layers and iterations. Returns `MoRECausalLMOutputWithPast` fields: `aux_loss`,
    `z_loss`, `entropy_loss`, `dropped_tokens`, `recurrent_steps`, with `output_router_logits` also `routing_stats`
    and (when iterating) `iteration_stats`, and with `output_recurrence_stats` `recurrence_stats`.
    """
    passes = [report for layer in reports for report in layer]  # layer-major, then iteration
    if not passes:
        return {}

    def mean(values):
        return torch.stack(values).mean() if values else None

    summary = {
        "aux_loss": mean([load_balancing_loss(r.routing.probs, r.routing.top_k_index, token_mask) for r in passes]),
        # z-loss keeps the router's own outputs small, so it reads them before the EMA (on the smoothed logits its
        # gradient would shrink by 1 - ema); load balancing and the entropy floor use the routing actually applied.
        "z_loss": mean([router_z_loss(r.routing.raw_logits, token_mask) for r in passes]),
        "entropy_loss": None,
        "dropped_tokens": torch.stack([r.dropped for r in passes]).sum(),
        "recurrent_steps": mean([r.recurrent_steps for r in passes if r.recurrent_steps is not None]),
    }
    if config.router_entropy_floor > 0:
        floor = config.router_entropy_floor
        summary["entropy_loss"] = mean([F.relu(floor - routing_entropy(r.routing.probs, token_mask)) for r in passes])
    if output_router_logits:
        per_layer = []
        for layer in reports:
            stats = [routing_statistics(r.routing.logits, config.num_experts_per_tok, token_mask) for r in layer]
            for entry, report in zip(stats, layer, strict=True):
                entry["dropped_tokens"] = report.dropped
            per_layer.append(stats)
        summary["routing_stats"] = tuple(entry for stats in per_layer for entry in stats)
        if any(len(layer) > 1 for layer in reports):
            summary["iteration_stats"] = tuple(_iteration_stats(stats) for stats in per_layer)
    if passes[0].stats is not None:  # `output_recurrence_stats`
        summary["recurrence_stats"] = tuple(r.stats for r in passes)
    return summary


def _iteration_stats(stats: list[dict]) -> dict[str, torch.Tensor]:
    """Synthesis II diagnostics of one layer: entropy and max-prob per iteration (iterations,), and the max-prob
    trend (last minus first)."""
    entropy = torch.stack([s["router_entropy"] for s in stats])
    max_prob = torch.stack([s["max_prob"] for s in stats])
    return {"router_entropy": entropy, "max_prob": max_prob, "max_prob_trend": max_prob[-1] - max_prob[0]}


# ---------------------------------------------------------------------------------------------------------------------
# MoE block: router + experts (+ shared expert), iterated `num_moe_iterations` times (Synthesis II)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MoREPassReport:
    """What one routed pass reports; the model's losses and diagnostics are computed from these records."""

    routing: MoRERouting
    dropped: torch.Tensor  # () real (token, expert) pairs dropped by the capacity limit
    recurrent_steps: torch.Tensor | None = None  # () mean steps per kept row (experts that iterate)
    stats: dict[str, torch.Tensor] | None = None  # recurrence statistics (`output_recurrence_stats`)


class MoRERouterMemory:
    """Per-call state of the layerwise recurrent routers (RMoE): each MoE layer's last router state, read by the next
    MoE layer. Every layer writes its own slot once per call, so a layer that activation checkpointing recomputes in
    backward reads the same state its forward read (a single running value would hold the last layer's by then)."""

    def __init__(self):
        self.states: dict[int, torch.Tensor] = {}  # layer -> (tokens, router_hidden)

    def read(self, layer_idx: int) -> torch.Tensor | None:
        earlier = [layer for layer in self.states if layer < layer_idx]
        return self.states[max(earlier)] if earlier else None

    def write(self, layer_idx: int, state: torch.Tensor | None) -> None:
        if state is not None:
            self.states[layer_idx] = state


class MoRESparseMoeBlock(nn.Module):
    """One routed pass: route, sort once, run all experts grouped, scatter-add once (+ the shared expert).

    Like Mixtral's block it runs on hidden states alone; it returns the output and its reports (one per routed
    pass), which `output_moe_reports` records for the losses and diagnostics.
    """

    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = get_router_class(config.router_type)(config, layer_idx)
        self.experts = get_expert_class(config.expert_type)(config)
        self.shared_expert = None
        if config.shared_expert_intermediate_size > 0:
            self.shared_expert = MoREMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_gate == "learned":
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def _capacity(self, token_mask: torch.Tensor | None, num_tokens: int) -> int | torch.Tensor | None:
        """Rows kept per expert: ceil(factor * real tokens * top_k / experts), at least 1; padding does not count.
        With a mask it stays a device tensor, so computing it never syncs with the host."""
        factor = self.config.capacity_factor if self.training else self.config.eval_capacity_factor
        if factor is None:
            return None
        if token_mask is None:
            return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))
        real = token_mask.sum().double()
        return torch.ceil(real * factor * self.top_k / self.num_experts).clamp_min(1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache_offset: int = 0,
        settings: "MoREForwardSettings | None" = None,
        cache: "MoRECache | None" = None,
        router_memory: MoRERouterMemory | None = None,
    ) -> tuple[torch.Tensor, tuple[MoREPassReport, ...]]:
        """hidden_states (batch, seq, hidden) -> (output of the same shape, one `MoREPassReport` per pass).

        `token_mask` (batch, seq) marks real tokens (None = all), positions default to `cache_offset + arange(seq)`
        and `settings` to the config's inference depth.

        >>> from configuration_more import MoREConfig
        >>> config = MoREConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                     num_attention_heads=4, num_experts=4, num_moe_iterations=2)
        >>> block = MoREModel(config).layers[0].mlp
        >>> out, reports = block(torch.randn(2, 5, 32))
        >>> out.shape, len(reports)  # one report per iteration
        (torch.Size([2, 5, 32]), 2)
        """
        if position_ids is None:
            batch, seq_len = hidden_states.shape[:2]
            position_ids = torch.arange(cache_offset, cache_offset + seq_len, device=hidden_states.device)
            position_ids = position_ids.expand(batch, -1)
        if settings is None:
            settings = MoREForwardSettings.from_config(self.config)
        # The expert pool of every iteration, all fetched before any iteration writes: an iteration the cached tokens
        # never ran starts from the earlier iteration's state as it was before this call, not after it cached the new
        # tokens.
        inherit = cache_offset > 0
        pools = [
            None if cache is None else cache.expert_pool(self.layer_idx, i, inherit)
            for i in range(settings.num_moe_iterations)
        ]
        # Deeper iterations that earlier calls ran and this one does not: afterwards they take in this call's tokens at
        # its last iteration (depth policy), told apart from the older ones by that pool's state before the call.
        deeper = [] if cache is None else cache.deeper_pools(self.layer_idx, settings.num_moe_iterations)
        before = pools[-1].copy() if deeper else None
        state = None if router_memory is None else router_memory.read(self.layer_idx)
        passes = self.run_passes(hidden_states, token_mask, position_ids, cache_offset, settings, pools, state)
        out, reports, state = passes
        for pool in deeper:
            pool.catch_up(pools[-1], before)
        if router_memory is not None:
            router_memory.write(self.layer_idx, state)
        return out, reports

    def run_passes(self, hidden_states, token_mask, position_ids, cache_offset, settings, pools, state):
        """The routed passes of one call: one here (`MoREIteratedMoeBlock` iterates). Returns (output, reports,
        router state)."""
        if settings.num_moe_iterations != 1:
            raise ValueError(
                f"`MoRESparseMoeBlock` runs one routed pass, got num_moe_iterations={settings.num_moe_iterations}; "
                "`MoREIteratedMoeBlock` (every MoE layer of a model) iterates."
            )
        out, report, state = self.routed_pass(
            hidden_states, token_mask, position_ids, cache_offset, settings, pools[0], None, state
        )
        return out, (report,), state

    def routed_pass(self, hidden_states, token_mask, position_ids, cache_offset, settings, pool, logits, state):
        """One routed pass. hidden_states (batch, seq, hidden) -> (delta (batch, seq, hidden), report, router state);
        `logits` are the previous iteration's (tokens, experts) or None."""
        batch, seq_len, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (tokens, hidden)
        flat_mask = None if token_mask is None else token_mask.reshape(-1)
        logits, raw, probs, top_k_weights, top_k_index, state = self.gate(
            hidden_states, token_mask, logits, state, pool
        )
        routing = MoRERouting(logits, probs, top_k_weights, top_k_index, raw)
        weights, assignment_mask = top_k_weights.to(x.dtype), None
        expert_dropout = self.config.expert_dropout
        if self.training and expert_dropout > 0:
            # Expert dropout: single (token, expert) assignments pass through the residual; rescaled like dropout.
            assignment_mask = torch.rand_like(top_k_weights) >= expert_dropout  # (tokens, top_k)
            weights = weights / (1 - expert_dropout)
        dispatch = build_dispatch(
            top_k_index,
            weights,
            flat_mask,
            position_ids,
            cache_offset,
            self._capacity(flat_mask, x.shape[0]),
            self.num_experts,
            assignment_mask,
        )
        # index_select rather than x[index]: its backward is one index_add, not an accumulating index_put.
        rows, expert_report = self.experts(x.index_select(0, dispatch.token_index), dispatch, settings, pool)
        out = torch.zeros_like(x).index_add_(0, dispatch.token_index, rows * dispatch.weights[:, None])
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.config.shared_expert_gate == "learned":
                out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
            else:
                out = self.config.moe_weight * out + self.config.shared_expert_weight * shared
        if self.config.moe_residual_scale != 1.0:
            out = self.config.moe_residual_scale * out
        report = self._report(routing, dispatch, expert_report, settings.output_recurrence_stats)
        return out.view(batch, seq_len, hidden), report, state

    def _report(self, routing, dispatch, expert_report, output_stats) -> MoREPassReport:
        report = MoREPassReport(routing, dispatch.dropped)
        steps_taken = expert_report.steps_taken  # (rows,) or None
        if steps_taken is not None:
            report.recurrent_steps = masked_mean(steps_taken, dispatch.kept)
        if not output_stats:
            return report
        report.stats = expert_report.stats
        if steps_taken is not None:
            report.stats["steps"] = report.recurrent_steps
            # Steps per token: the mean over its routed experts (0 for padding and dropped-only tokens).
            kept = dispatch.kept.float()
            tokens = routing.logits.shape[0]
            steps = kept.new_zeros(tokens).index_add_(0, dispatch.token_index, steps_taken * kept)
            count = kept.new_zeros(tokens).index_add_(0, dispatch.token_index, kept)
            report.stats["steps_per_token"] = steps / count.clamp_min(1)
        report.stats.update(self.experts.weight_statistics())
        return report


class MoREIteratedMoeBlock(MoRESparseMoeBlock):
    """Synthesis II (README, "Expert types"): the block as a recurrent unit over `num_moe_iterations` T routed passes,
    `state = state + residual_scale * pass(state)`, re-routed at every iteration. It returns `state_T - state_0`, so
    the decoder layer's residual stays the usual `h + mlp(norm(h))`. With T = 1 it is one routed pass; every MoE
    layer is built as this block, because T is a per-call setting (`num_moe_iterations`)."""

    def run_passes(self, hidden_states, token_mask, position_ids, cache_offset, settings, pools, state):
        """`settings.num_moe_iterations` routed passes, one report each."""
        iterations = settings.num_moe_iterations
        backprop = self.config.num_backprop_iterations
        # Truncated backprop through iterations: the first ones run without building a graph.
        first_grad_iteration = 0 if backprop is None else max(0, iterations - backprop)
        grad_enabled = torch.is_grad_enabled()
        total, logits, reports = None, None, []
        for iteration in range(iterations):
            with torch.set_grad_enabled(grad_enabled and iteration >= first_grad_iteration):
                delta, report, state = self.routed_pass(
                    hidden_states, token_mask, position_ids, cache_offset, settings, pools[iteration], logits, state
                )
            logits = report.routing.logits
            reports.append(report)
            if iteration + 1 < iterations:
                hidden_states = hidden_states + delta
            total = delta if total is None else total + delta  # state_T - state_0, without a zeros-plus-delta
        return total, tuple(reports), state


# ---------------------------------------------------------------------------------------------------------------------
# Decoder layer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoREForwardSettings:
    """Depth and flags resolved once per model call, so every layer (and a checkpointed recompute) agrees."""

    num_recurrent_steps: int
    num_moe_iterations: int
    output_recurrence_stats: bool = False
    exit_threshold: float | None = None

    @classmethod
    def from_config(cls, config) -> "MoREForwardSettings":
        """The config's inference defaults."""
        depth, iterations = config.num_recurrent_steps, config.num_moe_iterations
        return cls(depth, iterations, exit_threshold=config.adaptive_exit_threshold)


class MoREDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoREConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MoREAttention(config, layer_idx)
        self.is_moe = layer_idx not in config.mlp_only_layers
        if self.is_moe:
            self.mlp = MoREIteratedMoeBlock(config, layer_idx)
        else:
            self.mlp = MoREMLP(config, config.intermediate_size)
        self.input_layernorm = MoRERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoRERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache_offset: int = 0,
        settings: MoREForwardSettings | None = None,
        cache: "MoRECache | None" = None,
        router_memory: MoRERouterMemory | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            hidden_states, _ = self.mlp(
                hidden_states, token_mask, position_ids, cache_offset, settings, cache, router_memory
            )
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


class MoRECacheEntry:
    """Decoding state that one module (an expert type, a token-wise router) keeps per (layer, iteration) of a
    `MoRECache`, created by that module on first use (`MoREExpertPool.entry`). Subclasses say how it follows the batch
    (beam search, repeats, selection), whether a crop can keep it, and how it takes in tokens that a call ran through
    shallower iterations only (`catch_up`)."""

    croppable = False  # recurrent states summarise every earlier token: dropping tokens would need a recompute

    def copy(self) -> "MoRECacheEntry":
        """A copy that later writes to either side leave alone (tensors are replaced, never written in place)."""
        return copy.copy(self)

    def remap_batch(self, source: torch.Tensor) -> None:
        """New batch row j takes the state of old batch row `source[j]` (beam reorder, repeat, select)."""
        raise NotImplementedError

    def crop(self, length: int) -> None:
        """Keep the state of the first `length` tokens (only when `croppable`)."""
        raise NotImplementedError

    def catch_up(self, source: "MoRECacheEntry", before: "MoRECacheEntry | None") -> None:
        """A call ran shallower iterations than this entry's but not this one: `source` is the entry of the last
        iteration it ran, `before` that entry as it was before the call (None: it had none). The call's tokens are
        to be read here at that iteration, their latest (depth policy). Default, for a state after the last cached
        token: `source`'s state, the one the call's last token reached."""
        vars(self).update(vars(source.copy()))


class MoREExpertKVCache(MoRECacheEntry):
    """Keys and values of attention inside Huginn experts.

    Each cached token routed to an expert is a row with its (segment slot, batch, position) and its keys/values at
    every step (rows, steps, heads, head_dim). Policy for depth: a token computed with fewer steps than a later read
    asks for is read at its latest computed step (its last step is repeated along the step axis).
    """

    croppable = True

    def __init__(self):
        self.expert = self.batch = self.position = None  # (rows,)
        self.keys = self.values = None  # (rows, steps, heads, head_dim)
        self._staged = {}

    def __len__(self):
        return 0 if self.expert is None else self.expert.shape[0]

    def copy(self) -> "MoREExpertKVCache":
        entry = copy.copy(self)
        entry._staged = {}
        return entry

    def read(self, step_idx: int, batch_size: int):
        """Cached (k, v, segment, position) at `step_idx` (or the latest available step), or None when empty."""
        if len(self) == 0:
            return None
        step = min(step_idx, self.keys.shape[1] - 1)
        return self.keys[:, step], self.values[:, step], self.expert * batch_size + self.batch, self.position

    def stage(self, step_idx: int, keys: torch.Tensor, values: torch.Tensor):
        self._staged[step_idx] = (keys, values)

    def commit(self, dispatch: MoREDispatch):
        """Append the rows of this call with the keys/values staged at every step."""
        steps = len(self._staged)
        if steps == 0:  # no step ran (no kept row under adaptive exit): nothing to cache
            return
        keys = torch.stack([self._staged[i][0] for i in range(steps)], dim=1)  # (rows, steps, heads, head_dim)
        values = torch.stack([self._staged[i][1] for i in range(steps)], dim=1)
        self._staged = {}
        # Dropped rows are kept too (expert id `num_experts`, their own segments, never read by kept rows): selecting
        # the kept rows would be a host sync.
        self._append(dispatch.expert_index, dispatch.batch_index, dispatch.cache_index, keys, values)

    def catch_up(self, source: "MoREExpertKVCache", before: "MoREExpertKVCache | None") -> None:
        """Append the rows `source` gained since `before`, with their steps: a token is read at an iteration it never
        ran with its keys/values of its latest earlier one, as at a step it never ran with its latest step. The new
        rows are the last ones (commit appends), so slicing them needs no host sync."""
        start = 0 if before is None else len(before)
        if len(source) > start:
            new = slice(start, None)
            self._append(*(getattr(source, name)[new] for name in ("expert", "batch", "position", "keys", "values")))

    def _append(self, expert, batch, position, keys, values):
        """Append rows: expert, batch, position (rows,), keys, values (rows, steps, heads, head_dim). The step axes are
        matched by repeating the shorter one's last step; an entry without rows (never written, cropped to no token)
        has no step count to keep."""
        if len(self) > 0:
            keys, self.keys = _match_steps(keys, self.keys)
            values, self.values = _match_steps(values, self.values)
            old = (self.expert, self.batch, self.position, self.keys, self.values)
            expert, batch, position, keys, values = (
                torch.cat([o, n]) for o, n in zip(old, (expert, batch, position, keys, values), strict=True)
            )
        self.expert, self.batch, self.position, self.keys, self.values = expert, batch, position, keys, values

    def crop(self, length: int) -> None:
        if len(self) > 0:
            keep = self.position < length
            for name in ("expert", "batch", "position", "keys", "values"):
                setattr(self, name, getattr(self, name)[keep])

    def remap_batch(self, source: torch.Tensor) -> None:
        if len(self) == 0:
            return
        source = source.to(self.batch.device)
        match = self.batch[None, :] == source[:, None]  # (new_batch, rows)
        new_batch, rows = match.nonzero(as_tuple=True)
        for name in ("expert", "position", "keys", "values"):
            setattr(self, name, getattr(self, name)[rows])
        self.batch = new_batch


class MoRESegmentStateCache(MoRECacheEntry):
    """The recurrent branch state (h, c) of `parallel` experts per (expert, sequence) after the last cached token."""

    def __init__(self):
        self.h = self.c = None  # (experts, batch, hidden)

    def read(self, h, c):
        """Initial (h, c) of the (experts * batch) segments: the cached state of each (expert, sequence), or the
        given zeros before the first call."""
        if self.h is None:
            return h, c
        return self.h.flatten(0, 1).to(h.dtype), self.c.flatten(0, 1).to(c.dtype)

    def write(self, h, c, num_experts):
        """h, c: (experts * batch, hidden); a segment without rows in this call kept its state through the scan."""
        self.h, self.c = h.view(num_experts, -1, h.shape[-1]), c.view(num_experts, -1, c.shape[-1])

    def remap_batch(self, source: torch.Tensor) -> None:
        if self.h is not None:
            source = source.to(self.h.device)
            self.h, self.c = self.h[:, source], self.c[:, source]


class MoRERouterStateCache(MoRECacheEntry):
    """A token-wise router's state (batch, router_hidden) after the last cached token."""

    def __init__(self):
        self.hidden = None

    def remap_batch(self, source: torch.Tensor) -> None:
        if self.hidden is not None:
            self.hidden = self.hidden[source.to(self.hidden.device)]


class MoREExpertPool:
    """The decoding state of one (layer, iteration) of a MoE block besides the backbone's keys and values: one
    `MoRECacheEntry` per module that keeps one, under the module's own name ("experts", "router")."""

    def __init__(self):
        self.entries: dict[str, MoRECacheEntry] = {}

    def entry(self, name: str, cls: type[MoRECacheEntry]) -> MoRECacheEntry:
        """The entry `name`, created as `cls()` on first use."""
        if name not in self.entries:
            self.entries[name] = cls()
        return self.entries[name]

    def copy(self) -> "MoREExpertPool":
        pool = MoREExpertPool()
        pool.entries = {name: entry.copy() for name, entry in self.entries.items()}
        return pool

    def remap_batch(self, source: torch.Tensor) -> None:
        for entry in self.entries.values():
            entry.remap_batch(source)

    def crop(self, length: int) -> None:
        for entry in self.entries.values():
            entry.crop(length)

    def catch_up(self, source: "MoREExpertPool", before: "MoREExpertPool") -> None:
        """Follow a call that ran up to `source`'s iteration but not this one (`before`: `source` before the call)."""
        for name, entry in source.entries.items():
            self.entry(name, type(entry)).catch_up(entry, before.entries.get(name))


def _match_steps(a, b):
    """Pad the step axis (dim 1) of the shorter tensor by repeating its last step."""
    steps = max(a.shape[1], b.shape[1])

    def pad(t):
        if t.shape[1] == steps:
            return t
        return torch.cat([t, t[:, -1:].expand(-1, steps - t.shape[1], *t.shape[2:])], dim=1)

    return pad(a), pad(b)


class MoRECache(DynamicCache):
    """`DynamicCache` for the backbone attention plus per-(layer, iteration) pools for attention inside recurrent
    experts. Not compileable: pools grow by routed rows."""

    is_compileable = False

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.expert_pools: dict[tuple[int, int], MoREExpertPool] = {}

    def expert_pool(self, layer_idx: int, iteration: int, inherit: bool) -> MoREExpertPool:
        key = (layer_idx, iteration)
        if key not in self.expert_pools:
            # An iteration that cached tokens never ran (`inherit`: the cache already holds tokens) starts from the
            # latest earlier iteration's pool, as missing recurrent steps do (depth policy).
            earlier = [i for (layer, i) in self.expert_pools if layer == layer_idx and i < iteration]
            earlier = earlier if inherit else []
            self.expert_pools[key] = (
                self.expert_pools[(layer_idx, max(earlier))].copy() if earlier else MoREExpertPool()
            )
        return self.expert_pools[key]

    def deeper_pools(self, layer_idx: int, iterations: int) -> list[MoREExpertPool]:
        """The pools of layer `layer_idx` at iterations beyond a call's `iterations`, written by earlier calls: they
        take in the call's tokens at its last iteration (`MoREExpertPool.catch_up`), so a later deeper call reads every
        cached token at every iteration, at the latest iteration it ran (depth policy), as one with no pool for an
        iteration starts from the latest earlier pool."""
        return [
            pool
            for (layer, iteration), pool in self.expert_pools.items()
            if layer == layer_idx and iteration >= iterations
        ]

    def _remap_pools(self, source: torch.Tensor):
        for pool in self.expert_pools.values():
            pool.remap_batch(source)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._remap_pools(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        batch = self._batch_size()
        super().batch_repeat_interleave(repeats)
        if batch is not None:
            self._remap_pools(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._remap_pools(indices)

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can drop tokens (generation asks before it relies on it): not while the cache holds
        recurrent states that summarise every earlier token."""
        return super().is_croppable and not self._uncroppable_entries()

    def _uncroppable_entries(self) -> set[str]:
        """The kinds of entry held that a crop can't keep."""
        entries = [entry for pool in self.expert_pools.values() for entry in pool.entries.values()]
        return {type(entry).__name__ for entry in entries if not entry.croppable}

    def crop(self, tokens_to_remove: int):
        """Drop the last `-tokens_to_remove` tokens (Transformers' convention: a negative count), expert state too."""
        if tokens_to_remove == 0:  # removes nothing: a no-op whatever the cache holds, as for Transformers' layers
            return
        # Checked before anything is cropped, so a refused crop leaves the cache as it was.
        kept = self._uncroppable_entries()
        if kept:
            raise ValueError(
                f"A MoRE cache holding recurrent states ({', '.join(sorted(kept))}: parallel experts, token-wise "
                "routers) can't be cropped."
            )
        super().crop(tokens_to_remove)
        length = self.get_seq_length()
        for pool in self.expert_pools.values():
            pool.crop(length)

    def reset(self):
        super().reset()
        self.expert_pools = {}

    def _batch_size(self):
        if self.layers and getattr(self.layers[0], "keys", None) is not None and self.layers[0].keys.numel() > 0:
            return self.layers[0].keys.shape[0]
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Tensor and expert parallelism: MoRE's styles for Transformers' plan machinery
# ---------------------------------------------------------------------------------------------------------------------


class MoREAllReduceSum(torch.autograd.Function):
    """Sum over `group` in forward, identity in backward: partial outputs of the ranks (each ran a share of the
    work) become the whole output on every rank, whose gradient every rank already holds."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        tensor = tensor.clone()  # all_reduce works in place; the input may be needed by autograd
        torch.distributed.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class MoREAllReduceGrad(torch.autograd.Function):
    """Identity in forward, sum over `group` in backward: a replicated input (or weight) that each rank used for its
    own share of the work receives the sum of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """`MoREAllReduceGrad` where a gradient can flow; the tensor itself otherwise (no autograd node at inference)."""
    return MoREAllReduceGrad.apply(tensor, group) if torch.is_grad_enabled() and tensor.requires_grad else tensor


@contextlib.contextmanager
def _swapped_params(module: nn.Module, swap: Callable[[torch.Tensor], torch.Tensor | None]):
    """`module`'s own parameters replaced by `swap(param)` (where it returns a tensor) for the duration."""
    originals = dict(module.named_parameters(recurse=False))
    swapped = {name: new for name, param in originals.items() if (new := swap(param)) is not None}
    module._parameters.update(swapped)
    try:
        yield
    finally:
        module._parameters.update({name: originals[name] for name in swapped})


@contextlib.contextmanager
def local_expert_params(module: nn.Module, group=None):
    """Run `module` and its submodules on plain tensors: sharded (DTensor) parameters as this rank's shard. With
    `group`, the replicated parameters' gradients are summed over it (each rank ran only its rows)."""

    def local(param):
        if isinstance(param, DTensor):
            return param.to_local()
        if group is not None and param.requires_grad:
            return all_reduce_grad(param, group)
        return None

    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            stack.enter_context(_swapped_params(sub, local))
        yield


def local_dispatch(dispatch: MoREDispatch, first_expert: int, num_local: int):
    """The dispatch as this rank sees it: only the rows routed to experts `first_expert .. first_expert + num_local -
    1`, with local expert ids, so each rank computes its share of the rows.

    The row count is read back to the host (one read per layer call; the collectives that follow synchronise anyway).
    A rank without rows keeps one row, as a dropped row, so its graph still reaches the shared input and the
    experts' parameters and every rank runs the same collectives in backward. Returns the dispatch and the rows'
    indices into the full dispatch (local rows,).
    """
    shifted = dispatch.expert_index - first_expert  # (rows,)
    local = (shifted >= 0) & (shifted < num_local)  # (rows,)
    # Stable sort on "not local" keeps local rows in their (expert, sequence, position) order, ahead of the others.
    index = torch.argsort((~local).to(torch.int8), stable=True)[: max(1, int(local.sum()))]  # (local rows,)
    expert_index = torch.where(local, shifted, torch.full_like(shifted, num_local))
    return replace(dispatch, expert_index=expert_index, num_experts=num_local).subset(index), index


def _combine_expert_report(report: MoREExpertReport, index, valid, num_rows, kept, group) -> MoREExpertReport:
    """The experts' report over all ranks: steps per row, and the statistics (means over kept rows) weighted by each
    rank's kept rows. A per-step statistic of a rank whose rows all exited early is padded with 0, the change of rows
    that no longer move."""
    combined = MoREExpertReport()
    if report.steps_taken is not None:
        steps = report.steps_taken.new_zeros(num_rows).index_copy_(0, index, report.steps_taken * valid.squeeze(1))
        torch.distributed.all_reduce(steps, group=group)
        combined.steps_taken = steps
    if not report.stats:
        return combined
    stats = dict(report.stats)
    names = sorted(stats)
    sizes = torch.tensor([stats[name].numel() for name in names])
    torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX, group=group)
    if "refinement_consistency" in stats:
        # A mean over step pairs: over all ranks' steps, the pairs a rank's exited rows no longer ran count 0 (they do
        # not move), as in one process.
        pairs, all_pairs = stats["state_change"].numel() - 1, int(sizes[names.index("state_change")]) - 1
        stats["refinement_consistency"] = stats["refinement_consistency"] * (pairs / all_pairs if all_pairs else 0.0)
    count = kept.sum().float()  # () this rank's kept rows
    packed = [
        F.pad(stats[name].detach().float().reshape(-1), (0, int(size) - stats[name].numel()))
        for name, size in zip(names, sizes, strict=True)
    ]
    total = torch.cat([torch.cat(packed) * count, count[None]])
    torch.distributed.all_reduce(total, group=group)
    values = (total[:-1] / total[-1].clamp_min(1)).split(sizes.tolist())
    for name, value in zip(names, values, strict=True):
        combined.stats[name] = value.reshape(stats[name].shape) if value.numel() == stats[name].numel() else value
    if "final_step_contribution" in combined.stats:  # the change at the last step of all ranks, not of this one
        combined.stats["final_step_contribution"] = combined.stats["state_change"][-1]
    return combined


def expert_parallel_forward(experts_forward, x, dispatch, settings, pool, first_expert: int, num_local: int, group):
    """This rank's experts on their routed rows, through the unchanged expert forward (step loop, attention inside
    experts, adaptive exit, cache pools for these experts); an all-reduce returns every row to every rank.

    x: (rows, hidden), the routed rows of the whole dispatch, identical on every rank of `group`.
    """
    x = all_reduce_grad(x, group)  # each rank's gradient of x covers its own rows only
    local, index = local_dispatch(dispatch, first_expert, num_local)
    valid = local.kept[:, None]  # (rows, 1) only this rank's rows leave it; the others are dropped here
    # Randomness inside experts (latent init, projection dropout) is drawn per rank for its own rows, from a forked
    # generator: the global stream stays the same on every rank, so routing noise and depth draws agree afterwards.
    with torch.random.fork_rng(devices=[x.device] if x.device.type != "cpu" else [], device_type=x.device.type):
        out, report = experts_forward(x[index], local, settings, pool)
    out = out * valid  # (local rows, hidden)
    full = out.new_zeros(x.shape[0], out.shape[-1]).index_copy_(0, index, out)  # in place into the new zeros
    report = _combine_expert_report(report, index, valid, x.shape[0], local.kept, group)
    return MoREAllReduceSum.apply(full, group), report


class MoREExpertsTensorParallel(TensorParallelLayer):
    """`more_tp_experts`: FFN experts whose gate/up (`packed_colwise`) and down (`rowwise`) weights each rank holds a
    slice of; every rank runs all routed rows on its slice and the partial outputs are summed."""

    def install_forward(self, module, mesh, **kwargs):
        # Transformers 5.25 added keyword arguments (`config`, `mesh_manager`); MoRE's style needs none of them.
        forward, group = module.forward, mesh.get_group()

        def tp_forward(x, dispatch, settings=None, pool=None):
            with local_expert_params(module):
                out, report = forward(all_reduce_grad(x, group), dispatch, settings, pool)
            return MoREAllReduceSum.apply(out, group), report

        module.forward = tp_forward
        return module


class MoREExpertsExpertParallel(ExpertParallelLayer):
    """`more_ep_experts`: whole experts per rank (their weights sharded by `grouped_gemm` on the expert dim, which
    also sets the module's `num_experts` to the local count); see `expert_parallel_forward`.

    Transformers' `ep_dispatch_experts` hands experts (hidden_states, top_k_index, top_k_weights); MoRE's experts need
    the sorted dispatch (sequence segments, positions), the call's settings (depth) and cache pool, hence this style.
    """

    def install_forward(self, module, mesh, **kwargs):
        forward, group = module.forward, mesh.get_group()
        num_local = module.num_experts
        first_expert = mesh.get_local_rank() * num_local

        def ep_forward(x, dispatch, settings=None, pool=None):
            with local_expert_params(module, group):
                return expert_parallel_forward(forward, x, dispatch, settings, pool, first_expert, num_local, group)

        module.forward = ep_forward
        return module


def expand_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """`plan`'s rules (layer numbers as `*`) applied to `model`'s modules and parameters, a module's own parameters
    listed before it: EP styles shard the weights first (which sets the local `num_experts`), then hook the module."""
    expanded = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if (style := plan.get(replace_layer_number_by_wildcard(name))) is not None:
                expanded[name] = style
        if (style := plan.get(replace_layer_number_by_wildcard(module_name))) is not None:
            expanded[module_name] = style
    return expanded


def check_parallel_config(config: MoREConfig, distributed_config) -> None:
    """A clear error before any sharding when the config does not split over the requested groups."""
    tp_size, ep_size = distributed_config.tp_size, distributed_config.ep_size
    if ep_size > 1:
        if config.num_experts % ep_size:
            raise ValueError(
                f"Expert parallelism needs `num_experts` divisible by `ep_size`; got num_experts="
                f"{config.num_experts}, ep_size={ep_size}. Pick an ep_size that divides num_experts."
            )
        if ep_size != tp_size or distributed_config.dp_size > 1:
            raise ValueError(
                "MoRE's expert parallelism needs every rank of the expert group to hold the same batch: "
                f"`ep_size` == `tp_size` and `fsdp_size` == `dp_replicate_size` == 1; got ep_size={ep_size}, "
                f"tp_size={tp_size}, fsdp_size={distributed_config.fsdp_size}, "
                f"dp_replicate_size={distributed_config.dp_replicate_size}."
            )
    if tp_size > 1:
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(config, name) % tp_size:
                raise ValueError(
                    f"Tensor parallelism needs `{name}` divisible by `tp_size`; got {name}="
                    f"{getattr(config, name)}, tp_size={tp_size}."
                )


if torch.distributed.is_available():
    ALL_PARALLEL_STYLES.register("more_tp_experts", MoREExpertsTensorParallel())
    ALL_PARALLEL_STYLES.register("more_ep_experts", MoREExpertsExpertParallel())
    # Stacked weights with the experts on dim 1 (the Huginn norms, (4, experts, d)).
    ALL_PARALLEL_STYLES.register("more_experts_dim1", MoEParamShard(Shard(1)))


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base, outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MoREModelOutputWithPast(MoeModelOutputWithPast):
    """`router_logits` (`output_router_logits=True`): one (tokens, experts) entry per MoE layer and iteration.
    `moe_reports` (`output_moe_reports=True`, which `MoREForCausalLM` always asks for): per MoE layer, one
    `MoREPassReport` per iteration; the causal LM computes its router losses and diagnostics from them."""

    moe_reports: tuple | None = None


@dataclass
class MoRECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`loss` = `lm_loss` + weighted aux terms (`aux_loss`, `z_loss`, `entropy_loss`) + `expert_loss` (the experts' own
    weighted penalties, e.g. `shared_recurrent`'s orthogonality term, mean over MoE layers). `lm_loss` is the
    cross-entropy summed over the label tokens and divided by their count (by `num_items_in_batch` when given).
    `dropped_tokens` counts (token, expert) assignments dropped by the capacity limit; `recurrent_steps` is the mean
    number of expert steps actually run per routed token.

    With `output_router_logits=True`: `router_logits` and `routing_stats` have one entry per MoE layer and iteration
    (`routing_statistics` plus `dropped_tokens`), and `iteration_stats` one per MoE layer when iterating (Synthesis II:
    `router_entropy` and `max_prob` per iteration, `max_prob_trend`). With `output_recurrence_stats=True`:
    `recurrence_stats` has per MoE layer and iteration `steps`, `steps_per_token`, `state_change` (per step),
    `final_step_contribution`, `refinement_magnitude`, `refinement_consistency` (+ `projection_orthogonality` and
    `projection_divergence` for `shared_recurrent`, `recurrent_branch_weight` for `parallel`)."""

    lm_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None
    expert_loss: torch.FloatTensor | None = None
    dropped_tokens: torch.LongTensor | None = None
    recurrent_steps: torch.FloatTensor | None = None
    recurrence_stats: tuple | None = None
    routing_stats: tuple | None = None
    iteration_stats: tuple | None = None


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# With a registered expert type of its own module, `save_pretrained` writes this module: the remote-code entry point.
EXPERT_TYPES_MODULE = "more_expert_types"


def _save_module_files(source: Path, folder: Path) -> None:
    """Copy the module file `source` and, recursively, the files it imports relatively that sit beside it (the model
    files are saved already: relative imports not found beside it are skipped)."""
    todo, seen = [source], set()
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        shutil.copyfile(path, folder / path.name)
        todo += [path.parent / f"{name.replace('.', '/')}.py" for name in get_relative_imports(path)]


class MoREPreTrainedModel(PreTrainedModel):
    config_class = MoREConfig
    config: MoREConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoREDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # Recorded through Transformers' output hooks when `output_<name>=True`: the backbone's attention maps (eager
    # attention), the decoder layers' outputs, every routed pass's logits and reports.
    _can_record_outputs = {
        "attentions": MoREAttention,
        "hidden_states": MoREDecoderLayer,
        "router_logits": OutputRecorder(MoRERouter, index=0),
        "moe_reports": OutputRecorder(MoRESparseMoeBlock, index=1),
    }

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        if (activation_checkpointing_kwargs or {}).get("use_reentrant", False):
            # Reentrant checkpointing runs a layer's forward without a graph and keeps only the tensor it returns in
            # one: the recorded routing (the router losses' input) and the layerwise router state would lose theirs.
            raise ValueError(
                "MoRE supports non-reentrant activation checkpointing only; got use_reentrant=True. "
                "Pass gradient_checkpointing_kwargs={'use_reentrant': False} (the default)."
            )
        return super().activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """Transformers' `from_pretrained`, which also refuses a checkpoint whose backbone weights do not fit the
        model its config builds (saved with another `expert_type`, `router_type` or `mlp_only_layers`, or a config
        overridden or edited since): the model would run on the weights it found and random ones where the others
        belong. A missing head (`lm_head` of a base model's checkpoint, untied) is initialised, as Transformers does.
        With `output_loading_info=True` nothing is refused: the model comes with Transformers' report.
        """
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if output_loading_info:
            return model, info
        prefix = f"{model.base_model_prefix}."
        has_head = getattr(model, model.base_model_prefix, None) is not None

        def in_backbone(key: str) -> bool:
            return not has_head or key.startswith(prefix)

        unfit = {kind: sorted(filter(in_backbone, info[kind])) for kind in ("missing_keys", "unexpected_keys")}
        if any(unfit.values()):
            listed = "; ".join(
                f"{kind.replace('_', ' ')} ({len(keys)}): {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for kind, keys in unfit.items()
                if keys
            )
            raise ValueError(
                f"The checkpoint's weights do not fit the model its config builds (expert_type="
                f"{model.config.expert_type!r}, router_type={model.config.router_type!r}): {listed}. Load it with the "
                "config it was saved with, or pass `output_loading_info=True` to load it anyway with the report."
            )
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Transformers' `save_pretrained`; for an expert type registered from a module of its own, that module (and
        what it imports relatively) is saved beside the model files together with `more_expert_types.py`, which
        imports it and then the model classes, and the config's `auto_map` points there: `trust_remote_code=True`
        in a fresh process registers the type before it builds the config and the model.

        The expert's module imports MoRE relatively first (`from .modeling_more import ...`, falling back to
        `from modeling_more import ...`): with remote code it is one package with the model files (README, "Add your
        own expert").
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        experts = get_expert_class(self.config.expert_type)
        if experts.__module__ == type(self).__module__ or not kwargs.get("is_main_process", True):
            return
        if experts.__module__ == "__main__":
            logger.warning(
                f"expert_type {self.config.expert_type!r} is defined in __main__: its code cannot travel with the "
                "checkpoint, and loading it needs the type registered first. Define it in a module of its own."
            )
            return
        _save_module_files(Path(sys.modules[experts.__module__].__file__), Path(save_directory))
        module = experts.__module__.rsplit(".", 1)[-1]
        config_file = Path(save_directory) / CONFIG_NAME
        config = json.loads(config_file.read_text())
        classes = {auto: tuple(ref.rsplit(".", 1)) for auto, ref in config["auto_map"].items()}  # (module, class)
        imports = "".join(
            f"from .{source} import {name}  # noqa: F401\n" for source, name in sorted(set(classes.values()))
        )
        (Path(save_directory) / f"{EXPERT_TYPES_MODULE}.py").write_text(
            f'"""Written by MoRE\'s `save_pretrained`: importing `{module}` registers expert_type '
            f'{self.config.expert_type!r}, before the model classes are used."""\n\n'
            f"from .{module} import {experts.__name__}  # noqa: F401\n{imports}"
        )
        config["auto_map"] = {auto: f"{EXPERT_TYPES_MODULE}.{name}" for auto, (_, name) in classes.items()}
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def num_parameters(
        self, only_trainable: bool = False, exclude_embeddings: bool = False, active: bool = False
    ) -> int:
        """Parameter count as in Transformers; `active=True` counts what one token uses: every parameter except the
        `num_experts - num_experts_per_tok` experts it is not routed to in each MoE layer (weights shared by all
        experts, e.g. the engine of `shared_recurrent`, count as active).

        >>> model.num_parameters(active=True) <= model.num_parameters()
        True
        """
        total = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if not active:
            return total
        config = self.config
        experts, idle = get_expert_class(config.expert_type), config.num_experts - config.num_experts_per_tok
        if not only_trainable:
            return total - len(self._moe_blocks()) * idle * experts.parameters_per_expert(config)
        # Only what the total counted: a frozen expert weight is in neither. Layers alike are counted once.
        trainable = Counter(
            frozenset(name for name, param in block.experts.named_parameters() if param.requires_grad)
            for block in self._moe_blocks()
        )
        return total - sum(
            layers * idle * experts.parameters_per_expert(config, names) for names, layers in trainable.items()
        )

    def flops_per_token(self, num_recurrent_steps: int | None = None, num_moe_iterations: int | None = None) -> int:
        """Forward FLOPs (2 x multiply-adds) per token of every weight matmul at the given depth (config defaults):
        attention projections, routers, the active experts (`multiply_adds_per_token` of the expert class), shared
        expert, dense MLPs and the LM head. Attention scores are excluded; a training step costs about 3x this.
        """
        config = self.config
        steps = config.num_recurrent_steps if num_recurrent_steps is None else num_recurrent_steps
        iterations = config.num_moe_iterations if num_moe_iterations is None else num_moe_iterations
        expert = get_expert_class(config.expert_type).multiply_adds_per_token(config, steps)
        base = getattr(self, self.base_model_prefix, self)
        router_cell = _numel(base.router_cell)  # the layerwise routers' shared cell runs once per layer
        madds = _numel(getattr(self, "lm_head", None))
        for layer in base.layers:
            madds += _numel(layer.self_attn)
            block = layer.mlp
            if isinstance(block, MoRESparseMoeBlock):
                shared = _numel(block.shared_expert) + _numel(getattr(block, "shared_expert_gate", None))
                madds += iterations * (_numel(block.gate) + router_cell + config.num_experts_per_tok * expert + shared)
            else:
                madds += _numel(block)
        return 2 * madds

    def _moe_blocks(self) -> list["MoRESparseMoeBlock"]:
        return [module for module in self.modules() if isinstance(module, MoRESparseMoeBlock)]

    def init_parallel_plans(self):
        """Transformers' plans (the config's `base_model_tp_plan`) plus the expert type's own `tp_plan` / `ep_plan`,
        keeping the rules that name something in this model (dense layers and the shared expert are optional)."""
        super().init_parallel_plans()
        if self.base_model is self:
            experts = get_expert_class(self.config.expert_type)
            names = {replace_layer_number_by_wildcard(n) for n, _ in (*self.named_modules(), *self.named_parameters())}
            for plan, own in ((self._tp_plan, experts.tp_plan), (self._ep_plan, experts.ep_plan)):
                plan.update(plan_under("layers.*.mlp.experts", own))
                for name in plan.keys() - names:
                    del plan[name]

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """Transformers applies the TP plan, and the EP plan only for its own `ep_dispatch_experts` experts (which take
        top-k ids); MoRE's experts take a dispatch, so their EP plan is applied here, over the TP-sharded backbone.

        The one Transformers hook MoRE overrides for parallelism (checked against Transformers 5.24.0 and 5.25.0;
        `tests/test_parallel.py` runs on both in CI): `from_pretrained` calls it after building the model on the
        meta device and before loading weights.
        """
        if mesh_manager is not None:
            check_parallel_config(model.config, distributed_config)
        model = super().maybe_distribute_model(model, distributed_config, mesh_manager)
        if mesh_manager is not None and distributed_config.ep_size > 1:
            ep_plan = expand_plan(model, model.ep_plan)
            apply_expert_parallelism(model, mesh_manager.get_mesh("ep"), mesh_manager.get_mesh("tp"), ep_plan)
        return model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoREExperts):
            module.initialize_parameters(std)  # each expert type initialises its own stacked weights
        elif isinstance(module, MoRELinearRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (MoRELayerwiseRecurrentRouter, MoRETokenwiseRecurrentRouter)):
            # Unit-gain input projection: with std 0.02 the token-independent cell state would dominate the
            # logits and send every token to the same expert at initialisation.
            init.normal_(module.input_weight, mean=0.0, std=module.input_weight.shape[1] ** -0.5)
        elif isinstance(module, (nn.GRUCell, nn.RNNCell)):
            bound = 1.0 / math.sqrt(module.hidden_size)  # PyTorch's default for the weights; biases start at zero
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("bias"):
                    init.zeros_(param)
                else:
                    init.uniform_(param, -bound, bound)
        elif isinstance(module, MoRERMSNorm):
            init.ones_(module.weight)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class MoREModel(MoREPreTrainedModel):
    def __init__(self, config: MoREConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoREDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoRERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.rotary_emb = MoRERotaryEmbedding(config, head_dim)
        # RMoE layerwise routers share one cell across all layers; its state passes from layer to layer.
        self.router_cell = None
        if config.router_type in ("gru", "rnn"):
            self.router_cell = ROUTER_CELLS[config.router_type](config.router_hidden_size, config.router_hidden_size)
            for layer in self.layers:
                if layer.is_moe:
                    layer.mlp.gate.share_cell(self.router_cell)
        self.uses_recurrent_steps = any(
            layer.is_moe and layer.mlp.experts.uses_recurrent_steps for layer in self.layers
        )
        self.gradient_checkpointing = False
        # What the modules were built from; every other config field is read live (see `ARCHITECTURE_FIELDS`).
        self._architecture = {name: copy.deepcopy(getattr(config, name)) for name in ARCHITECTURE_FIELDS}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def resolve_settings(
        self,
        num_recurrent_steps=None,
        num_moe_iterations=None,
        output_recurrence_stats=False,
        adaptive_exit_threshold=None,
    ) -> MoREForwardSettings:
        """Depth for this call: the argument, else a training draw, else the config's inference default."""
        config = self.config
        if not self.uses_recurrent_steps and (num_recurrent_steps is not None or adaptive_exit_threshold is not None):
            logger.warning_once(
                f"`num_recurrent_steps` / `adaptive_exit_threshold` have no effect on this model: its experts "
                f"(expert_type={config.expert_type!r}) run no expert-level recurrence."
            )
        sampling = self.training and torch.is_grad_enabled()
        if num_recurrent_steps is None:
            num_recurrent_steps = self._sample_depth() if sampling else config.num_recurrent_steps
        if num_moe_iterations is None:
            num_moe_iterations = config.num_moe_iterations
            if sampling and config.train_moe_iterations_min is not None:
                draw = torch.randint(config.train_moe_iterations_min, config.train_moe_iterations_max + 1, (1,))
                num_moe_iterations = self._broadcast(draw)
        for name, value in (("num_recurrent_steps", num_recurrent_steps), ("num_moe_iterations", num_moe_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if adaptive_exit_threshold is None:
            adaptive_exit_threshold = config.adaptive_exit_threshold
        elif isinstance(adaptive_exit_threshold, bool) or not (
            isinstance(adaptive_exit_threshold, (int, float)) and adaptive_exit_threshold > 0
        ):
            raise ValueError(
                f"`adaptive_exit_threshold` must be a number > 0 or None, got {adaptive_exit_threshold!r}."
            )
        truncated = config.num_backprop_steps is not None
        if sampling and self.uses_recurrent_steps and adaptive_exit_threshold is not None and truncated:
            # The graph starts at one step for every row (the last `num_backprop_steps` of the loop): a row that exits
            # before it would run no step with a graph, and the expert weights would get no gradient from it.
            raise ValueError(
                "Training with adaptive exit and truncated backprop (`num_backprop_steps`) together is not supported: "
                "tokens that exit before the last num_backprop_steps steps would get no gradient. Train with one of "
                "them, and use adaptive exit at inference (`model(..., adaptive_exit_threshold=t)`, `generate`)."
            )
        return MoREForwardSettings(
            num_recurrent_steps, num_moe_iterations, bool(output_recurrence_stats), adaptive_exit_threshold
        )

    def _sample_depth(self) -> int:
        """Training depth, drawn from the global torch RNG (so Trainer's RNG checkpointing replays it)."""
        draw = get_depth_sampler(self.config.recurrent_steps_sampler).draw(self.config)
        return draw if isinstance(draw, int) else self._broadcast(draw)

    # The drawn depth becomes a Python int that drives the step loops: a deliberate graph break under torch.compile
    # (training only) and one compiled graph per depth drawn.
    @torch.compiler.disable
    def _broadcast(self, draw: torch.Tensor) -> int:
        """Rank 0's draw, so every data-parallel rank runs the same depth."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            draw = draw.to(self.embed_tokens.weight.device)
            torch.distributed.broadcast(draw, src=0)
        return int(draw.item())

    def _check_architecture(self):
        for name, built in self._architecture.items():
            if getattr(self.config, name) != built:
                raise ValueError(
                    f"`config.{name}` changed from {built!r} to {getattr(self.config, name)!r} after the model was "
                    "built; it sizes or chooses modules, so build a new model from the changed config instead."
                )

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_length):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.dtype == torch.bool):
            raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}.")
        hidden = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden):
            raise ValueError(
                f"`inputs_embeds` must have shape (batch, seq_len, hidden_size={hidden}), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        name, inputs = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        shape = inputs.shape[:2]
        if 0 in shape:
            raise ValueError(
                f"`{name}` has shape {tuple(inputs.shape)}: at least one sequence of at least one token is needed "
                "(to generate from nothing, start from the BOS token)."
            )
        # Reading the range back is a host sync: checked where that is free only (on GPU the embedding's device-side
        # assert catches bad ids).
        if input_ids is not None and host_reads_free(input_ids):
            if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
                raise ValueError(
                    f"`input_ids` must be in [0, {self.vocab_size}) (vocab_size); got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]."
                )
        if position_ids is not None and tuple(position_ids.shape) not in ((shape[1],), (1, shape[1]), tuple(shape)):
            raise ValueError(
                f"`position_ids` must have shape (seq_len,), (1, seq_len) or (batch, seq_len) with batch, seq_len = "
                f"{tuple(shape)}, got {tuple(position_ids.shape)}."
            )
        if attention_mask is not None:
            expected = (shape[0], past_length + shape[1])
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"`attention_mask` must have shape (batch, past + seq_len) = {expected}, "
                    f"got {tuple(attention_mask.shape)}."
                )

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: "MoRECache | None" = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_recurrence_stats: bool | None = None,
        num_recurrent_steps: int | None = None,
        num_moe_iterations: int | None = None,
        adaptive_exit_threshold: float | None = None,
        **kwargs,
    ) -> MoREModelOutputWithPast:
        """`output_hidden_states`, `output_attentions`, `output_router_logits` and `output_moe_reports` are recorded
        through hooks (`_can_record_outputs`); other `kwargs` (attention-interface arguments) reach every backbone
        attention call."""
        cache, use_cache = self._resolve_cache(cache, use_cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        self._check_architecture()
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_length)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_ids = self._position_ids(inputs_embeds, attention_mask, position_ids, past_length)
        seq_len = inputs_embeds.shape[1]
        token_mask = None if attention_mask is None else attention_mask[:, -seq_len:].bool()
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        settings = self.resolve_settings(
            num_recurrent_steps, num_moe_iterations, output_recurrence_stats, adaptive_exit_threshold
        )
        router_memory = MoRERouterMemory() if self.router_cell is not None else None
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                token_mask=token_mask,
                cache_offset=past_length,
                settings=settings,
                cache=cache,
                router_memory=router_memory,
                **kwargs,
            )
        return MoREModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)

    def _resolve_cache(self, cache, use_cache):
        """The cache this call reads and writes (a `MoRECache`: it also holds expert state), and `use_cache`."""
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if use_cache and cache is None:
            cache = MoRECache(config=self.config)
        if cache is not None and not isinstance(cache, MoRECache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"MoRE needs a `MoRECache` (it also caches expert state); got a non-empty {type(cache).__name__}."
                )
            cache = MoRECache(config=self.config)
        return cache, use_cache

    @staticmethod
    def _position_ids(inputs_embeds, attention_mask, position_ids, past_length):
        """(batch, seq) positions: given, else counted over real tokens (left padding starts each row at 0), else
        `past_length + arange(seq)`."""
        batch, seq_len = inputs_embeds.shape[:2]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_length, past_length + seq_len, device=inputs_embeds.device)
        return position_ids.expand(batch, -1)


class MoREForCausalLM(MoREPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MoREConfig):
        super().__init__(config)
        self.model = MoREModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        # generate() builds an empty DynamicCache; MoRE also caches expert state, so swap in its own cache.
        cache = model_kwargs.get("cache")
        if cache is not None and not isinstance(cache, MoRECache) and cache.get_seq_length() == 0:
            model_kwargs["cache"] = MoRECache(config=self.config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: "MoRECache | None" = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_recurrence_stats: bool | None = None,
        num_recurrent_steps: int | None = None,
        num_moe_iterations: int | None = None,
        adaptive_exit_threshold: float | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoRECausalLMOutputWithPast:
        r"""
        Causal LM forward. `num_recurrent_steps` / `num_moe_iterations` override the depth for this call and
        `adaptive_exit_threshold` turns on per-token exit (all three reach every decoding step when passed to
        `generate`).

        Example:

        ```python
        >>> import torch
        >>> from transformers import AutoModelForCausalLM
        >>> from configuration_more import MoREConfig
        >>> config = MoREConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                     num_attention_heads=4, num_experts=4, expert_type="recurrent")
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> ids = torch.randint(0, 100, (2, 8))
        >>> out = model(ids, labels=ids, num_recurrent_steps=3)
        >>> out.logits.shape
        torch.Size([2, 8, 100])
        ```
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoREModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_moe_reports=True,  # what the router losses and diagnostics are computed from
            output_recurrence_stats=output_recurrence_stats,
            num_recurrent_steps=num_recurrent_steps,
            num_moe_iterations=num_moe_iterations,
            adaptive_exit_threshold=adaptive_exit_threshold,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -hidden_states.shape[1] :].reshape(-1).bool()  # (tokens,)
        summary = summarise_reports(outputs.moe_reports, self.config, token_mask, output_router_logits)
        expert_terms = [block.experts.regularisation_loss() for block in self._moe_blocks()]
        expert_terms = [term for term in expert_terms if term is not None]
        summary["expert_loss"] = torch.stack(expert_terms).mean() if expert_terms else None

        loss = lm_loss = None
        if labels is not None:
            lm_loss = self._lm_loss(logits, labels, hidden_states, kwargs.get("num_items_in_batch"))
            loss = lm_loss + self.regularisation(summary, labels, kwargs.get("num_items_in_batch")).to(lm_loss.dtype)
        return MoRECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **summary,
        )

    def _lm_loss(self, logits, labels, hidden_states, num_items_in_batch):
        """Cross-entropy summed over the label tokens / their count (Trainer's `num_items_in_batch` when given)."""
        expected = tuple(hidden_states.shape[:2])
        if tuple(labels.shape) != expected:
            raise ValueError(f"`labels` must have shape (batch, seq_len) = {expected}, got {tuple(labels.shape)}.")
        if logits.shape[1] != expected[1]:
            raise ValueError(
                f"`labels` need the logits of every position: got `logits_to_keep` keeping {logits.shape[1]} of "
                f"{expected[1]}."
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"`labels` must hold integer token ids (or -100), got dtype {labels.dtype}.")
        # A host read, as for `input_ids`: where it is free only (on GPU the loss kernel's assert catches them).
        if host_reads_free(labels) and (((labels < 0) & (labels != -100)) | (labels >= self.vocab_size)).any():
            raise ValueError(
                f"`labels` must be token ids in [0, {self.vocab_size}) (vocab_size) or -100 (ignored); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        if num_items_in_batch is not None:  # the label tokens over the accumulated micro-batches: 0 if none has any
            count = torch.as_tensor(num_items_in_batch).clamp_min(1)
        else:
            # Counted as at least 1: a batch without label tokens (all -100) has LM loss 0 and zero LM gradients,
            # where a mean would be 0 / 0 = NaN. No host read.
            count = (labels[:, 1:] != -100).sum().clamp_min(1)
        return self.loss_function(logits, labels, self.vocab_size, num_items_in_batch=count)

    def regularisation(self, summary: dict, labels: torch.Tensor, num_items_in_batch=None):
        """Weighted router and projection terms of `summary` (`summarise_reports` plus `expert_loss`).

        They are means over this batch; under gradient accumulation (Trainer passes `num_items_in_batch`, the label
        tokens of all accumulated micro-batches) each micro-batch is weighted by its share of those tokens, so the
        accumulated sum carries the configured weight once.
        """
        config = self.config
        total = torch.zeros(())
        if summary.get("aux_loss") is not None:
            total = total + config.router_aux_loss_coef * summary["aux_loss"]
            total = total + config.router_z_loss_coef * summary["z_loss"]
        if summary.get("entropy_loss") is not None:
            total = total + config.router_entropy_coef * summary["entropy_loss"]
        if summary["expert_loss"] is not None:  # already weighted by each expert type
            total = total + summary["expert_loss"]
        if num_items_in_batch is not None:
            local = (labels[:, 1:] != -100).sum()
            total = total * (local / torch.as_tensor(num_items_in_batch).clamp_min(1))
        return total


# ---------------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------------

MoREConfig.register_for_auto_class()
MoREForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MoREModel.register_for_auto_class("AutoModel")

from transformers import AutoConfig  # noqa: E402


if not __name__.startswith("transformers_modules"):
    # Installed path: `import modeling_more` makes the Auto classes know MoRE (installed classes win over remote code).
    from transformers import AutoModel, AutoModelForCausalLM

    AutoConfig.register("more", MoREConfig, exist_ok=True)
    AutoModel.register(MoREConfig, MoREModel, exist_ok=True)
    AutoModelForCausalLM.register(MoREConfig, MoREForCausalLM, exist_ok=True)
else:
    # Remote code: once a checkpoint's code is loaded, `AutoTokenizer.from_pretrained(checkpoint)` (which reads
    # config.json first) must find the model type without asking to run custom code again. Only the config is
    # registered, and only where nothing is (an installed MoRE, imported before or after, keeps precedence).
    try:
        AutoConfig.register("more", MoREConfig)
    except ValueError:  # "more" is already registered
        pass


__all__ = ["MoRECache", "MoREConfig", "MoREForCausalLM", "MoREModel", "MoREPreTrainedModel"]
