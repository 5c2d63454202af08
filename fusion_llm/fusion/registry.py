"""The registry of fusion methods (name -> module class + options dataclass)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn

from fusion_llm.errors import ConfigError

_REGISTRY: dict[str, type["FusionMethod"]] = {}


class FusionMethod(nn.Module):
    """Base class: combines ``num_inputs`` features of width ``width``.

    Subclasses set ``Options`` (a dataclass of their settings) and implement
    ``forward(features)`` with features (..., num_inputs, width) -> (..., width).
    The leading dimensions are (batch,) for sequence-level heads and (batch, length) for
    token-level heads; methods act on the last two dimensions only, so every method works per position.
    """

    name: str = ""

    @dataclasses.dataclass
    class Options:
        dropout: float = 0.0

    def __init__(self, num_inputs: int, width: int, options):
        super().__init__()
        self.num_inputs = num_inputs
        self.width = width
        self.options = options


def register_fusion(name: str) -> Callable[[type[FusionMethod]], type[FusionMethod]]:
    """Class decorator: make a `FusionMethod` available under ``name``."""

    def wrap(cls: type[FusionMethod]) -> type[FusionMethod]:
        if name in _REGISTRY:
            raise ValueError(f"fusion method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_fusions() -> list[str]:
    return sorted(_REGISTRY)


def get_fusion(name: str) -> type[FusionMethod]:
    """The fusion class registered as ``name``; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"fusion.method: unknown method {name!r}; known: {', '.join(available_fusions())}") from None


def validate_fusion_options(fusion: dict) -> dict:
    """Check a ``{"method": ..., **options}`` mapping; returns it with defaults filled in."""
    fusion = dict(fusion)
    if "method" not in fusion:
        raise ConfigError(f"fusion.method: missing; known: {', '.join(available_fusions())}")
    cls = get_fusion(fusion.pop("method"))
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(fusion) - known)
    if unknown:
        raise ConfigError(f"fusion: unknown option(s) {unknown} for method {cls.name!r}; known: {sorted(known)}")
    options = cls.Options(**fusion)
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name == "dropout" and not 0.0 <= value < 1.0:
            raise ConfigError(f"fusion.dropout: must be in [0, 1), got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"fusion.{f.name}: must be positive, got {value}")
    return {"method": cls.name, **dataclasses.asdict(options)}


def build_fusion(fusion: dict, num_inputs: int, width: int) -> FusionMethod:
    """Instantiate the fusion module described by a validated ``fusion`` mapping."""
    fusion = validate_fusion_options(fusion)
    cls = get_fusion(fusion.pop("method"))
    return cls(num_inputs, width, cls.Options(**fusion))
