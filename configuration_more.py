"""MoRE (Mixture of Recurrent Experts) model configuration.

This file depends on `transformers` only; `save_pretrained` copies it next to the weights so the checkpoint loads
with `trust_remote_code=True` where MoRE is not installed.
"""

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Valid names of the registries in `modeling_more.py`; a test keeps both lists equal. `EXPERT_TYPES` is a registry:
# `modeling_more.register_expert` adds a user's expert type to it (through `register_expert_type`).
EXPERT_TYPES = ["ffn", "recurrent", "shared_recurrent", "sandwich", "parallel", "sequential"]
ROUTER_TYPES = ("linear", "gru", "rnn", "gru_token", "rnn_token")
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
        and recurrent_num_heads (the Huginn block inside recurrent experts), projection_dropout and
        projection_orthogonality_coef (`shared_recurrent` projections), parallel_gate_hidden_size (`parallel`),
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

    def _validate(self):
        """Raise a `ValueError` naming the field, the bad value and what is allowed."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "num_experts",
            "num_experts_per_tok",
            "num_recurrent_steps",
            "train_recurrent_steps_min",
            "train_recurrent_steps_max",
            "recurrent_intermediate_size",
            "recurrent_num_heads",
            "parallel_gate_hidden_size",
            "router_hidden_size",
            "num_moe_iterations",
            "adaptive_exit_min_steps",
        ):
            _check_positive_int(name, getattr(self, name))
        for name in (
            "head_dim",
            "num_backprop_steps",
            "num_backprop_iterations",
            "train_moe_iterations_min",
            "train_moe_iterations_max",
        ):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        _check_choice("expert_type", self.expert_type, EXPERT_TYPES)
        _check_choice("router_type", self.router_type, ROUTER_TYPES)
        _check_choice("recurrent_steps_sampler", self.recurrent_steps_sampler, RECURRENT_STEPS_SAMPLERS)
        _check_choice("shared_expert_gate", self.shared_expert_gate, SHARED_EXPERT_GATES)
        _check_choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
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
        if self.hidden_size % self.recurrent_num_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `recurrent_num_heads`, "
                f"got {self.recurrent_num_heads}."
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
        if self.adaptive_exit_threshold is not None and not (
            isinstance(self.adaptive_exit_threshold, (int, float)) and self.adaptive_exit_threshold > 0
        ):
            raise ValueError(
                f"`adaptive_exit_threshold` must be a number > 0 or None (off), got {self.adaptive_exit_threshold!r}."
            )
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(
                f"`shared_expert_intermediate_size` must be >= 0 (0 = no shared expert), "
                f"got {self.shared_expert_intermediate_size}."
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be > 0 or None (dropless), got {value}.")
        for name in (
            "router_jitter_noise",
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "latent_init_std",
            "projection_orthogonality_coef",
            "shared_expert_weight",
            "moe_weight",
            "moe_residual_scale",
            "router_entropy_floor",
            "router_entropy_coef",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")
        for name in ("attention_dropout", "projection_dropout", "expert_dropout", "router_logits_ema"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
        self._validate_rope()
        if not self.rms_norm_eps > 0:
            raise ValueError(f"`rms_norm_eps` must be > 0, got {self.rms_norm_eps}.")
        bad_layers = [i for i in self.mlp_only_layers if not (isinstance(i, int) and 0 <= i < self.num_hidden_layers)]
        if bad_layers:
            raise ValueError(
                f"`mlp_only_layers` must hold layer indices in [0, {self.num_hidden_layers}), got {bad_layers}."
            )

    def _validate_rope(self):
        rope_type = self.rope_parameters.get("rope_type") if isinstance(self.rope_parameters, dict) else None
        allowed = ["default", *ROPE_INIT_FUNCTIONS]
        if rope_type not in allowed:
            raise ValueError(
                f"`rope_parameters` must be a dict whose 'rope_type' is one of {allowed}, "
                f"got {self.rope_parameters!r}."
            )
        try:
            self.validate_rope()
        except KeyError as err:  # Transformers reports missing keys as KeyError
            raise ValueError(f"`rope_parameters` {self.rope_parameters!r}: {err.args[0]}") from None


def register_expert_type(name: str) -> None:
    """Accept `name` as an `expert_type` from now on (`modeling_more.register_expert` calls it)."""
    if name not in EXPERT_TYPES:
        EXPERT_TYPES.append(name)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


__all__ = ["MoREConfig"]
