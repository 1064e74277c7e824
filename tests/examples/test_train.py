"""`examples/train_more.py`: config building, curriculum, health metrics, saving/loading, exact resume, CPU DDP over
gloo (same depth on every rank, no unused parameters) and DeepSpeed ZeRO-2/3 (slow)."""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import scripts
import torch
from helpers import MODEL_CASES, random_ids, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

import modeling_more
from configuration_more import MoREConfig
from more_tools.data import IGNORE_INDEX, build_reasoning_dataset, tokenize_qa, train_bpe_tokenizer
from more_tools.models import ModelArguments, build_config, parse_config_overrides
from more_tools.training import (
    PRESETS,
    CurriculumCallback,
    CurriculumStage,
    DataArguments,
    MoRETrainer,
    build_datasets,
    collate,
    fit_batch,
    last_complete_checkpoint,
    lm_loss_sum,
    load_raw_datasets,
    parse_curriculum,
    resume_checkpoint,
)


REPO = str(scripts.EXAMPLES.parent)
EXAMPLES = str(scripts.EXAMPLES)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# A 20-step run on bAbI task 1 with recurrent experts: depth 1 and 48-token batches until step 14, then depth 1-3
# and full batches; a checkpoint every 10 steps, a log entry every step.
TRAIN_ARGS = [
    "--preset", "tiny",
    "--expert_type", "recurrent",
    "--tasks", "babi1",
    "--num_train_examples", "200",
    "--num_validation_examples", "12",
    "--num_test_examples", "12",
    "--max_length", "96",
    "--curriculum", "0:48:1,14:-:3",
    "--max_steps", "20",
    "--per_device_train_batch_size", "8",
    "--learning_rate", "3e-3",
    "--logging_steps", "1",
    "--save_steps", "10",
    "--do_eval",
    "--eval_exact_match",
    "--use_cpu",
    "--report_to", "tensorboard",
    "--disable_tqdm", "true",
    "--seed", "3",
]  # fmt: skip
HEALTH_METRICS = ("lm_loss", "aux_loss", "z_loss", "load_cv", "effective_experts", "router_entropy", "recurrent_steps")


def run(args, cwd=REPO, env=ENV, timeout=600):
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_script(output_dir, *extra):
    script = os.path.join(EXAMPLES, "train_more.py")
    return run([sys.executable, script, *TRAIN_ARGS, "--output_dir", output_dir, *extra])


def log_history(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [entry for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def tokenizer():
    data = build_reasoning_dataset(["babi1"], num_train=64, num_validation=0, num_test=0, seed=0)
    return train_bpe_tokenizer(data["train"]["text"], vocab_size=300)


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_config_overrides_types_and_lists():
    overrides = parse_config_overrides(
        "capacity_factor=1.25, mlp_only_layers=[0,1],expert_type=sandwich,norm_topk_prob=true,"
        "num_backprop_steps=None,router_jitter_noise=0"
    )
    assert overrides == {
        "capacity_factor": 1.25,
        "mlp_only_layers": [0, 1],
        "expert_type": "sandwich",
        "norm_topk_prob": True,
        "num_backprop_steps": None,
        "router_jitter_noise": 0,
    }
    assert parse_config_overrides(None) == {} == parse_config_overrides("")
    with pytest.raises(ValueError, match="name=value"):
        parse_config_overrides("capacity_factor")


def test_build_config_precedence(tokenizer, tmp_path):
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"expert_type": "sequential", "num_experts": 2, "mlp_only_layers": [1]}))
    args = ModelArguments(
        preset="tiny",
        expert_type="sandwich",
        router_type="gru",
        config_json=str(config_json),
        config_overrides="num_experts=3,top_k=2",
    )
    config = build_config(args, tokenizer, max_position_embeddings=77)
    assert config.hidden_size == PRESETS["tiny"]["hidden_size"]  # preset
    assert config.router_type == "gru"  # named argument
    assert config.expert_type == "sequential" and config.mlp_only_layers == [1]  # JSON beats named arguments
    assert config.num_experts == 3 and config.num_experts_per_tok == 2  # overrides beat JSON; guide alias accepted
    assert config.vocab_size == len(tokenizer) and config.max_position_embeddings == 77
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize(
    ("config_json", "overrides", "expected"),
    [
        ({"top_k": 1, "aux_loss_weight": 0.5}, "num_experts_per_tok=2,router_aux_loss_coef=0.01", (2, 0.01)),
        ({"num_experts_per_tok": 1, "router_aux_loss_coef": 0.5}, "top_k=2,aux_loss_weight=0.01", (2, 0.01)),
    ],
)
def test_later_sources_win_whether_they_use_a_field_or_its_alias(
    tokenizer, tmp_path, config_json, overrides, expected
):
    """MoREConfig applies an alias after its field: an alias from --config_json once beat the field named in
    --config_overrides."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_json))
    args = ModelArguments(preset="tiny", num_experts=4, config_json=str(path), config_overrides=overrides)
    config = build_config(args, tokenizer, max_position_embeddings=64)
    assert (config.num_experts_per_tok, config.router_aux_loss_coef) == expected


def test_resume_values(tmp_path):
    """`--resume_from_checkpoint` as text or as a JSON argument file's boolean."""
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    for value in ("true", "last", "True", True):
        assert resume_checkpoint(value, str(tmp_path)) == str(checkpoint)
    for value in ("false", False, None):
        assert resume_checkpoint(value, str(tmp_path)) is None
    assert resume_checkpoint("runs/checkpoint-7", str(tmp_path)) == "runs/checkpoint-7"


def test_label_smoothing_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        MoRETrainer(model=tiny_model(), args=args)


def test_build_config_rejects_unknown_and_invalid_fields(tokenizer):
    with pytest.raises(ValueError, match="Unknown MoREConfig fields.*num_expert"):
        build_config(ModelArguments(config_overrides="num_expert=4"), tokenizer, 64)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        build_config(ModelArguments(num_experts=2, num_experts_per_tok=3), tokenizer, 64)
    with pytest.raises(ValueError, match="Unknown preset"):
        build_config(ModelArguments(preset="huge"), tokenizer, 64)


def test_presets_build_and_base_is_the_guide_configuration(tokenizer):
    for name in PRESETS:
        build_config(ModelArguments(preset=name), tokenizer, 512)
    base = build_config(ModelArguments(preset="base"), tokenizer, 512)
    guide = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_experts=8, num_experts_per_tok=1)
    assert {name: getattr(base, name) for name in guide} == guide
    assert base.hidden_size // base.num_attention_heads == 64
    assert (base.capacity_factor, base.router_aux_loss_coef, base.router_z_loss_coef) == (1.0, 1e-3, 1e-3)


def test_build_config_continues_from_a_checkpoint_config(tokenizer, tmp_path):
    MoREConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, expert_type="parallel").save_pretrained(
        tmp_path
    )
    args = ModelArguments(model_name_or_path=str(tmp_path), preset="base", num_recurrent_steps=5)
    config = build_config(args, tokenizer, 64)
    assert (config.hidden_size, config.expert_type, config.num_recurrent_steps) == (32, "parallel", 5)


# ---------------------------------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------------------------------


def test_data_sources_babi_files_and_text_corpus(tokenizer, tmp_path):
    story = "1 Mary moved to the garden.\n2 Where is Mary? \tgarden\t1\n"
    for split in ("train", "test"):
        (tmp_path / f"qa1_single-supporting-fact_{split}.txt").write_text(story, encoding="utf-8")
    babi = load_raw_datasets(DataArguments(babi_dir=str(tmp_path), tasks="babi1"))
    assert babi["test"][0] == {
        "task": "babi1",
        "prompt": "1 Mary moved to the garden.\n2 Where is Mary?\nAnswer:",
        "answer": "garden",
        "text": "1 Mary moved to the garden.\n2 Where is Mary?\nAnswer: garden",
    }
    with pytest.raises(ValueError, match="bAbI tasks"):
        load_raw_datasets(DataArguments(babi_dir=str(tmp_path), tasks="arithmetic"))
    with pytest.raises(ValueError, match="Unknown tasks"):
        load_raw_datasets(DataArguments(tasks="babi1,babi99"))

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Mary moved to the garden.\n\nJohn went to the kitchen and then back to the hallway.\n" * 20)
    data_args = DataArguments(train_file=str(corpus), max_length=16)
    raw = load_raw_datasets(data_args)
    assert list(raw) == ["train"] and raw["train"].column_names == ["text"]
    blocks = build_datasets(data_args, raw, tokenizer)["train"]
    assert len(blocks) > 1 and {len(ids) for ids in blocks["input_ids"]} == {16}
    assert blocks["labels"] == blocks["input_ids"] and tokenizer.eos_token_id in sum(blocks["input_ids"], [])


# ---------------------------------------------------------------------------------------------------------------------
# Batches and curriculum
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_batch_trims_padding_and_keeps_the_end_of_long_rows():
    ids = torch.tensor([[1, 5, 6, 7, 8, 2, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    trimmed = fit_batch(batch)
    assert trimmed["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]]
    cut = fit_batch(batch, max_length=4)
    # The long row keeps its last 4 real tokens (answer and eos stay), the short one is only trimmed.
    assert cut["input_ids"].tolist() == [[6, 7, 8, 2], [1, 9, 2, 0]]
    assert cut["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert cut["labels"].tolist() == [[6, 7, 8, 2], [1, 9, 2, IGNORE_INDEX]]
    assert fit_batch(batch, max_length=10)["input_ids"].shape == (2, 6)


def test_parse_curriculum():
    stages = parse_curriculum("10:256:2, 0:128:1,20:-:4")
    assert stages == [CurriculumStage(0, 128, 1), CurriculumStage(10, 256, 2), CurriculumStage(20, None, 4)]
    for bad in ("5:128:1", "0:128", "0:128:1,0:256:2", "0:0:1", "0:128:x"):
        with pytest.raises(ValueError):
            parse_curriculum(bad)


def test_curriculum_refuses_the_fixed_depth_sampler():
    model = tiny_model(recurrent_steps_sampler="fixed")
    with pytest.raises(ValueError, match="depth curriculum"):
        CurriculumCallback(parse_curriculum("0:-:2")).on_train_begin(None, None, None, model=model)


def train_with_curriculum(model, train, curriculum, output_dir, **args):
    """A short CPU `MoRETrainer` run (batches of 4, a log entry per step, no checkpoints) under `curriculum`."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **args,
    )
    curriculum = CurriculumCallback(parse_curriculum(curriculum))
    trainer = MoRETrainer(model=model, args=args, train_dataset=train, data_collator=collate, curriculum=curriculum)
    trainer.train()
    return trainer


def test_curriculum_changes_length_and_depth_as_scheduled(tokenizer, tmp_path):
    data = build_reasoning_dataset(["babi1"], num_train=32, num_validation=0, num_test=0, seed=0)
    train = tokenize_qa(data["train"], tokenizer, max_length=96)
    # min = max = 3: each stage's depth d becomes the range [d, d], so every step's depth is known.
    overrides = "hidden_size=32,intermediate_size=64,train_recurrent_steps_min=3,train_recurrent_steps_max=3"
    model_args = ModelArguments(expert_type="recurrent", config_overrides=overrides)
    model = AutoModelForCausalLM.from_config(build_config(model_args, tokenizer, 96))
    seen = []

    def record(module, args, kwargs, output):
        seen.append((kwargs["input_ids"].shape[1], float(output.recurrent_steps), kwargs["labels"]))

    model.register_forward_hook(record, with_kwargs=True)
    trainer = train_with_curriculum(model, train, "0:16:1,2:24:2,3:-:-", tmp_path, max_steps=4)
    assert [(width, depth) for width, depth, _ in seen[:3]] == [(16, 1.0), (16, 1.0), (24, 2.0)]
    assert seen[3][0] > 24 and seen[3][1] == 3.0  # the last stage keeps the batch and the configured depth
    for _, _, labels in seen:
        assert ((labels != IGNORE_INDEX).sum(-1) >= 2).all()  # every cut row still holds its answer and eos
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("curriculum_max_length") for entry in logs] == [16, 16, 24, None]
    assert [entry["curriculum_recurrent_steps_max"] for entry in logs] == [1, 1, 2, 3]
    assert (model.config.train_recurrent_steps_min, model.config.train_recurrent_steps_max) == (3, 3)


@pytest.mark.parametrize(("expert_type", "router_type", "iterations"), MODEL_CASES)
def test_every_parameter_gets_a_gradient_when_experts_get_no_tokens(expert_type, router_type, iterations):
    """DDP without find_unused_parameters (its default under activation checkpointing) fails on a parameter without
    a gradient; 3 tokens over 4 experts leave at least one expert of every layer empty."""
    model = tiny_model(train=True, expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations)
    ids = random_ids(1, 3)
    out = model(ids, labels=ids, output_router_logits=True)
    assert all((stats["load"] == 0).any() for stats in out.routing_stats)
    out.loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("train") / "tiny-more")
    train_script(output_dir)
    return output_dir


def test_training_writes_a_loadable_model_tokenizer_and_card(trained):
    for name in ("model.safetensors", "config.json", "configuration_more.py", "modeling_more.py", "README.md"):
        assert os.path.isfile(os.path.join(trained, name)), name
    assert all(os.path.isdir(os.path.join(trained, f"checkpoint-{step}")) for step in (10, 20))
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert isinstance(model, modeling_more.MoREForCausalLM)
    assert model.config.expert_type == "recurrent" and model.config.vocab_size == len(tokenizer)
    with open(os.path.join(trained, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\n") and "library_name: transformers" in card and "exact_match_babi1" in card
    with open(os.path.join(trained, "test_results.json")) as f:
        test_results = json.load(f)
    assert 0 <= test_results["exact_match_mean"] <= 1 and 0 <= test_results["majority_baseline_babi1"] <= 1
    with open(os.path.join(trained, "eval_results.json")) as f:
        assert json.load(f)["perplexity"] > 1

    # Anywhere with only torch and transformers: the code saved with the weights, same logits.
    ids = tokenizer("1 Mary went to the garden.\n2 Where is Mary?\nAnswer:")["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1]
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({trained!r}, trust_remote_code=True)
        # Without trust_remote_code the tokenizer would ask whether to run the code the config names.
        assert AutoTokenizer.from_pretrained({trained!r}, trust_remote_code=True) is not None
        assert "modeling_more" not in sys.modules, "must not import the repository's copy"
        with torch.no_grad():
            logits = model(torch.tensor([{ids}])).logits[0, -1]
        print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist()}}))
    """)
    env = {key: value for key, value in ENV.items() if key != "PYTHONPATH"}
    stdout = run([sys.executable, "-c", script], cwd=os.path.dirname(trained), env=env).stdout
    remote = json.loads(stdout.splitlines()[-1])
    assert remote["module"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(remote["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_curriculum_loss_is_normalised_by_the_tokens_trained_on(tokenizer, tmp_path):
    """Under gradient accumulation the loss of an optimizer step equals the mean cross-entropy over the label tokens
    of the curriculum-cut micro-batches (not over the uncut batches Trainer would otherwise count)."""
    data = build_reasoning_dataset(["babi1"], num_train=32, num_validation=0, num_test=0, seed=0)
    # Every token is a label (as on corpus data), so cutting a row removes label tokens.
    train = tokenize_qa(data["train"], tokenizer, max_length=96, answer_only_loss=False)
    overrides = "hidden_size=32,intermediate_size=64,router_aux_loss_coef=0,router_z_loss_coef=0"
    model = AutoModelForCausalLM.from_config(build_config(ModelArguments(config_overrides=overrides), tokenizer, 96))
    micro = []  # (loss the trainer backpropagated, summed cross-entropy, label tokens) per micro-batch

    tokens = []  # input tokens per micro-batch

    def record(module, args, kwargs, output):
        total, count = lm_loss_sum(output.logits.detach(), kwargs["labels"])
        micro.append((output.loss.detach(), total, count))
        tokens.append(kwargs["input_ids"].numel())

    model.register_forward_hook(record, with_kwargs=True)
    trainer = train_with_curriculum(model, train, "0:16:-", tmp_path, max_steps=2, gradient_accumulation_steps=2)
    assert len(micro) == 4
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for step in range(2):
        losses, totals, counts = zip(*micro[2 * step : 2 * step + 2], strict=True)
        expected = sum(totals) / sum(counts)
        torch.testing.assert_close(sum(losses), expected)
        assert logs[step]["loss"] == pytest.approx(float(expected), rel=1e-3)
        # The logged LM loss is rebuilt from the model's `lm_loss` (divided by the step's label tokens).
        assert logs[step]["lm_loss"] == pytest.approx(float(expected), rel=1e-5)
    # Trainer's FLOPs estimate, with the parameters counted once.
    assert trainer.state.total_flos == 6 * sum(tokens) * model.num_parameters(exclude_embeddings=True)


def test_health_metrics_and_curriculum_in_the_log_history(trained):
    logs = log_history(trained)
    assert [entry["step"] for entry in logs] == list(range(1, 21))
    config = AutoModelForCausalLM.from_pretrained(trained).config
    for entry in logs:
        assert set(HEALTH_METRICS) <= set(entry), entry
        # One micro-batch per step: the objective is the LM loss plus the weighted router terms.
        weighted = config.router_aux_loss_coef * entry["aux_loss"] + config.router_z_loss_coef * entry["z_loss"]
        assert entry["loss"] == pytest.approx(entry["lm_loss"] + weighted, abs=1e-4)
        assert 1.0 <= entry["effective_experts"] <= config.num_experts + 1e-4
        assert entry["load_cv"] >= 0 and 0 <= entry["router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-4
        assert entry["aux_loss"] >= 1.0 - 1e-4  # the Switch loss is 1 at uniform routing and larger otherwise
    early, late = logs[:14], logs[14:]
    assert all(e["recurrent_steps"] == 1.0 and e["curriculum_max_length"] == 48 for e in early)
    assert all(e["curriculum_recurrent_steps_max"] == 3 and "curriculum_max_length" not in e for e in late)
    assert all(1.0 <= e["recurrent_steps"] <= 3.0 for e in late) and {e["recurrent_steps"] for e in late} != {1.0}
    assert logs[-1]["lm_loss"] < logs[0]["lm_loss"]


def test_health_metrics_reach_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = {os.path.dirname(path) for path in glob.glob(os.path.join(trained, "runs", "*", "events.*"))}
    events = EventAccumulator(run_dir)
    events.Reload()
    for name in HEALTH_METRICS:
        assert [event.step for event in events.Scalars(f"train/{name}")] == list(range(1, 21)), name


def test_resumed_training_matches_uninterrupted_training(trained, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(trained, "checkpoint-10"), os.path.join(resumed, "checkpoint-10"))
    train_script(resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-10"))
    assert_resumed_from_step_10(trained, resumed)


def assert_resumed_from_step_10(trained, resumed):
    # Steps 11-20 come from the resumed process: data order, depth draws and latent init replay exactly (Trainer
    # restores the RNG states; the curriculum stage follows from the step).
    expected, actual = log_history(trained), log_history(resumed)
    assert [e["step"] for e in actual] == list(range(1, 21))
    for a, b in zip(expected, actual, strict=True):
        for name in ("loss", "lm_loss", "recurrent_steps", "load_cv"):
            assert b[name] == pytest.approx(a[name], abs=1e-5), (a["step"], name)
    resumed_weights = load_file(os.path.join(resumed, "model.safetensors"))
    for name, tensor in load_file(os.path.join(trained, "model.safetensors")).items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-5)


def _fake_checkpoint(output_dir, step, *files, state="{}"):
    checkpoint = output_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    for name in files:
        (checkpoint / name).write_text(state if name == "trainer_state.json" else "weights")
    return str(checkpoint)


def test_resume_true_skips_checkpoints_cut_short_while_saving(tmp_path, caplog):
    """kill -9 while Trainer saves leaves the newest checkpoint without its trainer_state.json (written last) or with
    a truncated one: `--resume_from_checkpoint true` resumes from the newest complete one and says what it skipped."""
    complete = _fake_checkpoint(tmp_path, 2, "model.safetensors", "optimizer.pt", "trainer_state.json")
    _fake_checkpoint(tmp_path, 1, "model.safetensors", "trainer_state.json")
    weights_only = _fake_checkpoint(tmp_path, 4, "model.safetensors")
    truncated = _fake_checkpoint(tmp_path, 10, "model.safetensors", "trainer_state.json", state='{"global_st')
    with caplog.at_level("WARNING", logger="train_more"):
        assert last_complete_checkpoint(str(tmp_path)) == complete
    (warning,) = caplog.messages
    assert complete in warning and weights_only in warning and truncated in warning


def test_resume_true_without_a_complete_checkpoint_is_an_error(tmp_path):
    half_written = _fake_checkpoint(tmp_path, 4, "model.safetensors")
    with pytest.raises(ValueError, match=f"No complete checkpoint.*{re.escape(half_written)}.*train from scratch"):
        last_complete_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="No complete checkpoint"):
        last_complete_checkpoint(str(tmp_path / "missing"))


def test_resume_true_after_a_kill_while_saving_continues_from_the_last_complete_checkpoint(trained, tmp_path):
    resumed = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(trained, "checkpoint-10"), os.path.join(resumed, "checkpoint-10"))
    # The process died after writing checkpoint-20's weights, before its optimizer and trainer state.
    half_written = os.path.join(resumed, "checkpoint-20")
    os.makedirs(half_written)
    shutil.copy(os.path.join(trained, "checkpoint-20", "model.safetensors"), half_written)
    stdout = train_script(resumed, "--resume_from_checkpoint", "true").stdout
    assert "skipping incomplete" in stdout and half_written in stdout
    assert_resumed_from_step_10(trained, resumed)


@pytest.mark.slow
def test_torch_compile_trains(tmp_path):
    """`--torch_compile` (Trainer compiles the model with inductor): a short run trains and saves a loadable model.
    Slow: minutes of compilation on a shared CPU (`tests/model/test_compile.py` covers compiled training steps)."""
    output_dir = str(tmp_path / "compiled")
    script = os.path.join(EXAMPLES, "train_more.py")
    args = ["--preset", "tiny", "--expert_type", "recurrent", "--tasks", "babi1", "--num_train_examples", "32"]
    args += ["--num_validation_examples", "4", "--num_test_examples", "4", "--max_length", "48", "--max_steps", "3"]
    args += ["--per_device_train_batch_size", "8", "--logging_steps", "1", "--use_cpu", "--report_to", "none"]
    args += ["--torch_compile", "--output_dir", output_dir]
    run([sys.executable, script, *args])
    losses = [entry["loss"] for entry in log_history(output_dir)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert isinstance(AutoModelForCausalLM.from_pretrained(output_dir), modeling_more.MoREForCausalLM)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------------------------------

# Runs `examples/train_more.py` on one rank with a seed of its own (so the ranks' RNGs differ and only rank 0's
# broadcast can make their depths agree) and records, per training step, the depth used, how many MoE layers left an
# expert without tokens, one draw of the rank's RNG and the world size.
RANK_SCRIPT = """
import json, os, runpy, sys
import torch
from more_tools.training import MoRETrainer

rank = int(os.environ["RANK"])
record = {{"depth": [], "empty": 0, "rng": [], "world_size": None}}
record_metrics = MoRETrainer._record_metrics

def spy(self, outputs, labels, num_items_in_batch=None):
    record["depth"].append(float(outputs.recurrent_steps))
    # Routing statistics come with the micro-batches of logging steps only.
    record["empty"] += sum(int((stats["load"] == 0).any()) for stats in outputs.routing_stats or ())
    record["rng"].append(torch.rand(1).item())
    record["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    record_metrics(self, outputs, labels, num_items_in_batch)

MoRETrainer._record_metrics = spy
sys.argv += ["--seed", str(rank)]
runpy.run_path({script!r}, run_name="__main__")
with open(os.path.join({output_dir!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump(record, f)
"""
DISTRIBUTED_ARGS = [
    "--preset", "tiny",
    "--expert_type", "recurrent",
    "--num_experts", "8",
    "--tasks", "babi1",
    "--num_train_examples", "64",
    "--num_validation_examples", "0",
    "--num_test_examples", "0",
    "--max_length", "96",
    "--per_device_train_batch_size", "1",
    "--max_steps", "10",
    "--logging_steps", "5",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
]  # fmt: skip


def rank_records(launcher, tmp_path, ranks, *extra):
    output_dir = str(tmp_path / "out")
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT.format(script=os.path.join(EXAMPLES, "train_more.py"), output_dir=output_dir))
    run([*launcher, str(script), *DISTRIBUTED_ARGS, "--output_dir", output_dir, *extra])
    records = []
    for rank in range(ranks):
        with open(os.path.join(output_dir, f"rank{rank}.json")) as f:
            records.append(json.load(f))
    return output_dir, records


def test_cpu_ddp_ranks_share_the_depth_and_tolerate_empty_experts(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher.append(os.path.join(EXAMPLES, "configs", "accelerate_cpu_ddp.yaml"))
    # 6-token batches over 8 experts leave experts empty; with find_unused_parameters off (Trainer's default under
    # activation checkpointing) DDP fails on any parameter without a gradient.
    extra = [
        "--use_cpu",
        "--activation_checkpointing",
        "--ddp_find_unused_parameters",
        "false",
        "--curriculum",
        "0:6:-",
    ]
    output_dir, (rank0, rank1) = rank_records(launcher, tmp_path, 2, *extra)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["rng"] != rank1["rng"]  # the ranks' RNGs differ ...
    assert rank0["depth"] == rank1["depth"] and len(rank0["depth"]) == 10  # ... yet they ran the same depths
    assert len(set(rank0["depth"])) > 1
    assert rank0["empty"] > 0 and rank1["empty"] > 0
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.num_experts == 8


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ranks"), [(2, 2), (3, 1)])
def test_deepspeed_zero_on_cpu(stage, ranks, tmp_path):
    """DeepSpeed ZeRO on CPU ranks (its CPU Adam is compiled on first use: minutes the first time). Without --use_cpu
    TrainingArguments counts one process on a CPU-only machine and DeepSpeed's batch check fails; with it, ZeRO-3's
    zero.Init still sees one process, so ZeRO-3 runs on one rank here."""
    pytest.importorskip("deepspeed")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    config = os.path.join(EXAMPLES, "configs", f"deepspeed_zero{stage}.json")
    extra = ["--deepspeed", config, "--use_cpu", "--num_test_examples", "4", "--eval_exact_match"]
    output_dir, records = rank_records(launcher, tmp_path, ranks, *extra)
    assert all(record["depth"] == records[0]["depth"] and record["world_size"] == ranks for record in records)
    logs = log_history(output_dir)
    assert [entry["step"] for entry in logs] == [5, 10]
    assert all(set(HEALTH_METRICS) <= set(entry) for entry in logs)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert os.path.isfile(os.path.join(output_dir, "test_results.json"))
