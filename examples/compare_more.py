"""The main job of MoRE: train every expert type, a Synthesis II variant and the recurrent routers on the embedded
reasoning data at matched parameter counts, evaluate each, and print the research guide's comparison table (§5.3).

    python examples/compare_more.py                                   # default preset: real learning, < 15 min, 2 CPUs
    python examples/compare_more.py --preset smoke                    # every variant, a few steps (used by tests)
    python examples/compare_more.py --match_parameters total          # match total instead of active parameters
    python examples/compare_more.py --variants ffn,recurrent --max_steps 1000
    python examples/compare_more.py compare_args.json                 # the same arguments from a JSON file

Every variant gets the same data, tokenizer, seed, optimizer and number of steps. Its width (`intermediate_size`, or
`recurrent_intermediate_size` for Huginn-block experts) is chosen so that its active parameters per token (or its
total parameters) match the `ffn` baseline. Writes to `--output_dir`: `comparison.json`, `comparison.md`, plots, and
one directory per variant with the trained model, its tokenizer, model card and `evaluate_more.py` outputs.
"""

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, HfArgumentParser, PrinterCallback, TrainingArguments, set_seed


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import modeling_more  # noqa: E402
from configuration_more import MoREConfig  # noqa: E402
from evaluate_more import EvaluationArguments, count_parameters, evaluate_model, write_outputs  # noqa: E402
from model_card_more import markdown_table, save_model_card  # noqa: E402
from more_eval import majority_baseline  # noqa: E402
from train_more import (  # noqa: E402
    DataArguments,
    ModelArguments,
    MoRETrainer,
    build_config,
    build_datasets,
    build_tokenizer,
    collate,
    data_summary,
    load_raw_datasets,
)


logger = logging.getLogger(__name__)

BASELINE = "ffn"


@dataclass(frozen=True)
class Preset:
    """One comparison budget, in the arguments of the scripts it drives: a `train_more.py` model preset and
    `--config_overrides`, `train_more.DataArguments` fields, `TrainingArguments` fields and `EvaluationArguments`."""

    model_preset: str
    config_overrides: str
    data: dict
    training: dict
    evaluation: dict


PRESETS = {
    # Every variant end to end in about a minute on 2 CPU cores; the numbers mean nothing.
    "smoke": Preset(
        model_preset="tiny",
        config_overrides="hidden_size=32,intermediate_size=128,router_hidden_size=16",
        data=dict(
            tasks="babi1,babi2,arithmetic",
            num_train_examples=96,
            num_validation_examples=0,
            num_test_examples=6,
            tokenizer_vocab_size=300,
            max_length=160,
        ),
        training=dict(max_steps=3, per_device_train_batch_size=8),
        evaluation=dict(recurrent_steps_sweep="1,2", moe_iterations_sweep="1,2", sweep_examples=6),
    ),
    # Real learning in under 15 minutes on 2 CPU cores: the tiny model with the guide's d_ff = 4 d_model (so a
    # Huginn-block expert fits the FFN expert's active size), 280 steps of 32 examples of bAbI single and two
    # supporting facts, induction and arithmetic; 40 test stories per task.
    "default": Preset(
        model_preset="tiny",
        config_overrides="intermediate_size=256",
        data=dict(
            tasks="babi1,babi2,babi16,arithmetic",
            num_train_examples=8960,
            num_validation_examples=0,
            num_test_examples=160,
            tokenizer_vocab_size=400,
            max_length=192,
        ),
        training=dict(max_steps=280, per_device_train_batch_size=32),
        evaluation=dict(recurrent_steps_sweep="1,2,4,8", moe_iterations_sweep="1,2", sweep_examples=80),
    ),
}
# Optimisation shared by every preset: AdamW, cosine schedule with a short warm-up.
TRAINING_DEFAULTS = dict(learning_rate=3e-3, lr_scheduler_type="cosine", weight_decay=0.01)


def comparison_variants() -> dict[str, dict]:
    """`train_more.ModelArguments` fields of each compared model: every registered expert type with the linear
    router (the `ffn` baseline first), Synthesis II on the baseline, and the recurrent routers with FFN and recurrent
    experts."""
    names = sorted(modeling_more.EXPERT_REGISTRY, key=lambda name: name != BASELINE)
    variants = {name: {"expert_type": name} for name in names}
    variants["ffn_synthesis2"] = {"expert_type": "ffn", "num_moe_iterations": 2}
    variants["ffn_gru_router"] = {"expert_type": "ffn", "router_type": "gru"}
    variants["ffn_gru_token_router"] = {"expert_type": "ffn", "router_type": "gru_token"}
    variants["recurrent_gru_router"] = {"expert_type": "recurrent", "router_type": "gru"}
    return variants


@dataclass
class CompareArguments:
    preset: str = field(default="default", metadata={"help": f"Budget and data: one of {list(PRESETS)}."})
    output_dir: str = field(default="outputs/compare", metadata={"help": "Where every output goes."})
    variants: str | None = field(
        default=None, metadata={"help": f"Comma-separated subset of {list(comparison_variants())} (default: all)."}
    )
    match_parameters: str = field(
        default="active",
        metadata={"help": "Match each variant's 'active' parameters per token or its 'total' parameters to ffn's."},
    )
    max_steps: int | None = field(default=None, metadata={"help": "Override the preset's optimizer steps."})
    seed: int = field(default=0, metadata={"help": "Seed of data, initialisation and training (same for all)."})


# ---------------------------------------------------------------------------------------------------------------------
# Configs at matched size
# ---------------------------------------------------------------------------------------------------------------------


def size_knob(expert_type: str) -> str:
    """The width that sizes an expert: the MLP of the Huginn block for block experts, `intermediate_size` else."""
    expert_class = modeling_more.get_expert_class(expert_type)
    if issubclass(expert_class, modeling_more.MoREHuginnExperts):
        return "recurrent_intermediate_size"
    return "intermediate_size"


def parameter_counts(config: MoREConfig) -> dict[str, int]:
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(config))


def matched_config(config: MoREConfig, target: int, which: str) -> MoREConfig:
    """`config` with its size knob set so that its `which` ("active" or "total") parameter count is closest to
    `target`.

    Counts grow with the knob, so a bisection finds the first width at or above the target; the closer of it and the
    width below wins. A type that is larger than the target even at width 1 keeps width 1 (reported as a mismatch).
    """
    knob = size_knob(config.expert_type)
    fields = config.to_dict()

    def resized(width: int) -> MoREConfig:
        return MoREConfig(**{**fields, knob: width})

    def count(width: int) -> int:
        return parameter_counts(resized(width))[which]

    low, high = 1, 16 * config.hidden_size
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(middle) < target else (low, middle)
    return resized(min((low, max(low - 1, 1)), key=lambda width: abs(count(width) - target)))


def variant_config(preset: Preset, overrides: dict, tokenizer, max_length: int) -> MoREConfig:
    """The config `train_more.py --preset <model_preset> --config_overrides ... --<overrides>` would build."""
    model_args = ModelArguments(preset=preset.model_preset, config_overrides=preset.config_overrides, **overrides)
    return build_config(model_args, tokenizer, max_position_embeddings=max_length)


def train_variant(config: MoREConfig, train_dataset, training_args: TrainingArguments, tokenizer):
    """A freshly initialised model trained with `train_more.MoRETrainer`; returns it and the training log."""
    set_seed(training_args.seed)
    model = AutoModelForCausalLM.from_config(config)
    trainer = MoRETrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=collate,
    )
    # The variants progress bar shows progress; the log history (plotted) keeps the losses instead of printing them.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model, [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------------------------------
# Comparison table and plots
# ---------------------------------------------------------------------------------------------------------------------


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline in percent, as the guide's §5.3 improvement columns; None without a base."""
    if value is None or not baseline:
        return None
    return 100.0 * (value - baseline) / baseline


def comparison_rows(results: dict[str, dict]) -> list[list]:
    base = results.get(BASELINE)
    rows = []
    for name, result in results.items():
        config, params = result["config"], result["parameters"]
        utilization = result["expert_utilization"]
        rows.append(
            [
                name,
                config["expert_type"],
                config["router_type"],
                config["num_moe_iterations"],
                params["total"],
                params["active"],
                params["active"] / base["parameters"]["active"] if base else None,
                result["perplexity"],
                result["exact_match"]["mean"],
                result["multihop_accuracy"],
                result["arithmetic_accuracy"],
                result["tokens_per_second"],
                result["peak_memory_mb"],
                utilization["load_cv"],
                utilization["effective_experts"],
                result["health_score"],
                relative_change(result["perplexity"], base and base["perplexity"]),
                relative_change(result["exact_match"]["mean"], base and base["exact_match"]["mean"]),
                relative_change(result["arithmetic_accuracy"], base and base["arithmetic_accuracy"]),
                result["train_seconds"],
            ]
        )
    return rows


COMPARISON_HEADERS = [
    "variant",
    "experts",
    "router",
    "T",
    "total params",
    "active params",
    "active / ffn",
    "perplexity",
    "mean acc",
    "multi-hop acc",
    "arithmetic acc",
    "tokens/s",
    "peak MB",
    "load CV",
    "eff. experts",
    "health",
    "Δ ppl %",
    "Δ mean acc %",
    "Δ arith acc %",
    "train s",
]


def task_rows(results: dict[str, dict], majority: dict[str, float]) -> tuple[list[str], list[list]]:
    tasks = [task for task in majority if task != "mean"]
    rows = [["majority baseline", *[majority[task] for task in tasks], majority["mean"]]]
    rows += [
        [name, *[r["exact_match"][task] for task in tasks], r["exact_match"]["mean"]] for name, r in results.items()
    ]
    return ["variant", *tasks, "mean"], rows


def depth_rows(results: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Mean exact match of every variant at every swept depth (– where a knob does not apply)."""
    columns = sorted(
        {(knob, depth) for r in results.values() for knob, sweep in r["depth_sweep"].items() for depth in sweep}
    )
    headers = ["variant"] + [f"{'r' if knob == 'num_recurrent_steps' else 'T'}={depth}" for knob, depth in columns]
    rows = [
        [name] + [r["depth_sweep"].get(knob, {}).get(depth, {}).get("mean") for knob, depth in columns]
        for name, r in results.items()
    ]
    return headers, rows


def render_comparison(results: dict[str, dict], majority: dict[str, float], run: dict) -> str:
    task_headers, task_table_rows = task_rows(results, majority)
    depth_headers, depth_table_rows = depth_rows(results)
    return (
        "\n\n".join(
            [
                "# MoRE comparison",
                f"Preset `{run['preset']}`, parameters matched on **{run['match_parameters']}** counts, perplexity "
                f"on the test {next(iter(results.values()))['perplexity_on']}, "
                f"{run['max_steps']} steps x {run['batch_size']} examples per variant, seed {run['seed']}, "
                f"wall time {run['wall_seconds'] / 60:.1f} min on {run['device']}.",
                markdown_table(COMPARISON_HEADERS, comparison_rows(results)),
                "## Exact match by task (greedy, test split)",
                markdown_table(task_headers, task_table_rows),
                "## Test-time compute: mean exact match by inference depth (r = expert steps, T = MoE iterations)",
                markdown_table(depth_headers, depth_table_rows),
            ]
        )
        + "\n"
    )


def plot_accuracy(results: dict[str, dict], majority: dict[str, float], path: Path) -> None:
    names = list(results)
    metrics = {
        "mean": [results[n]["exact_match"]["mean"] for n in names],
        "multi-hop": [results[n]["multihop_accuracy"] or 0.0 for n in names],
        "arithmetic": [results[n]["arithmetic_accuracy"] or 0.0 for n in names],
    }
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 4))
    x = np.arange(len(names))
    for offset, (label, values) in zip((-0.27, 0, 0.27), metrics.items(), strict=True):
        ax.bar(x + offset, values, width=0.26, label=label)
    ax.axhline(majority["mean"], color="k", ls="--", lw=1, label="majority baseline (mean)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="exact match", title="accuracy by variant", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depth(results: dict[str, dict], path: Path) -> None:
    knobs = ["num_recurrent_steps", "num_moe_iterations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, knob in zip(axes, knobs, strict=True):
        for index, (name, result) in enumerate(results.items()):
            sweep = result["depth_sweep"].get(knob)
            if sweep:
                depths = sorted(sweep, key=int)
                means = [sweep[d]["mean"] for d in depths]
                # One colour per variant in both panels, whichever variants a panel shows.
                ax.plot([int(d) for d in depths], means, "-o", ms=3, color=f"C{index % 10}", label=name)
        ax.set(xlabel=knob, ylabel="mean exact match", title=f"test-time compute: {knob}")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(training_logs: dict[str, list[dict]], path: Path) -> None:
    """Language-model loss and expert-load CV of every variant along training (`MoRETrainer` logs)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("lm_loss", "load_cv"), strict=True):
        for name, logs in training_logs.items():
            ax.plot([entry["step"] for entry in logs], [entry[metric] for entry in logs], label=name)
        ax.set(xlabel="step", ylabel=metric, title=f"training {metric}")
        ax.legend(fontsize=6)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    parser = HfArgumentParser(CompareArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    if args.preset not in PRESETS:
        raise ValueError(f"Unknown preset {args.preset!r}; valid presets: {list(PRESETS)}")
    if args.match_parameters not in ("active", "total"):
        raise ValueError(f"--match_parameters must be 'active' or 'total', got {args.match_parameters!r}")
    variants = comparison_variants()
    if args.variants is not None:
        unknown = sorted(set(args.variants.split(",")) - set(variants))
        if unknown:
            raise ValueError(f"Unknown variants {unknown}; valid variants: {list(variants)}")
        variants = {name: variants[name] for name in args.variants.split(",")}
    preset = PRESETS[args.preset]
    training = {**TRAINING_DEFAULTS, **preset.training}
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    set_seed(args.seed)

    # One data set, tokenizer and test split for every variant, built as train_more.py builds them.
    data_args = DataArguments(**preset.data, dataset_seed=args.seed)
    raw_datasets = load_raw_datasets(data_args)
    tokenizer = build_tokenizer(ModelArguments(), data_args, raw_datasets)
    train_dataset = build_datasets(data_args, raw_datasets, tokenizer)["train"]
    majority = majority_baseline(raw_datasets["train"], raw_datasets["test"])
    eval_args = EvaluationArguments(**preset.evaluation)
    baseline_config = variant_config(preset, comparison_variants()[BASELINE], tokenizer, data_args.max_length)
    target = parameter_counts(baseline_config)[args.match_parameters]
    logger.info(f"Comparing {len(variants)} variants at {target:,} {args.match_parameters} parameters (as {BASELINE})")

    results, training_logs = {}, {}
    progress = tqdm(variants.items(), desc="variants", total=len(variants))
    for name, overrides in progress:
        progress.set_postfix_str(name)
        config = variant_config(preset, overrides, tokenizer, data_args.max_length)
        config = matched_config(config, target, args.match_parameters)
        variant_dir = output_dir / name
        training_args = TrainingArguments(
            output_dir=str(variant_dir / "trainer"),
            seed=args.seed,
            warmup_steps=max(1, training["max_steps"] // 20),
            logging_steps=max(1, training["max_steps"] // 20),
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            use_cpu=not torch.cuda.is_available(),
            **training,
        )
        train_start = time.perf_counter()
        model, training_logs[name] = train_variant(config, train_dataset, training_args, tokenizer)
        train_seconds = time.perf_counter() - train_start
        result = evaluate_model(model, tokenizer, raw_datasets["test"], eval_args, data_args)
        result.update(
            majority_baseline=majority,
            train_seconds=train_seconds,
            eval_seconds=time.perf_counter() - train_start - train_seconds,
        )
        results[name] = result
        model.save_pretrained(variant_dir)
        tokenizer.save_pretrained(variant_dir)
        write_outputs(result, variant_dir)
        training_data = (
            f"{data_summary(data_args, raw_datasets)} {training['max_steps']} steps of "
            f"{training['per_device_train_batch_size']} examples, AdamW (lr {training['learning_rate']}, cosine), "
            f"seed {args.seed}; `examples/compare_more.py --preset {args.preset}`."
        )
        save_model_card(variant_dir, result, repo_id=f"more-{name}", training_data=training_data)
        logger.info(
            f"{name}: {result['parameters']['active']:,} active / {result['parameters']['total']:,} total "
            f"parameters, perplexity {result['perplexity']:.3f}, mean exact match {result['exact_match']['mean']:.3f}"
        )

    run = {
        **dataclasses.asdict(args),
        "max_steps": training["max_steps"],
        "batch_size": training["per_device_train_batch_size"],
        "preset_settings": dataclasses.asdict(preset),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads",
        "wall_seconds": time.perf_counter() - start,
    }
    comparison = {"run": run, "majority_baseline": majority, "results": results, "training_logs": training_logs}
    (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    report = render_comparison(results, majority, run)
    (output_dir / "comparison.md").write_text(report)
    plot_accuracy(results, majority, output_dir / "accuracy.png")
    plot_depth(results, output_dir / "depth.png")
    plot_training(training_logs, output_dir / "training.png")
    logger.info(f"Comparison ({run['wall_seconds'] / 60:.1f} min):\n{report}")


if __name__ == "__main__":
    main()
