"""Causal cross-tokenizer alignment: anchor token positions -> settled source token indices.

Why it is causal (hard boundaries, the safe cut) is in ``settled.py``'s docstring, the per-tokenizer proofs
in ``boundaries.py``'s. One concept per file; each file imports only files listed above it:

- ``stats.py``: ``AlignmentStats`` / ``ALIGNMENT_STATS``, the counters of the safety nets.
- ``chars.py``: Unicode whitespace, the split regexes' character classes, code-point helpers.
- ``boundaries.py``: ``SettleRule.hard_boundaries`` per tokenizer kind, and the added tokens' contexts.
- ``rules.py``: ``settle_rule`` (reads a fast tokenizer's pipeline, builds and caches its rule).
- ``encoding.py``: a source's encodings with offsets: token left ends, ``prefix_tokens``.
- ``tails.py``: unsettled tails (windowed or verified), ``pack_tails`` and ``tail_attention_mask``.
- ``settled.py``: ``causal_char_ends``, ``safe_cut``, ``settled_count`` and ``align_source``.
- ``batch.py``: ``align_batch`` and ``make_align_fn`` (for ``Dataset.map``), ``source_keys``.
- ``gather.py``: ``gather_aligned``, the model-side lookup (torch).
"""

from fusion_llm.alignment.batch import align_batch, make_align_fn, source_keys
from fusion_llm.alignment.boundaries import SettleRule
from fusion_llm.alignment.chars import WHITESPACE
from fusion_llm.alignment.encoding import prefix_tokens
from fusion_llm.alignment.gather import gather_aligned
from fusion_llm.alignment.rules import LLAMA3_SPLIT_REGEX, check_fast_tokenizer, settle_rule
from fusion_llm.alignment.settled import align_source, causal_char_ends, safe_cut, settled_count, settled_split
from fusion_llm.alignment.stats import ALIGNMENT_STATS, AlignmentStats
from fusion_llm.alignment.tails import TAIL_COLUMNS, pack_tails, tail_attention_mask

__all__ = [
    "ALIGNMENT_STATS",
    "AlignmentStats",
    "LLAMA3_SPLIT_REGEX",
    "SettleRule",
    "TAIL_COLUMNS",
    "WHITESPACE",
    "align_batch",
    "align_source",
    "causal_char_ends",
    "check_fast_tokenizer",
    "gather_aligned",
    "make_align_fn",
    "pack_tails",
    "prefix_tokens",
    "safe_cut",
    "settle_rule",
    "settled_count",
    "settled_split",
    "source_keys",
    "tail_attention_mask",
]
