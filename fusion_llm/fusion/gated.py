"""``gated``: each input gets a sigmoid gate computed from itself, then the gated inputs are summed."""

import torch
from torch import nn

from fusion_llm.fusion.registry import FusionMethod, register_fusion


@register_fusion("gated")
class GatedFusion(FusionMethod):
    def __init__(self, num_inputs, width, options):
        super().__init__(num_inputs, width, options)
        # One gate per input and channel, from that input alone: (N, W) -> (N, W).
        self.gate_weight = nn.Parameter(torch.zeros(num_inputs, width, width))
        self.gate_bias = nn.Parameter(torch.zeros(num_inputs, width))
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(torch.einsum("...nw,nwv->...nv", features, self.gate_weight) + self.gate_bias)
        return self.dropout((gates * features).sum(-2) / self.num_inputs)  # (..., W)
