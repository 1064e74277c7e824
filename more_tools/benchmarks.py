"""The suites of `examples/benchmark_more.py`: one MoE layer, recurrent experts, full-model training, cached decoding
and the comparison job's step, each returning its tables and targets."""

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import modeling_more
from configuration_more import MoREConfig
from more_tools.comparison import Preset, build_variant_configs, train_model, training_arguments
from more_tools.data import TensorExamples, build_depth_dataset, tokenize_qa, train_word_level_tokenizer
from more_tools.timing import (
    peak_memory,
    release,
    summary,
    synchronize,
    time_interleaved,
)
from more_tools.training import collate


logger = logging.getLogger(__name__)


SUITES = ("moe-layer", "recurrent", "model", "decode", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Model sizes: the research guide's base configuration (§3.1) and a tiny one for quick runs.
MODEL_SIZES = {
    "guide": dict(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_experts=8,
        num_experts_per_tok=1,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=1,
    ),
}


def benchmark_cell(value) -> str:
    """Ratios and timings to 3 significant digits (large values whole)."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def target(name: str, measured: float, limit: float, at_least: bool) -> dict:
    holds = measured >= limit if at_least else measured <= limit
    return {"target": name, "measured": round(measured, 3), "limit": limit, "holds": bool(holds)}


def more_block(device, dtype, **config_kwargs) -> tuple[modeling_more.MoRESparseMoeBlock, MoREConfig]:
    """One MoE block with MoRE's own weight initialisation (taken from a one-layer model)."""
    config = MoREConfig(vocab_size=8, num_hidden_layers=1, num_attention_heads=8, **config_kwargs)
    block = modeling_more.MoREModel(config).layers[0].mlp
    return block.to(device=device, dtype=dtype), config


def block_call(block, position_ids, num_recurrent_steps: int = 1):
    settings = modeling_more.MoREForwardSettings(num_recurrent_steps=num_recurrent_steps, num_moe_iterations=1)
    return lambda x: block(x, None, position_ids, 0, settings)[0]


def train_step_fn(call: Callable, module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable:
    """Forward + backward of `call(x)` against a fixed output gradient; gradients are reset so none accumulate."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        call(x).backward(grad)

    return step


def causal_lm(kind: str, size: dict, args, device, dtype):
    """A MoRE model of expert type `kind`, or Transformers' Mixtral (`kind == "mixtral"`) of the same size."""
    if kind == "mixtral":
        config = MixtralConfig(
            **{k: v for k, v in size.items() if k != "num_experts"},
            num_local_experts=size["num_experts"],
            num_key_value_heads=size["num_attention_heads"],
            tie_word_embeddings=True,
            output_router_logits=True,  # Mixtral adds its load-balancing loss only when asked; MoRE always does
            router_aux_loss_coef=1e-3,
            max_position_embeddings=4096,
        )
        return MixtralForCausalLM(config).to(device=device, dtype=dtype)
    config = MoREConfig(
        **size,
        expert_type=kind,
        num_recurrent_steps=args.num_recurrent_steps,
        recurrent_steps_sampler="fixed",  # same depth every step, so timings compare
        max_position_embeddings=4096,
    )
    return modeling_more.MoREForCausalLM(config).to(device=device, dtype=dtype)


def model_size(name: str, args) -> dict:
    size = dict(MODEL_SIZES[name])
    if name == "guide" and args.num_layers is not None:
        size["num_hidden_layers"] = args.num_layers
    return size


# Profiler op names by role in the MoE block; matrix products and multiplies are told apart by their shapes.
ROUTING_OPS = {
    "aten::_softmax",
    "aten::_softmax_backward_data",
    "aten::topk",
    "aten::logsumexp",
    "aten::scatter",
    "aten::scatter_add_",
    "aten::value_selecting_reduction_backward",
    "aten::histc",
}
SORT_OPS = {
    "aten::argsort",
    "aten::sort",
    "aten::bincount",
    "aten::cumsum",
    "aten::repeat_interleave",
    "aten::one_hot",
    "aten::searchsorted",
    "aten::div",
    "aten::remainder",
    "aten::where",
    "aten::arange",
}
GATHER_SCATTER_OPS = {
    "aten::index",
    "aten::index_select",
    "aten::index_add_",
    "aten::index_add",
    "aten::index_put_",
    "aten::_index_put_impl_",
    "aten::gather",
    "aten::index_copy",
    "aten::embedding_dense_backward",
}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}
# Products over the experts' stacked weights (experts, in, out): the expert compute, though the expert count is one of
# their dimensions (the router's product has it too, below).
GROUPED_MATMUL_OPS = {"aten::_grouped_mm", "more::grouped_mm", "more::grouped_mm_weight_grad"}


def classify(event, num_experts: int) -> str:
    name, shapes = event.name, [s for s in event.input_shapes if s]
    if name in GROUPED_MATMUL_OPS:
        return "expert compute"
    if name in MATMUL_OPS:
        # The router is the only product with the expert count as a dimension ((tokens, d) x (d, E) and backward).
        return "routing" if any(num_experts in s for s in shapes) else "expert compute"
    if name == "aten::mul" and any(len(s) == 2 and s[1] == 1 for s in shapes):
        return "gather/scatter"  # rows * gate weight (rows, 1): the combine step
    for category, names in (("routing", ROUTING_OPS), ("sort", SORT_OPS), ("gather/scatter", GATHER_SCATTER_OPS)):
        if name in names:
            return category
    if name.startswith("aten::"):
        return "expert compute"  # activations, products, splits and sums of the expert FFN
    return "other"  # autograd engine bookkeeping, gradient accumulation


def dispatch_share(step: Callable, device, iterations: int, num_experts: int) -> dict:
    """Self time of the block's forward + backward by category, from torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iterations):
            step()
        synchronize(device)
    totals = {"routing": 0.0, "sort": 0.0, "gather/scatter": 0.0, "expert compute": 0.0, "other": 0.0}
    for event in prof.events():
        if device.type == "cuda" and event.device_type != DeviceType.CPU:
            continue  # a kernel's time is already its launching op's self device time: counted once, by op
        self_time = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[classify(event, num_experts)] += self_time
    total = sum(totals.values())
    shares = {k: v / total for k, v in totals.items()}
    shares["dispatch (routing + sort + gather/scatter)"] = sum(
        shares[k] for k in ("routing", "sort", "gather/scatter")
    )
    return shares


def host_sync_check(fn: Callable) -> str:
    """Run `fn` with CUDA's sync debug mode set to error: any host synchronisation raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as error:
        return f"host sync: {str(error).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def forward_backward(fn: Callable):
    fn().sum().backward()


def bench_moe_layer(args, device, dtypes):
    d, ff, experts, tokens = args.hidden_size, args.intermediate_size, args.num_experts, args.num_tokens
    rows, records, shares_rows, targets = [], [], [], []
    for dtype_name, dtype in dtypes.items():
        for top_k in [int(k) for k in args.top_k.split(",")]:
            torch.manual_seed(args.seed)
            block, config = more_block(
                device,
                dtype,
                hidden_size=d,
                intermediate_size=ff,
                num_experts=experts,
                num_experts_per_tok=top_k,
                norm_topk_prob=True,  # as Mixtral, so both compute the same function
            )
            block.train()
            mixtral = {}
            for implementation in ("eager", "grouped_mm"):
                mixtral_config = MixtralConfig(
                    hidden_size=d,
                    intermediate_size=ff,
                    num_local_experts=experts,
                    num_experts_per_tok=top_k,
                    experts_implementation=implementation,
                )
                mixtral[implementation] = MixtralSparseMoeBlock(mixtral_config).to(device=device, dtype=dtype).train()
                mixtral[implementation].load_state_dict(
                    {
                        "gate.weight": block.gate.weight,
                        "experts.gate_up_proj": block.experts.gate_up_proj,
                        "experts.down_proj": block.experts.down_proj,
                    }
                )
            dense = modeling_more.MoREMLP(config, top_k * ff).to(device=device, dtype=dtype).train()
            x = torch.randn(1, tokens, d, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            position_ids = torch.arange(tokens, device=device)[None]
            more_call = block_call(block, position_ids)
            with torch.no_grad():
                difference = (more_call(x) - mixtral["eager"](x)).abs().max().item()
            calls = {
                "MoRE ffn (grouped_mm)": (more_call, block),
                "Mixtral block, eager experts (standalone default)": (mixtral["eager"], mixtral["eager"]),
                "Mixtral block, grouped_mm experts": (mixtral["grouped_mm"], mixtral["grouped_mm"]),
                f"dense SwiGLU FFN, width {top_k * ff}": (dense, dense),
            }
            steps = {name: train_step_fn(call, module, x, grad) for name, (call, module) in calls.items()}
            times = time_interleaved(steps, args.repeats, device, f"moe-layer {dtype_name} top-{top_k}")
            flops = 3 * 2 * tokens * top_k * 3 * d * ff  # three d x ff products per active expert; backward = 2x
            more_time = min(times["MoRE ffn (grouped_mm)"])
            for name, seconds in times.items():
                stats = summary(seconds)
                speedup = min(seconds) / more_time
                rows.append(
                    [
                        dtype_name,
                        top_k,
                        name,
                        1e3 * stats["min_s"],
                        1e3 * stats["median_s"],
                        stats["spread"],
                        flops / stats["min_s"] / 1e12,
                        speedup,
                    ]
                )
                records.append(
                    {
                        "dtype": dtype_name,
                        "top_k": top_k,
                        "implementation": name,
                        **stats,
                        "active_tflops": flops / stats["min_s"] / 1e12,
                        "more_speedup_over_it": speedup,
                    }
                )
            shares = dispatch_share(steps["MoRE ffn (grouped_mm)"], device, args.profile_iterations, experts)
            sync = host_sync_check(partial(more_call, x)) if device.type == "cuda" else "n/a (CPU)"
            shares_rows.append([dtype_name, top_k] + [100 * v for v in shares.values()] + [sync])
            records.append(
                {
                    "dtype": dtype_name,
                    "top_k": top_k,
                    "profile_shares": shares,
                    "host_syncs": sync,
                    "max_abs_difference_to_mixtral": difference,
                }
            )
            logger.info(f"{dtype_name} top-{top_k}: max |MoRE - Mixtral| = {difference:.2e}")
            if dtype == torch.float32:
                dense_time = min(times[f"dense SwiGLU FFN, width {top_k * ff}"])
                eager_time = min(times["Mixtral block, eager experts (standalone default)"])
                if top_k == 1:
                    targets.append(
                        target(
                            f"fp32 top-1: MoRE speed / dense FFN ({ff}) speed >= 0.75",
                            dense_time / more_time,
                            0.75,
                            True,
                        )
                    )
                    targets.append(
                        target(
                            "fp32 top-1: MoRE speed / Mixtral block (eager) speed >= 1.5",
                            eager_time / more_time,
                            1.5,
                            True,
                        )
                    )
                elif top_k == 2:
                    targets.append(
                        target(
                            f"fp32 top-2: MoRE speed / dense FFN ({2 * ff}) speed >= 0.9",
                            dense_time / more_time,
                            0.9,
                            True,
                        )
                    )
                targets.append(
                    target(
                        f"fp32 top-{top_k}: routing + sort + gather/scatter share of block time <= 10%",
                        100 * shares["dispatch (routing + sort + gather/scatter)"],
                        10,
                        False,
                    )
                )
            del block, mixtral, dense, steps, calls
            release(device)
    return {
        "tables": [
            (
                f"MoE layer, forward + backward, {tokens} tokens, hidden {d}, ffn {ff}, {experts} experts",
                [
                    "dtype",
                    "top-k",
                    "implementation",
                    "min ms",
                    "median ms",
                    "max/min",
                    "active TFLOP/s",
                    "MoRE speed-up over it",
                ],
                rows,
            ),
            (
                "MoRE block time by category (torch.profiler self time, %)",
                [
                    "dtype",
                    "top-k",
                    "routing",
                    "sort",
                    "gather/scatter",
                    "expert compute",
                    "other",
                    "routing + sort + gather/scatter",
                    "host syncs in forward",
                ],
                shares_rows,
            ),
        ],
        "records": records,
        "targets": targets,
    }


def huginn_types() -> list[str]:
    """Registered expert types built on the Huginn block (attention inside experts): what this suite measures."""
    registry = modeling_more.EXPERT_REGISTRY
    return [name for name, cls in registry.items() if issubclass(cls, modeling_more.MoREHuginnExperts)]


def bench_recurrent(args, device, dtype):
    d, experts, batch, length = args.hidden_size, args.num_experts, args.recurrent_batch_size, args.attention_length
    depths = [int(r) for r in args.recurrent_steps.split(",")]
    position_ids = torch.arange(length, device=device)[None].expand(batch, -1)
    x = torch.randn(batch, length, d, device=device, dtype=dtype)
    common = dict(hidden_size=d, intermediate_size=args.intermediate_size, num_experts=experts, num_experts_per_tok=1)
    records, targets = [], []

    # 1. Cost of r steps (inference forward of one block).
    blocks = {}
    for expert_type in huginn_types():
        torch.manual_seed(args.seed)
        blocks[expert_type] = more_block(device, dtype, expert_type=expert_type, **common)[0].eval()
    candidates = {}
    for expert_type, block in blocks.items():
        for r in depths:
            call = block_call(block, position_ids, r)
            candidates[(expert_type, r)] = lambda call=call: call(x)
    with torch.no_grad():
        times = time_interleaved(candidates, args.repeats, device, "recurrent depth")
    step_rows = []
    for (expert_type, r), seconds in times.items():
        one = min(times[(expert_type, 1)]) if 1 in depths else None
        best = min(seconds)
        ratio = best / (r * one) if one else float("nan")
        marginal = (best - one) / (r - 1) / one if one and r > 1 else float("nan")
        step_rows.append([expert_type, r, 1e3 * best, 1e3 * best / r, summary(seconds)["spread"], ratio, marginal])
        records.append(
            {
                "measurement": "depth",
                "expert_type": expert_type,
                "r": r,
                **summary(seconds),
                "time_over_r_times_one_step": ratio,
                "marginal_step_over_one_step": marginal,
            }
        )
        if one and r > 1:
            targets.append(target(f"{expert_type}: time(r={r}) <= 1.1 x {r} x time(r=1)", ratio, 1.1, False))
    del blocks, candidates
    release(device)

    # 2. Attention inside experts (segments of one expert's tokens of one sequence) vs plain causal SDPA.
    heads, head_dim = 8, d // 8
    generator = torch.Generator(device=device).manual_seed(args.seed)
    attention_rows = []
    for routing in ("uniform over experts", "all tokens to one expert"):
        tokens = batch * length
        if routing == "uniform over experts":
            top_k_index = torch.randint(0, experts, (tokens, 1), device=device, generator=generator)
        else:
            top_k_index = torch.zeros(tokens, 1, dtype=torch.long, device=device)
        dispatch = modeling_more.build_dispatch(
            top_k_index, torch.ones(tokens, 1, device=device, dtype=dtype), None, position_ids, 0, None, experts
        )
        q, k, v = (
            torch.randn(tokens, heads, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        # The same tokens as (batch, heads, L, head_dim) for plain causal attention over whole sequences.
        q4, k4, v4 = (t.detach().view(batch, length, heads, -1).transpose(1, 2).requires_grad_() for t in (q, k, v))
        scale = head_dim**-0.5
        # The layout is built once per block call and shared by all r steps, so a step's attention excludes it.
        layout = modeling_more.segment_layout(dispatch.segment, dispatch.cache_index, batch)
        segment_attention = partial(modeling_more.segment_causal_attention, q, k, v, layout, scale)
        sdpa = partial(F.scaled_dot_product_attention, q4, k4, v4, is_causal=True, scale=scale)
        candidates = {
            "experts forward": segment_attention,
            "SDPA forward": sdpa,
            "experts forward + backward": partial(forward_backward, segment_attention),
            "SDPA forward + backward": partial(forward_backward, sdpa),
        }
        times = time_interleaved(candidates, args.repeats, device, f"attention, {routing}")
        for mode in ("forward", "forward + backward"):
            ours, plain = min(times[f"experts {mode}"]), min(times[f"SDPA {mode}"])
            attention_rows.append(
                [
                    routing,
                    mode,
                    1e3 * ours,
                    1e3 * plain,
                    ours / plain,
                    max(summary(times[f"experts {mode}"])["spread"], summary(times[f"SDPA {mode}"])["spread"]),
                ]
            )
            records.append(
                {
                    "measurement": "attention",
                    "routing": routing,
                    "mode": mode,
                    "experts_min_s": ours,
                    "sdpa_min_s": plain,
                    "ratio": ours / plain,
                }
            )
            targets.append(
                target(
                    f"attention in experts / causal SDPA, L={length}, {routing}, {mode} <= 1.25",
                    ours / plain,
                    1.25,
                    False,
                )
            )
    release(device)

    # 3. Training peak memory: truncated backprop keeps it flat as depth grows; full backprop for contrast.
    memory_rows = []
    for expert_type in huginn_types():
        for backprop in (args.num_backprop_steps, None):
            peaks = {}
            for r in (2, 16):
                torch.manual_seed(args.seed)
                block = more_block(device, dtype, expert_type=expert_type, num_backprop_steps=backprop, **common)[0]
                block.train()
                inputs = x.clone().requires_grad_()
                call = block_call(block, position_ids, r)
                peaks[r] = peak_memory(partial(forward_backward, partial(call, inputs)), device)
                del block
                release(device)
            label = "all" if backprop is None else str(backprop)
            ratio = peaks[16] / peaks[2]
            memory_rows.append([expert_type, label, peaks[2] / 2**20, peaks[16] / 2**20, ratio])
            records.append(
                {
                    "measurement": "training memory",
                    "expert_type": expert_type,
                    "backprop_steps": label,
                    "peak_bytes_r2": peaks[2],
                    "peak_bytes_r16": peaks[16],
                    "ratio": ratio,
                }
            )
            if backprop is not None:
                targets.append(
                    target(
                        f"{expert_type}: training peak memory r=16 / r=2, backprop {backprop} <= 1.3",
                        ratio,
                        1.3,
                        False,
                    )
                )
    tokens = batch * length
    return {
        "tables": [
            (
                f"Recurrent experts: inference forward of one block, {tokens} tokens, hidden {d}, {experts} experts",
                [
                    "expert type",
                    "r",
                    "min ms",
                    "ms per step",
                    "max/min",
                    "time / (r x time(r=1))",
                    "marginal step / time(r=1)",
                ],
                step_rows,
            ),
            (
                f"Attention inside experts vs causal SDPA, {batch} x L={length} tokens, {heads} heads",
                ["routing", "pass", "experts min ms", "SDPA min ms", "experts / SDPA", "max/min (worse)"],
                attention_rows,
            ),
            (
                f"Training peak memory of one block (forward + backward), {tokens} tokens, above the weights",
                ["expert type", "backprop steps", "r=2 MiB", "r=16 MiB", "r=16 / r=2"],
                memory_rows,
            ),
        ],
        "records": records,
        "targets": targets,
    }


def training_step(model, optimizer, ids, forward=None, autocast_dtype=None):
    """One step; `forward` (default: the model) may be a compiled model, `autocast_dtype` turns on autocast."""
    with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = (model if forward is None else forward)(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainer(kind: str, size: dict, args, device, dtype, ids):
    """A fresh model of `kind` in training mode, its AdamW optimizer and a callable running one training step."""
    torch.manual_seed(args.seed)
    model = causal_lm(kind, size, args, device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, partial(training_step, model, optimizer, ids)


def step_variants(kind, model, optimizer, ids, args, dtype) -> dict[str, Callable]:
    """Extra steps of the same model, timed in the same rounds: bf16 autocast (fp32 weights) and torch.compile."""
    variants = {}
    if args.autocast and dtype == torch.float32:
        variants[f"{kind} (bf16 autocast)"] = partial(
            training_step, model, optimizer, ids, autocast_dtype=torch.bfloat16
        )
    if args.compile:
        variants[f"{kind} (compiled)"] = partial(training_step, model, optimizer, ids, forward=torch.compile(model))
    return variants


def measurement_groups(kinds: list[str]) -> list[list[str]]:
    """Expert types timed in the same rounds: `parallel` with `sequential` (their ratio is a target), others alone."""
    pair = [kind for kind in ("parallel", "sequential") if kind in kinds]
    groups = [[kind] for kind in kinds if kind not in pair]
    return groups + ([pair] if pair else [])


def training_memory(model, optimizer, step, device) -> tuple[int, int]:
    """(bytes live between steps: weights and AdamW's moments, peak bytes a step adds: gradients, activations)."""
    state = [t for group in optimizer.state.values() for t in group.values() if torch.is_tensor(t)]
    static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *state])
    return static, peak_memory(step, device)


def bench_model(args, device, dtype):
    kinds = sorted(modeling_more.EXPERT_REGISTRY) if args.expert_types == "all" else args.expert_types.split(",")
    rows, records, targets = [], [], []
    generator = torch.Generator().manual_seed(args.seed)
    for size_name in args.model_sizes.split(","):
        size = model_size(size_name, args)
        ids = torch.randint(3, size["vocab_size"], (args.batch_size, args.seq_len), generator=generator).to(device)
        tokens = ids.numel()
        # The models of one size need not fit in memory together (at the guide size sandwich experts alone hold 218M
        # parameters per layer), so each MoRE model (parallel and sequential together) is timed interleaved with the
        # same-size Mixtral, which stays alive: the ratio to Mixtral compares steps run under the same load. Its
        # bf16-autocast and compiled steps run in the same rounds.
        mixtral, mixtral_optimizer, mixtral_step = trainer("mixtral", size, args, device, dtype, ids)
        label = f"Mixtral ({mixtral.config._experts_implementation} experts)"
        mixtral_times = []
        # (label, parameters, seconds, seconds / Mixtral's seconds in the same rounds, static, peak, variant ratios)
        measured = []
        for group in tqdm(measurement_groups(kinds), desc=f"model {size_name}", leave=False):
            models, candidates, variants_of = {}, {}, {}
            for kind in group:
                model, optimizer, step = trainer(kind, size, args, device, dtype, ids)
                models[kind] = (model, optimizer, step)
                variants_of[kind] = step_variants(kind, model, optimizer, ids, args, dtype)
                candidates.update({kind: step, **variants_of[kind]})
            candidates[label] = mixtral_step
            times = time_interleaved(candidates, args.repeats, device, f"{size_name} {'+'.join(group)}")
            mixtral_times += times[label]
            for kind, (model, optimizer, step) in models.items():
                ratio = min(times[kind]) / min(times[label])
                variant_ratios = {name: min(times[name]) / min(times[kind]) for name in variants_of[kind]}
                parameters = sum(p.numel() for p in model.parameters())
                memory = training_memory(model, optimizer, step, device)
                measured.append((kind, parameters, times[kind], ratio, *memory, variant_ratios))
            if len(group) == 2:
                parallel, sequential = min(times["parallel"]), min(times["sequential"])
                targets.append(
                    target(
                        f"{size_name} ({size['num_hidden_layers']} layers): parallel / sequential step time, same "
                        "rounds <= 1.0",
                        parallel / sequential,
                        1.0,
                        False,
                    )
                )
            del models, candidates, variants_of
            release(device)
        parameters = sum(p.numel() for p in mixtral.parameters())
        memory = training_memory(mixtral, mixtral_optimizer, mixtral_step, device)
        measured.append((label, parameters, mixtral_times, 1.0, *memory, {}))
        for name, parameters, seconds, ratio, static, peak, variant_ratios in measured:
            stats = summary(seconds)
            autocast = variant_ratios.get(f"{name} (bf16 autocast)", "-")
            compiled = variant_ratios.get(f"{name} (compiled)", "-")
            rows.append(
                [
                    size_name,
                    size["num_hidden_layers"],
                    name,
                    parameters / 1e6,
                    tokens / stats["min_s"],
                    1e3 * stats["min_s"],
                    stats["spread"],
                    ratio,
                    autocast,
                    compiled,
                    static / 2**20,
                    peak / 2**20,
                    (static + peak) / 2**20,
                ]
            )
            records.append(
                {
                    "size": size_name,
                    **size,
                    "model": name,
                    "parameters": parameters,
                    "tokens_per_step": tokens,
                    "tokens_per_s": tokens / stats["min_s"],
                    **stats,
                    "time_over_mixtral": ratio,
                    "bf16_autocast_over_fp32": autocast,
                    "compiled_over_eager": compiled,
                    "static_bytes": static,
                    "step_peak_bytes": peak,
                }
            )
        del mixtral, mixtral_optimizer, mixtral_step, measured
        release(device)
    return {
        "tables": [
            (
                f"Full-model training (forward, backward, AdamW), {args.batch_size} x {args.seq_len} tokens per step, "
                f"{args.num_recurrent_steps} recurrent steps",
                [
                    "size",
                    "layers",
                    "model",
                    "params (M)",
                    "tokens/s",
                    "min ms/step",
                    "max/min",
                    "step time / Mixtral's (same rounds)",
                    "bf16 autocast / fp32 step",
                    "compiled / eager step",
                    "weights + AdamW MiB",
                    "step peak MiB (grads, activations)",
                    "total peak MiB",
                ],
                rows,
            ),
        ],
        "records": records,
        "targets": targets,
    }


def timed_decode(decode, model, prompt, new_tokens, device, tokens, key):
    """Run `decode`, keep its tokens under `key` and report its own seconds (prefill excluded)."""
    seconds, tokens[key] = decode(model, prompt, new_tokens, device)
    return seconds


def decode_cached(model, prompt, new_tokens, device):
    """Greedy decoding with the cache; returns the seconds of the decoding steps (prefill excluded) and the tokens."""
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    generated = [token]
    synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=out.cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    synchronize(device)
    return time.perf_counter() - start, torch.cat(generated, dim=1)


def decode_uncached(model, prompt, new_tokens, device):
    """Greedy decoding re-reading the whole context at every step (the first step, the prefill, excluded)."""
    ids = torch.cat([prompt, model(input_ids=prompt, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    synchronize(device)
    return time.perf_counter() - start, ids[:, prompt.shape[1] :]


def bench_decode(args, device, dtype):
    size = model_size(args.decode_size, args)
    contexts = [int(c) for c in args.contexts.split(",")]
    generator = torch.Generator().manual_seed(args.seed)
    models = {}
    for kind in args.decode_expert_types.split(","):
        torch.manual_seed(args.seed)
        models[kind] = causal_lm(kind, size, args, device, dtype).eval()
    rows, records = [], []
    cached_ms = {}
    with torch.no_grad():
        for context in contexts:
            prompt = torch.randint(3, size["vocab_size"], (1, context), generator=generator).to(device)
            candidates, tokens = {}, {}
            for kind, model in models.items():
                for cached, decode in ((True, decode_cached), (False, decode_uncached)):
                    candidates[(kind, cached)] = partial(
                        timed_decode, decode, model, prompt, args.new_tokens, device, tokens, (kind, cached)
                    )
            times = time_interleaved(candidates, args.repeats, device, f"decode, context {context}")
            steps = args.new_tokens - 1
            for kind in models:
                with_cache, without = min(times[(kind, True)]), min(times[(kind, False)])
                cached_ms.setdefault(kind, {})[context] = 1e3 * with_cache / steps
                same = bool(torch.equal(tokens[(kind, True)], tokens[(kind, False)]))
                rows.append(
                    [
                        kind,
                        context,
                        steps / with_cache,
                        steps / without,
                        without / with_cache,
                        1e3 * with_cache / steps,
                        cached_ms[kind][context] / cached_ms[kind][contexts[0]],
                        same,
                    ]
                )
                records.append(
                    {
                        "expert_type": kind,
                        "context": context,
                        "cached_tokens_per_s": steps / with_cache,
                        "uncached_tokens_per_s": steps / without,
                        "cached_ms_per_token": 1e3 * with_cache / steps,
                        "cached_spread": summary(times[(kind, True)])["spread"],
                        "uncached_spread": summary(times[(kind, False)])["spread"],
                        "same_tokens": same,
                    }
                )
    del models
    release(device)
    return {
        "tables": [
            (
                f"Greedy decoding, batch 1, {args.decode_size} size ({size['num_hidden_layers']} layers), "
                f"{args.new_tokens - 1} timed tokens after the prefill, {args.num_recurrent_steps} recurrent steps",
                [
                    "expert type",
                    "context",
                    "cached tok/s",
                    "no-cache tok/s",
                    "cache speed-up",
                    "cached ms/token",
                    f"cached ms/token vs context {contexts[0]}",
                    "same greedy tokens",
                ],
                rows,
            ),
        ],
        "records": records,
        "targets": [],
    }


TINY_VARIANTS = ("ffn", "recurrent", "shared_recurrent", "ffn_synthesis2")
TINY_TARGETS = {"ffn": 1.1, "recurrent": 2.5}  # step time / same-size Llama's, medians of the same rounds


def tiny_job_data(args, preset: Preset):
    """The comparison job's data at its main shapes: the `preset`'s ("default") configs of `TINY_VARIANTS` (sized to
    the `ffn` model as the job sizes them), its word-level tokenizer and tokenized addition examples (fewer than the
    job's)."""
    raw = build_depth_dataset(
        {task: (list(train), list(test)) for task, (train, test) in preset.tasks.items()},
        num_train=args.tiny_train_examples,
        num_test_per_difficulty=8,
        seed=args.seed,
    )
    tokenizer = train_word_level_tokenizer([*raw["train"]["text"], *raw["test"]["text"]], preset.max_length)
    train = TensorExamples.from_dataset(tokenize_qa(raw["train"], tokenizer, preset.max_length, answer_only_loss=True))
    configs = build_variant_configs(preset, list(TINY_VARIANTS), tokenizer, "active")
    return configs, tokenizer, train


def same_size_baselines(config: MoREConfig) -> dict[str, torch.nn.Module]:
    """Transformers' Llama (SDPA attention) and Mixtral of the `ffn` config's vocabulary, width, expert width, depth
    and heads."""
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        pad_token_id=config.pad_token_id,
        attn_implementation="sdpa",
    )
    mixtral = MixtralConfig(
        **common,
        num_local_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        output_router_logits=True,  # its load-balancing loss, as MoRE's
        router_aux_loss_coef=config.router_aux_loss_coef,
    )
    return {"Llama": LlamaForCausalLM(LlamaConfig(**common)), "Mixtral": MixtralForCausalLM(mixtral)}


def job_step(model, batches, learning_rate: float) -> Callable:
    """One optimizer step as the job's Trainer runs it (fused AdamW, weight decay 0.01, gradient clipping at 1.0, no
    cache), on the next of `batches`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, fused=True)
    state = {"next": 0}

    def step():
        batch = batches[state["next"] % len(batches)]
        state["next"] += 1
        model(**batch, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


class _StepClock(transformers.TrainerCallback):
    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def trainer_step_seconds(model, train, tokenizer, preset, steps: int, output_dir: Path, seed: int) -> list[float]:
    """Seconds between consecutive optimizer steps of the job's `MoRETrainer`, built as the job builds it
    (`training_arguments` and `train_model` of `more_tools.comparison`): the bare step plus the loop around it."""
    clock = _StepClock()
    training_args = training_arguments(preset.training, seed, output_dir, steps)
    # Logging steps (routing statistics, the log) as often as in the job, not every twentieth step of this block.
    training_args.logging_steps = max(1, preset.training["max_steps"] // 20)
    train_model(model, train, training_args, tokenizer, None, [clock])
    return [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]


def bench_tiny(args, device, preset: Preset):
    """The comparison job's step, side by side with Llama and Mixtral of the same size (CPU, fp32, one thread)."""
    if device.type != "cpu":
        raise ValueError("--suite tiny measures the CPU job (one thread per job): run it with --device cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job runs one single-thread process per core
    configs, tokenizer, train = tiny_job_data(args, preset)
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = preset.training["per_device_train_batch_size"]
    indices = [torch.randperm(len(train), generator=generator)[:batch_size].tolist() for _ in range(16)]
    batches = [collate(train.__getitems__(index)) for index in indices]
    learning_rate = preset.training["learning_rate"]
    # The job's models as the job builds them (its preset's attention kernel); the baselines run SDPA, Llama's fastest.
    attention = {"attn_implementation": preset.attn_implementation}
    models = {}
    for name, config in configs.items():
        torch.manual_seed(args.seed)
        models[name] = AutoModelForCausalLM.from_config(config, **attention).train()
    torch.manual_seed(args.seed)
    models.update({name: model.train() for name, model in same_size_baselines(configs["ffn"]).items()})
    candidates = {name: job_step(model, batches, learning_rate) for name, model in models.items()}
    # The data path of one step as Trainer's DataLoader runs it: one batched read of the examples, then the collator.
    data_state = {"next": 0}

    def data_path():
        data_state["next"] += 1
        collate(train.__getitems__(indices[data_state["next"] % len(indices)]))

    candidates["data path"] = data_path
    times = time_interleaved(candidates, args.tiny_rounds, device, "tiny")
    medians = {name: summary(seconds)["median_s"] for name, seconds in times.items()}
    llama = medians["Llama"]
    rows, records, targets = [], [], []
    for name, model in models.items():
        stats = summary(times[name])
        parameters = sum(p.numel() for p in model.parameters())
        active = model.num_parameters(active=True) if isinstance(model, modeling_more.MoREForCausalLM) else "-"
        limit = TINY_TARGETS.get(name, "-")
        rows.append(
            [name, parameters, active, 1e3 * stats["median_s"], 1e3 * stats["min_s"], stats["median_s"] / llama, limit]
        )
        records.append({"model": name, "parameters": parameters, **stats, "over_llama": stats["median_s"] / llama})
        if name in TINY_TARGETS:
            targets.append(target(f"{name} step / Llama's (medians) <= {limit}", medians[name] / llama, limit, False))
    # Loop overhead: Trainer steps of the ffn model vs its bare steps, in alternating blocks (short ones, so that the
    # machine's drifting speed reaches both sides alike).
    blocks = 8
    steps = max(20, 3 * args.tiny_rounds // blocks)
    trainer_times, bare_times = [], []
    for _ in range(blocks):
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(configs["ffn"], **attention).train()
        output_dir = Path(args.output_dir) / "tiny"
        trainer_times += trainer_step_seconds(model, train, tokenizer, preset, steps, output_dir, args.seed)[2:]
        bare = job_step(model, batches, learning_rate)
        for _ in range(steps):
            start = time.perf_counter()
            bare()
            bare_times.append(time.perf_counter() - start)
    trainer_median, bare_median = summary(trainer_times)["median_s"], summary(bare_times)["median_s"]
    overhead = (trainer_median - bare_median) / trainer_median
    data_share = medians["data path"] / (medians["ffn"] + medians["data path"])
    targets.append(
        target(
            "ffn: Trainer step outside the bare step (loop overhead), share of the step < 5 %", overhead, 0.05, False
        )
    )
    torch.set_num_threads(threads)
    return {
        "tables": [
            (
                f"The comparison job's training step (preset default, {batch_size} examples of up to "
                f"{batches[0]['input_ids'].shape[1]} tokens, fused AdamW, clipping), one thread, "
                f"{args.tiny_rounds} interleaved rounds",
                ["model", "params", "active params", "median ms/step", "min ms/step", "median / Llama's", "target"],
                rows,
            ),
            (
                "Loop overhead (ffn): Trainer step (data path, callbacks, scheduler, logging) vs the bare step, "
                "medians of alternating blocks",
                ["Trainer ms/step", "bare ms/step", "overhead share", "data path ms", "data path share"],
                [[1e3 * trainer_median, 1e3 * bare_median, overhead, 1e3 * medians["data path"], data_share]],
            ),
        ],
        "records": records
        + [
            {
                "measurement": "loop overhead",
                "trainer_median_s": trainer_median,
                "bare_median_s": bare_median,
                "overhead_share": overhead,
                "data_path_median_s": medians["data path"],
                "data_path_share": data_share,
            }
        ],
        "targets": targets,
    }
