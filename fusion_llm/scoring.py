"""Bits per byte: language models with different tokenizers scored on one scale.

``bits/byte = total negative log-likelihood of the text in bits / UTF-8 bytes of the text``. Every
token after the first (BOS) is predicted, so every byte of the text is paid for exactly once whatever
the tokenizer; a tokenizer that adds no BOS (Phi-3's) gets its BOS prepended so that its first token
is predicted too. Token perplexity (``exp`` of the mean NLL per predicted token) is reported beside
it; it compares models that share a vocabulary only.

Scorers: `score_causal_lm` (any model with ``logits = f(input_ids, attention_mask)``: a frozen backbone
with its LM head, a PEFT model, a merged model) and `score_fused` (a `FusionModel` LM, through
`FusionModel.lm_forward` and the causal alignment). No text is truncated: a text longer than a
model's positions is an error, because its tail would go unscored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from fusion_llm.alignment import align_batch
from fusion_llm.data.pipeline import LMCollator, pad_right


@dataclass
class LMScore:
    """Summed negative log-likelihood (nats) of ``tokens`` predicted tokens over ``bytes`` UTF-8 bytes."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def __add__(self, other: LMScore) -> LMScore:
        return LMScore(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def as_dict(self) -> dict:
        return {**asdict(self), "bits_per_byte": self.bits_per_byte, "token_perplexity": self.token_perplexity}


def text_bytes(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def _nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    labels = labels.to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                            reduction="sum")
    return float(nll), int((labels != -100).sum())


def model_ids(tokenizer, text: str, max_positions: int | None = None) -> list[int]:
    """The ids a model scores for ``text``: its tokenizer's, with a BOS in front when it adds none."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    if max_positions is not None and len(ids) > max_positions:
        raise ValueError(f"a text of {len(ids)} tokens is longer than the model's {max_positions} positions; "
                         "cut the texts shorter (its tail would go unscored)")
    return ids


@torch.no_grad()
def score_causal_lm(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer, texts: list[str],
                    *, batch_size: int = 8, max_positions: int | None = None) -> LMScore:
    """Score texts with one causal LM.

    Args:
        logits_fn: ``(input_ids, attention_mask) -> logits`` (B, L, V); right padding.
        tokenizer: the model's tokenizer.
        texts: texts scored independently (each from its BOS).
        batch_size: texts per forward.
        max_positions: refuse longer token sequences.
    """
    score = LMScore(bytes=text_bytes(texts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [model_ids(tokenizer, t, max_positions) for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        rows = [seqs[i] for i in order[start:start + batch_size]]
        ids, mask = pad_right(rows, pad)
        labels = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), torch.full_like(ids[:, :1], -100)], 1)
        nll, count = _nll_sum(logits_fn(ids, mask), labels)
        score.nll += nll
        score.tokens += count
    return score


def backbone_logits_fn(backbone) -> Callable:
    """``logits_fn`` of a `FrozenBackbone` loaded with its LM head (last hidden state -> final norm -> LM head)."""
    last = backbone.spec.num_hidden_layers

    def logits(ids, mask):
        (hidden,) = backbone.taps(ids, mask, layers=[last])
        return backbone.lm_logits(hidden)

    return logits


def hf_logits_fn(model) -> Callable:
    """``logits_fn`` of a transformers / PEFT causal LM."""
    device = next(model.parameters()).device

    def logits(ids, mask):
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits

    return logits


@torch.no_grad()
def score_fused(model, texts: list[str], *, batch_size: int = 8) -> LMScore:
    """Score texts with a fused LM (`FusionModel` with an LM head) in the anchor's tokens.

    The texts go through the same path as training: `fusion_llm.alignment.align_batch` (anchor and
    source tokenizations, causal alignment), `LMCollator`, `FusionModel.lm_forward`.
    """
    anchor = model.anchor
    tokenizer = anchor.tokenizer
    if tokenizer.bos_token_id is None or tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        raise ValueError("bits/byte of a fused model needs an anchor tokenizer that starts every text with BOS")
    sources = {n: b.tokenizer for n, b in model.backbones.items() if n != anchor.name}
    pad_ids = {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()}
    collate = LMCollator(anchor.name, pad_ids)
    was_training = model.head.training
    model.head.eval()
    score = LMScore(bytes=text_bytes(texts))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        chunk = [texts[i] for i in order[start:start + batch_size]]
        aligned = align_batch(chunk, tokenizer, sources, tails=model.config.head_spec.source_tails)
        if any(len(x) > anchor.max_length for x in aligned["input_ids"]):
            raise ValueError(f"a text is longer than the anchor's {anchor.max_length} positions; cut the texts shorter")
        rows = [{k: v[i] for k, v in aligned.items()} for i in range(len(chunk))]
        batch = collate(rows)
        # the mean loss a few positions at a time, never the (B, T, vocab) logits (fusion_llm.output_loss)
        out = model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"], return_logits=False)
        count = int((batch["labels"] != -100).sum())
        score.nll += float(out.loss) * count
        score.tokens += count
    model.head.train(was_training)
    return score
