"""The grokking splits as tensors: one `SplitData` per split, the union of the four tasks.

The holdout (for choosing merge settings) is carved out of each task's *training* pairs; the
validation pairs are exactly the seed baseline's (`split_indices` gives the same validation set with
or without a holdout), so every method is scored on the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fusion_llm.data.grokking import TASKS, build_grokking_dataset


@dataclass
class SplitData:
    """One split of the union of the tasks.

    Attributes:
        name: ``train``, ``holdout`` or ``validation``.
        input_ids: (N, 4) ``[x, op, y, =]`` in the shared grokking vocabulary.
        labels: (N,) answer class ids (0..216).
        task_ids: (N,) index into `TASKS`.
        dataset: the same rows as a `datasets.Dataset` (columns ``text``, ``label``, ``task``, ...).
    """

    name: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    task_ids: torch.Tensor
    dataset: object

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def texts(self) -> list[str]:
        if getattr(self, "_texts", None) is None:
            self._texts = list(self.dataset["text"])
        return self._texts

    def task_indices(self, task: str) -> torch.Tensor:
        return torch.nonzero(self.task_ids == TASKS.index(task)).flatten()

    def sample(self, per_task: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
        """A fixed seeded subset of each task's indices (all of them when ``per_task`` is None)."""
        out = {}
        for task in TASKS:
            idx = self.task_indices(task)
            if per_task is not None and len(idx) > per_task:
                order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
                idx = idx[order[:per_task]].sort().values
            out[task] = idx
        return out


def load_splits(split_seed: int, holdout_fraction: float, max_per_task: int | None = None) -> dict[str, SplitData]:
    """``train`` / ``holdout`` / ``validation`` of the union of all tasks.

    Args:
        split_seed: the split seed (`fusion_llm.data.grokking.split_indices`).
        holdout_fraction: share of each task's training pairs moved to ``holdout``.
        max_per_task: keep a seeded subset of at most this many rows per task and split (smoke runs).
    """
    raw = build_grokking_dataset(TASKS, seed=split_seed, holdout_fraction=holdout_fraction)
    splits = {}
    for name, ds in raw.items():
        task_ids = np.array([TASKS.index(t) for t in ds["task"]])
        if max_per_task is not None:
            rng = np.random.default_rng([split_seed, 7])
            keep = [np.sort(rng.permutation(np.flatnonzero(task_ids == i))[:max_per_task]) for i in range(len(TASKS))]
            ds = ds.select(np.concatenate(keep).tolist())
            task_ids = np.array([TASKS.index(t) for t in ds["task"]])
        splits[name] = SplitData(
            name=name,
            input_ids=torch.tensor(ds["input_ids"], dtype=torch.long),
            labels=torch.tensor(ds["label"], dtype=torch.long),
            task_ids=torch.from_numpy(task_ids),
            dataset=ds,
        )
    return splits
