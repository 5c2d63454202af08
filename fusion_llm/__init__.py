"""fusion_llm: fuse frozen LLMs of different families through their hidden states.

The public API, by layer (each name is imported on first use, so ``import fusion_llm`` stays light)::

    config      FusionConfig, BackboneSpec            what to fuse; RunConfig, load_run_config: a whole run
    backbones   load_backbone, FrozenBackbone         one frozen (quantized, truncated) backbone and its taps
    fusion      get_fusion, register_fusion           fusion methods by name
    heads       FusionHead                            everything that trains (adapters, fusion, output head)
    modeling    FusionModel                           backbones + head: forward, lm_forward, generate
    training    train                                 the one training loop, under accelerate
    generation  generate                              decoding with a fused LM
    scoring     score_fused, score_causal_lm, LMScore bits per byte across tokenizers
    harness     FusedLM                               a fused LM as an lm-evaluation-harness model
    budget      plan, check_budget                    parameters and memory before anything loads
    merging     merge_in_memory, merge_from_disk      mergekit merges (the comparison's baselines)
    errors      ConfigError, BudgetError, ...         one-line errors naming the field and the fix
"""

from __future__ import annotations

import importlib
import os

# An LM head's logits over a 262k-token vocabulary are ~0.5 GB of fresh CPU memory each step; with transparent huge
# pages torch's CPU allocator page-faults far less on such tensors (a fresh 0.5 GB tensor: 0.21 s -> 0.03 s here).
# Read by torch at its first large allocation; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
from typing import TYPE_CHECKING

_EXPORTS = {
    "FusionConfig": "config", "BackboneSpec": "config",
    "RunConfig": "runconfig", "load_run_config": "runconfig", "build_run_config": "runconfig",
    "load_backbone": "backbones", "FrozenBackbone": "backbones",
    "get_fusion": "fusion", "register_fusion": "fusion", "available_fusions": "fusion",
    "FusionHead": "heads", "FusionModel": "modeling", "FusionOutput": "heads",
    "train": "training", "generate": "generation",
    "score_fused": "scoring", "score_causal_lm": "scoring", "LMScore": "scoring", "FusedLM": "harness",
    "plan": "budget", "check_budget": "budget",
    "merge_in_memory": "merging", "merge_from_disk": "merging",
    "ConfigError": "errors", "BudgetError": "errors", "MergeRefused": "errors", "NonFiniteLoss": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fusion_llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fusion_llm.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from fusion_llm.backbones import FrozenBackbone, load_backbone
    from fusion_llm.budget import check_budget, plan
    from fusion_llm.config import BackboneSpec, FusionConfig
    from fusion_llm.errors import BudgetError, ConfigError, MergeRefused, NonFiniteLoss
    from fusion_llm.fusion import available_fusions, get_fusion, register_fusion
    from fusion_llm.generation import generate
    from fusion_llm.heads import FusionHead, FusionOutput
    from fusion_llm.merging import merge_from_disk, merge_in_memory
    from fusion_llm.modeling import FusionModel
    from fusion_llm.runconfig import RunConfig, build_run_config, load_run_config
    from fusion_llm.scoring import LMScore, score_causal_lm, score_fused
    from fusion_llm.training import train
