"""Unsettled tails and their packing: per anchor position, the source's tokens of exactly the anchor's prefix
after the settled ones (:func:`_windowed_tails`, or :func:`_verify` re-tokenizing every prefix), one sequence
packing the settled tokens and every distinct tail (:func:`pack_tails`), and its attention mask
(:func:`tail_attention_mask`)."""

from __future__ import annotations

import numpy as np

from fusion_llm.alignment.encoding import _encode, _name, _prefix_tokens, _token_left_ends


def _windowed_tails(text, ends, cuts, last_hard, tokenizer, stats) -> list[list[int]]:
    """The unsettled tail of each anchor prefix, tokenizing only a window of it: from the hard boundary before
    the cut. Tokens right of a hard boundary do not depend on the text left of it, so the tokens of
    ``text[w:end]`` starting at or after the cut are the prefix's own (w is itself hard, so chunking and digit
    groups restart there as in the full text; SentencePiece's dummy prefix only touches the tokens near w). O(length)
    instead of re-tokenizing every prefix. Causal either way: the window lies inside the prefix. A window whose
    kept tokens do not tile ``[cut, end)`` falls back to the whole prefix (counted in ``window_fallbacks``)."""
    uniq, first = np.unique(ends, return_index=True)
    cut_u = cuts[first]
    starts = np.where(cut_u > 0, last_hard[np.maximum(cut_u - 1, 0)], 0)
    enc = _encode(tokenizer, [text[w:e] for w, e in zip(starts.tolist(), uniq.tolist())])
    tails_u, redo = [], []
    for u, (w, c, e) in enumerate(zip(starts.tolist(), cut_u.tolist(), uniq.tolist())):
        kept, expect = [], c - w
        for tok, (a, b), special in zip(enc["input_ids"][u], enc["offset_mapping"][u], enc["special_tokens_mask"][u]):
            if special and a == b:  # BOS / EOS of the window
                continue
            if b > c - w and a < c - w:  # a token spanning the cut: the claim failed here
                expect = -1
                break
            if a >= c - w:
                if a != expect:
                    expect = -1
                    break
                kept.append(tok)
                expect = b
        if expect != e - w and not (expect == c - w == e - w):
            redo.append(u)
        tails_u.append(kept)
    if redo:  # exact: the whole prefix, minus the settled tokens it shares with the full text
        full = _encode(tokenizer, [text[: int(uniq[u])] for u in redo])
        for k, u in enumerate(redo):
            lefts = _token_left_ends(np.asarray(full["offset_mapping"][k], np.int64).reshape(-1, 2),
                                     np.asarray(full["special_tokens_mask"][k]))
            settled = int(np.searchsorted(lefts, int(cut_u[u]), side="right"))
            tails_u[u] = _prefix_tokens(full, k)[settled:]
        stats.window_fallbacks += len(redo)
    inverse = np.searchsorted(uniq, ends)
    return [tails_u[u] for u in inverse.tolist()]


def _verify(text, ends, cuts, index, ids, tokenizer, stats) -> tuple[np.ndarray, list[list[int]]]:
    """Re-tokenize each distinct anchor prefix and compare with the full-text tokens.

    Returns the (possibly lowered) index and, per anchor position, the prefix's tokens after it: its
    unsettled tail (see ``align_source(tails=True)``).
    """
    uniq, inverse = np.unique(ends, return_inverse=True)
    enc = _encode(tokenizer, [text[:e] for e in uniq.tolist()])
    index = index.copy()
    tails_u = []
    for u in range(uniq.size):
        sel = inverse == u
        j = int(index[sel][0])
        p_ids = enc["input_ids"][u]
        left = _token_left_ends(np.asarray(enc["offset_mapping"][u], np.int64).reshape(-1, 2),
                                np.asarray(enc["special_tokens_mask"][u]))
        j_prefix = int(np.searchsorted(left, cuts[sel][0], side="right")) - 1
        stats.verified_positions += int(sel.sum())
        if not (j_prefix == j and p_ids[: j + 1] == ids[: j + 1]):
            lcp = 0
            for a, b in zip(p_ids, ids):
                if a != b:
                    break
                lcp += 1
            j = min(j, j_prefix, lcp - 1)
            index[sel] = j
            stats.verify_failures += int(sel.sum())
            stats.failures_by_source[_name(tokenizer)] += int(sel.sum())
        tails_u.append(_prefix_tokens(enc, u)[j + 1:])
    return index, [tails_u[u] for u in inverse.tolist()]


#: Extra columns of a source packed with its tails (``align_batch(tails=True)``), per packed token.
TAIL_COLUMNS = ("tail_group", "tail_ctx", "position_ids")  # the model-side names too (`FusionModel.lm_forward`)


def pack_tails(ids: list[int], index: list[int], tails: list[list[int]]) -> dict[str, list[int]]:
    """One source sequence that gives every anchor position its tokenization of exactly the anchor's prefix.

    The settled full-text tokens come first (``ids``, already trimmed); then, for each distinct
    ``(index, tail)`` with a non-empty tail, its tail tokens. A tail token attends to the settled
    tokens ``0..index`` and to the earlier tokens of its own tail, at the positions it has in the
    prefix's own encoding - so its hidden state is the source's, run on ``tokenize(prefix)``.

    Returns:
        ``input_ids`` (settled + tails), ``align`` (per anchor position, the packed index of its last
        token: the tail's last, or the settled ``index``; ``-1`` none), and per packed token ``tail_group``
        (``-1`` settled, else the tail's number), ``tail_ctx`` (settled tokens visible to it) and
        ``position_ids`` (its position id). `tail_attention_mask` turns them into the attention mask.
    """
    n = len(ids)
    out = {"input_ids": list(ids), "tail_group": [-1] * n, "tail_ctx": list(range(1, n + 1)),
           "position_ids": list(range(n))}
    last_of: dict[tuple, int] = {}  # (index, tail) -> packed index of the tail's last token
    align = []
    for j, tail in zip(index, tails):
        if not tail:
            align.append(j)
            continue
        key = (j, tuple(tail))
        if key not in last_of:
            out["tail_group"] += [len(last_of)] * len(tail)
            out["input_ids"] += tail
            out["tail_ctx"] += [j + 1] * len(tail)
            out["position_ids"] += list(range(j + 1, j + 1 + len(tail)))
            last_of[key] = len(out["input_ids"]) - 1
        align.append(last_of[key])
    out["align"] = align
    return out


def tail_attention_mask(group, ctx):
    """The (B, 1, P, P) boolean attention mask (True = attend) of sequences packed by `pack_tails`.

    Args:
        group: (B, P) long tensor, ``-1`` settled tokens, ``>= 0`` tail number, anything else padding.
        ctx: (B, P) long tensor, how many settled tokens each packed token sees.
    """
    import torch

    p = group.shape[1]
    idx = torch.arange(p, device=group.device)
    settled_key = (group == -1)[:, None, :] & (idx[None, None, :] < ctx[:, :, None])
    same_tail = ((group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
                 & (idx[None, None, :] <= idx[None, :, None]))
    self_only = torch.eye(p, dtype=torch.bool, device=group.device)[None]  # padding rows attend to themselves
    return (settled_key | same_tail | self_only).unsqueeze(1)
