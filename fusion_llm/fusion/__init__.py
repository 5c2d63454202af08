"""Fusion methods: each combines N adapted taps (..., N, W) into one feature (..., W).

One file per method, registered by name with `@register_fusion`. A method's options are a
dataclass; the config's ``fusion`` mapping is ``{"method": name, **options}``.
"""

from fusion_llm.fusion.registry import (
    FusionMethod,
    available_fusions,
    build_fusion,
    get_fusion,
    register_fusion,
    validate_fusion_options,
)

# Importing the method modules registers them.
from fusion_llm.fusion import attention, concat, gated, weighted  # noqa: E402,F401

__all__ = [
    "FusionMethod", "available_fusions", "build_fusion", "get_fusion", "register_fusion",
    "validate_fusion_options",
]
