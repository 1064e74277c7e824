"""One rank of `test_parallel.py`, run under `torchrun --nproc_per_node 2` (gloo on CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/model/parallel_worker.py ROOT

ROOT holds `cases.json` (checkpoint names), the checkpoints and `inputs.pt`. For every checkpoint and mode (`tp`:
`tp_plan="auto"`, `ep`: `DistributedConfig(tp_size=2, ep_size=2)`) this rank loads the model sharded, runs a forward
without gradients (also with recurrence statistics and adaptive exit) and with them, a backward, greedy generation,
saves the model, trains it a few steps, and writes what it saw to `ROOT/<name>-<mode>-rank<r>.pt`; the test compares
it with one process.
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)


MODES = {
    "tp": {"tp_plan": "auto"},
    "ep": {"distributed_config": DistributedConfig(tp_size=2, ep_size=2)},
}


def local(tensor):
    return tensor.to_local() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def train_losses(model, inputs, steps=3):
    """Losses of a few AdamW steps in training mode (depth drawn per step from the seeded global generator)."""
    model.train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def counted_rows(forward):
    """Run `forward()` and return its result with, per expert-parallel layer call, (rows this rank's experts
    computed, kept rows among them, kept rows of the whole dispatch)."""
    seen, local_dispatch = [], modeling_more.local_dispatch

    def counting(dispatch, first_expert, num_local):
        local, index = local_dispatch(dispatch, first_expert, num_local)
        seen.append((index.shape[0], int(local.kept.sum()), int(dispatch.kept.sum())))
        return local, index

    modeling_more.local_dispatch = counting
    try:
        return forward(), seen
    finally:
        modeling_more.local_dispatch = local_dispatch


def run_case(root, name, mode, inputs):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name), **MODES[mode]).eval()
    with torch.no_grad():
        logits, expert_rows = counted_rows(lambda: model(**inputs).logits)
        stats = model(**inputs, output_recurrence_stats=True).recurrence_stats
        adaptive = model(**inputs, output_recurrence_stats=True, adaptive_exit_threshold=0.3, num_recurrent_steps=8)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    # Gradients gathered to full tensors, and each parameter's local shard size (what this rank stores).
    grads = {n: modeling_more.full_tensor(p.grad).detach().clone() for n, p in model.named_parameters()}
    local_numel = {n: local(p).numel() for n, p in model.named_parameters()}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_recurrent_steps=3)
    model.save_pretrained(os.path.join(root, f"{name}-{mode}-saved"))
    model.zero_grad()
    losses = train_losses(model, inputs)
    rank = torch.distributed.get_rank()
    result = {
        "logits": logits,
        "expert_rows": expert_rows,
        "stats": stats,
        "adaptive_logits": adaptive.logits,
        "adaptive_stats": adaptive.recurrence_stats,
        "train_logits": out.logits.detach(),
        "loss": out.loss.detach(),
        "grads": grads,
        "local_numel": local_numel,
        "generated": generated,
        "train_losses": losses,
    }
    torch.save(result, os.path.join(root, f"{name}-{mode}-rank{rank}.pt"))


def main(root):
    torch.manual_seed(0)
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    with open(os.path.join(root, "cases.json")) as f:
        cases = json.load(f)
    for mode in MODES:
        for name in cases:
            run_case(root, name, mode, inputs)


if __name__ == "__main__":
    main(sys.argv[1])
