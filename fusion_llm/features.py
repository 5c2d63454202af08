"""On-disk cache of the frozen backbones' pooled taps (classification path).

Backbones are frozen, so their features for a fixed dataset never change: compute them once,
store them as Arrow (memory-mapped by ``datasets``), and train the head from the cache without
running any backbone. The cache key hashes the backbones' ids, revisions and fingerprints, the taps, the
pooling, the tokenized data and this module's ``FEATURES_VERSION``, so a change in any of them is a miss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from fusion_llm.config import ConfigError
from fusion_llm.modeling import FusionModel
from fusion_llm.paths import atomic_dir


FEATURES_VERSION = 2  # bump when the code that computes the features changes what it stores


def cache_key(model: FusionModel, data_fingerprint: str) -> str:
    """Hash of what determines the features: backbones (id, revision, config, tokenizer, weights), taps, pooling,
    data, and the feature code's version."""
    parts = {
        "version": FEATURES_VERSION,
        "backbones": {n: [b.spec.model, b.spec.revision, b.fingerprint, b.spec.resolved_taps(), b.spec.quantization,
                          b.spec.compute_dtype] for n, b in model.backbones.items()},
        "pooling": model.config.head["pooling"],
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def feature_columns(model: FusionModel) -> list[tuple[str, str, int, int]]:
    """(column, backbone, tap position, width) for every tap."""
    return [(f"{n}_tap{i}", n, i, b.hidden_size) for n, b in model.backbones.items()
            for i in range(len(b.spec.tap_layers))]


def estimate_bytes(model: FusionModel, num_examples: int) -> int:
    """Size of the cache for ``num_examples``: one float32 vector per tap per example."""
    return num_examples * sum(w for *_, w in feature_columns(model)) * 4


class FeatureCache:
    """Pooled features of one tokenized split, built once and reused.

    Args:
        root: cache folder (``<output_dir>/../feature_cache`` or the run's choice).
        model: the fused model whose backbones produce the features.
        limit_bytes: refuse to write a cache larger than this.
    """

    def __init__(self, root: str | Path, model: FusionModel, limit_bytes: float):
        self.root = Path(root)
        self.model = model
        self.limit_bytes = limit_bytes

    def path(self, dataset: Dataset) -> Path:
        return self.root / cache_key(self.model, dataset._fingerprint)

    def get(self, dataset: Dataset) -> Dataset | None:
        path = self.path(dataset)
        return load_from_disk(str(path)).with_format("torch") if (path / "dataset_info.json").is_file() else None

    def build(self, dataset: Dataset, collate, batch_size: int = 32, log=print) -> Dataset:
        """Run the backbones over ``dataset`` once and store pooled features + labels (atomic write)."""
        cached = self.get(dataset)
        if cached is not None:
            log(f"feature cache hit: {self.path(dataset)}")
            return cached
        estimate = estimate_bytes(self.model, len(dataset))
        log(f"feature cache: writing about {estimate / 2**20:.1f} MiB for {len(dataset)} examples")
        if estimate > self.limit_bytes:
            raise ConfigError(f"train.cache_limit_gb: the feature cache would take {estimate / 1e9:.2f} GB, over the "
                              f"limit of {self.limit_bytes / 1e9:.2f} GB; raise the limit or cache fewer examples")
        columns = {c: [] for c, *_ in feature_columns(self.model)}
        labels = []
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            feats = self.model.features(batch["inputs"])
            for column, name, i, _ in feature_columns(self.model):
                columns[column].append(feats[name][i].float().cpu())
            labels.append(batch["labels"])
        data = {c: torch.cat(v).numpy() for c, v in columns.items()}
        data["labels"] = torch.cat(labels).numpy()
        with atomic_dir(self.path(dataset)) as tmp:  # a failed write leaves whatever was there before
            Dataset.from_dict(data).save_to_disk(str(tmp))
        return self.get(dataset)


def collate_features(model: FusionModel):
    """Collate rows of a feature-cache dataset into ``{"features": {name: [taps]}, "labels": ...}``."""
    columns = feature_columns(model)

    def collate(rows):
        features: dict[str, list] = {}
        for column, name, _, _ in columns:
            features.setdefault(name, []).append(torch.stack([r[column] for r in rows]))
        return {"features": features, "labels": torch.stack([r["labels"] for r in rows])}

    return collate
