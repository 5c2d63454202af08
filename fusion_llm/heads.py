"""The trainable part of a fused model: `FusionHead` (a PreTrainedModel: adapters, fusion method, output head,
member adapters) and its output heads, plus how an LM head's output meets the anchor's own output layer
(`add_residual`, `mixed_logits`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from fusion_llm.adapters import build_adapter
from fusion_llm.alignment import gather_aligned
from fusion_llm.backbones import FrozenBackbone
from fusion_llm.config import FusionConfig
from fusion_llm.errors import ConfigError
from fusion_llm.fusion import build_fusion
from fusion_llm.member_lora import MemberLoRA, lora_modules
from fusion_llm.output_loss import mixed_rows


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, kind: str = "last") -> torch.Tensor:
    """Pool token features to one vector per sequence.

    Args:
        hidden: (B, L, H) token features.
        attention_mask: (B, L), 1 for real tokens; padding may be on either side.
        kind: ``last`` (last real token) or ``mean`` (mean over real tokens).

    Returns:
        (B, H)
    """
    mask = attention_mask.to(hidden.device)
    if kind == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(1)  # index of the last real token, whichever side pads
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationHead(nn.Module):
    """Dropout and a linear layer from the fused feature (B, W) to label logits (B, num_labels)."""

    def __init__(self, width: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, num_labels)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(fused))


class AnchorResidualHead(nn.Module):
    """The LM head's trainable part: a zero-initialised residual (B, T, W) -> (B, T, anchor hidden).

    The fused model adds it to the anchor's last (pre-norm) hidden state and applies the anchor's
    own frozen final norm and LM head, so at initialisation it reproduces the anchor exactly.
    """

    def __init__(self, width: int, anchor_width: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(width, anchor_width)
        self.zero_init()

    def zero_init(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(fused))


class PredictionMixer(nn.Module):
    """Per-position log-linear weights of the anchor and each source's predictions (``head.source_predictions``).

    A zero-initialised linear layer over the fused feature and the members' confidences: at initialisation every
    weight is zero, so the fused model is the anchor exactly.
    """

    def __init__(self, in_width: int, members: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_width)
        self.out = nn.Linear(in_width, members)
        self.zero_init()

    def zero_init(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(features))  # (..., members)


@dataclass
class FusionOutput(ModelOutput):
    """``loss`` (when labels are given) and ``logits``: (B, num_labels) or (B, T, anchor vocab)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mix: torch.Tensor | None = None  # (B, T, 1 + sources): LM weights of the anchor and each source's predictions
    member_loss: torch.Tensor | None = None  # head.source_lm_loss: the adapted sources' own next-token losses, summed


def tap_key(name: str, layer: int) -> str:
    """Module-dict key of one tap: backbone name and absolute layer index."""
    return f"{name}_L{layer}"


class FusionHead(PreTrainedModel):
    """Everything that trains: one adapter per tap, the fusion method and the output head.

    It never holds backbone weights; ``save_pretrained`` writes the config (which names the
    backbones and their fingerprints) and these weights only.
    """

    config_class = FusionConfig
    base_model_prefix = "fusion"
    main_input_name = "features"

    def __init__(self, config: FusionConfig):
        super().__init__(config)
        specs = config.backbone_specs
        missing = [s.name for s in specs if s.hidden_size is None]
        if missing:
            raise ConfigError(f"backbones {missing}: hidden size unknown; load the backbones or give config_path")
        width = config.shared_width
        adapter = config.adapter_spec
        self.taps = [(s.name, layer) for s in specs for layer in s.resolved_taps()]
        self.adapters = nn.ModuleDict(
            {tap_key(n, layer): build_adapter(adapter, s.hidden_size, width) for s in specs
             for n, layer in [(s.name, t) for t in s.resolved_taps()]}
        )
        self.fusion = build_fusion(config.fusion, len(self.taps), width)
        head = config.head_spec
        if head.kind == "classification":
            self.classifier = ClassificationHead(width, head.num_labels, head.dropout)
        else:
            anchor = next(s for s in specs if s.anchor)
            # "Nothing settled yet" stands in for a source token at anchor positions that precede any.
            self.nothing = nn.ParameterDict({
                tap_key(s.name, layer): nn.Parameter(torch.randn(s.hidden_size) * 0.02)
                for s in specs if not s.anchor for layer in s.resolved_taps()
            })
            self.residual = AnchorResidualHead(width, anchor.hidden_size, head.dropout)
            if head.source_predictions:
                sources = len(specs) - 1
                self.mixer = PredictionMixer(width + 2 * sources, 1 + sources)
        adapted = [s for s in specs if s.lora_rank]
        if adapted:  # member adapters (fusion_llm.member_lora): LoRA inside a backbone, owned by the head
            for s in adapted:
                if not s.lora_modules:
                    s.lora_modules = lora_modules(s, with_lm_head=s.anchor or head.source_predictions)
                    config.set_backbone_fields(s.name, lora_modules=s.lora_modules)
            self.members = nn.ModuleDict({s.name: MemberLoRA(s) for s in adapted})
        self.post_init()
        if head.kind == "lm":
            self.residual.zero_init()  # post_init may have re-initialised it
            if head.source_predictions:
                self.mixer.zero_init()

    def _init_weights(self, module):
        """Keep PyTorch's default initialisation (and the zero-initialised residual)."""

    def align(self, name: str, taps: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """Bring a source backbone's taps (B, S, H) onto anchor positions (B, T, H) with its alignment index
        (-1 = nothing settled yet: the learned "nothing" vector of that tap)."""
        layers = [layer for n, layer in self.taps if n == name]
        return [gather_aligned(tap.to(self.dtype), index, self.nothing[tap_key(name, layer)])
                for tap, layer in zip(taps, layers)]

    def fuse(self, features: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """Adapt every tap and fuse them.

        Args:
            features: backbone name -> its taps in ``tap_layers`` order, each (B, H) or (B, T, H).

        Returns:
            (B, W) or (B, T, W)
        """
        adapted = []
        layers = {}
        for name, layer in self.taps:
            layers.setdefault(name, 0)
            tap = features[name][layers[name]]
            layers[name] += 1
            adapted.append(self.adapters[tap_key(name, layer)](tap.to(self.dtype)))
        return self.fusion(torch.stack(adapted, dim=-2))  # (..., N, W) -> (..., W)

    def forward(self, features: dict[str, list[torch.Tensor]], labels: torch.Tensor | None = None,
                confidence: torch.Tensor | None = None, alignment: dict[str, torch.Tensor] | None = None
                ) -> FusionOutput:
        """Classification: pooled taps -> label logits (and cross-entropy loss with ``labels``).

        For an LM head this returns the residual (B, T, anchor hidden) as ``logits``; `FusionModel`
        adds it to the anchor's hidden state and applies the anchor's output layer. The sources' taps come
        in at their own positions (B, S, H) with ``alignment`` (source name -> (B, T) index, `align`): every
        trainable parameter is used inside this call, as DistributedDataParallel needs. With
        ``head.source_predictions`` it also returns ``mix`` (B, T, 1 + sources), the log-linear weights of the
        anchor's logits and each source's predictions, from the fused feature and ``confidence`` (B, T,
        2 * sources: each source's entropy, and whether it has a position yet).
        """
        if alignment is not None:
            features = {n: self.align(n, taps, alignment[n]) if n in alignment else taps
                        for n, taps in features.items()}
        fused = self.fuse(features)
        if self.config.head["kind"] == "lm":  # features: anchor taps and aligned source taps, (B, T, H)
            mix = None
            if self.config.head.get("source_predictions"):
                mix = self.mixer(torch.cat([fused, confidence.to(fused.dtype)], dim=-1))
            return FusionOutput(logits=self.residual(fused), mix=mix)
        logits = self.classifier(fused)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.to(logits.device))
        return FusionOutput(loss=loss, logits=logits)


AutoConfig.register(FusionConfig.model_type, FusionConfig)
AutoModel.register(FusionConfig, FusionHead)


def add_residual(last: torch.Tensor, residual: torch.Tensor, head: dict) -> torch.Tensor:
    """The anchor's last hidden state plus the head's residual, scaled per ``head["residual_scale"]``."""
    if head.get("residual_scale", "none") == "anchor_rms":
        residual = residual * last.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(residual.device)
    return last + residual.to(last.dtype)


def mixed_logits(logits: torch.Tensor, mix: torch.Tensor,
                 corrections: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Log-linear mix of the anchor and each source: ``(1 + mix_0) * logits + sum_i mix_i * log p_i``.

    With ``log p_i = logits + correction_i`` up to a per-position constant (which a softmax ignores), that is
    ``(1 + sum(mix)) * logits + sum_i mix_i * correction_i``. Each correction is sparse and added where it is not
    zero only: one pass over the (B, T, V) logits (the scaling) besides the output layer's own.

    Args:
        logits: (B, T, V) the (adapted) anchor's logits, with grad (`FrozenBackbone.lm_logits`).
        mix: (B, T, 1 + S) weights, zero at initialisation (then the result is ``logits`` exactly).
        corrections: per source, ``(keys, values)``: distinct indices into the flattened (B * T, V) logits and
            the source's log-probabilities relative to the anchor's there (`FusionModel.source_corrections`).
    """
    return mixed_rows(logits.flatten(0, 1), mix.flatten(0, 1), corrections).view_as(logits)
