"""The README's "Add your own expert" example: importing this module registers `expert_type="toy"`."""

import math

import torch
from torch import nn
from transformers import initialization as init


try:  # shipped with a checkpoint (trust_remote_code): one package with the model files
    from .modeling_more import MoRERecurrentExperts, grouped_linear, register_expert
except ImportError:  # installed: top-level modules
    from modeling_more import MoRERecurrentExperts, grouped_linear, register_expert


class ToyExperts(MoRERecurrentExperts):
    """Per expert, a tanh RNN cell run r weight-tied steps on its routed token: s = tanh(W s + U x)."""

    def __init__(self, config):
        super().__init__(config)
        d, n = config.hidden_size, config.num_experts
        self.w_state = nn.Parameter(torch.empty(n, d, d))  # stacked over experts: (experts, out, in)
        self.w_input = nn.Parameter(torch.empty(n, d, d))

    def initialize_parameters(self, std):
        super().initialize_parameters(std)  # normal(std) for every weight, zeros for biases
        init.normal_(self.w_state, std=0.5 / math.sqrt(self.hidden_size))  # a contractive loop at init

    def encode(self, x, dispatch):  # the loop's input, projected once for all steps
        return grouped_linear(x, self.w_input, dispatch.offs)

    def step(self, state, static, dispatch, step_idx, prepared):
        return torch.tanh(grouped_linear(state, self.w_state, dispatch.offs) + static)

    def regularisation_loss(self):  # added to the training loss as `expert_loss`
        return 1e-3 * self.w_state.pow(2).sum(dim=(1, 2)).mean()

    @classmethod
    def multiply_adds_per_token(cls, config, num_steps):  # FLOPs accounting: input once, state matmul per step
        return (1 + num_steps) * config.hidden_size**2


register_expert("toy", ToyExperts)
