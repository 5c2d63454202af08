"""``concat``: concatenate the adapted taps and mix them with an MLP."""

import dataclasses

import torch
from torch import nn

from fusion_llm.fusion.registry import FusionMethod, register_fusion


@register_fusion("concat")
class ConcatFusion(FusionMethod):
    @dataclasses.dataclass
    class Options:
        hidden: int = 512  # MLP inner width
        dropout: float = 0.0

    def __init__(self, num_inputs, width, options):
        super().__init__(num_inputs, width, options)
        self.mlp = nn.Sequential(
            nn.Linear(num_inputs * width, options.hidden),
            nn.GELU(),
            nn.Dropout(options.dropout),
            nn.Linear(options.hidden, width),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.flatten(-2))  # (..., N, W) -> (..., N*W) -> (..., W)
