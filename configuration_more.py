"""MoRE (Mixture of Recurrent Experts) model configuration.

This file depends on `transformers` only; `save_pretrained` copies it next to the weights so the checkpoint loads
with `trust_remote_code=True` where MoRE is not installed.
"""

import copy
import difflib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from transformers import GenerationConfig, PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging


logger = logging.get_logger(__name__)

# The one registry of expert types, shared with `modeling_more` (its `EXPERT_REGISTRY` is this dict): name -> expert
# class. The config needs the names only, so the built-in types name their class in `modeling_more`, which puts the
# classes in when it is imported; `modeling_more.register_expert` adds a user's type.
EXPERT_TYPES: dict[str, "str | type"] = {
    "ffn": "MoREFFNExperts",
    "recurrent": "MoREHuginnExperts",
    "shared_recurrent": "MoRESharedRecurrentExperts",
    "sandwich": "MoRESandwichExperts",
    "parallel": "MoREParallelExperts",
    "sequential": "MoRESequentialExperts",
}
# Expert types whose experts attend among their tokens, with `recurrent_num_heads` heads of a rotary head size.
ATTENTION_EXPERT_TYPES = ("recurrent", "shared_recurrent")
# Valid names of `modeling_more.ROUTER_REGISTRY` (a test keeps both equal).
ROUTER_TYPES = ("linear", "gru", "rnn", "gru_token", "rnn_token")
# Valid names of `modeling_more.DEPTH_SAMPLER_REGISTRY` (a test keeps both equal).
RECURRENT_STEPS_SAMPLERS = ("fixed", "uniform", "poisson_lognormal")
SHARED_EXPERT_GATES = ("learned", "fixed")
HIDDEN_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
# Fields that size or choose a model's modules: fixed once a model is built, and a forward after a change raises.
# Every other field is read when it is used, so a change on a built model takes effect at its next call.
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "expert_type",
    "num_experts",
    "num_experts_per_tok",
    "router_type",
    "router_hidden_size",
    "shared_expert_intermediate_size",
    "shared_expert_gate",
    "mlp_only_layers",
    "recurrent_intermediate_size",
    "recurrent_num_heads",
    "parallel_gate_hidden_size",
    "projection_dropout",
    "rope_parameters",
)
# Keys a config.json (or `to_dict()`) may hold that are not MoRE fields but Transformers' own: what
# `PreTrainedConfig` reads in its post-init or writes on save, and attributes Transformers 4 saved in every config.
# Several look like MoRE fields (`sep_token_id` / `pad_token_id`, `max_length` / `max_seq_length`), so they are never
# taken for a misspelt field. Generation parameters (also Transformers' own) are added from `GenerationConfig`.
TRANSFORMERS_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "model_type",
        "auto_map",
        "torch_dtype",
        "num_labels",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation",
        "_attn_implementation_internal",
        "_experts_implementation",
        "_experts_implementation_internal",
        "per_layer_config",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "quantization_config",
        "transformers_weights",
        "is_decoder",
        "add_cross_attention",
        "cross_attention_hidden_size",
        "tie_encoder_decoder",
        "pruned_heads",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
    }
)


class MoREConfig(PreTrainedConfig):
    r"""
    Configuration of a MoRE decoder-only language model. Every expert type and routing scheme of the MoRE research
    guide is selected by a field here; defaults follow the guide's base configuration (§3.1).

    Backbone:
        vocab_size, hidden_size (`d_model`), intermediate_size (`d_ff`, width of FFN experts and dense MLPs),
        num_hidden_layers (`n_layers`), num_attention_heads (`n_heads`), num_key_value_heads, head_dim, hidden_act
        (gated MLP activation), max_position_embeddings (`max_seq_length`), rms_norm_eps, rope_parameters
        (Transformers' RoPE dict `{"rope_type": "default" | "linear" | "dynamic" | "yarn" | ..., "rope_theta": ...,
        "factor": ...}`, used by the backbone and by attention inside recurrent experts; a legacy `rope_theta` or
        `rope_scaling` argument or config.json key is folded into it), attention_dropout, attention_bias,
        initializer_range, tie_word_embeddings.

    Mixture of experts:
        expert_type (one of `EXPERT_TYPES`), num_experts, num_experts_per_tok (`top_k`, as a constructor argument
        only), norm_topk_prob (renormalise the top-k weights), router_type (one of `ROUTER_TYPES`),
        router_jitter_noise (multiplicative input jitter in training), router_hidden_size (state size of the
        recurrent routers: `gru`/`rnn` layer to layer, `gru_token`/`rnn_token` token to token), capacity_factor
        (training; `None` = dropless), eval_capacity_factor (eval; `None` = dropless), router_aux_loss_coef
        (`aux_loss_weight`), router_z_loss_coef (`router_z_loss_weight`), output_router_logits,
        shared_expert_intermediate_size (0 = no shared expert), shared_expert_gate (`"learned"` sigmoid gate or
        `"fixed"` mix with shared_expert_weight / moe_weight), mlp_only_layers (layer indices kept dense),
        expert_dropout (training: each (token, expert) assignment is dropped with this probability and the kept
        ones rescaled by 1 / (1 - p)), router_entropy_floor and router_entropy_coef (penalty
        `coef * relu(floor - mean routing entropy)` per layer and iteration; floor 0 = off).

    Expert-level recurrence (`recurrent`, `shared_recurrent`, `sandwich`, `sequential`):
        num_recurrent_steps (inference default; also a forward / `generate` argument), train_recurrent_steps_min /
        train_recurrent_steps_max and recurrent_steps_sampler (depth drawn once per training batch),
        num_backprop_steps (truncated backprop: gradients flow through the last k steps only; `None` = all),
        latent_init_std (std of the latent state init in training; eval starts from zeros), recurrent_intermediate_size
        and recurrent_num_heads (the Huginn block inside recurrent experts), recurrent_attention_window (attention
        inside Huginn experts sees the last W positions of its segment, itself included; `None` = every earlier
        position; with one expert per layer and W = 2, each step moves information one token on), projection_dropout
        and projection_orthogonality_coef (`shared_recurrent` projections), parallel_gate_hidden_size (`parallel`),
        adaptive_exit_threshold (`None` = off; a routed token stops iterating once the relative change of its latent
        state falls below it; also a forward / `generate` argument) and adaptive_exit_min_steps.

    Layer-level recurrence (Synthesis II):
        num_moe_iterations (> 1 turns each MoE block into a recurrent unit; inference default and forward /
        `generate` argument), train_moe_iterations_min / train_moe_iterations_max (both set: iterations drawn
        uniformly per training batch, guide 2-4), num_backprop_iterations (truncated backprop through iterations;
        `None` = all), router_logits_ema (logits of iteration t are `ema * logits_{t-1} + (1 - ema) * new`;
        0 = off), moe_residual_scale.

    Example:

    ```python
    >>> from configuration_more import MoREConfig
    >>> config = MoREConfig(expert_type="recurrent", d_model=256, n_layers=4, num_experts=4, top_k=1)
    >>> config.hidden_size, config.num_hidden_layers
    (256, 4)
    ```
    """

    model_type = "more"
    keys_to_ignore_at_inference = [
        "cache",
        "hidden_states",
        "attentions",
        "router_logits",
        "aux_loss",
        "z_loss",
        "expert_loss",
        "recurrent_steps",
        "recurrence_stats",
        "routing_stats",
        "entropy_loss",
        "dropped_tokens",
    ]
    # The research guide's names, accepted as aliases of Transformers' names.
    attribute_map = {
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "d_ff": "intermediate_size",
        "k_experts": "num_experts_per_tok",
        "max_seq_length": "max_position_embeddings",
        "aux_loss_weight": "router_aux_loss_coef",
        "router_z_loss_weight": "router_z_loss_coef",
        "num_local_experts": "num_experts",
    }
    # Tensor parallelism of the backbone (`from_pretrained(..., tp_plan="auto")`): attention heads, dense MLP layers
    # and the shared expert split over the TP group. Each expert type adds how its own stacked weights shard (its
    # `tp_plan` / `ep_plan` in modeling_more.py); the embeddings are sharded by vocabulary by Transformers.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }

    # Backbone (guide §3.1)
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    attention_bias: bool = False
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    # Mixture of experts
    expert_type: str = "ffn"
    num_experts: int = 8
    num_experts_per_tok: int = 1
    norm_topk_prob: bool = False
    router_type: str = "linear"
    router_jitter_noise: float = 0.0
    router_hidden_size: int = 128
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    router_aux_loss_coef: float = 1e-3
    router_z_loss_coef: float = 1e-3
    output_router_logits: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: str = "learned"
    shared_expert_weight: float = 0.5
    moe_weight: float = 0.5
    mlp_only_layers: list[int] | None = None
    expert_dropout: float = 0.0
    router_entropy_floor: float = 0.0
    router_entropy_coef: float = 1e-2

    # Expert-level recurrence
    num_recurrent_steps: int = 4
    train_recurrent_steps_min: int = 2
    train_recurrent_steps_max: int = 4
    recurrent_steps_sampler: str = "uniform"
    num_backprop_steps: int | None = None
    latent_init_std: float = 0.02
    recurrent_intermediate_size: int | None = None
    recurrent_num_heads: int | None = None
    recurrent_attention_window: int | None = None
    projection_dropout: float = 0.0
    projection_orthogonality_coef: float = 0.0
    parallel_gate_hidden_size: int = 64
    adaptive_exit_threshold: float | None = None
    adaptive_exit_min_steps: int = 1

    # Layer-level recurrence (Synthesis II)
    num_moe_iterations: int = 1
    train_moe_iterations_min: int | None = None
    train_moe_iterations_max: int | None = None
    num_backprop_iterations: int | None = None
    router_logits_ema: float = 0.0
    moe_residual_scale: float = 1.0

    def __post_init__(self, **kwargs):
        # `top_k` cannot be an attribute alias: Transformers treats a config attribute of that name as a generation
        # parameter (it is dropped on load and refused on save), so it is accepted as a constructor argument only.
        if "top_k" in kwargs:
            self.num_experts_per_tok = kwargs.pop("top_k")
        self._warn_misspelt_keys(kwargs)
        # Transformers' post-init folds legacy RoPE keys into `rope_parameters` and fails obscurely on a non-dict.
        self._check_fields(["rope_parameters"])
        # It also completes the dict in place: the caller's own dict (maybe shared by several configs) stays as given.
        self.rope_parameters = copy.deepcopy(self.rope_parameters)
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.recurrent_num_heads is None:
            self.recurrent_num_heads = self.num_attention_heads
        if self.recurrent_intermediate_size is None:
            self.recurrent_intermediate_size = self.intermediate_size
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        self._validate()

    def _warn_misspelt_keys(self, kwargs):
        """One warning for the keys (constructor arguments, config.json entries) that look like a misspelt field.

        Such a key is kept as a plain attribute and the field it meant silently keeps its value. A key warns when it
        is close to a MoRE field or alias (a misspelling is close to what it misspells) and is not one of Transformers'
        own keys (`TRANSFORMERS_KEYS`, generation parameters), several of which look like MoRE fields. Other unknown
        keys are kept silently, as Transformers keeps them: other versions and tools write keys MoRE does not read.
        """
        names = [*self._field_rules(), *self.attribute_map]
        known = TRANSFORMERS_KEYS | set(GenerationConfig._get_default_generation_params()) | set(self.attribute_map)
        # Cutoff 0.8: a letter or two off (`num_recurent_steps` scores 0.97), not merely a shared word.
        closest = {key: difflib.get_close_matches(key, names, n=1, cutoff=0.8) for key in kwargs if key not in known}
        misspelt = [f"`{key}` (did you mean `{match[0]}`?)" for key, match in closest.items() if match]
        if misspelt:
            logger.warning(
                f"{type(self).__name__}: unknown keys that look like misspelt fields: {', '.join(misspelt)}. They "
                "are kept as plain attributes and set no field."
            )

    def _field_rules(self) -> dict[str, "_Rule"]:
        """What each MoRE field accepts on its own (a test checks that every field has a rule). Built per call: the
        expert types grow with `modeling_more.register_expert` and the layer indices depend on `num_hidden_layers`."""
        layers = self.num_hidden_layers
        token_id = _token_id_rule(self.vocab_size)
        return {
            "vocab_size": _POSITIVE_INT,
            "hidden_size": _POSITIVE_INT,
            "intermediate_size": _POSITIVE_INT,
            "num_hidden_layers": _POSITIVE_INT,
            "num_attention_heads": _POSITIVE_INT,
            "num_key_value_heads": _POSITIVE_INT,
            "head_dim": _optional(_POSITIVE_INT, "hidden_size / num_attention_heads"),
            "hidden_act": _one_of(HIDDEN_ACTS),
            "max_position_embeddings": _POSITIVE_INT,
            "rms_norm_eps": _POSITIVE,
            "rope_parameters": _Rule(
                "a dict of RoPE parameters or None (default RoPE)", lambda v: v is None or isinstance(v, dict)
            ),
            "attention_dropout": _FRACTION,
            "attention_bias": _BOOL,
            "initializer_range": _NON_NEGATIVE,
            "use_cache": _BOOL,
            "tie_word_embeddings": _BOOL,
            "pad_token_id": token_id,
            "bos_token_id": token_id,
            "eos_token_id": _Rule(
                f"an integer token id in [0, {self.vocab_size}) (vocab_size), a list of them or None",
                lambda v: (
                    token_id.accepts(v) or (isinstance(v, list) and all(_is_int(i) and token_id.accepts(i) for i in v))
                ),
            ),
            "expert_type": _one_of(EXPERT_TYPES),
            "num_experts": _POSITIVE_INT,
            "num_experts_per_tok": _POSITIVE_INT,
            "norm_topk_prob": _BOOL,
            "router_type": _one_of(ROUTER_TYPES),
            "router_jitter_noise": _NON_NEGATIVE,
            "router_hidden_size": _POSITIVE_INT,
            "capacity_factor": _optional(_POSITIVE, "dropless"),
            "eval_capacity_factor": _optional(_POSITIVE, "dropless"),
            "router_aux_loss_coef": _NON_NEGATIVE,
            "router_z_loss_coef": _NON_NEGATIVE,
            "output_router_logits": _BOOL,
            "shared_expert_intermediate_size": _Rule(
                "an integer >= 0 (0 = no shared expert)", lambda v: _is_int(v) and v >= 0
            ),
            "shared_expert_gate": _one_of(SHARED_EXPERT_GATES),
            "shared_expert_weight": _NON_NEGATIVE,
            "moe_weight": _NON_NEGATIVE,
            "mlp_only_layers": _Rule(
                f"a list of layer indices in [0, {layers}) (num_hidden_layers)",
                lambda v: isinstance(v, (list, tuple)) and all(_is_int(i) and 0 <= i < layers for i in v),
            ),
            "expert_dropout": _FRACTION,
            "router_entropy_floor": _NON_NEGATIVE,
            "router_entropy_coef": _NON_NEGATIVE,
            "num_recurrent_steps": _POSITIVE_INT,
            "train_recurrent_steps_min": _POSITIVE_INT,
            "train_recurrent_steps_max": _POSITIVE_INT,
            "recurrent_steps_sampler": _one_of(RECURRENT_STEPS_SAMPLERS),
            "num_backprop_steps": _optional(_POSITIVE_INT, "all steps"),
            "latent_init_std": _NON_NEGATIVE,
            "recurrent_intermediate_size": _POSITIVE_INT,
            "recurrent_num_heads": _POSITIVE_INT,
            "recurrent_attention_window": _optional(_POSITIVE_INT, "every earlier position"),
            "projection_dropout": _FRACTION,
            "projection_orthogonality_coef": _NON_NEGATIVE,
            "parallel_gate_hidden_size": _POSITIVE_INT,
            "adaptive_exit_threshold": _optional(_POSITIVE, "off"),
            "adaptive_exit_min_steps": _POSITIVE_INT,
            "num_moe_iterations": _POSITIVE_INT,
            "train_moe_iterations_min": _optional(_POSITIVE_INT, "no draw"),
            "train_moe_iterations_max": _optional(_POSITIVE_INT, "no draw"),
            "num_backprop_iterations": _optional(_POSITIVE_INT, "all iterations"),
            "router_logits_ema": _FRACTION,
            "moe_residual_scale": _NON_NEGATIVE,
        }

    def _check_fields(self, names=None):
        """Raise a `ValueError` naming the field, the bad value and what is allowed (`_field_rules`; default all)."""
        rules = self._field_rules()
        for name in rules if names is None else names:
            value = getattr(self, name)
            if not rules[name].accepts(value):
                raise ValueError(f"`{name}` must be {rules[name].allowed}, got {value!r}.")

    def _validate(self):
        """Raise a `ValueError` naming the field, the bad value and what is allowed: each field on its own (type and
        range), then the constraints between fields."""
        self._check_fields()
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` (top_k) must be <= `num_experts` ({self.num_experts}), "
                f"got {self.num_experts_per_tok}."
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}) when `head_dim` is not set."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads` must divide `num_attention_heads` ({self.num_attention_heads}), "
                f"got {self.num_key_value_heads}."
            )
        if self.expert_type in ATTENTION_EXPERT_TYPES and self.hidden_size % self.recurrent_num_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `recurrent_num_heads` for "
                f"expert_type={self.expert_type!r}, got {self.recurrent_num_heads}."
            )
        if self.train_recurrent_steps_min > self.train_recurrent_steps_max:
            raise ValueError(
                f"`train_recurrent_steps_min` ({self.train_recurrent_steps_min}) must be <= "
                f"`train_recurrent_steps_max` ({self.train_recurrent_steps_max})."
            )
        if (self.train_moe_iterations_min is None) != (self.train_moe_iterations_max is None):
            raise ValueError(
                "`train_moe_iterations_min` and `train_moe_iterations_max` must be set together (or both None), got "
                f"{self.train_moe_iterations_min} and {self.train_moe_iterations_max}."
            )
        if self.train_moe_iterations_min is not None and self.train_moe_iterations_min > self.train_moe_iterations_max:
            raise ValueError(
                f"`train_moe_iterations_min` ({self.train_moe_iterations_min}) must be <= "
                f"`train_moe_iterations_max` ({self.train_moe_iterations_max})."
            )
        self._validate_rope()

    def _validate_rope(self):
        allowed = ["default", *ROPE_INIT_FUNCTIONS]
        if self.rope_parameters.get("rope_type") not in allowed:
            raise ValueError(
                f"`rope_parameters` must be a dict whose 'rope_type' is one of {allowed}, "
                f"got {self.rope_parameters!r}."
            )
        theta = self.rope_parameters.get("rope_theta")
        if not (_is_number(theta) and theta > 0):  # every RoPE type uses it; Transformers does not check it
            raise ValueError(f"`rope_parameters`'s 'rope_theta' must be a number > 0, got {theta!r}.")
        partial = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if partial != 1.0:  # MoRE rotates whole heads: a smaller factor would be ignored
            raise ValueError(
                f"`rope_parameters`'s 'partial_rotary_factor' must be 1.0 (whole heads), got {partial!r}."
            )
        sizes = self._rotary_head_sizes()
        for field, size in sizes.items():
            if size % 2:  # rotary turns pairs of features
                raise ValueError(f"Rotary needs an even head size: `{field}` gives {size}.")
        # Transformers' own checks read `head_dim`, which MoRE leaves None for hidden_size / num_attention_heads.
        probe = copy.copy(self)
        probe.head_dim = sizes["head_dim"]
        try:
            probe.validate_rope()
        except KeyError as err:  # Transformers reports missing keys as KeyError
            raise ValueError(f"`rope_parameters` {self.rope_parameters!r}: {err.args[0]}") from None
        if self.rope_parameters["rope_type"] == "longrope":  # one factor per rotated pair, for every head size
            for key in ("short_factor", "long_factor"):
                factors = self.rope_parameters[key]
                for field, size in sizes.items():
                    if not (isinstance(factors, list) and len(factors) == size // 2):
                        raise ValueError(
                            f"`rope_parameters`'s {key!r} needs {size // 2} numbers for the head size {size} "
                            f"(`{field}`), got {factors!r}."
                        )

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Validates the fields first: one changed on a built model (behaviour fields may be) to a value the config
        rejects would otherwise be written into a checkpoint that cannot be loaded."""
        self._validate()
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def _rotary_head_sizes(self) -> dict[str, int]:
        """The head size of every attention that applies rotary, by the field that sets it: the backbone's and, for
        experts that attend, the experts' own."""
        sizes = {"head_dim": self.head_dim or self.hidden_size // self.num_attention_heads}
        if self.expert_type in ATTENTION_EXPERT_TYPES:
            sizes["recurrent_num_heads"] = self.hidden_size // self.recurrent_num_heads
        return sizes


class _Rule(NamedTuple):
    """What a field accepts: `accepts(value)` checks a value, `allowed` says it in the error message."""

    allowed: str
    accepts: Callable[[Any], bool]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_number(value) -> bool:
    # An int is fine where a float is expected; inf and nan are not: they pass a range check and break the model.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _optional(rule: _Rule, none_means: str) -> _Rule:
    return _Rule(f"{rule.allowed} or None ({none_means})", lambda v: v is None or rule.accepts(v))


def _one_of(choices) -> _Rule:
    # Compared by equality (a list of names, e.g.): a dict's `in` would hash the value and fail on unhashable ones.
    return _Rule(f"one of {list(choices)}", lambda v: v in list(choices))


_POSITIVE_INT = _Rule("a positive integer", lambda v: _is_int(v) and v >= 1)
_POSITIVE = _Rule("a finite number > 0", lambda v: _is_number(v) and v > 0)
_NON_NEGATIVE = _Rule("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
_FRACTION = _Rule("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)
_BOOL = _Rule("a bool", lambda v: isinstance(v, bool))


def _token_id_rule(vocab_size) -> _Rule:
    return _Rule(
        f"an integer token id in [0, {vocab_size}) (vocab_size) or None",
        lambda v: v is None or (_is_int(v) and 0 <= v < vocab_size),
    )


__all__ = ["MoREConfig"]
