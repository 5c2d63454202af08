"""Configuration: one `BackboneSpec` per frozen backbone and the `FusionConfig` of a fused model.

Tap index convention (``tap_layers``): index ``k`` selects ``hidden_states[k]`` of the backbone,
where ``0`` is the embedding output and ``k`` the output of decoder layer ``k`` (1-based), so a
model with ``L`` layers has taps ``0..L``. Negative indices count from the end of the *full*
model: ``-1`` is layer ``L``. Taps are the residual stream *before* the final norm (the backbone is
loaded with ``tie_last_hidden_states=False``), so a tap means the same thing whether or not the
backbone is truncated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from fusion_llm.errors import ConfigError
from fusion_llm.fusion import validate_fusion_options

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
ADAPTER_KINDS = ("linear", "lowrank", "mlp")
HEAD_KINDS = ("classification", "lm")
POOLINGS = ("last", "mean")

# Keys transformers itself passes to (or writes from) every PreTrainedConfig; accepted, not ours.
_TRANSFORMERS_KEYS = {
    "model_type", "name_or_path", "_name_or_path", "output_attentions", "attn_implementation",
    "experts_implementation", "torch_dtype", "id2label", "label2id", "num_labels", "_commit_hash",
}


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(allowed)}")


def _typed(where: str, hint, value):
    """``value`` as the field's type ``hint`` (bool, int, float, str, list[int], optional), or a `ConfigError`
    naming the field. Takes what a user means where it is unambiguous: ``"3e-4"`` (YAML reads a number without
    a dot as a string) is a float, ``2.0`` an int; refuses non-finite numbers."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) > 1:  # e.g. str | dict: one of the kinds, checked by the field's own validation after
            kinds = tuple(typing.get_origin(o) or o for o in options)
            if not isinstance(value, kinds):
                raise ConfigError(f"{where}: expected a {' or a '.join(k.__name__ for k in kinds)}, "
                                  f"got {value!r} ({type(value).__name__})")
            return value
        hint = options[0]
    shown = f"{value!r} ({type(value).__name__})"
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown}")
    elif hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected a{'n integer' if hint is int else ' number'}, got {shown}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {shown}")
        if hint is int:
            if number != int(number):
                raise ConfigError(f"{where}: expected an integer, got {shown}")
            return int(number)
        return float(number)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {shown}")
    elif typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown}")
        return [_typed(f"{where}[{i}]", typing.get_args(hint)[0], v) for i, v in enumerate(value)]
    elif hint is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {shown}")
    return value


def _from_dict(cls, where: str, data: dict | Any, prefix: str | None = None):
    """Build dataclass `cls` from a dict, refusing unknown keys and values of the wrong type with a message
    naming `where` and the field (``prefix`` + field name; default ``where.``)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    _check_keys(where, data, {f.name for f in fields})
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if prefix is None else prefix
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{f.name}: missing; this field is required")
    data = {k: _typed(f"{prefix}{k}", hints[k], v) for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as err:  # a check that met a value it did not expect
        raise ConfigError(f"{where}: {err}") from None


_DEVICE = re.compile(r"auto|cpu|meta|mps|disk|cuda(:\d+)?|\d+")


def _is_device_map(value) -> bool:
    def device(v) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            isinstance(v, str) and bool(_DEVICE.fullmatch(v)))

    if isinstance(value, dict):
        return bool(value) and all(isinstance(k, str) and device(v) and v != "auto" for k, v in value.items())
    return isinstance(value, str) and device(value)


@dataclass
class BackboneSpec:
    """One frozen backbone and where it is tapped.

    Args:
        name: short unique name, used as a key for weights and features (e.g. ``"llama"``).
        model: hub id or local ``from_pretrained`` directory.
        revision: hub revision (commit, tag or branch); recorded in saved heads.
        tokenizer: tokenizer path or id; defaults to ``model``.
        tap_layers: hidden-state indices to tap (0 = embeddings, k = layer k, -1 = last layer).
        quantization: ``nf4`` / ``fp4`` (bitsandbytes 4-bit), ``int8`` or ``none``.
        compute_dtype: dtype the backbone computes in.
        anchor: the backbone whose vocabulary an LM head predicts (exactly one for ``head.kind: lm``).
        config_path: a local ``config.json`` describing the model, used by the budget plan and
            validation when ``model`` is a hub id that is not available locally.
        max_length: longest token sequence fed to this backbone (defaults to the model's maximum).
        lora_rank: member adapters (LM heads only): LoRA of this rank on every Linear of the backbone's loaded
            decoder layers, trained with the head and saved with it (`fusion_llm.member_lora`); the backbone's
            own weights stay frozen and bit-identical, gradients flow through them as in QLoRA. 0 = none.
        lora_alpha: LoRA scale numerator (the update is ``B @ A * lora_alpha / lora_rank``); default
            ``2 * lora_rank``, the LoRA recipe of the benchmarks' control.
        lora_lr: learning rate of this backbone's member adapters; default ``train.member_lr``.
        device_map: where this backbone's weights go (``from_pretrained``'s ``device_map``): ``"auto"`` (spread
            over the visible GPUs), ``"cpu"``, ``"cuda:1"``, or a ``{module: device}`` dict; default the run's
            (under accelerate the process's own GPU). Placing each backbone on its own GPU fits models that one GPU
            cannot hold; the head gathers their features on its own device.
        lora_modules: filled in when the head is built: ``{module path: [in_features, out_features]}``.
        num_hidden_layers, hidden_size, max_position_embeddings: filled from the model's config
            when it can be read; used to validate taps and to build the head without the backbone.
    """

    name: str
    model: str
    tap_layers: list[int] = field(default_factory=lambda: [-1])
    revision: str | None = None
    tokenizer: str | None = None
    quantization: str = "nf4"
    compute_dtype: str = "bfloat16"
    anchor: bool = False
    config_path: str | None = None
    max_length: int | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_lr: float | None = None
    device_map: str | dict | None = None
    lora_modules: dict | None = None
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self):
        where = f"backbones[{self.name!r}]"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(f"backbones: name {self.name!r} must be a short identifier like 'llama'")
        if not self.model:
            raise ConfigError(f"{where}.model: give a hub id or a local model directory")
        if not isinstance(self.tap_layers, (list, tuple)) or not self.tap_layers:
            raise ConfigError(f"{where}.tap_layers: give a non-empty list of layer indices, e.g. [8, -1]")
        self.tap_layers = [int(t) for t in self.tap_layers]
        if len(set(self.tap_layers)) != len(self.tap_layers):
            raise ConfigError(f"{where}.tap_layers: {self.tap_layers} repeats a layer")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"{where}.quantization: {self.quantization!r} is not one of {QUANTIZATIONS}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"{where}.compute_dtype: {self.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
        if self.max_length is not None and self.max_length <= 0:
            raise ConfigError(f"{where}.max_length: must be positive, got {self.max_length}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"{where}.lora_rank: expected a whole number >= 0 (0 = no member adapters), "
                              f"got {self.lora_rank!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool)
                                            or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0):
            raise ConfigError(f"{where}.lora_alpha: expected a positive number, got {self.lora_alpha!r}")
        if self.lora_lr is not None and (isinstance(self.lora_lr, bool)
                                         or not isinstance(self.lora_lr, (int, float)) or not self.lora_lr > 0):
            raise ConfigError(f"{where}.lora_lr: expected a positive number, got {self.lora_lr!r}")
        if self.device_map is not None and not _is_device_map(self.device_map):
            raise ConfigError(f"{where}.device_map: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a {{module: device}} "
                              f"mapping, got {self.device_map!r}")
        if self.num_hidden_layers is None:
            self.resolve_model_config()
        if self.num_hidden_layers is not None:
            self.resolved_taps()  # validates the range

    def model_config_source(self) -> str | None:
        """A local path whose config describes this backbone, or None when only the hub has it."""
        if self.config_path:
            return self.config_path
        if (Path(self.model) / "config.json").is_file():
            return self.model
        return None

    def load_model_config(self, hub: bool = False) -> PreTrainedConfig:
        """The backbone's transformers config, read from local files (with ``hub``, a hub-only model's config.json
        is fetched when it is not in the local cache; nothing else is downloaded)."""
        source = self.model_config_source()
        try:
            if source is None:
                return AutoConfig.from_pretrained(self.model, revision=self.revision, local_files_only=not hub)
            if source.endswith(".json"):
                if not Path(source).is_file():
                    raise ConfigError(f"backbones[{self.name!r}].config_path: {source} does not exist")
                data = json.loads(Path(source).read_text())
                return AutoConfig.for_model(**data)
            return AutoConfig.from_pretrained(source)
        except ConfigError:
            raise
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"backbones[{self.name!r}]: cannot read the config of {self.model!r} "
                f"({str(err).splitlines()[0]}); give a local directory or config_path (configs/backbones/ holds the "
                f"four real ones)"
            ) from None

    def resolve_model_config(self) -> None:
        """Fill num_hidden_layers / hidden_size from the model's config when it is readable locally."""
        source = self.model_config_source()
        if source is None:
            try:
                cfg = AutoConfig.from_pretrained(self.model, revision=self.revision, local_files_only=True)
            except (OSError, ValueError):
                return  # validated later, when the backbone is loaded
        else:
            cfg = self.load_model_config()
        self.fill_from(cfg)

    def fill_from(self, cfg: PreTrainedConfig) -> None:
        cfg = cfg.get_text_config()
        self.num_hidden_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        self.max_position_embeddings = getattr(cfg, "max_position_embeddings", None)
        self.resolved_taps()

    def resolved_taps(self) -> list[int]:
        """Tap indices made absolute (0..num_hidden_layers); raises ConfigError when out of range."""
        if self.num_hidden_layers is None:
            raise ConfigError(f"backbones[{self.name!r}]: the number of layers is unknown; give config_path")
        n = self.num_hidden_layers
        out = []
        for tap in self.tap_layers:
            if not -n <= tap <= n:
                raise ConfigError(
                    f"backbones[{self.name!r}].tap_layers: index {tap} is out of range for a "
                    f"{n}-layer model (valid: 0..{n}, or -1..-{n} counting from the last layer)"
                )
            out.append(tap if tap >= 0 else n + 1 + tap)
        if len(set(out)) != len(out):
            raise ConfigError(f"backbones[{self.name!r}].tap_layers: {self.tap_layers} name the same layer twice")
        return out

    @property
    def deepest_tap(self) -> int:
        return max(self.resolved_taps())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdapterSpec:
    """How each tap is projected to ``shared_width``.

    Args:
        kind: ``linear``, ``lowrank`` (two linears through ``rank``) or ``mlp`` (through ``hidden``).
        rank: inner width of ``lowrank``.
        hidden: inner width of ``mlp`` (defaults to 2 x shared_width).
        layer_norm: LayerNorm on the tap before projecting (taps are pre-norm residual streams).
        dropout: dropout after the projection.
    """

    kind: str = "linear"
    rank: int = 64
    hidden: int | None = None
    layer_norm: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError(f"adapter.kind: {self.kind!r} is not one of {ADAPTER_KINDS}")
        if self.rank <= 0:
            raise ConfigError(f"adapter.rank: must be positive, got {self.rank}")
        if self.hidden is not None and self.hidden <= 0:
            raise ConfigError(f"adapter.hidden: must be positive, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout: must be in [0, 1), got {self.dropout}")


RESIDUAL_SCALES = ("none", "anchor_rms")


@dataclass
class HeadSpec:
    """What the fused features predict.

    Args:
        kind: ``classification`` (a label per sequence) or ``lm`` (next token in the anchor's vocabulary).
        num_labels: number of classes (classification).
        pooling: per-backbone pooling of token features for classification: ``last`` non-pad token or ``mean``.
        dropout: dropout before the output layer.
        source_tails: (lm) feed each source, at every anchor position, its own tokenization of exactly the
            text the anchor has seen: the settled tokens plus the unsettled tail of the prefix
            (``fusion_llm.alignment.pack_tails``). Off: a source's feature is its last settled token,
            about a word behind the anchor (cheaper: no tail tokens in the source's forward pass).
        source_predictions: (lm) also feed the head each source's own next-token distribution at its aligned
            position (its frozen LM head), carried onto the anchor's vocabulary through shared byte strings
            (`fusion_llm.vocab_bridge`), and mix the fused logits log-linearly: ``(1 + a_0) * anchor logits +
            sum_i a_i * log p_i``, with the weights ``a`` predicted per position by a zero-initialised layer
            (so an untrained head is still the anchor exactly). The sources then load with their LM heads.
        source_top_k: (with ``source_predictions``) source tokens carried per position; the rest of a source's
            mass is spread like the anchor's distribution. More is closer to the source's whole distribution and
            costs time linearly (bits/byte of the untrained route on the real pair, 24 validation rows: 1.4198 at
            256, 1.4161 at 1024, 1.4147 at 4096).
        residual_scale: (lm) units of the residual the head adds to the anchor's last (pre-norm) hidden state:
            ``none`` adds it as is; ``anchor_rms`` multiplies it, per position, by that hidden state's RMS
            (detached), so the head works in the units the anchor's final norm sees. Real models' last hidden
            states are large (RMS ~30 for SmolLM2-135M, ~1000 for Gemma-3-270M) and a plain residual then moves
            the logits by 1/RMS of what it would on a model whose states are O(1).
        source_lm_loss: (lm, with ``source_predictions``) train each source that has member adapters
            (``backbones[].lora_rank``) on its own next-token loss over its own tokens of the same rows, added
            to the fused loss: the source's predictions then adapt to the data as the anchor does (the fused
            loss reaches a source's adapters through its taps only; its predictions are mixed as constants).
    """

    kind: str = "classification"
    num_labels: int = 2
    pooling: str = "last"
    dropout: float = 0.0
    source_tails: bool = True
    source_predictions: bool = False
    residual_scale: str = "none"
    source_lm_loss: bool = False
    source_top_k: int = 256

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head.kind: {self.kind!r} is not one of {HEAD_KINDS}")
        if self.kind == "classification" and self.num_labels < 2:
            raise ConfigError(f"head.num_labels: need at least 2 classes, got {self.num_labels}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"head.pooling: {self.pooling!r} is not one of {POOLINGS}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout: must be in [0, 1), got {self.dropout}")
        for key in ("source_tails", "source_predictions", "source_lm_loss"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"head.{key}: expected true or false, got {getattr(self, key)!r}")
        if self.source_predictions and self.kind != "lm":
            raise ConfigError("head.source_predictions: only an LM head (head.kind: lm) mixes source predictions")
        if self.residual_scale not in RESIDUAL_SCALES:
            raise ConfigError(f"head.residual_scale: {self.residual_scale!r} is not one of {RESIDUAL_SCALES}")
        if self.source_top_k < 1:
            raise ConfigError(f"head.source_top_k: must be >= 1, got {self.source_top_k}")
        if self.source_lm_loss and not self.source_predictions:
            raise ConfigError("head.source_lm_loss: needs head.source_predictions: true (the sources' LM heads)")


@strict(accept_kwargs=True)
class FusionConfig(PreTrainedConfig):
    """Configuration of a fused model: the frozen backbones and the trainable head over them.

    Args:
        backbones: list of `BackboneSpec` (or dicts with its fields).
        shared_width: width every adapted tap is projected to.
        adapter: `AdapterSpec` fields.
        fusion: ``{"method": name, **options}``; see ``fusion_llm.fusion.available_fusions()``.
        head: `HeadSpec` fields.
        budget_limit: limit on bf16-equivalent parameters (frozen storage + trainable), default 8e9.
        fingerprints: ``{backbone name: hash of its config and tokenizer}``, written on save.
    """

    model_type = "fusion_llm"

    backbones: list | None = None
    shared_width: int = 256
    adapter: dict | None = None
    fusion: dict | None = None
    head: dict | None = None
    budget_limit: float = 8e9
    fingerprints: dict | None = None

    def __post_init__(self, **kwargs):
        _check_keys("FusionConfig", kwargs, _TRANSFORMERS_KEYS)
        super().__post_init__(**kwargs)
        if self.backbones is not None and not isinstance(self.backbones, (list, tuple)):
            raise ConfigError(f"backbones: expected a list of backbones, got {type(self.backbones).__name__}")
        self.backbones = [
            _from_dict(BackboneSpec, f"backbones[{i}]", b).to_dict() for i, b in enumerate(self.backbones or [])
        ]
        self.shared_width = _typed("shared_width", int | None, self.shared_width)
        self.budget_limit = _typed("budget_limit", float | None, self.budget_limit)
        names = [b["name"] for b in self.backbones]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"backbones: duplicate name(s) {dupes}; give each backbone its own name")
        models = [(b["model"], b["revision"]) for b in self.backbones]
        dupe_models = sorted({m for m, r in models if models.count((m, r)) > 1})
        if dupe_models:
            raise ConfigError(f"backbones: model(s) {dupe_models} listed twice; tap several layers of one entry instead")
        if self.shared_width is None or self.shared_width <= 0:
            raise ConfigError(f"shared_width: must be positive, got {self.shared_width}")
        self.adapter = dataclasses.asdict(_from_dict(AdapterSpec, "adapter", self.adapter or {}))
        self.head = dataclasses.asdict(_from_dict(HeadSpec, "head", self.head or {}))
        self.fusion = dict(self.fusion or {"method": "concat"})
        self.fusion = validate_fusion_options(self.fusion)
        if self.budget_limit is None or self.budget_limit <= 0:
            raise ConfigError(f"budget_limit: must be positive, got {self.budget_limit}")
        if self.backbones:
            anchors = [b["name"] for b in self.backbones if b["anchor"]]
            if len(anchors) > 1:
                raise ConfigError(f"backbones: only one anchor allowed, got {anchors}")
            if self.head["kind"] == "lm" and not anchors:
                raise ConfigError("backbones: head.kind 'lm' needs one backbone with anchor: true")
            adapted = [b["name"] for b in self.backbones if b["lora_rank"]]
            if adapted and self.head["kind"] != "lm":
                raise ConfigError(f"backbones {adapted}: lora_rank (member adapters) needs an LM head "
                                  "(head.kind: lm); set lora_rank: 0")
            if self.head["source_lm_loss"] and not any(b["lora_rank"] for b in self.backbones if not b["anchor"]):
                raise ConfigError("head.source_lm_loss: no source has member adapters; give a source "
                                  "backbones[].lora_rank > 0 or set source_lm_loss: false")

    # Typed views of the stored dicts (the dicts are what config.json holds).
    @property
    def backbone_specs(self) -> list[BackboneSpec]:
        return [BackboneSpec(**b) for b in self.backbones]

    @property
    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec(**self.adapter)

    @property
    def head_spec(self) -> HeadSpec:
        return HeadSpec(**self.head)

    @property
    def anchor_name(self) -> str | None:
        return next((b["name"] for b in self.backbones if b["anchor"]), None)

    def set_backbone_fields(self, name: str, **values) -> None:
        """Update resolved fields of one backbone (after loading it)."""
        for b in self.backbones:
            if b["name"] == name:
                b.update(values)
                return
        raise KeyError(name)
