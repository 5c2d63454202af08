"""``attention``: a learned query attends over the set of adapted taps (multi-head)."""

import dataclasses

import torch
from torch import nn

from fusion_llm.errors import ConfigError
from fusion_llm.fusion.registry import FusionMethod, register_fusion


@register_fusion("attention")
class AttentionFusion(FusionMethod):
    @dataclasses.dataclass
    class Options:
        num_heads: int = 4
        dropout: float = 0.0

    def __init__(self, num_inputs, width, options):
        super().__init__(num_inputs, width, options)
        if width % options.num_heads:
            raise ConfigError(f"fusion.num_heads: {options.num_heads} does not divide shared_width {width}")
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        # A learned embedding per input tells the query which backbone/tap each feature came from.
        self.source_embedding = nn.Parameter(torch.zeros(num_inputs, width))
        self.attn = nn.MultiheadAttention(width, options.num_heads, dropout=options.dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lead = features.shape[:-2]
        keys = (features + self.source_embedding).reshape(-1, self.num_inputs, self.width)  # (B*, N, W)
        query = self.query.expand(keys.shape[0], 1, self.width)  # (B*, 1, W)
        out, _ = self.attn(query, keys, keys, need_weights=False)  # (B*, 1, W)
        return self.norm(out.squeeze(1)).reshape(*lead, self.width)
