"""The main job of MoRE: do recurrent experts beat plain FFN experts on reasoning, at equal active parameters and at
equal compute, and does thinking longer at inference help?

    python examples/compare_more.py                           # default preset: 3 seeds, <= 15 min on 2 CPU cores
    python examples/compare_more.py --preset smoke            # every registered variant, 2 seeds, < 1 min (tests)
    python examples/compare_more.py --preset full             # every registered variant, the default protocol
    accelerate launch examples/compare_more.py --preset guide --corpus_name wikitext  # GPU: the guide's protocol
    python examples/compare_more.py --variants ffn,recurrent --seeds 5
    python examples/compare_more.py --preset parity           # prefix parity, a target at every bit (~10 min)
    python examples/compare_more.py compare_args.json         # the same arguments from a JSON file

Protocol. Every variant is trained on the same examples (depth-controlled tasks of `more_tools/data.py`: pointer
chasing, difficulty = hops; digit addition, difficulty = digits) with difficulties 1..K, once per seed (the seed sets
the initialisation and the data order), for the same number of optimizer steps, and scored on the same test examples of
difficulties 1..2K. Widths are chosen so that active parameters per token match the `ffn` baseline; a deeper
`ffn_compute_matched` model matches the FLOPs per token of `recurrent` at its mean training depth instead. Recurrent
variants train with a random depth and are scored at every inference depth of the sweep. Every accuracy is a mean over
seeds x examples with a 95 % t interval over both, and every variant is compared with `ffn` on the same seeds and
examples (`more_tools/stats.py`); a difference whose interval contains 0 reads as no difference.

Writes to `--output_dir` (default `outputs/compare-<preset>`): `comparison.json`, `comparison.md`, plots, and one
directory per variant with the first seed's model, its tokenizer, model card and diagnostics.
"""

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, HfArgumentParser

from more_tools.comparison import (
    PLOTS,
    CompareArguments,
    Job,
    build_data,
    build_variant_configs,
    data_settings,
    dry_run_preset,
    finished_result,
    is_main_process,
    load_presets,
    meta_model,
    parameter_counts,
    plot_accuracy_by_difficulty,
    plot_accuracy_vs_flops,
    plot_depth_curves,
    plot_learning_curves,
    plot_training,
    render_comparison,
    resolve_variants,
    run_jobs,
    steps_trained,
    summarise,
    training_flops_per_token,
    write_card,
)


logger = logging.getLogger(__name__)

PRESETS = load_presets(Path(__file__).resolve().parent / "configs" / "compare")


def main():
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    datasets.disable_progress_bars()  # one progress bar: training over all variants x seeds
    parser = HfArgumentParser(CompareArguments)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=sys.argv[1])
    else:
        (args,) = parser.parse_args_into_dataclasses()
    if args.preset not in PRESETS:
        raise ValueError(f"Unknown preset {args.preset!r}; valid presets: {list(PRESETS)}")
    if args.match_parameters not in ("active", "total"):
        raise ValueError(f"--match_parameters must be 'active' or 'total', got {args.match_parameters!r}")
    modules = [name.strip() for name in (args.expert_modules or "").split(",") if name.strip()]
    for name in modules:
        __import__(name)
    preset = PRESETS[args.preset]
    if args.dry_run:
        preset = dry_run_preset(preset, PRESETS["default"].model)
    training = {**preset.training}
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    if args.learning_rate is not None:
        training["learning_rate"] = args.learning_rate
    if args.lr_scheduler_type is not None:
        training["lr_scheduler_type"] = args.lr_scheduler_type
    attn_implementation = args.attn_implementation or preset.attn_implementation
    if args.split not in ("test", "validation"):
        raise ValueError(f"--split must be 'test' or 'validation', got {args.split!r}")
    seeds = range(args.seed_offset, args.seed_offset + (args.seeds or preset.seeds))
    names = resolve_variants(args, preset)
    output_dir = Path(args.output_dir or f"outputs/compare-{args.preset}")
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. One tokenizer, training set and test set for every variant and seed.
    data = build_data(preset, args, output_dir)
    tokenizer_dir = data.tokenizer_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # 2. Configs at matched active parameters (and the compute-matched deeper ffn).
    configs = build_variant_configs(preset, names, tokenizer, args.match_parameters)
    meta_model(configs[names[0]], attn_implementation)  # an unknown attention kernel fails here, before any training
    logger.info(
        "Variants: %s", ", ".join(f"{n} ({parameter_counts(c)['active']:,} active)" for n, c in configs.items())
    )

    # 3. Train and score every variant x seed.
    corpus_steps = min(args.corpus_steps, 2) if args.dry_run else args.corpus_steps
    jobs = [
        Job(
            variant=name,
            seed=seed,
            config=config.to_dict(),
            output_dir=str(output_dir / name),
            save_model=seed == args.seed_offset,
            training=training,
            corpus_steps=corpus_steps,
            recurrent_depths=preset.recurrent_depths,
            moe_iterations=preset.moe_iterations,
            data_settings=data_settings(preset, args),
            stop_at_accuracy=preset.stop_at_accuracy,
            attn_implementation=attn_implementation,
        )
        for name, config in configs.items()
        for seed in seeds
    ]
    # A finished job leaves its result file; `--resume` loads it instead of training again (the guide preset is long),
    # if it was produced with the same settings.
    done = {}
    if args.resume:
        done = {i: result for i, job in enumerate(jobs) if (result := finished_result(job)) is not None}
        logger.info("Resuming: %d of %d jobs already finished with these settings", len(done), len(jobs))
    todo = [job for i, job in enumerate(jobs) if i not in done]
    # On GPUs (and under `accelerate launch`) jobs run one after another in this process, on its device(s).
    num_workers = 1 if torch.cuda.is_available() or "LOCAL_RANK" in os.environ else args.num_workers
    fresh = iter(run_jobs(todo, data, num_workers, modules))
    outcomes = [done[i] if i in done else next(fresh) for i in range(len(jobs))]
    runs = {name: [o for o in outcomes if o["variant"] == name] for name in configs}
    if not is_main_process():
        return

    # 4. Statistics, tables, plots, model cards.
    results = summarise(runs, data, preset)

    def tokens_per_step(examples) -> float:  # real tokens of a batch, on average
        return (
            examples.columns["attention_mask"].sum(1).float().mean().item() * training["per_device_train_batch_size"]
        )

    task_tokens = tokens_per_step(data.train)
    # The guide preset's corpus blocks are trained on too.
    pretraining_tokens = 0.0 if data.corpus_train is None else tokens_per_step(data.corpus_train) * corpus_steps
    for name, config in configs.items():
        model = meta_model(config)
        by_seed = sorted(runs[name], key=lambda r: r["seed"])
        steps = [steps_trained(run) for run in by_seed]
        per_token = training_flops_per_token(config)
        results[name].update(
            config=config.to_diff_dict(),
            active_params=model.num_parameters(active=True),
            total_params=model.num_parameters(),
            flops_per_token=model.flops_per_token(),
            training_flops_per_token=per_token,
            steps=steps,  # per seed: max_steps, or fewer where the stop rule ended the job
            training_flops=per_token * (task_tokens * float(np.mean(steps)) + pretraining_tokens),
            pretraining_flops=per_token * pretraining_tokens,  # included in training_flops
            train_seconds=[run["train_seconds"] for run in by_seed],
            learning_curves=[run["learning_curve"] for run in by_seed],
            diagnostics=next((run["diagnostics"] for run in runs[name] if "diagnostics" in run), None),
        )
    run = {
        **dataclasses.asdict(args),
        "seeds": list(seeds),
        "max_steps": training["max_steps"],
        "batch_size": training["per_device_train_batch_size"],
        "preset_settings": dataclasses.asdict(preset),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {args.num_workers} single-thread workers",
        "wall_seconds": time.perf_counter() - start,
        "reused_jobs": len(done),
    }
    training_logs = {name: [run["training_log"] for run in variant_runs] for name, variant_runs in runs.items()}
    comparison = {"run": run, "results": results, "training_logs": training_logs}
    if data.corpus_train is not None:
        comparison["pretraining_logs"] = {
            name: [run["pretraining_log"] for run in variant_runs] for name, variant_runs in runs.items()
        }
    (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    report = render_comparison(results, preset, run)
    (output_dir / "comparison.md").write_text(report)
    plot_accuracy_by_difficulty(results, preset, output_dir / "accuracy.png")
    plot_depth_curves(results, preset, output_dir / "depth.png")
    plot_accuracy_vs_flops(results, preset, output_dir / "accuracy_vs_flops.png")
    plot_training(runs, output_dir / "training.png")
    plot_learning_curves(runs, results, output_dir / "learning_curves.png")
    for name in configs:
        write_card(output_dir / name, name, results[name], preset, run)
    print(report)
    logger.info(
        "Done in %.1f min. Results: %s, %s; plots: %s",
        run["wall_seconds"] / 60,
        output_dir / "comparison.json",
        output_dir / "comparison.md",
        ", ".join(str(output_dir / p) for p in PLOTS),
    )


if __name__ == "__main__":
    main()
