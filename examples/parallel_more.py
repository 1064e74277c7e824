"""Tensor and expert parallelism of MoRE on CPU ranks (gloo): per-rank parameter memory, and a few training steps.

    torchrun --nproc_per_node 2 examples/parallel_more.py memory                  # every expert type, TP and EP
    torchrun --nproc_per_node 2 examples/parallel_more.py train --mode ep --expert_type recurrent
    python examples/parallel_more.py train --mode none --expert_type recurrent    # the same steps in one process

`memory` builds a model of the `--preset` size per expert type (saved once under `--output_dir`), loads it with
`tp_plan="auto"` and with `DistributedConfig(tp_size=2, ep_size=2)`, and prints the bytes each rank stores of the
expert weights (`layers.*.mlp.experts.*`) and of everything else, next to one process. `train` runs `--steps` AdamW
steps on fixed random batches, in training mode (depth drawn per step), and prints the loss of every step: the TP
and EP curves match `--mode none` to float tolerance (with `latent_init_std=0`: under EP each rank draws the
recurrent latent noise for its own rows). Results also go to `<output_dir>/memory.json` and
`<output_dir>/train-<expert_type>-<mode>.json` (rank 0).
"""

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)
from configuration_more import EXPERT_TYPES, MoREConfig
from more_tools.cards import markdown_table
from more_tools.training import PRESETS


MODES = {
    "none": {},
    "tp": {"tp_plan": "auto"},
    "ep": {"distributed_config": DistributedConfig(tp_size=2, ep_size=2)},
}


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def checkpoint(output_dir: Path, preset: str, expert_type: str) -> Path:
    """A freshly initialised model of `preset` size, written once by rank 0."""
    path = output_dir / f"{preset}-{expert_type}"
    if rank() == 0 and not (path / "config.json").exists():
        torch.manual_seed(0)
        config = MoREConfig(**PRESETS[preset], vocab_size=512, expert_type=expert_type, latent_init_std=0.0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def stored_bytes(model) -> dict[str, int]:
    """Bytes of parameters this rank stores (a sharded parameter counts its local shard), experts and the rest."""
    totals = {"experts": 0, "other": 0}
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, torch.distributed.tensor.DTensor) else param
        totals["experts" if ".mlp.experts." in name else "other"] += local.numel() * local.element_size()
    return totals


def per_rank(value):
    """`value` of every rank, in rank order."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def memory(args) -> dict:
    results = {}
    for expert_type in args.expert_types:
        path = checkpoint(args.output_dir, args.preset, expert_type)
        row = {"one_process": stored_bytes(AutoModelForCausalLM.from_pretrained(path))}
        for mode in ("tp", "ep"):
            row[mode] = per_rank(stored_bytes(AutoModelForCausalLM.from_pretrained(path, **MODES[mode])))
        results[expert_type] = row
    if rank() == 0:
        mib = 2**20
        print(f"\nPer-rank parameter memory, preset {args.preset!r}, fp32, 2 ranks (MiB; expert weights / the rest)\n")
        headers = ["expert_type", "one process", "TP rank 0", "TP rank 1", "EP rank 0", "EP rank 1"]
        headers.append("EP experts / one process")
        rows = []
        for expert_type, row in results.items():
            cells = [row["one_process"], *row["tp"], *row["ep"]]
            ratio = row["ep"][0]["experts"] / row["one_process"]["experts"]
            rows.append([expert_type, *(f"{c['experts'] / mib:.2f} / {c['other'] / mib:.2f}" for c in cells), ratio])
        print(markdown_table(headers, rows, cell=lambda value: f"{value:.3f}" if isinstance(value, float) else value))
    return results


def train(args) -> dict:
    path = checkpoint(args.output_dir, args.preset, args.expert_type)
    model = AutoModelForCausalLM.from_pretrained(path, **MODES[args.mode]).train()
    torch.manual_seed(args.seed)
    batches = [torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len)) for _ in range(args.steps)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, foreach=False)
    losses = []
    for ids in batches:
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if rank() == 0:
        print(f"{args.expert_type} {args.mode}: " + " ".join(f"{loss:.6f}" for loss in losses))
    return {"expert_type": args.expert_type, "mode": args.mode, "losses": losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("memory", "train"))
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    expert_types = list(EXPERT_TYPES)
    parser.add_argument("--expert_types", nargs="+", default=expert_types, choices=expert_types, help="memory")
    parser.add_argument("--expert_type", default="recurrent", choices=expert_types, help="train")
    parser.add_argument("--mode", default="ep", choices=list(MODES), help="train: none = one process")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/parallel"))
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")  # Transformers' device mesh reuses it
    results = memory(args) if args.command == "memory" else train(args)
    if rank() == 0:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        name = args.command if args.command == "memory" else f"train-{args.expert_type}-{args.mode}"
        (args.output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
