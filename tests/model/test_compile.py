"""`torch.compile` and bf16 autocast for every expert type.

The default suite compiles with the `aot_eager` backend: Dynamo's tracing with fake tensors (where `grouped_mm`
failed on CPU) and AOT autograd's backward graph, without inductor's C++ build; `pytest -m slow` repeats the eval
and training checks with inductor.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import EXPERT_TYPES, random_ids, tiny_model


def compile_model(expert_type, train=False, **overrides):
    """One MoE layer, a fixed depth of 2 and a zero latent start, so eager and compiled runs compute the same."""
    torch._dynamo.reset()
    kwargs = dict(num_hidden_layers=1, recurrent_steps_sampler="fixed", num_recurrent_steps=2, latent_init_std=0.0)
    kwargs.update(overrides)
    return tiny_model(train=train, expert_type=expert_type, **kwargs)


def check_eval(expert_type, backend):
    model = compile_model(expert_type)
    ids = random_ids(seq=6)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def check_training_step(expert_type, backend):
    model = compile_model(expert_type, train=True)
    ids = random_ids(seq=6)
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss = torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss
    loss.backward()
    compiled = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert compiled.keys() == eager.keys()
    assert any(name.startswith("model.layers.0.mlp.experts.") for name in compiled)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_compiled_eval_matches_eager(expert_type):
    check_eval(expert_type, "aot_eager")


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_compiled_training_step_matches_eager(expert_type):
    check_training_step(expert_type, "aot_eager")


@pytest.mark.parametrize("expert_type", ["recurrent", "parallel"])
def test_compiled_forward_generates(expert_type):
    """generate() with a compiled forward (the MoRE cache itself stays outside the graph) gives eager's tokens."""
    model = compile_model(expert_type)
    ids = random_ids(seq=4)
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    model.forward = torch.compile(model.forward, backend="aot_eager")
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_inductor_eval_and_training_step(expert_type):
    check_eval(expert_type, "inductor")
    check_training_step(expert_type, "inductor")


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_autocast_runs_every_grouped_mm_in_bf16(expert_type, monkeypatch):
    """Inside bf16 autocast every grouped matmul gets bf16 operands (grouped_mm itself is not autocast-enabled), with
    no per-group fallback (which reads group sizes back with `.tolist()`); the loss stays fp32."""
    dtypes = []
    grouped_mm = F.grouped_mm

    def counting(a, b, **kwargs):
        dtypes.append((a.dtype, b.dtype))
        return grouped_mm(a, b, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", counting)
    tolist = torch.Tensor.tolist

    def no_fallback(self):
        if sys._getframe(1).f_code.co_name == "_group_bounds":  # the per-group fallback's offsets
            pytest.fail("per-group fallback under autocast")
        return tolist(self)  # other host reads (the CPU scan schedule of `parallel`) are not the fallback

    monkeypatch.setattr(torch.Tensor, "tolist", no_fallback)
    model = tiny_model(train=True, expert_type=expert_type)
    ids = random_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert len(dtypes) >= 2 * model.config.num_hidden_layers
    assert set(dtypes) == {(torch.bfloat16, torch.bfloat16)}
    experts = model.model.layers[0].mlp.experts
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in experts.parameters() if p.requires_grad)
    # Outside autocast nothing changes: fp32 operands.
    dtypes.clear()
    model(input_ids=ids)
    assert set(dtypes) == {(torch.float32, torch.float32)}
