"""Datasets: the grokking tasks, text corpora and collators (all `datasets`-based)."""

from fusion_llm.data.grokking import (
    DEFAULT_SPLIT_SEED,
    TASKS,
    VOCABULARY,
    build_grokking_dataset,
    build_task_dataset,
    build_union_dataset,
    split_indices,
    task_examples,
)

__all__ = [
    "DEFAULT_SPLIT_SEED", "TASKS", "VOCABULARY", "build_grokking_dataset", "build_task_dataset",
    "build_union_dataset", "split_indices", "task_examples",
]
