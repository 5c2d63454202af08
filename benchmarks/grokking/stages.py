"""Building blocks shared by the stages: the run context, scoring a model, and training fusion heads.

A stage returns a *record* (JSON-ready) for one method and one seed::

    {"group", "track", "per_task": {task: {"val_acc", "val_loss", "train_acc", "train_loss",
     "step_val_acc_99", "train_flops_to_99"}}, "trainable_params", "total_params", "wall_s", "upstream_wall_s",
     "train_flops", "upstream_flops", "total_train_flops", "inference_ms_per_1000", "inference_flops_per_1000",
     "inference_peak_mib", "memory_method", "weights_mib", "produce_peak_mib",
     "curve": {task: [[step, val_acc], ...]}, "details": {...}}

Compute is counted in full: ``train_flops`` is what producing the method itself took (a model's updates; a
merge's holdout search; a fusion head's feature extraction over the training rows plus its updates),
``upstream_flops`` what the models it is built from took (the base and the experts), ``total_train_flops`` both;
``train_flops_to_99`` the total compute spent when val acc first passed 0.99 on a task (upstream included).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.utils import logging as hf_logging

from benchmarks.grokking.data import SplitData
from benchmarks.grokking.measure import (
    LogitsFn,
    PeakMemory,
    counting_flops,
    evaluate,
    inference_cost,
    mixed_rows,
    weights_mib,
)
from benchmarks.grokking.presets import ComparePreset
from benchmarks.store import Store, recipe_key
from benchmarks.grokking.training import fit
from fusion_llm.config import FusionConfig
from fusion_llm.data.grokking import TASKS
from fusion_llm.data.pipeline import Collator
from benchmarks.grokking.experts import NUM_CLASSES
from fusion_llm.features import FeatureCache
from fusion_llm.modeling import FusionModel


@dataclass
class Context:
    """What every stage of one run shares.

    Attributes:
        preset: the run's preset.
        splits: ``train`` / ``holdout`` / ``validation`` (`SplitData`).
        store: the resumable cache.
        log: progress lines.
        val_rows: task -> every validation row (final metrics).
        probe_rows: task -> the validation probe evaluated during training.
        train_rows: task -> the training rows scored for the final train metrics.
        holdout_rows: task -> every holdout row (merge selection).
        inference_rows: rows timed for inference (validation, mixed tasks).
    """

    preset: ComparePreset
    splits: dict[str, SplitData]
    store: Store
    log: Callable[[str], None] = print
    val_rows: dict = field(init=False)
    probe_rows: dict = field(init=False)
    train_rows: dict = field(init=False)
    holdout_rows: dict = field(init=False)
    inference_rows: torch.Tensor = field(init=False)

    def __post_init__(self):
        p = self.preset
        self.val_rows = self.splits["validation"].sample(None)
        self.probe_rows = self.splits["validation"].sample(p.probe_examples_per_task, seed=1)
        self.train_rows = self.splits["train"].sample(p.train_eval_examples_per_task, seed=2)
        self.holdout_rows = self.splits["holdout"].sample(None)
        self.inference_rows = mixed_rows(self.val_rows, p.inference_examples)

    @property
    def data_recipe(self) -> dict:
        p = self.preset
        return {"split_seed": p.split_seed, "holdout_fraction": p.holdout_fraction,
                "max_examples_per_task": p.max_examples_per_task, "probe": p.probe_examples_per_task,
                "train_eval": p.train_eval_examples_per_task}


@contextlib.contextmanager
def seeded(seed: int):
    """Initialise under a forked, seeded RNG: the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def score(ctx: Context, logits_for: Callable[[str], LogitsFn]) -> dict[str, dict]:
    """Final per-task metrics: every validation row, and the train-eval rows of the training split.

    Args:
        logits_for: split name -> a function from that split's row indices to logits.
    """
    val = evaluate(logits_for("validation"), ctx.splits["validation"].labels, ctx.val_rows)
    train = evaluate(logits_for("train"), ctx.splits["train"].labels, ctx.train_rows)
    return {task: {"val_acc": val[task]["acc"], "val_loss": val[task]["loss"], "train_acc": train[task]["acc"],
                   "train_loss": train[task]["loss"], "step_val_acc_99": None} for task in val}


def curve_by_task(curve: list[dict]) -> dict[str, list[list[float]]]:
    """``fit``'s curve as task -> [[step, probe val acc], ...]."""
    out: dict[str, list] = {}
    for point in curve:
        for task, metrics in point.get("val", {}).items():
            out.setdefault(task, []).append([point["step"], metrics["acc"]])
    return out


def trained_per_task(per_task: dict, training: dict) -> dict:
    """Add ``step_val_acc_99`` (None when never reached) from a ``fit`` result to final metrics."""
    for task, step in training["step_val_acc_99"].items():
        if task in per_task:
            per_task[task]["step_val_acc_99"] = step
    return per_task


def add_flops(*values: float | None) -> float | None:
    """The sum, or None when any part is unknown (a record cached before FLOPs were counted)."""
    return None if any(v is None for v in values) else float(sum(values))


def make_record(group: str, track: str, per_task: dict, *, trainable: int, total: int, wall_s: float,
                cost: dict, weights: float, trained_tasks=(), produce_peak_mib: float = 0.0,
                upstream_wall_s: float = 0.0, curve: dict | None = None, details: dict | None = None,
                train_flops: float | None = None, upstream_flops: float | None = 0.0,
                flops_per_update: float | None = None, fixed_flops: float = 0.0) -> dict:
    """One method's record for one seed (see the module docstring); ``trained_tasks``: the tasks whose
    ``step_val_acc_99`` is meaningful (the method trained on them). With ``flops_per_update`` each task that
    reached 0.99 gets ``train_flops_to_99`` = upstream + ``fixed_flops`` (spent before the first update, such as
    feature extraction) + that many updates."""
    if flops_per_update is not None:
        for entry in per_task.values():
            step = entry.get("step_val_acc_99")
            entry["train_flops_to_99"] = None if step is None else add_flops(upstream_flops, fixed_flops,
                                                                              flops_per_update * step)
    return {"group": group, "track": track, "per_task": per_task, "trained_tasks": list(trained_tasks),
            "trainable_params": int(trainable),
            "total_params": int(total), "wall_s": wall_s, "upstream_wall_s": upstream_wall_s,
            "train_flops": train_flops, "upstream_flops": upstream_flops,
            "total_train_flops": add_flops(train_flops, upstream_flops), **cost,
            "weights_mib": weights, "produce_peak_mib": produce_peak_mib, "curve": curve or {},
            "details": details or {}}


# ---- fusion heads over frozen experts ---------------------------------------------------------------

def fusion_config(preset: ComparePreset, folders: dict[str, str], method: str) -> FusionConfig:
    """A classification `FusionConfig` over expert folders: last-layer tap, last-token pooling, 217 labels."""
    backbones = [dict(name=name, model=str(path), tap_layers=[-1], quantization=preset.quantization,
                      compute_dtype="float32") for name, path in folders.items()]
    return FusionConfig(backbones=backbones, shared_width=preset.shared_width, fusion={"method": method},
                        head={"kind": "classification", "num_labels": NUM_CLASSES, "pooling": "last"})


def tokenize_for_backbones(dataset, tokenizers: dict, fingerprint: str):
    """Each backbone's own ``input_ids`` of the ``text`` column, and ``labels`` (`FeatureCache`'s input).

    Like `fusion_llm.data.pipeline.tokenize_splits`, but the result's fingerprint is given: datasets
    would otherwise hash the tokenizers through dill to name the result, which takes about 40 s for
    the four real ones (the Gemma vocabulary alone has 262k entries).
    """
    def encode(batch):
        out = {"labels": batch["label"]}
        for name, tokenizer in tokenizers.items():
            out[f"{name}_input_ids"] = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, new_fingerprint=fingerprint)


class FrozenFeatures:
    """The frozen experts of one track, loaded once, and their pooled features of each split (cached on disk).

    Args:
        ctx: the run context.
        folders: backbone name -> expert folder.
        keys: backbone name -> the expert's recipe key (names the tokenized data, so the feature cache
            is found again when a run resumes).
    """

    def __init__(self, ctx: Context, folders: dict[str, str], keys: dict[str, str]):
        start = time.perf_counter()
        self.config = fusion_config(ctx.preset, folders, "concat")
        bars = hf_logging.is_progress_bar_enabled()
        self.backbones = FusionModel.load_backbones(self.config)
        if not bars:  # load_backbone turns transformers' progress bars back on
            hf_logging.disable_progress_bar()
        model = FusionModel(self.config, self.backbones)
        tokenizers = {n: b.tokenizer for n, b in self.backbones.items()}
        pad_ids = {n: b.tokenizer.pad_token_id for n, b in self.backbones.items()}
        cache = FeatureCache(ctx.store.root / "features", model, limit_bytes=8e9)
        self.features, self.labels = {}, {}
        for split in ("train", "validation"):
            name = recipe_key("tokenized", {"split": split, "experts": keys, "data": ctx.data_recipe})
            tokenized = tokenize_for_backbones(ctx.splits[split].dataset, tokenizers, name)
            table = cache.build(tokenized, Collator(pad_ids), batch_size=512, log=lambda *_: None)[:]  # tensors
            self.features[split] = {n: [table[f"{n}_tap{i}"] for i in range(len(b.spec.tap_layers))]
                                    for n, b in self.backbones.items()}
            self.labels[split] = table["labels"]
            if not torch.equal(self.labels[split], ctx.splits[split].labels):
                raise RuntimeError(f"feature cache rows of {split} are out of order")
            if split == "train":  # extracting the training rows' features is part of training a head
                sample = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(0))[:256].tolist()
                batch = Collator(pad_ids)([tokenized[i] for i in sample])
                with counting_flops() as counter, torch.no_grad():
                    model.features(batch["inputs"])
                self.train_flops = counter.get_total_flops() * len(tokenized) / len(sample)  # a 256-row sample
        self.wall_s = time.perf_counter() - start

    def select(self, split: str, rows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {n: [t[rows] for t in taps] for n, taps in self.features[split].items()}


def fusion_head_record(ctx: Context, seed: int, track: str, frozen: FrozenFeatures, method: str,
                       head_folder, upstream_wall_s: float, upstream_flops: float | None) -> dict:
    """Train one fusion head on the union's cached features and measure it (end to end for inference)."""
    preset = ctx.preset
    config = fusion_config(preset, {n: b.spec.model for n, b in frozen.backbones.items()}, method)
    with PeakMemory() as peak:
        start = time.perf_counter()
        with seeded(seed):
            model = FusionModel(config, frozen.backbones)
        head = model.head
        labels = frozen.labels["train"]

        def batch_logits(rows):
            return head(frozen.select("train", rows)).logits, labels[rows]

        def probe():
            return evaluate(lambda rows: head(frozen.select("validation", rows)).logits,
                            frozen.labels["validation"], ctx.probe_rows)

        training = fit(head, batch_logits, len(labels), preset.head_for(track), seed, probe, ctx.log)
        wall = time.perf_counter() - start + frozen.wall_s
    model.save_pretrained(head_folder)  # the head alone: config naming the experts + trainable weights
    per_task = score(ctx, lambda split: (lambda rows: head(frozen.select(split, rows)).logits))
    texts = ctx.splits["validation"].texts
    batches = [model.tokenize([texts[i] for i in chunk.tolist()]) for chunk in ctx.inference_rows.split(250)]
    cost = inference_cost(lambda inputs: model(inputs=inputs).logits, batches, len(ctx.inference_rows))
    frozen_params = sum(p.numel() for b in frozen.backbones.values() for p in b.model.parameters())
    trainable = sum(p.numel() for p in head.parameters())
    return make_record(
        "fusion", track, trained_per_task(per_task, training), trainable=trainable, total=trainable + frozen_params,
        wall_s=wall, cost=cost, weights=weights_mib(head, *[b.model for b in frozen.backbones.values()]),
        trained_tasks=TASKS,
        produce_peak_mib=peak.mib, upstream_wall_s=upstream_wall_s, curve=curve_by_task(training["curve"]),
        train_flops=frozen.train_flops + training["train_flops"], upstream_flops=upstream_flops,
        flops_per_update=training["flops_per_update"], fixed_flops=frozen.train_flops,
        details={"feature_extraction_s": frozen.wall_s, "head_training_s": training["wall_s"],
                 "feature_extraction_flops": frozen.train_flops, "head_training_flops": training["train_flops"],
                 "updates": training["num_updates"], "fusion": config.fusion,
                 "quantization": preset.quantization, "head_folder": str(head_folder),
                 "experts": {n: b.spec.model for n, b in frozen.backbones.items()}},
    )
