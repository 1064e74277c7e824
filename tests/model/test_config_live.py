"""One rule for config fields on a built model: behaviour fields are read when used (a change takes effect at the
next call, exactly as if the model had been built with it); fields that size or choose modules raise on change."""

import pytest
import torch
from helpers import clone_model, random_ids, tiny_model

from configuration_more import ARCHITECTURE_FIELDS


# (field, value at construction, value set afterwards, model overrides, train mode)
BEHAVIOUR_CHANGES = [
    ("expert_dropout", 0.0, 0.5, {}, True),
    ("router_jitter_noise", 0.0, 0.5, {}, True),
    ("latent_init_std", 0.0, 0.5, {"expert_type": "recurrent"}, True),
    ("router_logits_ema", 0.0, 0.8, {"num_moe_iterations": 3}, False),
    ("norm_topk_prob", False, True, {"num_experts_per_tok": 2}, False),
    ("capacity_factor", None, 0.25, {}, True),
    ("moe_residual_scale", 1.0, 0.3, {}, False),
    ("adaptive_exit_threshold", None, 10.0, {"expert_type": "recurrent"}, False),
]


@pytest.mark.parametrize(("name", "before", "after", "overrides", "train"), BEHAVIOUR_CHANGES)
def test_behaviour_field_change_takes_effect(name, before, after, overrides, train):
    changed = tiny_model(train=train, **{name: before}, **overrides)
    built_with = tiny_model(train=train, **{name: after}, **overrides)
    built_with.load_state_dict(changed.state_dict())
    ids = random_ids(2, 8)
    torch.manual_seed(1)
    original = changed(ids, num_recurrent_steps=3).logits
    setattr(changed.config, name, after)
    torch.manual_seed(1)
    updated = changed(ids, num_recurrent_steps=3).logits
    torch.manual_seed(1)
    reference = built_with(ids, num_recurrent_steps=3).logits
    torch.testing.assert_close(updated, reference, atol=0, rtol=0)
    assert not torch.equal(original, updated), f"changing {name} should change the output here"


@pytest.mark.parametrize(
    ("name", "value"), [("num_experts_per_tok", 2), ("rms_norm_eps", 1e-3), ("expert_type", "sandwich")]
)
def test_architecture_field_change_raises(name, value):
    assert name in ARCHITECTURE_FIELDS
    model = tiny_model()
    other = clone_model(model)
    setattr(other.config, name, value)
    with pytest.raises(ValueError, match=f"config.{name}"):
        other(random_ids(1, 4))
    model(random_ids(1, 4))  # the original (own config) is unaffected
