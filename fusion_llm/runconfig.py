"""The YAML schema of a run: ``model`` (a FusionConfig), ``data``, ``train``, ``output_dir``, ``tracker``.

Loaded with `load_run_config(path, overrides)`; unknown keys are errors; single keys can be
overridden from the command line as ``--train.lr 3e-4`` or ``--data.max_length=64``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusion_llm.config import FusionConfig, _from_dict
from fusion_llm.errors import ConfigError
from fusion_llm.paths import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def _check_seed(where: str, seed: int) -> None:
    if not 0 <= seed < 2 ** 32:  # what numpy, datasets and accelerate's set_seed take
        raise ConfigError(f"{where}.seed: expected a whole number from 0 to 2**32 - 1, got {seed}")


@dataclass
class DataConfig:
    """Where examples come from.

    Args:
        task: a built-in task (``topics``, ``python_docs`` (text), or a grokking task such as ``x_plus_y`` /
            ``grokking_all``); when no source is given, ``topics``, or ``python_docs`` for an LM head.
        dataset: a HF dataset name (loaded with ``datasets.load_dataset``; needs the hub or its cache).
        files: local data files, ``{"train": path, "validation": path}`` (json/jsonl/csv/parquet/txt);
            ``cache:text/mixture/train.jsonl`` names a file in the fusion_llm cache (the prepared corpora).
        text_column, label_column: column names.
        max_length: longest token sequence per backbone (longer inputs are truncated with a warning).
        train_split, eval_split: split names.
        max_train_examples, max_eval_examples: optional caps (quick runs).
        seed: seed of built-in task generation and splits.
    """

    task: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    files: dict | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 64
    train_split: str = "train"
    eval_split: str = "validation"
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    seed: int = 0

    def __post_init__(self):
        sources = [x for x in (self.task, self.dataset, self.files) if x]
        if not sources:
            self.task = "topics"
        elif len(sources) != 1:
            raise ConfigError("data: give exactly one of task, dataset or files")
        _check_seed("data", self.seed)
        if self.max_length <= 0:
            raise ConfigError(f"data.max_length: must be positive, got {self.max_length}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{key}: must be positive, got {value}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    Args:
        lr, weight_decay, warmup_steps, schedule (``cosine`` / ``linear`` / ``constant``): AdamW and its schedule.
        member_lr: learning rate of the member adapters (``backbones[].lora_rank``); default ``lr``.
        mixer_lr: learning rate of the prediction mixer (``head.source_predictions``); default ``lr``.
        batch_size: examples per process per micro-step; the effective batch is
            batch_size x gradient_accumulation x number of processes.
        gradient_accumulation, grad_clip: as usual (grad_clip 0 disables clipping).
        max_steps: optimizer steps (takes precedence over ``epochs`` when both are given).
        epochs: passes over the training set when ``max_steps`` is None.
        eval_every: evaluate every N optimizer steps (and at the end).
        checkpoint_every, keep_checkpoints: `accelerator.save_state` cadence and how many to keep.
        seed: seed of head initialisation, data order and dropout.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (accelerate).
        cache_features: train from an on-disk cache of the frozen backbones' features
            (under the fusion_llm cache folder, keyed by backbones + taps + data).
        cache_limit_gb: refuse to write a cache larger than this.
        init_head: a saved head (a `FusionModel.save_pretrained` folder) over the same backbones to start from:
            every part of the new head that it holds (same name and shape) starts from its weights; parts it
            lacks (say the prediction mixer of ``head.source_predictions``, added to a trained hidden-state head)
            keep their initialisation.
        train_only: names of the head's parts that train (prefixes of its parameter names, e.g. ``[mixer]``);
            the rest stays as initialised or loaded (``init_head``). Default: the whole head trains.
    """

    lr: float = 1e-3
    member_lr: float | None = None
    mixer_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"
    batch_size: int = 16
    gradient_accumulation: int = 1
    grad_clip: float = 1.0
    max_steps: int | None = 60
    epochs: float | None = None
    eval_every: int = 20
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"
    cache_features: bool = False
    cache_limit_gb: float = 20.0
    init_head: str | None = None
    train_only: list | None = None

    def __post_init__(self):
        _check_seed("train", self.seed)
        if self.init_head is not None and not (isinstance(self.init_head, str) and self.init_head):
            raise ConfigError(f"train.init_head: expected the path of a saved head, got {self.init_head!r}")
        if self.train_only is not None and (not isinstance(self.train_only, list) or not self.train_only
                                            or not all(isinstance(x, str) and x for x in self.train_only)):
            raise ConfigError(f"train.train_only: expected a non-empty list of head part names (e.g. [mixer]), "
                              f"got {self.train_only!r}")
        positive = ["lr", "batch_size", "gradient_accumulation", "eval_every", "checkpoint_every", "keep_checkpoints"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}: must be positive, got {getattr(self, key)}")
        for key in ("member_lr", "mixer_lr"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"train.{key}: must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "warmup_steps", "grad_clip", "cache_limit_gb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must not be negative, got {getattr(self, key)}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"train.schedule: {self.schedule!r} is not one of cosine, linear, constant")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision: {self.mixed_precision!r} is not one of no, bf16, fp16")
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train: give max_steps or epochs")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps: must be positive, got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs: must be positive, got {self.epochs}")


@dataclass
class RunConfig:
    model: dict
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "outputs/run"
    tracker: str = "auto"

    def __post_init__(self):
        if self.tracker not in ("auto", "tensorboard", "jsonl", "none"):
            raise ConfigError(f"tracker: {self.tracker!r} is not one of auto, tensorboard, jsonl, none")

    def fusion_config(self) -> FusionConfig:
        return FusionConfig(**copy.deepcopy(self.model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(text: str) -> Any:
    """A command-line value as YAML would read it (numbers, booleans, null, lists); ``3e-4`` is a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--a.b value`` / ``--a.b=value`` overrides to a nested dict (copy)."""
    data = copy.deepcopy(data)
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r}: expected --section.key value")
        key, _, value = item[2:].partition("=")
        if not _:
            if not items:
                raise ConfigError(f"override --{key}: missing a value")
            value = items.pop(0)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"override --{key}: {part!r} is not a section")
            node = node[part]
        node[parts[-1]] = _coerce(value)
    return data


def resolve_paths(model: dict, base: Path) -> dict:
    """Make relative config_path / model / tokenizer entries absolute when they exist relative to ``base``."""
    model = copy.deepcopy(model)
    for b in model.get("backbones", []) or []:
        for key in ("config_path", "model", "tokenizer"):
            value = b.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                for root in (base, REPO_ROOT):
                    if (root / value).exists():
                        b[key] = str(root / value)
                        break
    return model


def expand_cache_paths(model: dict) -> dict:
    """``cache:standins/llama3`` -> the folder inside the fusion_llm cache (stand-ins, tokenizers)."""
    model = copy.deepcopy(model)
    for b in model.get("backbones", []) or []:
        for key in ("model", "tokenizer"):
            value = b.get(key)
            if isinstance(value, str) and value.startswith("cache:"):
                b[key] = str(cache_dir() / value[len("cache:"):])
    return model


#: Built-in tasks that are running text (an LM head's data); the others are labelled classification tasks.
TEXT_TASKS = ("python_docs",)


def build_run_config(data: dict, base: Path = REPO_ROOT) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("run config: expected a mapping at the top level")
    data = dict(data)
    if "model" not in data:
        raise ConfigError("model: missing (the fusion config: backbones, shared_width, fusion, head)")
    data["model"] = expand_cache_paths(resolve_paths(data["model"], base))
    if isinstance(data.get("data"), dict) and isinstance(data["data"].get("files"), dict):
        data["data"] = {**data["data"], "files": {
            split: str(cache_dir() / f[len("cache:"):]) if isinstance(f, str) and f.startswith("cache:") else f
            for split, f in data["data"]["files"].items()}}
    run = _from_dict(RunConfig, "run config", data, prefix="")
    given = data.get("data") if data.get("data") is not None else {}
    head = run.model.get("head") if isinstance(run.model, dict) else None
    if (isinstance(given, dict) and isinstance(head, dict) and head.get("kind") == "lm"
            and not any(given.get(k) for k in ("task", "dataset", "files"))):
        run.data = {**given, "task": "python_docs"}  # an LM head's built-in default is text, not topics
    run.data = _from_dict(DataConfig, "data", run.data if run.data is not None else {})
    run.train = _from_dict(TrainConfig, "train", run.train if run.train is not None else {})
    if not run.model.get("backbones"):
        raise ConfigError("model.backbones: empty; list the backbones to fuse (name, model, tap_layers, anchor)")
    fusion = run.fusion_config()  # validate the model section now
    if fusion.head_spec.kind == "lm" and run.data.task not in (None, *TEXT_TASKS):
        raise ConfigError(f"data.task: {run.data.task!r} is a labelled task, and an LM head (head.kind: lm) "
                          "learns to predict text: give data.files (the corpora: cache:text/mixture/train.jsonl and "
                          "validation.jsonl), data.dataset, or data.task: python_docs; or a classification head")
    return run


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config (the embedded default when ``path`` is None)."""
    if path is None:
        path = REPO_ROOT / "configs" / "standins_4llm.yaml"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    return build_run_config(apply_overrides(data or {}, overrides or []), base=path.parent)
