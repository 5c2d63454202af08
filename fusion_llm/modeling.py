"""`FusionModel`: the frozen backbones plus the trainable `FusionHead` (`fusion_llm.heads`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fusion_llm.alignment import tail_attention_mask
from fusion_llm.backbones import WEIGHTS_FINGERPRINT, FrozenBackbone, load_backbone
from fusion_llm.budget import check_budget
from fusion_llm.config import FusionConfig
from fusion_llm.errors import ConfigError
from fusion_llm.generation import generate
from fusion_llm.heads import FusionHead, FusionOutput, add_residual, mixed_logits, pool
from fusion_llm.member_lora import detach
from fusion_llm.output_loss import logsumexp
from fusion_llm.paths import atomic_dir
from fusion_llm.vocab_bridge import bridge_for, top_log_probs

log = logging.getLogger(__name__)

__all__ = ["FusionHead", "FusionModel", "FusionOutput", "add_residual", "mixed_logits", "own_token_loss"]


def own_token_loss(backbone: FrozenBackbone, last: torch.Tensor, src: dict[str, torch.Tensor]) -> torch.Tensor:
    """A source's own next-token loss (``head.source_lm_loss``) over its settled full-text tokens.

    Args:
        last: (B, P, H) its last-layer hidden states (with grad through its member adapters).
        src: its inputs; with packed tails (``tail_group``) only the settled tokens, which come first, count.
    """
    ids = src["input_ids"].to(last.device)
    mask = src.get("attention_mask")
    settled = mask.to(last.device).bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids).bool()
    if "tail_group" in src:
        settled = settled & (src["tail_group"].to(last.device) == -1)
    n = int(settled.sum(1).max())
    labels = ids[:, 1:n].masked_fill(~(settled[:, 1:n] & settled[:, :n - 1]), -100)
    return backbone.lm_loss(last[:, :n - 1].flatten(0, 1), labels.flatten())


def saved_config(path: Path) -> FusionConfig:
    """The config of the head saved in ``path``; a missing or unreadable one is a `ConfigError` naming the file. A
    saved head always records its backbones' identity: one without any record has ``fingerprints`` ``{}`` (nothing
    verifiable, so refused by `FusionModel._check_fingerprint` unless asked), never None (a new head)."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: no saved fusion head here (config.json missing)")
    try:
        config = FusionConfig.from_pretrained(path)
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{path / 'config.json'}: not a readable head config ({str(err).splitlines()[0]}); "
                          "the head is damaged: save or train it again") from None
    if config.fingerprints is None:
        config.fingerprints = {}
    return config


def check_head_weights(path: Path) -> None:
    """A saved head's weights file exists, reads as safetensors in full and holds only finite values; otherwise a
    `ConfigError` naming the file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConfigError(f"{path}: missing; the head's weights were not saved (save or train the head again)")
    try:
        with safe_open(path, "pt") as weights:
            for key in weights.keys():
                if not torch.isfinite(weights.get_tensor(key)).all():
                    raise ConfigError(f"{path}: tensor {key!r} holds NaN or infinite values; the head is damaged "
                                      "(load an earlier checkpoint or train it again)")
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]}); the head is "
                          "damaged (save or train it again)") from None


class FusionModel(nn.Module):
    """Frozen backbones plus a trainable `FusionHead`.

    The backbones are kept outside the module tree (``parameters()``, ``state_dict()`` and
    ``.to()`` see the head only): they are frozen, quantized, and placed by ``from_pretrained``.
    """

    def __init__(self, config: FusionConfig, backbones: dict[str, FrozenBackbone], head: FusionHead | None = None,
                 verify_weights: bool = True):
        super().__init__()
        names = [b["name"] for b in config.backbones]
        missing = [n for n in names if n not in backbones]
        if missing:
            raise ConfigError(f"backbones {missing} are named in the config but were not given")
        for name in names:
            self._check_identity(config, backbones[name])
            self._check_fingerprint(config, backbones[name], verify_weights)
            spec = backbones[name].spec
            config.set_backbone_fields(name, num_hidden_layers=spec.num_hidden_layers, hidden_size=spec.hidden_size,
                                       max_position_embeddings=spec.max_position_embeddings)
        self.config = config
        self._backbones = {n: backbones[n] for n in names}  # a plain dict: not submodules
        self._unfingerprinted: set[str] = set()  # backbones a save has warned about (save_pretrained)
        self.head = head if head is not None else FusionHead(config)

        members = getattr(self.head, "members", {})
        for name, backbone in self._backbones.items():
            if name in members:
                members[name].attach(backbone)  # the head's LoRA weights inside that backbone's layers
            else:
                detach(backbone)  # adapters an earlier head wired in stay off

    @staticmethod
    def _check_identity(config: FusionConfig, backbone: FrozenBackbone) -> None:
        """How a backbone was loaded is part of what a head was trained on: the same quantization, compute dtype and
        (absolute) tap layers as the head's config, or a one-line refusal naming the field."""
        want = next(b for b in config.backbones if b["name"] == backbone.name)
        got = backbone.spec
        n = got.num_hidden_layers

        def absolute(taps):
            return [t if t >= 0 or n is None else n + 1 + t for t in taps]

        for field, theirs, ours in (("quantization", want.get("quantization"), got.quantization),
                                    ("compute_dtype", want.get("compute_dtype"), got.compute_dtype),
                                    ("tap_layers", absolute(want.get("tap_layers") or []), absolute(got.tap_layers))):
            if theirs and theirs != ours:
                raise ConfigError(f"backbone {backbone.name!r}: loaded with {field} {ours!r}, but the head was built "
                                  f"for {theirs!r}; load the backbone as the head's config says")

    @staticmethod
    def _check_fingerprint(config: FusionConfig, backbone: FrozenBackbone, verify_weights: bool = True) -> None:
        """A backbone is the one the head was trained on: its config, tokenizer and weights fingerprints equal the
        ones saved with the head. A config that records none (``fingerprints`` None) is a new head, never saved:
        nothing to check. A saved head without a backbone's record, or one saved where a part could not be
        fingerprinted, cannot check it and is refused like a backbone that cannot be fingerprinted now, unless
        ``verify_weights=False`` (then one warning line)."""
        if config.fingerprints is None:
            return
        opt_out = "pass verify_weights=False (scripts: --unverified-weights) to load anyway"
        expected = config.fingerprints.get(backbone.name)
        if not expected:
            if verify_weights:
                raise ConfigError(f"backbone {backbone.name!r}: the head was saved without its fingerprints, so it "
                                  f"cannot check this is the backbone it was trained on; {opt_out}")
            log.warning("backbone %r: not verified (the head holds no fingerprints of it; verify_weights=False)",
                        backbone.name)
            return
        for part in ("config", "tokenizer", "weights"):
            want, got = expected.get(part), backbone.fingerprint.get(part)
            if not want:
                if verify_weights:
                    raise ConfigError(
                        f"backbone {backbone.name!r}: the head was saved without a fingerprint of its {part} (it could "
                        f"not be computed then), so it cannot check they are the ones it was trained on; {opt_out}")
                log.warning("backbone %r: %s not verified (the head holds no fingerprint of them; "
                            "verify_weights=False)", backbone.name, part)
                continue
            if part == "weights" and not want.startswith(WEIGHTS_FINGERPRINT):
                log.warning("backbone %r: the head was saved by an older fusion_llm that fingerprinted only part of "
                            "the weights; they are not verified (save the head again to record them)", backbone.name)
                continue
            if got is None:
                if verify_weights:
                    raise ConfigError(
                        f"backbone {backbone.name!r}: its {part} cannot be fingerprinted (no *.safetensors or *.bin in "
                        f"{backbone.spec.model!r}, nor a snapshot of it in the local hub cache), so the head cannot "
                        f"check they are the ones it was trained on; {opt_out}")
                log.warning("backbone %r: %s not verified (verify_weights=False)", backbone.name, part)
                continue
            if want != got:
                raise ConfigError(
                    f"backbone {backbone.name!r}: its {part} does not match the one this head was trained on "
                    f"(fingerprint {got} != {want}); load the head onto the backbone it was trained with"
                )

    @property
    def backbones(self) -> dict[str, FrozenBackbone]:
        return self._backbones

    @property
    def head_module(self) -> FusionHead:
        """The head itself, also while training wraps it (DistributedDataParallel): for its attributes."""
        return getattr(self.head, "module", self.head)

    @property
    def anchor(self) -> FrozenBackbone | None:
        name = self.config.anchor_name
        return self._backbones[name] if name else None

    # ---- construction -------------------------------------------------------------------------------
    @staticmethod
    def load_backbones(config: FusionConfig, device_map=None) -> dict[str, FrozenBackbone]:
        """Load every backbone of ``config`` (the LM anchor with its LM head; every source too when the head
        mixes source predictions), each where its ``device_map`` says, else at ``device_map``."""
        lm = config.head["kind"] == "lm"
        predictions = lm and config.head.get("source_predictions", False)
        return {
            spec.name: load_backbone(spec, with_lm_head=lm and (spec.anchor or predictions),
                                     device_map=spec.device_map if spec.device_map is not None else device_map)
            for spec in config.backbone_specs
        }

    @classmethod
    def from_config(cls, config: FusionConfig, backbones: dict[str, FrozenBackbone] | None = None,
                    device_map=None) -> "FusionModel":
        """A new (untrained) fused model; loads the backbones unless given."""
        check_budget(config)  # refuse an over-budget plan before anything heavy loads
        backbones = backbones or cls.load_backbones(config, device_map)
        return cls(config, backbones)

    @classmethod
    def from_pretrained(cls, path: str | Path, backbones: dict[str, FrozenBackbone] | None = None,
                        device_map=None, verify_weights: bool = True) -> "FusionModel":
        """Load a saved head and attach it to its backbones (loaded from the config, or given).

        A backbone whose config, tokenizer or weights differ from the ones the head was trained on is refused, and
        so is one whose weights cannot be fingerprinted unless ``verify_weights=False``.
        """
        path = Path(path)
        config = saved_config(path)
        check_head_weights(path / "model.safetensors")  # before any backbone loads
        backbones = backbones or cls.load_backbones(config, device_map)
        head = FusionHead.from_pretrained(path, config=config)
        return cls(config, backbones, head, verify_weights=verify_weights)

    def warm_start(self, path: str | Path) -> list[str]:
        """Start the head from a saved head over the same backbones (``train.init_head``): every weight the saved
        head holds is copied in; the backbones must be the ones it was trained on (as `from_pretrained` checks).

        Returns:
            The names of this head's weights the saved head does not hold (they keep their initialisation).

        Raises:
            ConfigError: a missing or damaged head, other backbones, or a weight this head has no place for (a
                different fusion, width or tap list).
        """
        from safetensors.torch import load_file

        path = Path(path)
        saved = saved_config(path)
        check_head_weights(path / "model.safetensors")
        theirs = {b["name"] for b in saved.backbones}
        for name, backbone in self._backbones.items():
            if name not in theirs:
                raise ConfigError(f"{path}: the saved head has no backbone {name!r} (it has {sorted(theirs)}); start "
                                  "from a head trained over these backbones")
            self._check_identity(saved, backbone)
            self._check_fingerprint(saved, backbone)
        weights = load_file(str(path / "model.safetensors"))
        own = self.head_module.state_dict()
        foreign = sorted(k for k in weights if k not in own or weights[k].shape != own[k].shape)
        if foreign:
            raise ConfigError(f"{path}: the saved head's weight {foreign[0]!r} has no place of that shape in this head "
                              f"({len(foreign)} such); it was built with another fusion, width or taps")
        self.head_module.load_state_dict(weights, strict=False)
        return sorted(k for k in own if k not in weights)

    def save_pretrained(self, path: str | Path) -> None:
        """Write config.json (backbones, taps, quantization, fingerprints) and the head's weights only.

        Atomic: written to a temporary folder beside ``path`` and renamed into place; a head already at ``path``
        is replaced only once the new one is complete, and put back if the final rename fails.
        """
        path = Path(path)
        for name, backbone in self._backbones.items():
            if backbone.fingerprint.get("weights") is None and name not in self._unfingerprinted:  # once: training
                self._unfingerprinted.add(name)  # saves many times
                log.warning("backbone %r: its weights cannot be fingerprinted (no *.safetensors or *.bin in %r, nor a "
                            "snapshot of it in the local hub cache); the head is saved without their fingerprint and "
                            "will load only with verify_weights=False (scripts: --unverified-weights)",
                            name, backbone.spec.model)
        self.config.fingerprints = {n: b.fingerprint for n, b in self._backbones.items()}
        self.head.config = self.config
        with atomic_dir(path) as tmp:
            self.head.save_pretrained(tmp)

    # ---- running ------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Each backbone's own tokenization of ``texts``: name -> {input_ids, attention_mask}."""
        return {name: dict(b.tokenize(texts, max_length)) for name, b in self._backbones.items()}

    @torch.no_grad()
    def features(self, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """Frozen part of the classification path: each backbone's taps, pooled per sequence (B, H)."""
        kind = self.config.head["pooling"]
        out = {}
        for name, backbone in self._backbones.items():
            enc = inputs[name]
            taps = backbone.taps(enc["input_ids"], enc["attention_mask"])
            out[name] = [pool(t, enc["attention_mask"], kind).float() for t in taps]
        return out

    def forward(self, inputs: dict | None = None, labels: torch.Tensor | None = None,
                features: dict[str, list[torch.Tensor]] | None = None, texts: list[str] | None = None) -> FusionOutput:
        """Run the fused model.

        Args:
            inputs: name -> {input_ids, attention_mask} per backbone (see `tokenize`).
            labels: (B,) class ids.
            features: precomputed pooled taps (a feature cache); then no backbone runs.
            texts: raw texts, tokenized here (convenience).
        """
        if self.config.head["kind"] == "lm":
            raise ValueError("this is an LM fusion model: call lm_forward(inputs, alignment)")
        if features is None:
            if inputs is None:
                if texts is None:
                    raise ValueError("give inputs, features or texts")
                inputs = self.tokenize(texts)
            features = self.features(inputs)
        device = self.head_module.device
        features = {n: [t.to(device) for t in taps] for n, taps in features.items()}
        return self.head(features, labels=labels)

    # ---- language modelling --------------------------------------------------------------------------
    def lm_forward(self, inputs: dict[str, dict[str, torch.Tensor]], alignment: dict[str, torch.Tensor],
                   labels: torch.Tensor | None = None, return_logits: bool = True) -> FusionOutput:
        """Next-token logits in the anchor's vocabulary from every backbone's features at each position.

        Args:
            inputs: name -> {input_ids, attention_mask}: the anchor's tokens and each source's own
                tokenization of the same text (see ``fusion_llm.alignment.align_batch``).
            alignment: source name -> (B, T) index of the last settled source token per anchor token (-1: none).
            labels: (B, T) anchor token ids to predict, -100 where ignored; by default the anchor's
                input ids shifted by one, padding ignored.
            return_logits: ``False`` (training) computes the loss a few positions at a time without holding the
                (B, T, vocab) logits (`FrozenBackbone.lm_loss`: the same loss and gradients, several times less
                time around a 262k-token output layer on CPU); ``logits`` is then None.

        Returns:
            ``FusionOutput(loss, logits)`` with logits (B, T, vocab). An untrained head returns the anchor's
            own logits exactly: the residual it adds to the anchor's last hidden state starts at zero.
        """
        anchor = self.anchor
        if anchor is None or anchor.lm_head is None:
            raise ValueError("lm_forward needs an anchor backbone loaded with its LM head (head.kind: lm)")
        device = self.head_module.device
        enc = inputs[anchor.name]
        last = anchor.spec.num_hidden_layers
        *anchor_taps, anchor_last = anchor.taps(enc["input_ids"], enc["attention_mask"],
                                                layers=anchor.spec.resolved_taps() + [last])
        features = {anchor.name: [t.to(device) for t in anchor_taps]}
        predictions = self.config.head.get("source_predictions", False)
        source_last, member_losses = {}, []
        for name, backbone in self._backbones.items():
            if name == anchor.name:
                continue
            src = inputs[name]
            layers = backbone.spec.resolved_taps() + ([backbone.spec.num_hidden_layers] if predictions else [])
            if "tail_group" in src:  # settled tokens + the unsettled tails (fusion_llm.alignment.pack_tails)
                mask = tail_attention_mask(src["tail_group"], src["tail_ctx"])
                taps = backbone.taps(src["input_ids"], mask, layers=layers, position_ids=src["position_ids"])
            else:
                taps = backbone.taps(src["input_ids"], src["attention_mask"], layers=layers)
            if predictions:
                source_last[name] = taps.pop()
                if self.config.head.get("source_lm_loss") and backbone.trainable:
                    member_losses.append(own_token_loss(backbone, source_last[name], src))
            features[name] = [t.to(device) for t in taps]
        confidence = tops = None
        if predictions:
            tops, confidence = self.source_predictions(source_last, alignment)
        out = self.head(features, confidence=confidence,
                        alignment={n: a.to(device) for n, a in alignment.items() if n in features})
        residual = out.logits  # (B, T, anchor hidden), zero at initialisation
        hidden = add_residual(anchor_last.to(device), residual, self.config.head)
        if labels is None:
            ids = enc["input_ids"].to(hidden.device)
            labels = ids.masked_fill(enc["attention_mask"].to(hidden.device) == 0, -100)
            labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        if not return_logits:
            def corrections(start, end, z):  # the sources' corrections on rows start:end of the flattened (B*T)
                return self.source_corrections({n: tuple(x[start:end] for x in v) for n, v in tops.items()},
                                               z.unsqueeze(0))

            loss = anchor.lm_loss(hidden.flatten(0, 1), labels.to(hidden.device).flatten(),
                                  mix=out.mix.flatten(0, 1) if predictions else None,
                                  corrections=corrections if predictions else None)
            logits = None
        else:
            logits = anchor.lm_logits(hidden)
            if predictions:
                logits = mixed_logits(logits, out.mix, self.source_corrections(tops, logits.detach()))
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.to(logits.device).flatten(),
                                               ignore_index=-100)
        member_loss = torch.stack([m.to(loss.device) for m in member_losses]).sum() if member_losses else None
        return FusionOutput(loss=loss, logits=logits, member_loss=member_loss)

    @torch.no_grad()
    def source_predictions(self, source_last: dict[str, torch.Tensor], alignment: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, tuple[torch.Tensor, ...]], torch.Tensor]:
        """Each source's most likely next tokens at its aligned position (its own frozen output layer).

        Args:
            source_last: source name -> (B, S, H) its last-layer (pre-norm) hidden states.
            alignment: source name -> (B, T) index into S per anchor position (-1: no source token yet).

        Returns:
            ``(tops, confidence)``: per source ``(log_probs, ids, valid)``, (B * T, k) its top-k log-probabilities
            and token ids (`fusion_llm.vocab_bridge.top_log_probs`) and (B * T,) whether it has a position yet;
            and (B, T, 2 * sources) each source's entropy (nats) and whether it has a position, for the mixer.
        """
        device = self.head_module.device
        tops, entropies, valids = {}, [], []
        for name, hidden in source_last.items():
            backbone = self._backbones[name]
            index = alignment[name].to(hidden.device)
            valid = (index >= 0).to(device)  # (B, T)
            gathered = hidden.gather(1, index.clamp_min(0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            top, ids, entropy = top_log_probs(backbone, gathered.flatten(0, 1), self.config.head_spec.source_top_k)
            tops[name] = (top.to(device), ids.to(device), valid.flatten())
            entropies.append(entropy.to(device).view(valid.shape).masked_fill(~valid, 0.0))
            valids.append(valid.float())
        return tops, torch.stack(entropies + valids, dim=-1)

    @torch.no_grad()
    def source_corrections(self, tops: dict[str, tuple[torch.Tensor, ...]], anchor_logits: torch.Tensor,
                           rows: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each source's predictions (`source_predictions`) carried onto the anchor's vocabulary, as corrections to
        the anchor's own distribution (`fusion_llm.vocab_bridge`).

        Args:
            anchor_logits: (B, T, V) the fused model's anchor logits before the mix (detached): the distribution
                the mass outside a source's top-k is spread like. Normalised lazily: only its logsumexp per
                position is computed (``rows`` positions at a time), no (B, T, V) copy.

        Returns:
            per source, ``(keys, values)``: the correction kept sparse over the flattened (B * T, V) logits
            (nothing where the source has no position yet).
        """
        flat = anchor_logits.reshape(-1, anchor_logits.shape[-1])
        lse = torch.cat([logsumexp(flat[i:i + rows].float()) for i in range(0, flat.shape[0], rows)])
        out = []
        for name, (top, ids, valid) in tops.items():
            bridge = bridge_for(self._backbones[name], self.anchor)
            keys, values = bridge.sparse_correction(top, ids, flat, lse)
            present = valid[keys // flat.shape[-1]]
            out.append((keys[present], values[present]))
        return out

    def generate(self, prompts: list[str] | str, **kwargs):
        """Generate with an LM fusion model: the anchor decodes with its KV cache, the other backbones see the
        growing text re-tokenized and causally re-aligned each step. See `fusion_llm.generation.generate`."""
        return generate(self, prompts, **kwargs)
