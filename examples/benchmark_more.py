"""Benchmarks of MoRE: one MoE layer, recurrent experts, full-model training, and cached decoding.

    python examples/benchmark_more.py --suite moe-layer                      # one suite, CPU, fp32 and bf16
    python examples/benchmark_more.py --suite all --repeats 5 --output_dir outputs/benchmark
    python examples/benchmark_more.py --suite model --model_sizes guide --num_layers 2 --seq_len 128
    python examples/benchmark_more.py --suite model --model_sizes tiny --compile   # + compiled vs eager steps
    python examples/benchmark_more.py --suite all --device cuda              # bf16 on a GPU (grouped_mm fast path)

Suites:
    moe-layer  one MoE block (4096 tokens, hidden 512, ffn 2048, 8 experts, top-1 and top-2), forward + backward:
               MoRE `ffn` experts vs Transformers' `MixtralSparseMoeBlock` (eager and grouped_mm experts) vs a dense
               SwiGLU FFN of the same active width; torch.profiler share of routing + sort + gather/scatter.
    recurrent  `recurrent` / `shared_recurrent` experts: cost of r steps, attention inside experts vs plain causal
               SDPA over the same tokens, training peak memory with truncated backprop at r=16 vs r=2.
    model      full-model training (forward, backward, AdamW step) tokens/s and peak memory for every expert type
               next to a same-size `MixtralForCausalLM`; in the same rounds, each type's step under bf16 autocast
               (fp32 weights) and, with `--compile`, through `torch.compile`; `parallel` and `sequential` share
               their rounds (target: parallel / sequential <= 1.0).
    decode     greedy decoding tokens/s with and without the cache at growing context lengths.
    tiny       the comparison job's own step (`compare_more.py` preset "default": its configs and attention kernel,
               its 32-example batches of the addition task, AdamW as Trainer runs it) for `ffn`, `recurrent` (training
               depth 1-3), `shared_recurrent`, `ffn_synthesis2` and Transformers' Mixtral and Llama of the `ffn`
               model's size (SDPA, their faster kernel there), single-thread medians, ratios to Llama (targets: ffn <=
               1.1, recurrent <= 2.5), and the share of a Trainer step spent outside the bare step (data path,
               callbacks, scheduler; target < 5 %).

Candidates of a measurement are timed side by side, interleaved round by round (each round runs every candidate
once), so load from other processes hits them alike; tables report the minimum over `--repeats` rounds and the spread
(max / min). The model suite, whose models need not fit in memory together, times each MoRE model interleaved with
the same-size Mixtral and reports the ratio of the two. Every suite prints Markdown tables and writes
`<output_dir>/<suite>.json`. The ratios are measurements of one run, not tests.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from more_tools.benchmarks import (
    DTYPES,
    MODEL_SIZES,
    SUITES,
    bench_decode,
    bench_model,
    bench_moe_layer,
    bench_recurrent,
    bench_tiny,
    benchmark_cell,
)
from more_tools.cards import markdown_table
from more_tools.comparison import load_presets
from more_tools.timing import device_description, source_revision


logger = logging.getLogger(__name__)

COMPARE_PRESETS = Path(__file__).resolve().parent / "configs" / "compare"  # the tiny suite measures the job's


@dataclass
class BenchmarkArguments:
    suite: str = field(default="all", metadata={"help": f"One of {SUITES} or 'all'."})
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Comma-separated dtypes (float32, bfloat16). 'auto': on CPU the moe-layer suite runs float32 and "
            "bfloat16 and the others float32; on CUDA everything runs bfloat16."
        },
    )
    repeats: int = field(default=5, metadata={"help": "Timed rounds per measurement (after one warm-up round)."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Where `<suite>.json` files go."})
    seed: int = field(default=0, metadata={"help": "Seed for weights and inputs."})
    # moe-layer
    num_tokens: int = field(default=4096, metadata={"help": "moe-layer: tokens per forward."})
    hidden_size: int = field(default=512, metadata={"help": "moe-layer / recurrent: model width."})
    intermediate_size: int = field(default=2048, metadata={"help": "moe-layer / recurrent: expert FFN width."})
    num_experts: int = field(default=8, metadata={"help": "moe-layer / recurrent: experts per layer."})
    top_k: str = field(default="1,2", metadata={"help": "moe-layer: comma-separated experts per token."})
    profile_iterations: int = field(default=3, metadata={"help": "moe-layer: profiled forward + backward passes."})
    # recurrent
    recurrent_steps: str = field(default="1,2,4,8,16", metadata={"help": "recurrent: comma-separated depths r."})
    attention_length: int = field(default=512, metadata={"help": "recurrent: sequence length L."})
    recurrent_batch_size: int = field(default=2, metadata={"help": "recurrent: sequences per forward."})
    num_backprop_steps: int = field(default=2, metadata={"help": "recurrent: truncated backprop depth for memory."})
    # model and decode
    model_sizes: str = field(
        default="tiny,guide", metadata={"help": f"model: comma-separated, of {list(MODEL_SIZES)}."}
    )
    num_layers: int | None = field(
        default=None, metadata={"help": "model / decode: override the layer count of the guide size (12)."}
    )
    expert_types: str = field(
        default="all", metadata={"help": "model: comma-separated expert types, or 'all' (the registry)."}
    )
    num_recurrent_steps: int = field(default=4, metadata={"help": "model / decode: expert recurrence depth."})
    autocast: bool = field(
        default=True, metadata={"help": "model: also time each fp32 model's steps under bf16 autocast."}
    )
    compile: bool = field(
        default=False, metadata={"help": "model: also time each MoRE model's steps through torch.compile(model)."}
    )
    seq_len: int = field(default=128, metadata={"help": "model: tokens per training sequence."})
    batch_size: int = field(default=4, metadata={"help": "model: sequences per training step."})
    decode_expert_types: str = field(default="ffn,recurrent", metadata={"help": "decode: expert types."})
    decode_size: str = field(default="guide", metadata={"help": f"decode: model size, one of {list(MODEL_SIZES)}."})
    contexts: str = field(default="64,256,512", metadata={"help": "decode: comma-separated context lengths."})
    new_tokens: int = field(default=16, metadata={"help": "decode: greedy tokens generated per measurement."})
    tiny_rounds: int = field(default=40, metadata={"help": "tiny: timed rounds (medians over them)."})
    tiny_train_examples: int = field(
        default=4096, metadata={"help": "tiny: training examples built for the batches (the job builds 40000)."}
    )


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser(BenchmarkArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    suites = SUITES if args.suite == "all" else (args.suite,)
    if any(s not in SUITES for s in suites):
        raise ValueError(f"--suite must be one of {SUITES} or 'all', got {args.suite!r}.")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda was asked, but this torch build ({torch.__version__}) sees no CUDA device "
            "(torch.cuda.is_available() is False). Run on a GPU machine or use --device cpu."
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {args.device!r}.")
    if args.dtype == "auto":
        layer_dtypes = ["float32", "bfloat16"] if device.type == "cpu" else ["bfloat16"]
        other_dtype = "float32" if device.type == "cpu" else "bfloat16"
    else:
        layer_dtypes = args.dtype.split(",")
        other_dtype = layer_dtypes[0]
    unknown = [d for d in layer_dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtype must list names from {list(DTYPES)} (or be 'auto'), got {unknown}.")
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = {
        "date": date.today().isoformat(),
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "revision": source_revision(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arguments": asdict(args),
    }
    logger.info(f"Benchmarking {', '.join(suites)} on {metadata['device']}, revision {metadata['revision']}")

    for suite in suites:
        logger.info(f"Suite {suite}")
        if suite == "moe-layer":
            result = bench_moe_layer(args, device, {name: DTYPES[name] for name in layer_dtypes})
        elif suite == "recurrent":
            result = bench_recurrent(args, device, DTYPES[other_dtype])
        elif suite == "model":
            result = bench_model(args, device, DTYPES[other_dtype])
        elif suite == "tiny":
            result = bench_tiny(args, device, load_presets(COMPARE_PRESETS)["default"])
        else:
            result = bench_decode(args, device, DTYPES[other_dtype])
        report = [
            f"## {suite} ({metadata['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"revision {metadata['revision']})"
        ]
        for title, columns, rows in result["tables"]:
            report += [f"\n**{title}**\n", markdown_table(columns, rows, cell=benchmark_cell)]
        if result["targets"]:
            rows = [[t["target"], t["measured"], "holds" if t["holds"] else "MISSED"] for t in result["targets"]]
            report += ["\n**Targets**\n", markdown_table(["target", "measured", "status"], rows, cell=benchmark_cell)]
        print("\n".join(report) + "\n", flush=True)
        path = output_dir / f"{suite.replace('-', '_')}.json"
        tables = [{"title": t, "columns": c, "rows": r} for t, c, r in result["tables"]]
        path.write_text(json.dumps({**metadata, "suite": suite, **result, "tables": tables}, indent=2, default=str))
        logger.info(f"Wrote {path}")


if __name__ == "__main__":
    main()
