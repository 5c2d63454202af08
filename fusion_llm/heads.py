"""Output heads over the fused feature, and the per-backbone pooling of the classification path."""

from __future__ import annotations

import torch
from torch import nn


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str = "last") -> torch.Tensor:
    """Pool token features to one vector per sequence.

    Args:
        hidden: (B, L, H) token features.
        attention_mask: (B, L), 1 for real tokens; padding may be on either side.
        kind: ``last`` (last real token) or ``mean`` (mean over real tokens).

    Returns:
        (B, H)
    """
    mask = attention_mask.to(hidden.device)
    if kind == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)  # index of the last real token, whichever side pads
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationHead(nn.Module):
    """Dropout and a linear layer from the fused feature (B, W) to label logits (B, num_labels)."""

    def __init__(self, width: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_labels)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(fused))


class AnchorResidualHead(nn.Module):
    """The LM head's trainable part: a zero-initialised residual (B, T, W) -> (B, T, anchor hidden).

    The fused model adds it to the anchor's last (pre-norm) hidden state and applies the anchor's
    own frozen final norm and LM head, so at initialisation it reproduces the anchor exactly.
    """

    def __init__(self, width: int, anchor_width: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, anchor_width)
        self.zero_init()

    def zero_init(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(fused))


class PredictionMixer(nn.Module):
    """Per-position log-linear weights of the anchor and each source's predictions (``head.source_predictions``).

    A zero-initialised linear layer over the fused feature and the members' confidences: at initialisation every
    weight is zero, so the fused model is the anchor exactly.
    """

    def __init__(self, in_width: int, members: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_width)
        self.out = nn.Linear(in_width, members)
        self.zero_init()

    def zero_init(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(features))  # (..., members)
