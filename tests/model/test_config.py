"""MoREConfig: validation names the bad field (also for wrong types, from every entry point), misspelt keys warn,
guide aliases, save/load round trip, registries in sync."""

import inspect
import json

import pytest
from helpers import tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.testing_utils import CaptureLogger

import configuration_more
import modeling_more
from configuration_more import MoREConfig


# Long-context RoPE with one factor per rotated pair of the tiny config's head size 8.
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 1e4,
    "short_factor": [1.0] * 4,
    "long_factor": [2.0] * 4,
    "original_max_position_embeddings": 32,
}

BAD_VALUES = [
    ("expert_type", {"expert_type": "nope"}),
    ("router_type", {"router_type": "nope"}),
    ("num_experts_per_tok", {"num_experts": 2, "num_experts_per_tok": 3}),
    ("hidden_size", {"hidden_size": 30, "num_attention_heads": 4}),
    ("num_recurrent_steps", {"num_recurrent_steps": 0}),
    ("num_recurrent_steps", {"num_recurrent_steps": -1}),
    ("num_moe_iterations", {"num_moe_iterations": 0}),
    ("num_moe_iterations", {"num_moe_iterations": -2}),
    ("num_experts", {"num_experts": 0}),
    ("num_experts", {"num_experts": -4}),
    ("train_recurrent_steps_min", {"train_recurrent_steps_min": 4, "train_recurrent_steps_max": 2}),
    ("recurrent_steps_sampler", {"recurrent_steps_sampler": "nope"}),
    ("router_aux_loss_coef", {"router_aux_loss_coef": -0.1}),
    ("router_z_loss_coef", {"router_z_loss_coef": -1e-3}),
    ("projection_orthogonality_coef", {"projection_orthogonality_coef": -1.0}),
    ("attention_dropout", {"attention_dropout": 1.0}),
    ("attention_dropout", {"attention_dropout": -0.1}),
    ("projection_dropout", {"projection_dropout": 1.5}),
    ("projection_dropout", {"projection_dropout": -0.5}),
    ("mlp_only_layers", {"mlp_only_layers": [2]}),
    ("mlp_only_layers", {"mlp_only_layers": [-1]}),
    ("capacity_factor", {"capacity_factor": 0.0}),
    ("capacity_factor", {"capacity_factor": -1.0}),
    ("eval_capacity_factor", {"eval_capacity_factor": 0.0}),
    ("rope_parameters", {"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}),
    ("recurrent_attention_window", {"recurrent_attention_window": 0}),
    ("recurrent_attention_window", {"recurrent_attention_window": 2.0}),
    # Non-finite numbers pass a range check and break the model (an overflow, NaN losses).
    ("capacity_factor", {"capacity_factor": float("inf")}),
    ("rms_norm_eps", {"rms_norm_eps": float("nan")}),
    ("latent_init_std", {"latent_init_std": float("inf")}),
    ("moe_residual_scale", {"moe_residual_scale": float("inf")}),
    ("rope_theta", {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}),
    # Special token ids outside the vocabulary (the embedding's padding index, generation's stop ids).
    ("pad_token_id", {"pad_token_id": 100}),
    ("pad_token_id", {"pad_token_id": -1}),
    ("bos_token_id", {"bos_token_id": 1000}),
    ("eos_token_id", {"eos_token_id": [2, 100]}),
    # Rotary turns pairs of features: odd head sizes, partial rotary (MoRE rotates whole heads), factors per pair.
    ("head_dim", {"hidden_size": 12, "num_attention_heads": 4}),
    ("head_dim", {"head_dim": 5}),
    ("recurrent_num_heads", {"expert_type": "recurrent", "recurrent_num_heads": 32}),
    ("recurrent_num_heads", {"expert_type": "shared_recurrent", "hidden_size": 24, "recurrent_num_heads": 8}),
    (
        "partial_rotary_factor",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
    ),
    ("short_factor", {"rope_parameters": LONGROPE | {"short_factor": [1.0] * 3}}),
    ("recurrent_num_heads", {"expert_type": "recurrent", "recurrent_num_heads": 2, "rope_parameters": LONGROPE}),
]


@pytest.mark.parametrize(("field", "overrides"), BAD_VALUES, ids=[f"{f}={list(o.values())}" for f, o in BAD_VALUES])
def test_bad_value_raises_naming_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_recurrent_steps": 1},
        {"num_moe_iterations": 1},
        {"train_recurrent_steps_min": 3, "train_recurrent_steps_max": 3},
        {"attention_dropout": 0.0, "projection_dropout": 0.5},
        {"mlp_only_layers": [0, 1]},
        {"capacity_factor": 0.25, "eval_capacity_factor": 2.0},
        {"router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0},
        {"num_experts": 2, "num_experts_per_tok": 2},
        {"capacity_factor": 2, "rms_norm_eps": 1, "router_logits_ema": 0},  # ints where floats are expected
        {"eos_token_id": [2, 3], "pad_token_id": None},
        {"mlp_only_layers": (1,)},
        {"recurrent_attention_window": 1},
        {"pad_token_id": 99, "bos_token_id": None, "eos_token_id": [0, 99]},
        # FFN experts do not attend: heads that would not divide hidden_size do not concern them.
        {"hidden_size": 30, "num_attention_heads": 4, "head_dim": 8},
        {"rope_parameters": LONGROPE},
        {"rope_parameters": LONGROPE, "expert_type": "recurrent"},
    ],
)
def test_boundary_values_accepted(overrides):
    config = tiny_config(**overrides)
    for name, value in overrides.items():
        assert getattr(config, name) == value


# (field, value of a wrong type, what the error says is allowed)
WRONG_TYPES = [
    ("capacity_factor", "abc", "a finite number > 0 or None"),
    ("rms_norm_eps", "abc", "a finite number > 0"),
    ("mlp_only_layers", 5, "a list of layer indices"),
    ("mlp_only_layers", [0.5], "a list of layer indices"),
    ("num_experts", 2.0, "a positive integer"),
    ("num_experts", True, "a positive integer"),
    ("num_backprop_steps", "all", "a positive integer or None"),
    ("router_aux_loss_coef", [0.1], "a finite number >= 0"),
    ("router_z_loss_coef", True, "a finite number >= 0"),
    ("attention_dropout", "0.1", "a number in [0, 1)"),
    ("norm_topk_prob", "yes", "a bool"),
    ("expert_type", ["ffn"], "one of"),
    ("eos_token_id", "eos", "an integer token id"),
    ("rope_parameters", 5, "a dict of RoPE parameters"),
]


def _from_constructor(field, value, tmp_path):
    return tiny_config(**{field: value})


def _from_config_overrides(field, value, tmp_path):
    """As `train_more.py`'s `build_config` does with `--config_overrides field=value`."""
    from more_tools.models import (  # here: the other tests do not need the training stack
        ModelArguments,
        config_updates,
    )

    return tiny_config(**config_updates(ModelArguments(config_overrides=f"{field}={json.dumps(value)}")))


def _from_config_json(loader):
    def load(field, value, tmp_path):
        tiny_config().save_pretrained(tmp_path)
        _edit_config_json(tmp_path, **{field: value})
        return loader.from_pretrained(tmp_path)

    return load


def _edit_config_json(directory, **entries):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


ENTRY_POINTS = {
    "constructor": _from_constructor,
    "config_overrides": _from_config_overrides,
    "MoREConfig.from_pretrained": _from_config_json(MoREConfig),
    "AutoConfig.from_pretrained": _from_config_json(AutoConfig),
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize(("field", "value", "allowed"), WRONG_TYPES, ids=[f"{f}={v!r}" for f, v, _ in WRONG_TYPES])
def test_wrong_type_raises_naming_field_value_and_allowed(field, value, allowed, entry_point, tmp_path):
    with pytest.raises(ValueError) as excinfo:
        ENTRY_POINTS[entry_point](field, value, tmp_path)
    message = str(excinfo.value)
    assert f"`{field}` must be {allowed}" in message and f"got {value!r}" in message


def test_every_field_has_a_rule():
    assert list(tiny_config()._field_rules()) == list(inspect.get_annotations(MoREConfig))


@pytest.mark.parametrize(("field", "value"), [("capacity_factor", -1.0), ("num_recurrent_steps", 2.5)])
def test_saving_a_field_changed_to_a_bad_value_raises_before_writing(field, value, tmp_path):
    model = tiny_model(train=True, expert_type="recurrent")
    setattr(model.config, field, value)  # behaviour fields may change on a built model
    with pytest.raises(ValueError, match=field):
        model.save_pretrained(tmp_path)
    # No checkpoint that `from_pretrained` would refuse (the code files are copied first, for remote code).
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".py", ".py"]


def test_rope_parameters_are_copied_not_shared():
    given = {"rope_type": "linear", "factor": 2.0}
    first, second = tiny_config(rope_parameters=given), tiny_config(rope_parameters=given)
    assert given == {"rope_type": "linear", "factor": 2.0}  # not completed in place (`rope_theta`)
    first.rope_parameters["factor"] = 4.0
    assert second.rope_parameters["factor"] == 2.0


@pytest.mark.parametrize("loader", [MoREConfig, AutoConfig])
def test_misspelt_config_json_key_warns(loader, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    _edit_config_json(tmp_path, num_recurent_steps=8)
    with CaptureLogger(configuration_more.logger) as captured:
        config = loader.from_pretrained(tmp_path)
    assert "`num_recurent_steps`" in captured.out and "`num_recurrent_steps`" in captured.out
    assert captured.out.count("misspelt") == 1
    assert config.num_recurrent_steps == 4  # the default: the misspelt key set nothing


def test_saving_and_loading_does_not_warn(tmp_path):
    """Transformers' own keys (also those Transformers 4 saved), aliases and keys unlike any field stay silent."""
    with CaptureLogger(configuration_more.logger) as captured:
        model = tiny_model(expert_type="recurrent", d_ff=48, top_k=2)
        model.save_pretrained(tmp_path)
        config = MoREConfig.from_pretrained(tmp_path)
        AutoConfig.from_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path, dtype="bfloat16", attn_implementation="eager")
        MoREConfig(**config.to_dict())  # as `train_more --model_name_or_path` builds it
        _edit_config_json(
            tmp_path,
            torch_dtype="float32",
            sep_token_id=3,
            max_length=20,
            is_decoder=False,
            rope_theta=500000.0,
            training_notes="kept as is",
        )
        assert MoREConfig.from_pretrained(tmp_path).training_notes == "kept as is"
    assert captured.out == ""


ALIASES = {"d_model": 64, "n_layers": 3, "n_heads": 8, "d_ff": 96, "aux_loss_weight": 0.05}
CANONICAL = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "intermediate_size": 96,
    "router_aux_loss_coef": 0.05,
}


def _fields(config):
    fields = config.to_dict()
    fields.pop("_name_or_path", None)
    return fields


def _alias_config():
    return MoREConfig(vocab_size=100, num_experts=4, top_k=2, **ALIASES)


def test_guide_aliases():
    config = _alias_config()
    for name, value in CANONICAL.items():
        assert getattr(config, name) == value, name
    for name, value in ALIASES.items():
        assert getattr(config, name) == value, name
    assert config.num_experts_per_tok == 2
    # Derived defaults follow the aliased values.
    assert config.num_key_value_heads == 8
    assert config.recurrent_intermediate_size == 96


def test_top_k_alias_is_validated():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoREConfig(num_experts=2, top_k=3)


def test_aliases_round_trip(tmp_path):
    config = _alias_config()
    config.save_pretrained(tmp_path)
    for loaded in (MoREConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded).__name__ == "MoREConfig"
        for name, value in CANONICAL.items():
            assert getattr(loaded, name) == value, name
        for name, value in ALIASES.items():
            assert getattr(loaded, name) == value, name
        assert loaded.num_experts_per_tok == 2
        assert _fields(loaded) == _fields(config)


def test_round_trip_keeps_every_field(tmp_path):
    config = tiny_config(
        expert_type="recurrent",
        num_experts=3,
        num_experts_per_tok=2,
        num_recurrent_steps=5,
        train_recurrent_steps_min=1,
        train_recurrent_steps_max=6,
        recurrent_steps_sampler="poisson_lognormal",
        num_backprop_steps=2,
        num_moe_iterations=2,
        mlp_only_layers=[1],
        capacity_factor=1.5,
        shared_expert_intermediate_size=16,
        shared_expert_gate="fixed",
    )
    config.save_pretrained(tmp_path)
    loaded = MoREConfig.from_pretrained(tmp_path)
    assert _fields(loaded) == _fields(config)
    assert loaded.mlp_only_layers == [1]
    assert loaded.num_backprop_steps == 2


def test_type_lists_match_registries():
    # One expert-type registry: the config validates against the very dict the model takes classes from.
    assert configuration_more.EXPERT_TYPES is modeling_more.EXPERT_REGISTRY
    assert all(isinstance(cls, type) for cls in modeling_more.EXPERT_REGISTRY.values())
    assert sorted(configuration_more.ROUTER_TYPES) == sorted(modeling_more.ROUTER_REGISTRY)
    assert sorted(configuration_more.RECURRENT_STEPS_SAMPLERS) == sorted(modeling_more.DEPTH_SAMPLER_REGISTRY)


@pytest.mark.parametrize(
    ("getter", "registry"),
    [
        (modeling_more.get_expert_class, modeling_more.EXPERT_REGISTRY),
        (modeling_more.get_router_class, modeling_more.ROUTER_REGISTRY),
        (modeling_more.get_depth_sampler, modeling_more.DEPTH_SAMPLER_REGISTRY),
    ],
)
def test_registry_lookup(getter, registry):
    for name, cls in registry.items():
        assert getter(name) is cls
    with pytest.raises(ValueError, match="nope") as excinfo:
        getter("nope")
    for name in registry:
        assert repr(name) in str(excinfo.value) or name in str(excinfo.value)
