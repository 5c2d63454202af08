"""Baselines reproduced from the seed experiment: the grokking transformer."""

from fusion_llm.baselines.grokking_transformer import (
    PRESETS,
    BaselineSchedule,
    GrokkingTransformer,
    build_baseline_model,
    fit_baseline,
    train_baseline,
)

__all__ = ["PRESETS", "BaselineSchedule", "GrokkingTransformer", "build_baseline_model", "fit_baseline",
           "train_baseline"]
