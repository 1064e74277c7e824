"""The grouped dispatch path against a straightforward per-expert loop, for every expert type.

`MoRESparseMoeBlock` routes once, sorts all (token, expert) pairs, runs every expert at once through
`torch.nn.functional.grouped_mm` and scatter-adds the results. The reference here does what that replaces: for each
expert e and each sequence b it selects with a boolean mask the tokens routed to e in b (in time order), runs expert e
alone on them (the same expert class built for one expert, fed expert e's slice of the stacked weights, so every
kernel is a plain `F.linear`), scales by the routing weight and scatters back. Outputs and gradients (input and every
parameter) must match.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import EXPERT_TYPES, count_calls, tiny_config
from torch.func import functional_call

import modeling_more


NUM_EXPERTS = 3  # odd, and unlike every other dimension, so a mix-up of axes cannot pass
NUM_STEPS = 3
BATCH, SEQ, PAD = 2, 8, 2  # the second sequence starts with PAD left-padding tokens


def build_block(expert_type, top_k, train):
    # latent_init_std=0: training starts the latent state at zeros, so train mode is deterministic too. Truncated
    # backprop in training checks that both paths cut gradients at the same step.
    config = tiny_config(
        expert_type=expert_type,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=top_k,
        latent_init_std=0.0,
        num_backprop_steps=2 if train else None,
        parallel_gate_hidden_size=16,
    )
    torch.manual_seed(0)
    # A one-layer model gives the block MoRE's own weight initialisation (norms at one, orthogonal projections, ...).
    model = modeling_more.MoREModel(copy.deepcopy(config))
    return model.layers[0].mlp.train(train), config


def expert_params(experts, single, index):
    """Expert `index`'s weights for the one-expert module `single`: stacked parameters are sliced along their expert
    axis (the one axis whose size differs), parameters shared by all experts (the shared engine) are passed whole."""
    params = {}
    for name, param in experts.named_parameters():
        target = single.get_parameter(name).shape
        axes = [i for i, (a, b) in enumerate(zip(param.shape, target, strict=True)) if a != b]
        if not axes:
            params[name] = param
            continue
        assert len(axes) == 1 and target[axes[0]] == 1, (name, tuple(param.shape), tuple(target))
        params[name] = param.narrow(axes[0], index, 1)
    return params


def reference_forward(block, config, x, token_mask, position_ids):
    """Route each token, then run each (expert, sequence) alone with its own copy of the expert."""
    batch, seq_len, hidden = x.shape
    flat = x.reshape(-1, hidden)
    probs = F.softmax(F.linear(flat, block.gate.weight).float(), dim=-1)
    top_k_weights, top_k_index = torch.topk(probs, config.num_experts_per_tok, dim=-1)
    if config.norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(-1, keepdim=True)
    top_k_weights = top_k_weights.to(x.dtype)

    single_config = copy.deepcopy(config)
    single_config.num_experts, single_config.num_experts_per_tok = 1, 1
    single = modeling_more.get_expert_class(config.expert_type)(single_config).train(block.training)
    sequence = torch.arange(batch).repeat_interleave(seq_len)
    real = token_mask.reshape(-1)
    out = torch.zeros_like(flat)
    for expert in range(config.num_experts):
        chosen = top_k_index == expert  # (tokens, top_k)
        params = expert_params(block.experts, single, expert)
        for b in range(batch):
            tokens = torch.nonzero(chosen.any(-1) & real & (sequence == b)).squeeze(1)  # ascending = time order
            if tokens.numel() == 0:
                continue
            n = tokens.shape[0]
            dispatch = modeling_more.MoREDispatch(
                token_index=torch.arange(n),
                expert_index=torch.zeros(n, dtype=torch.long),
                weights=torch.ones(n),
                offs=torch.tensor([n], dtype=torch.int32),
                batch_index=torch.zeros(n, dtype=torch.long),
                position=position_ids.reshape(-1)[tokens],
                cache_index=tokens % seq_len,
                batch_size=1,
                num_experts=1,
                seq_len=n,
            )
            settings = modeling_more.MoREForwardSettings(num_recurrent_steps=NUM_STEPS, num_moe_iterations=1)
            rows = functional_call(single, params, (flat[tokens], dispatch, settings))[0]
            weight = (top_k_weights * chosen)[tokens].sum(-1, keepdim=True)  # (n, 1)
            out = out.index_add(0, tokens, rows * weight)
    return out.view(batch, seq_len, hidden)


@pytest.mark.parametrize("shapes", ["host", "static"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_grouped_dispatch_matches_per_expert_loop(expert_type, top_k, mode, shapes, monkeypatch):
    """`shapes`: the CPU eager path, which sizes segment attention and the `parallel` scan by the data, or the static
    path of accelerators and compile (`host_reads_free` patched to False)."""
    if shapes == "static":
        monkeypatch.setattr(modeling_more, "host_reads_free", lambda tensor: False)
    block, config = build_block(expert_type, top_k, train=mode == "train")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, config.hidden_size, generator=generator, requires_grad=True)
    grad_output = torch.randn(BATCH, SEQ, config.hidden_size, generator=generator)
    token_mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    token_mask[1, :PAD] = False
    position_ids = (token_mask.long().cumsum(-1) - 1).clamp_min(0)
    settings = modeling_more.MoREForwardSettings(num_recurrent_steps=NUM_STEPS, num_moe_iterations=1)
    params = [p for _, p in block.named_parameters()]
    names = [n for n, _ in block.named_parameters()]

    calls = count_calls(monkeypatch, F, "grouped_mm")
    grouped = block(x, token_mask, position_ids, 0, settings)[0]
    grouped_grads = torch.autograd.grad((grouped * grad_output).sum(), [x, *params], allow_unused=True)
    assert calls, "the block never reached the grouped_mm fast path"
    calls.clear()
    reference = reference_forward(block, config, x, token_mask, position_ids)
    reference_grads = torch.autograd.grad((reference * grad_output).sum(), [x, *params], allow_unused=True)
    assert not calls, "the reference must not use grouped_mm"

    torch.testing.assert_close(grouped, reference, rtol=1e-4, atol=1e-5)
    assert grouped[1, :PAD].abs().max() == 0  # padding never reaches an expert
    for name, got, want in zip(["input", *names], grouped_grads, reference_grads, strict=True):
        if got is None and want is None:  # a parameter truncated backprop cuts off in both paths
            continue
        got = torch.zeros_like(want) if got is None else got
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"gradient of {n}: {m}")
