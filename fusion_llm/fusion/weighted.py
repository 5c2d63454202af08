"""``weighted``: a softmax-normalised learned weight per input, then a weighted sum."""

import torch
from torch import nn

from fusion_llm.fusion.registry import FusionMethod, register_fusion


@register_fusion("weighted")
class WeightedFusion(FusionMethod):
    def __init__(self, num_inputs, width, options):
        super().__init__(num_inputs, width, options)
        self.logits = nn.Parameter(torch.zeros(num_inputs))  # uniform average at start
        self.dropout = nn.Dropout(options.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.logits, dim=0).to(features.dtype)  # (N,)
        return self.dropout(torch.einsum("...nw,n->...w", features, weights))
