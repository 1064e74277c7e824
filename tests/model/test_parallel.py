"""Tensor and expert parallelism on 2 CPU ranks (gloo): every expert type loaded with `tp_plan="auto"` and with
`DistributedConfig(tp_size=2, ep_size=2)` gives one process's logits, gradients (gathered shards), recurrence
statistics, greedy generations and, saved, one process's checkpoint. One `torchrun` launch runs every case."""

import functools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import EXPERT_TYPES, REPO_ROOT, random_ids, tiny_model
from parallel_worker import train_losses
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

import modeling_more  # registers MoRE with the Auto classes


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
MODES = ("tp", "ep")
# Every expert type, top-2 with a shared expert and a dense layer; plus a model whose router gives every expert the
# same logit, so top-2 sends every token to the same two experts and under EP one rank has no rows (its graph and
# collectives must still match the other rank's). No latent
# noise: under EP each rank draws it for its own rows, so training steps would differ from one process.
# One more with a token-wise router (a router cache) over two Synthesis II iterations.
CASES = {name: {"expert_type": name} for name in EXPERT_TYPES} | {
    "one_rank": {"expert_type": "recurrent"},
    "token_router_iterated": {"expert_type": "parallel", "router_type": "gru_token", "num_moe_iterations": 2},
    # Top-1: under EP a rank's rows can all exit before the other's, so the ranks run different numbers of steps.
    "recurrent_top1": {"expert_type": "recurrent", "num_experts_per_tok": 1},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(root):
    for name, overrides in CASES.items():
        base = dict(
            latent_init_std=0.0,
            num_hidden_layers=3,
            mlp_only_layers=[0],
            num_experts_per_tok=2,
            shared_expert_intermediate_size=32,
        )
        model = tiny_model(**base | overrides)
        if name == "one_rank":
            for layer in model.model.layers[1:]:
                torch.nn.init.zeros_(layer.mlp.gate.weight)
        model.save_pretrained(os.path.join(root, name))
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: padded tokens route nowhere
    torch.save({"input_ids": ids, "attention_mask": mask}, os.path.join(root, "inputs.pt"))
    with open(os.path.join(root, "cases.json"), "w") as f:
        json.dump(list(CASES), f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel"))
    _build(root)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO_ROOT, TESTS_DIR]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(_free_port()), os.path.join(TESTS_DIR, "parallel_worker.py"), root]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@functools.cache
def _reference(root, name):
    """One process: the same checkpoint, inputs and calls as the worker."""
    model = AutoModelForCausalLM.from_pretrained(os.path.join(root, name)).eval()
    inputs = torch.load(os.path.join(root, "inputs.pt"))
    with torch.no_grad():
        logits = model(**inputs).logits
        stats = model(**inputs, output_recurrence_stats=True).recurrence_stats
        adaptive = model(**inputs, output_recurrence_stats=True, adaptive_exit_threshold=0.3, num_recurrent_steps=8)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, num_recurrent_steps=3)
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    losses = train_losses(AutoModelForCausalLM.from_pretrained(os.path.join(root, name)), inputs)
    return model, inputs, logits, stats, adaptive, generated, grads, losses


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_model_matches_one_process(runs, name, mode):
    model, inputs, logits, stats, adaptive, generated, grads, losses = _reference(runs, name)
    for rank in (0, 1):
        got = torch.load(os.path.join(runs, f"{name}-{mode}-rank{rank}.pt"))
        torch.testing.assert_close(got["logits"], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["train_logits"], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["adaptive_logits"], adaptive.logits, atol=1e-5, rtol=0)
        assert torch.equal(got["generated"], generated)
        # Three AdamW steps on the shards follow one process's loss curve.
        torch.testing.assert_close(got["train_losses"], losses, atol=1e-5, rtol=1e-5)
        # Gathered gradients equal one process's: replicated parameters and every shard of the sharded ones.
        assert got["grads"].keys() == grads.keys()
        for param, grad in grads.items():
            torch.testing.assert_close(got["grads"][param], grad, atol=1e-5, rtol=1e-4, msg=f"gradient of {param}")
        if stats is not None:
            # With adaptive exit the ranks' rows may stop at different steps (EP): the statistics still match.
            for got_stats, want in ((got["stats"], stats), (got["adaptive_stats"], adaptive.recurrence_stats)):
                for got_layer, layer in zip(got_stats, want, strict=True):
                    assert got_layer.keys() == layer.keys()
                    for key, value in layer.items():
                        torch.testing.assert_close(got_layer[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_one_rank_case_leaves_an_expert_parallel_rank_without_rows(runs):
    model, inputs = _reference(runs, "one_rank")[:2]
    with torch.no_grad():
        router_logits = model(**inputs, output_router_logits=True).router_logits
    for logits in router_logits:
        owners = torch.topk(logits, 2).indices // (model.config.num_experts // 2)  # (tokens, 2) EP rank of each expert
        assert owners.unique().numel() == 1


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_ranks_compute_only_their_rows(runs, name):
    """Under EP each kept row is computed on exactly one rank, and a rank computes no other rows (one placeholder row
    when it has none, so its collectives match)."""
    ranks = [torch.load(os.path.join(runs, f"{name}-ep-rank{rank}.pt"))["expert_rows"] for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    for (rows0, kept0, total0), (rows1, kept1, total1) in zip(*ranks, strict=True):
        assert total0 == total1 == kept0 + kept1
        assert rows0 == max(1, kept0) and rows1 == max(1, kept1)
    if name == "one_rank":
        assert any(min(kept0, kept1) == 0 for (_, kept0, _), (_, kept1, _) in zip(*ranks, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_saved_from_ranks_loads_in_one_process(runs, name, mode):
    reference = AutoModelForCausalLM.from_pretrained(os.path.join(runs, name)).eval()
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(runs, f"{name}-{mode}-saved")).eval()
    for key, tensor in reference.state_dict().items():
        assert torch.equal(saved.state_dict()[key], tensor), key
    ids = random_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, reference(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", EXPERT_TYPES)
def test_expert_parallelism_halves_each_ranks_expert_weights(runs, name):
    """Every weight of an expert type's `ep_plan` is stored at half size per rank; under TP only the FFN parts."""
    experts = modeling_more.get_expert_class(name)
    for mode, plan in (("ep", experts.ep_plan), ("tp", experts.tp_plan)):
        got = torch.load(os.path.join(runs, f"{name}-{mode}-rank0.pt"))
        sharded = {f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2) for p in plan if p and p != "ffn"}
        assert sharded or mode == "tp"
        for param, grad in got["grads"].items():
            if ".mlp.experts." not in param:
                continue
            expected = grad.numel() // 2 if param in sharded else grad.numel()
            assert got["local_numel"][param] == expected, (mode, param)


def test_invalid_parallel_sizes_raise_clear_errors():
    check = modeling_more.check_parallel_config
    with pytest.raises(ValueError, match=r"num_experts.*ep_size.*num_experts=3, ep_size=2"):
        check(tiny_model(num_experts=3).config, DistributedConfig(tp_size=2, ep_size=2))
    with pytest.raises(ValueError, match=r"num_attention_heads.*tp_size=4"):
        check(tiny_model(num_attention_heads=2, hidden_size=32).config, DistributedConfig(tp_size=4))
    with pytest.raises(ValueError, match=r"ep_size.*tp_size.*fsdp_size"):
        check(tiny_model().config, DistributedConfig(tp_size=1, fsdp_size=2, ep_size=2))


def test_plans_name_only_what_the_model_has():
    """The backbone plan comes from the config, the experts' from their class; rules naming nothing are dropped."""
    model = tiny_model(expert_type="shared_recurrent", mlp_only_layers=[0])
    assert model.tp_plan["model.layers.*.self_attn.q_proj"] == "colwise"
    assert model.tp_plan["model.layers.*.mlp.gate_proj"] == "colwise"  # the dense layer
    assert "model.layers.*.mlp.shared_expert.gate_proj" not in model.tp_plan  # no shared expert configured
    assert model.ep_plan == {
        "model.layers.*.mlp.experts.w_in": "grouped_gemm",
        "model.layers.*.mlp.experts.w_out": "grouped_gemm",
        "model.layers.*.mlp.experts": "more_ep_experts",
    }


TRAINER_ARGS = [
    "--preset", "tiny",
    "--expert_type", "recurrent",
    "--config_overrides", "latent_init_std=0",  # no latent noise: under EP each rank draws it for its own rows
    "--tasks", "babi1",
    "--num_train_examples", "64",
    "--num_validation_examples", "0",
    "--num_test_examples", "0",
    "--max_length", "64",
    "--per_device_train_batch_size", "4",
    "--max_steps", "4",
    "--logging_steps", "1",
    "--save_strategy", "no",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--use_cpu",
]  # fmt: skip


def _train_script(output_dir, launcher=(), *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [*launcher, os.path.join(REPO_ROOT, "examples", "train_more.py"), *TRAINER_ARGS, *extra]
    result = subprocess.run(
        [*command, "--output_dir", output_dir], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        losses = [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]
    return losses, AutoModelForCausalLM.from_pretrained(output_dir)


def test_trainer_on_cpu_ranks_follows_one_process(tmp_path):
    """`train_more.py --tp_size 2 [--ep_size 2]` under torchrun on 2 CPU ranks (Trainer, accelerate, gloo): one
    process's loss curve, and the saved model loads in one process with one process's weights."""
    losses, model = _train_script(str(tmp_path / "one"), [sys.executable])
    reference = model.state_dict()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    for name, extra in (("tp", ["--tp_size", "2"]), ("ep", ["--tp_size", "2", "--ep_size", "2"])):
        got_losses, got = _train_script(str(tmp_path / name), [*torchrun, str(_free_port())], *extra)
        assert len(got_losses) == 4
        torch.testing.assert_close(got_losses, losses, atol=1e-5, rtol=1e-5, msg=name)
        assert got.state_dict().keys() == reference.keys()
        for key, tensor in got.state_dict().items():
            torch.testing.assert_close(tensor, reference[key], atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
