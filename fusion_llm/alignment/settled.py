"""The causal settled index: per anchor token, the last settled source token (:func:`align_source`).

The fused feature at anchor position ``t`` may only depend on the text the anchor has seen
through token ``t`` (DESIGN.md, invariant 2). A source backbone runs once on its own
tokenization of the *full* text, so for each anchor token we pick the index ``j(t)`` of the
last source token that is **settled** by the anchor token's end: the source tokenizer gives
exactly the same ids for tokens ``0..j`` when it only sees ``text[:end_t]``, whatever follows.
When no source token is settled the index is ``-1`` and a learned "nothing yet" vector is used
(:func:`gather_aligned`).

The rule (why it is causal-safe)
--------------------------------
Character offsets are not enough: ``"12"`` is one Llama-3 token until a third digit arrives,
``"▁cat"`` may become ``"▁cats"``. And the *choice* of ``j`` must itself be decidable from the
prefix, or the index leaks the future. So ``j`` is derived from **hard boundaries**:

    A boundary ``c`` (between characters ``c-1`` and ``c``) is *hard* for a tokenizer if, in
    every text, no token spans it and the tokens left of it do not depend on anything right
    of it. Whether ``c`` is hard is decided from ``text[c-1]``, ``text[c]`` (and, for digit
    groups, the start of the digit run) only.

For a prefix ``P = text[:end_t]`` the *safe cut* is the last hard boundary ``c < len(P)``
(``c`` must have its right-hand character inside ``P``; the end of ``P`` is never a cut because
the next character is unknown), or ``0``. The settled tokens of ``tokenize(P)`` are the leading
special tokens (BOS) plus every token ending at or before the cut. Since the cut is hard, the
same tokens, with the same ids, start ``tokenize(text)`` - so ``j`` can be read off the
full-text encoding in O(n) without re-tokenizing any prefix, and it depends on ``P`` alone.

Which boundaries are hard is proved per tokenizer kind (:func:`settle_rule`; the proofs are in
``boundaries.py``'s docstring).

Anchor side: the anchor has seen the characters it *fully* covers. A byte-level token that ends
inside a multi-byte character (Llama-3 ``"ðŁĺ"`` + ``"Ģ"`` for one emoji, both with offsets
``(3, 4)``) has not seen that character yet, so its causal end is the character's start
(:func:`causal_char_ends`).

Safety nets: every example is checked, in O(n), that no source token of the full text spans a
claimed hard boundary. Where one does (counted as ``crossing_fallbacks``), the rule is wrong for
this text, and the example is aligned as with ``verify=True``: every anchor prefix is re-tokenized
(batched) and compared with the full-text tokens; a mismatch falls back to the longest agreeing
prefix and is counted in ``verify_failures``. With tails the source then sees, at every position,
exactly its tokenization of the prefix (settled tokens + tail), whatever follows; without tails the
tokens it sees are a prefix of it. No boundary is dropped on the evidence of full-text tokens, which
may run past a position's prefix. Both counters live in :data:`ALIGNMENT_STATS` (and in a training
run's summary, ``alignment_fallbacks``); the property tests show they stay at zero on the real
tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusion_llm.alignment.encoding import _NO_TOKEN, _encode, _name, _prefix_tokens, _token_left_ends
from fusion_llm.alignment.rules import settle_rule
from fusion_llm.alignment.stats import ALIGNMENT_STATS, AlignmentStats
from fusion_llm.alignment.tails import _verify, _windowed_tails


def causal_char_ends(anchor_offsets: Sequence, text_length: int | None = None) -> np.ndarray:
    """How many characters the anchor has fully seen through each of its tokens.

    Args:
        anchor_offsets: ``(T, 2)`` character offsets of the anchor tokens (special tokens
            included, with zero-width offsets such as BOS ``(0, 0)``).
        text_length: clip offsets to this length (a prefix of the text).

    Returns:
        int64 array ``e`` of length ``T``: ``e[t]`` is the end of the last character the anchor
        has completely seen through token ``t`` - its end offset, moved back to the start of a
        character that a later token continues (byte-level tokens splitting a multi-byte
        character), non-decreasing in ``t``. Zero-width tokens add nothing.
    """
    off = np.asarray(anchor_offsets, dtype=np.int64).reshape(-1, 2)
    if off.shape[0] == 0:
        return np.zeros(0, np.int64)
    s, e = off[:, 0].copy(), off[:, 1].copy()
    if text_length is not None:
        s, e = np.minimum(s, text_length), np.minimum(e, text_length)
    real = e > s
    starts = np.where(real, s, _NO_TOKEN)
    # min start over the tokens after t: a later token starting inside token t's span means
    # token t ended inside a character.
    later = np.minimum.accumulate(starts[::-1])[::-1]
    later = np.concatenate((later[1:], [_NO_TOKEN]))
    eff = np.where(real, np.minimum(e, later), 0)
    return np.maximum.accumulate(eff)


def _crossed(offsets: np.ndarray, n: int) -> np.ndarray:
    """Bool array over boundaries 0..n: some token spans boundary c (start < c < end)."""
    diff = np.zeros(n + 2, dtype=np.int64)
    s, e = offsets[:, 0], offsets[:, 1]
    wide = (e - s) >= 2
    np.add.at(diff, s[wide] + 1, 1)
    np.add.at(diff, e[wide], -1)
    return np.cumsum(diff)[: n + 1] > 0


def _last_hard(hard: np.ndarray) -> np.ndarray:
    """``out[k]`` = the largest hard boundary ``c <= k`` (0 if none)."""
    return np.maximum.accumulate(np.where(hard, np.arange(hard.size), 0))


def _cuts_for_ends(last_hard: np.ndarray, ends: np.ndarray) -> np.ndarray:
    # the cut must have its right-hand character inside the prefix: c <= len(P) - 1
    return np.where(ends > 0, last_hard[np.maximum(ends - 1, 0)], 0)


def safe_cut(prefix: str, source_tokenizer) -> int:
    """R(prefix), part 1: the last hard boundary strictly inside ``prefix`` (or 0).

    Args:
        prefix: the text seen so far.
        source_tokenizer: a fast tokenizer.

    Returns:
        A character position; every token of ``source_tokenizer(prefix)`` ending at or before
        it is settled: unchanged whatever text is appended.
    """
    hard = settle_rule(source_tokenizer).hard_boundaries(prefix)
    return int(_cuts_for_ends(_last_hard(hard), np.array([len(prefix)]))[0])


def settled_count(prefix: str, source_tokenizer) -> int:
    """R(prefix): how many leading tokens of ``source_tokenizer(prefix)`` are settled.

    Decided from ``prefix`` alone. Those tokens (special tokens included) are the first tokens
    of the source's encoding of any text that starts with ``prefix``.

    Args:
        prefix: the text seen so far.
        source_tokenizer: a fast tokenizer.

    Returns:
        The number of settled tokens (``align_source(...)[1][-1] + 1`` for an anchor token
        ending at ``len(prefix)``).
    """
    return settled_split(prefix, source_tokenizer)[1]


def settled_split(prefix: str, source_tokenizer) -> tuple[list[int], int]:
    """The source's ids of ``prefix`` (`prefix_tokens`: settled tokens + unsettled tail) and how many of them are
    settled (`settled_count`), from one encoding."""
    enc = _encode(source_tokenizer, [prefix])
    left = _token_left_ends(np.asarray(enc["offset_mapping"][0], np.int64).reshape(-1, 2),
                            np.asarray(enc["special_tokens_mask"][0]))
    count = int(np.searchsorted(left, safe_cut(prefix, source_tokenizer), side="right"))
    return _prefix_tokens(enc, 0), count


def align_source(
    text: str,
    anchor_offsets: Sequence,
    source_tokenizer,
    *,
    source_encoding: tuple | None = None,
    verify: bool = False,
    tails: bool = False,
    stats: AlignmentStats | None = None,
) -> tuple[list[int], list[int]] | tuple[list[int], list[int], list[list[int]]]:
    """Align one source tokenizer onto the anchor tokens of one text.

    Args:
        text: the full text.
        anchor_offsets: ``(T, 2)`` character offsets of the anchor's tokens (from a fast
            tokenizer with ``return_offsets_mapping=True``, special tokens included).
        source_tokenizer: the source's fast tokenizer.
        source_encoding: optional precomputed ``(input_ids, offset_mapping, special_tokens_mask)``
            of ``text`` by ``source_tokenizer`` with special tokens (as in :func:`align_batch`).
        verify: re-tokenize every anchor prefix (batched) and check the settled tokens against
            the full-text tokens; mismatches fall back to the agreeing part and are counted.
            O(T * len(text)): for tests, audits and sampled checks, not the default pipeline.
        tails: also return, per anchor token, the source's *unsettled tail*: the tokens of
            ``tokenize(text[:end_t])`` after the settled ones (post-processor tokens such as EOS
            left out). Settled tokens + tail = the source's own tokenization of exactly what the
            anchor has seen, so a source fed both has no lag behind the anchor (a settled token
            alone trails it by about a word). Each tail is tokenized from the hard boundary before
            the cut (O(length)); with ``verify`` from the whole prefix.
        stats: counters to update (default :data:`ALIGNMENT_STATS`).

    Returns:
        ``(source_input_ids, index)``: the source's ids for the full text (special tokens
        included, as its backbone runs on them) and, per anchor token, the index into them of
        the last settled source token, ``-1`` when none is; with ``tails=True`` a third list,
        the tail ids per anchor token (often empty).

    Raises:
        ValueError: for a slow source tokenizer.
    """
    stats = ALIGNMENT_STATS if stats is None else stats
    rule = settle_rule(source_tokenizer)
    if source_encoding is None:
        enc = _encode(source_tokenizer, [text])
        source_encoding = (enc["input_ids"][0], enc["offset_mapping"][0], enc["special_tokens_mask"][0])
    ids, offsets, smask = source_encoding
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    smask = np.asarray(smask, dtype=bool)
    n = len(text)

    hard = rule.hard_boundaries(text)
    bad = hard & _crossed(offsets, n)
    if bad.any():
        # The rule's claim failed on this text. Dropping the crossed boundaries would choose each position's
        # index from full-text tokens that may run past its prefix (the future); instead every prefix of this
        # text is re-tokenized (`_verify`): with tails each position then sees exactly tokenize(prefix).
        k = int(bad.sum())
        stats.crossing_fallbacks += k
        stats.failures_by_source[_name(source_tokenizer)] += k
        verify = True
    ends = causal_char_ends(anchor_offsets, n)
    last_hard = _last_hard(hard)
    cuts = _cuts_for_ends(last_hard, ends)
    left = _token_left_ends(offsets, smask)
    index = np.searchsorted(left, cuts, side="right") - 1

    tail_ids = None
    if verify and ends.size:
        index, tail_ids = _verify(text, ends, cuts, index, list(ids), source_tokenizer, stats)
    elif tails and ends.size:
        tail_ids = _windowed_tails(text, ends, cuts, last_hard, source_tokenizer, stats)
    elif tails:
        tail_ids = []

    stats.examples += 1
    stats.anchor_positions += int(index.size)
    stats.nothing_positions += int((index < 0).sum())
    if tails:
        return list(ids), index.tolist(), tail_ids
    return list(ids), index.tolist()
