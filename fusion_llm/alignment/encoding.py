"""A source tokenizer's encodings and what is read off them: one batched call with offsets and special-token
masks (:func:`_encode`), each token's left end (the smallest cut it is settled by), the leading post-processor
tokens, and a prefix's ids without the post-processor tokens after it (:func:`prefix_tokens`)."""

from __future__ import annotations

import numpy as np


_NO_TOKEN = np.iinfo(np.int64).max  # "left end" of a token that is never settled (EOS)


def _token_left_ends(offsets: np.ndarray, special_mask: np.ndarray) -> np.ndarray:
    """The smallest cut that a source token lies left of, made non-decreasing.

    Leading post-processor tokens (BOS) get 0 (always settled), post-processor tokens after
    the text (EOS) never settle, zero-width text tokens at ``p`` need a cut after ``p``.
    """
    s, e = offsets[:, 0], offsets[:, 1]
    special = special_mask.astype(bool) & (e == s)
    leading = np.logical_and.accumulate(special)
    left = np.where(e > s, e, s + 1)
    left = np.where(special, _NO_TOKEN, left)
    left = np.where(leading, 0, left)
    return np.maximum.accumulate(left) if left.size else left


def _encode(tokenizer, texts: list[str]):
    return tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True,
                     return_special_tokens_mask=True, return_attention_mask=False)


def _prefix_tokens(enc, u: int) -> list[int]:
    """The ids of encoding ``u`` without the post-processor tokens after the text (EOS: special, zero width)."""
    ids = enc["input_ids"][u]
    offsets, special = enc["offset_mapping"][u], enc["special_tokens_mask"][u]
    n, lead = len(ids), _leading(special, offsets)
    while n > lead and special[n - 1] and offsets[n - 1][0] == offsets[n - 1][1]:
        n -= 1
    return list(ids[:n])


def prefix_tokens(tokenizer, prefix: str) -> list[int]:
    """A source's ids of ``prefix`` without post-processor tokens after it: its settled tokens + unsettled tail."""
    return _prefix_tokens(_encode(tokenizer, [prefix]), 0)


def _leading(special, offsets) -> int:
    """How many leading post-processor tokens (BOS) an encoding has."""
    k = 0
    while k < len(special) and special[k] and offsets[k][0] == offsets[k][1]:
        k += 1
    return k


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
