"""Batch alignment for the data pipeline: tokenize a batch with the anchor and every source, align (and pack)
each source (:func:`align_batch`; :func:`make_align_fn` for ``Dataset.map``), and the column names it writes
(:func:`source_keys`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from fusion_llm.alignment.encoding import _encode
from fusion_llm.alignment.rules import check_fast_tokenizer, settle_rule
from fusion_llm.alignment.settled import align_source
from fusion_llm.alignment.stats import ALIGNMENT_STATS, AlignmentStats
from fusion_llm.alignment.tails import TAIL_COLUMNS, pack_tails


def source_keys(name: str) -> tuple[str, str]:
    """Column names of one source in :func:`align_batch`'s output: ``(ids_key, index_key)``."""
    return f"{name}_input_ids", f"{name}_align"


def align_batch(
    texts: Sequence[str],
    anchor_tokenizer,
    source_tokenizers: Mapping[str, object],
    *,
    max_length: int | None = None,
    trim_sources: bool = True,
    verify: bool = False,
    tails: bool = False,
    stats: AlignmentStats | None = None,
    count_fallbacks: bool = False,
) -> dict[str, list]:
    """Tokenize a batch with the anchor and every source and align them (for ``Dataset.map``).

    All tokenizers encode the whole batch at once (in Rust); the alignment itself is O(length)
    numpy work per example and source.

    Args:
        texts: the texts.
        anchor_tokenizer: the anchor's fast tokenizer (the LM head predicts its tokens).
        source_tokenizers: name -> fast tokenizer of each source backbone (may include the
            anchor's own family).
        max_length: truncate the anchor to this many tokens (sources are aligned to what is
            left).
        trim_sources: drop source tokens after the last one any anchor position uses (the
            backbone is causal, so the kept positions' features do not change); at least one
            token is kept so the backbone always has an input.
        verify: see :func:`align_source`.
        tails: pack each source's unsettled tails after its settled tokens (`pack_tails`): the
            source then sees exactly the anchor's prefix at every position. Adds the columns
            ``f"{name}_{c}"`` for ``c`` in :data:`TAIL_COLUMNS`; ``f"{name}_align"`` indexes the
            packed ids. Costs a tokenization of every prefix and about 1-2 tail tokens per
            anchor token in the source's forward pass.
        stats: counters to update (default :data:`ALIGNMENT_STATS`).
        count_fallbacks: add ``f"{name}_fallbacks"`` per text: the safety-net fallbacks (crossing + verify)
            its alignment took, so a cached ``Dataset.map`` still tells the run how many there were.

    Returns:
        ``{"input_ids": anchor ids, "offset_mapping": anchor [start, end] pairs, and for each
        source name: f"{name}_input_ids", f"{name}_align"}`` - one list per text, plain ints,
        ready for Arrow. ``f"{name}_align"[t]`` indexes ``f"{name}_input_ids"``, ``-1`` = nothing
        settled yet.

    Raises:
        ValueError: for a slow anchor or source tokenizer.
    """
    texts = list(texts)
    check_fast_tokenizer(anchor_tokenizer, "anchor")
    kw = {"truncation": True, "max_length": max_length} if max_length else {}
    anchor = anchor_tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True,
                              return_attention_mask=False, **kw)
    out: dict[str, list] = {
        "input_ids": [list(x) for x in anchor["input_ids"]],
        "offset_mapping": [list(map(list, offs)) for offs in anchor["offset_mapping"]],  # Arrow: no tuples
    }
    stats = stats if stats is not None else ALIGNMENT_STATS
    for name, tok in source_tokenizers.items():
        settle_rule(tok)  # refuses slow tokenizers before any work
        enc = _encode(tok, texts)
        ids_key, idx_key = source_keys(name)
        out[ids_key], out[idx_key] = [], []
        if tails:
            for c in TAIL_COLUMNS:
                out[f"{name}_{c}"] = []
        if count_fallbacks:
            out[f"{name}_fallbacks"] = []
        for i, text in enumerate(texts):
            before = stats.crossing_fallbacks + stats.verify_failures
            aligned = align_source(
                text, anchor["offset_mapping"][i], tok,
                source_encoding=(enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i]),
                verify=verify, tails=tails, stats=stats,
            )
            if count_fallbacks:
                out[f"{name}_fallbacks"].append(stats.crossing_fallbacks + stats.verify_failures - before)
            ids, index = aligned[:2]
            if trim_sources:
                ids = ids[: max(max(index, default=-1) + 1, min(1, len(ids)))]
            if tails:
                packed = pack_tails(ids, index, aligned[2])
                ids, index = packed["input_ids"], packed["align"]
                for c in TAIL_COLUMNS:
                    out[f"{name}_{c}"].append(packed[c])
            out[ids_key].append(ids)
            out[idx_key].append(index)
    return out


def make_align_fn(anchor_tokenizer, source_tokenizers: Mapping[str, object], *, text_column: str = "text",
                  **kwargs) -> Callable[[dict], dict]:
    """A function for ``dataset.map(fn, batched=True, remove_columns=[text_column])``.

    Args:
        anchor_tokenizer: see :func:`align_batch`.
        source_tokenizers: see :func:`align_batch`.
        text_column: the column holding the texts.
        **kwargs: passed to :func:`align_batch` (``max_length``, ``verify``, ...).

    Returns:
        ``fn(batch) -> align_batch(batch[text_column], ...)``. ``datasets`` fingerprints a map
        function by hashing it, tokenizers included (seconds for Gemma's 262k vocabulary); pass
        ``new_fingerprint=...`` to ``map`` to skip that.
    """

    def fn(batch: dict) -> dict:
        return align_batch(batch[text_column], anchor_tokenizer, source_tokenizers, **kwargs)

    return fn
