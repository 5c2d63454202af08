"""Adapters: project one backbone tap (..., hidden_size) into the shared width (..., shared_width)."""

from __future__ import annotations

from torch import nn

from fusion_llm.config import AdapterSpec

# kind -> the projection (in_width -> out_width) of that adapter kind; `AdapterSpec` validates the kind.
PROJECTIONS = {
    "linear": lambda spec, i, o: [nn.Linear(i, o)],
    "lowrank": lambda spec, i, o: [nn.Linear(i, spec.rank, bias=False), nn.Linear(spec.rank, o)],
    "mlp": lambda spec, i, o: [nn.Linear(i, spec.hidden or 2 * o), nn.GELU(), nn.Linear(spec.hidden or 2 * o, o)],
}


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
    layers += PROJECTIONS[spec.kind](spec, in_width, out_width)
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    return nn.Sequential(*layers)
