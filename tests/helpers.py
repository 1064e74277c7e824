"""Tiny configs and models shared by the test files (import after `conftest.py` put the repo root on sys.path)."""

import copy
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForCausalLM

import modeling_more
from configuration_more import MoREConfig


EXPERT_TYPES = sorted(modeling_more.EXPERT_REGISTRY)
ROUTER_TYPES = sorted(modeling_more.ROUTER_REGISTRY)
# Expert types that run the shared step loop (depth, truncated backprop, latent init, statistics).
RECURRENT_EXPERT_TYPES = [
    name
    for name in EXPERT_TYPES
    if issubclass(modeling_more.EXPERT_REGISTRY[name], modeling_more.MoRERecurrentExperts)
]
# Every expert type with the linear router, and every other router with FFN experts.
EXPERT_ROUTER_PAIRS = [(e, "linear") for e in EXPERT_TYPES] + [("ffn", r) for r in ROUTER_TYPES if r != "linear"]
# (expert_type, router_type, num_moe_iterations): every pair, plus Synthesis II (2 iterations) with each expert type.
MODEL_CASES = [(e, r, 1) for e in EXPERT_TYPES for r in ROUTER_TYPES] + [(e, "linear", 2) for e in EXPERT_TYPES]
VOCAB = 100
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The first lines of a script that must not import the project (remote-code loading): an editable install's finders
# and every sys.path entry inside the repository (its root, tests/) go, except the running environment's own (a
# `.venv` inside the repository keeps its packages), and MoRE's files are checked unimportable.
_WITHOUT_PROJECT = textwrap.dedent(
    """
    import importlib.util
    import os
    import sys

    repo_root = os.path.realpath(sys.argv[1])
    sys.meta_path[:] = [
        f for f in sys.meta_path if "editable" not in type(f).__name__.lower() and "editable" not in repr(f).lower()
    ]

    def inside(path, root):
        # A path component match, not a string prefix: a `<repo>-venv` next to the repository keeps its packages.
        return os.path.commonpath([os.path.realpath(path or os.getcwd()), root]) == root

    environments = {os.path.realpath(prefix) for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix)}
    sys.path[:] = [
        p for p in sys.path if not inside(p, repo_root) or any(inside(p, prefix) for prefix in environments)
    ]
    for name in ("modeling_more", "configuration_more"):
        assert importlib.util.find_spec(name) is None, f"{name} is importable"
    """
)


def run_without_project(
    script: str, arguments: list, tmp_path, repo_root: str = REPO_ROOT
) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python that cannot import MoRE (`_WITHOUT_PROJECT` first, with `repo_root` as the
    repository), from a directory outside it, offline, with its own remote-code cache; `sys.argv[2:]` are
    `arguments`."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules")
    )
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_PROJECT + textwrap.dedent(script), repo_root, *map(str, arguments)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def count_calls(monkeypatch, owner, name: str) -> list:
    """Wraps `owner.name` for this test so that every call appends to the returned list, then runs the original."""
    calls = []
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def tiny_config(**overrides) -> MoREConfig:
    """hidden 32, 2 layers, 4 heads, 4 experts, vocab 100, intermediate 64; any field can be overridden."""
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return MoREConfig(**kwargs)


def tiny_model(train: bool = False, seed: int = 0, attn_implementation=None, **overrides):
    """A freshly initialised tiny `MoREForCausalLM` (eval mode unless `train`)."""
    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_config(tiny_config(**overrides), **kwargs)
    return model.train(train)


def random_ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid the special tokens 0-2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, modeling_more.MoRESparseMoeBlock)]


def clone_model(model, **kwargs):
    """A second model with the same config and weights (kwargs go to `from_config`)."""
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), **kwargs)
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def assert_left_padded_decoding_matches_recomputation(model, steps: int = 4, seed: int = 1):
    """Greedy decoding with the cache from a batch whose first row is left-padded by 2 gives, at every step, the
    last-position logits of a full forward of the sequence so far."""
    ids = random_ids(2, 6, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for step in range(steps):
            next_token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            out = model(next_token, attention_mask=mask, cache=out.cache, use_cache=True)
            full = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            diff = (out.logits[:, -1] - full).abs().max().item()
            assert diff <= 1e-4, f"decode step {step}: cached logits differ from recomputation by {diff:.2e}"
