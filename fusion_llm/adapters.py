"""Adapters: project one backbone tap (..., hidden_size) into the shared width (..., shared_width)."""

from __future__ import annotations

from torch import nn

from fusion_llm.config import AdapterSpec


def build_adapter(spec: AdapterSpec, in_width: int, out_width: int) -> nn.Sequential:
    """A trainable projection of one tap.

    Args:
        spec: kind (``linear`` / ``lowrank`` / ``mlp``), rank, hidden, layer_norm, dropout.
        in_width: the backbone's hidden size.
        out_width: the shared width.

    Returns:
        ``nn.Sequential``: [LayerNorm] -> projection -> [Dropout].
    """
    layers: list[nn.Module] = []
    if spec.layer_norm:
        # Taps are pre-norm residual streams whose scale grows with depth; normalise first.
        layers.append(nn.LayerNorm(in_width))
    if spec.kind == "linear":
        layers.append(nn.Linear(in_width, out_width))
    elif spec.kind == "lowrank":
        layers += [nn.Linear(in_width, spec.rank, bias=False), nn.Linear(spec.rank, out_width)]
    else:  # mlp
        hidden = spec.hidden or 2 * out_width
        layers += [nn.Linear(in_width, hidden), nn.GELU(), nn.Linear(hidden, out_width)]
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    return nn.Sequential(*layers)
