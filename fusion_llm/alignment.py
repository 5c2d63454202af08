"""Causal cross-tokenizer alignment: anchor token positions -> settled source token indices.

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

Which boundaries are hard is proved per tokenizer kind (:func:`settle_rule`):

* **SentencePiece-style BPE / Unigram** (Mistral, Phi-3 = Llama-2, Gemma): the whole text is one
  pre-token and BPE merges are applied in global rank order. A merge ``(A, B)`` is the only thing
  that can erase the boundary between ``A[-1]`` and ``B[0]``. So if the normalized pair
  ``(text[c-1], text[c])`` is not such a joinable pair of any merge (Unigram: not adjacent in any
  piece), and not adjacent inside an added token, no token can span ``c`` and the merges left of
  ``c`` happen exactly as they would on the left part alone. The joinable pairs come from the
  tokenizer's own merges, so e.g. ``"o|▁"`` (end of a word, then a space) is hard for all three
  (no SentencePiece piece contains a letter followed by ``▁``), while ``"▁|w"`` is not.
  Byte-fallback pieces (``<0xE2>``) never merge, so they only ever add hard boundaries.
* **Byte-level BPE with the Llama-3 (cl100k) or GPT-2 split regex**: tokens never cross
  pre-tokenizer chunks, so ``c`` is hard when every continuation starts a new chunk at ``c``
  and the chunks left of ``c`` are decided by characters ``<= c``. From the regex, with the
  character classes ``L`` (``\\p{L}``), ``N`` (``\\p{N}``), ``W`` (``\\s``) and ``P`` (the rest),
  for Llama-3: ``L|N``, ``L|P``, ``N|L``, ``N|P``, ``P|N`` and ``{L,N,P}|W`` are hard, except
  ``P|\\r`` and ``P|\\n`` (punctuation swallows line breaks); ``N|N`` is hard every third digit
  of a digit run (``\\p{N}{1,3}`` groups from the run's start); ``W|N`` is hard, ``W|P`` unless
  the space is ``" "``, ``W|L`` only after a line break. ``P|L``, ``L|L``, ``P|P`` and ``W|W``
  are never hard (``",word"``, contractions, whitespace runs decided by what follows). GPT-2
  differs in gluing a single space to anything and in not grouping digits.
  Character classes come from the tokenizer's own regex engine where Python's Unicode table is
  older (unassigned code points), so the two never disagree.
* Anything else: the whitespace rule (``non-space|space``, not after punctuation before a line
  break), flagged ``proven=False`` with a warning; use ``verify=True`` to check it.

Special tokens: leading post-processor tokens (BOS, offsets ``(0, 0)``) are always settled;
post-processor tokens after the text (EOS) never are. Added tokens written in the text
(``"<|eot_id|>"``, Gemma's newline runs) are cut out before pre-tokenization, with real offsets:
a boundary is not hard where the prefix could be inside one (the pair is adjacent in an added
token and the text before ``c`` ends with that token's beginning), next to the whitespace an
``rstrip`` / ``lstrip`` token swallows, nor - for the byte-level ``W|*`` rules - before a
character an added token starts with (the segment would end there, and ``\\s+(?!\\S)`` then
takes the whole run).

Anchor side: the anchor has seen the characters it *fully* covers. A byte-level token that ends
inside a multi-byte character (Llama-3 ``"ðŁĺ"`` + ``"Ģ"`` for one emoji, both with offsets
``(3, 4)``) has not seen that character yet, so its causal end is the character's start
(:func:`causal_char_ends`).

Safety nets: every example is checked, in O(n), that no source token of the full text spans a
claimed hard boundary (counted as ``crossing_fallbacks``; the boundary is dropped). With
``verify=True`` every anchor prefix is re-tokenized (batched) and compared with the full-text
tokens; a mismatch falls back to the longest agreeing prefix and is counted in
``verify_failures``. Both counters live in :data:`ALIGNMENT_STATS`; the property tests show
they stay at zero on the four real tokenizers.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ALIGNMENT_STATS",
    "AlignmentStats",
    "SettleRule",
    "align_batch",
    "align_source",
    "causal_char_ends",
    "check_fast_tokenizer",
    "gather_aligned",
    "make_align_fn",
    "safe_cut",
    "settle_rule",
    "settled_count",
    "source_keys",
]

# Unicode White_Space: what ``\s`` matches in the tokenizers' regex engine (Oniguruma).
# Python's str.isspace() differs (it also accepts \x1c-\x1f), so it is not used.
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# The Llama-3 / cl100k split regex, exactly as it appears in tokenizer.json.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_L, _N, _W, _P = 0, 1, 2, 3  # character classes of the split regexes
_UNCLASSIFIED = 255
_NO_TOKEN = np.iinfo(np.int64).max  # "left end" of a token that is never settled (EOS)


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


@dataclass
class AlignmentStats:
    """Counters of the alignment's safety nets (per process: ``datasets.map(num_proc=k)``
    keeps one per worker).

    Attributes:
        examples: (example, source) pairs aligned.
        anchor_positions: anchor positions aligned.
        nothing_positions: positions with no settled source token (index ``-1``).
        crossing_fallbacks: claimed hard boundaries that a full-text source token crossed
            (the boundary was dropped; should stay 0).
        verified_positions: positions checked against a re-tokenized prefix (``verify=True``).
        verify_failures: verified positions whose prefix tokens disagreed (fell back; should
            stay 0).
        failures_by_source: ``crossing_fallbacks + verify_failures`` per source tokenizer name.
        window_fallbacks: unsettled tails re-tokenized from the whole prefix because the window's tokens
            did not tile the tail (overlapping offsets of byte pieces of one character, added tokens);
            exact either way, only slower.
    """

    examples: int = 0
    anchor_positions: int = 0
    nothing_positions: int = 0
    crossing_fallbacks: int = 0
    verified_positions: int = 0
    verify_failures: int = 0
    failures_by_source: Counter = field(default_factory=Counter)
    window_fallbacks: int = 0

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()

    def as_dict(self) -> dict:
        """The counters as a plain dict (for logs and JSON)."""
        d = {k: getattr(self, k) for k in ("examples", "anchor_positions", "nothing_positions",
                                            "crossing_fallbacks", "verified_positions", "verify_failures",
                                            "window_fallbacks")}
        d["failures_by_source"] = dict(self.failures_by_source)
        return d


#: Process-wide counters used when a function gets no ``stats`` argument.
ALIGNMENT_STATS = AlignmentStats()


# ---------------------------------------------------------------------------------------
# Tokenizer checks and settle rules
# ---------------------------------------------------------------------------------------


def check_fast_tokenizer(tokenizer, role: str = "source") -> None:
    """Refuse tokenizers that cannot return character offsets.

    Args:
        tokenizer: a transformers tokenizer.
        role: ``"anchor"`` or ``"source"``, for the message.

    Raises:
        ValueError: when the tokenizer is not a fast (Rust ``tokenizers``-backed) tokenizer.
    """
    if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is not None:
        return
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    raise ValueError(
        f"{role} tokenizer {name!r} ({type(tokenizer).__name__}) is a slow tokenizer and cannot return "
        "offset_mapping, which the causal alignment needs. Load the fast one instead: "
        "AutoTokenizer.from_pretrained(path) with use_fast=True (the default), from a folder with a "
        "tokenizer.json (or a SentencePiece tokenizer.model that transformers can convert); for the four "
        "backbone families run `python scripts/fetch_tokenizers.py`."
    )


@dataclass
class SettleRule:
    """Which character boundaries are hard for one source tokenizer.

    Attributes:
        kind: ``"sentencepiece"``, ``"bytelevel-regex"`` or ``"whitespace"``.
        proven: whether hardness follows from the tokenizer's structure (see module docstring);
            ``False`` for the generic whitespace fallback.
        description: one line for logs.
    """

    kind: str
    proven: bool
    description: str
    # sorted int64 codes (a << 21 | b) of normalized character pairs that a merge may join
    join_codes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    char_map: dict = field(default_factory=dict, repr=False)  # normalizer: code point -> code point
    added: _AddedTokenContexts | None = field(default=None, repr=False)
    unknown_fuse_chars: np.ndarray | None = field(default=None, repr=False)  # vocab chars if unks fuse
    regex: str | None = None  # byte-level: "llama3" or "gpt2" split regex

    def hard_boundaries(self, text: str) -> np.ndarray:
        """Hard boundaries of ``text``.

        Args:
            text: the text.

        Returns:
            Bool array ``h`` of length ``len(text) + 1``; ``h[c]`` says the boundary before
            character ``c`` is hard. ``h[0]`` and ``h[len(text)]`` are always False. ``h[c]``
            depends on ``text[:c + 1]`` only.
        """
        n = len(text)
        hard = np.zeros(n + 1, dtype=bool)
        if n < 2:
            return hard
        cps = _codepoints(text)
        m = cps
        if self.char_map:  # compare in normalized space (" " -> "\u2581")
            m = cps.copy()
            for a, b in self.char_map.items():
                m[cps == a] = b
        if self.kind == "sentencepiece":
            inner = ~_in_sorted(_pair_codes(m), self.join_codes)
            if self.unknown_fuse_chars is not None:  # consecutive unknown chars fuse into one <unk>
                unk = ~_in_sorted(m, self.unknown_fuse_chars)
                inner &= ~(unk[:-1] & unk[1:])
        else:
            cls = _char_classes(cps)
            x, y = cls[:-1], cls[1:]
            nl = (cps[1:] == 10) | (cps[1:] == 13)
            x_space = cps[:-1] == 32
            if self.kind == "bytelevel-regex":
                # chunks end at the end of a letter / digit / punctuation run, whatever follows
                inner = (x != _W) & (y == _W)
                inner |= (x == _L) & ((y == _N) | (y == _P))
                inner |= (x == _N) & ((y == _L) | (y == _P))
                inner |= (x == _P) & (y == _N)
                if self.regex == "llama3":
                    # " ?[^\s\p{L}\p{N}]+[\r\n]*": punctuation swallows the line breaks after it
                    inner &= ~((x == _P) & nl)
                    # "\p{N}{1,3}": a digit run is cut every third digit from its start
                    inner |= (x == _N) & (y == _N) & (_run_offset(cls == _N)[1:] % 3 == 0)
                    # whitespace glues onto letters ("[^\r\n\p{L}\p{N}]?\p{L}+", not after a line
                    # break) and, a space only, onto punctuation; never onto digits. The run's own
                    # chunks ("\s+(?!\S)") are decided once its first non-space is seen.
                    x_nl = (cps[:-1] == 10) | (cps[:-1] == 13)
                    after_ws = (y == _N) | ((y == _P) & ~x_space) | ((y == _L) & x_nl)
                else:  # gpt2: " ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+" glue a space to anything
                    after_ws = (y != _W) & ~x_space
                if self.added is not None and self.added.first_codes.size:
                    # an added token ends the pre-tokenized segment, and "\s+(?!\S)" then takes the
                    # whole run: the run's chunks are only decided by a non-space that is text
                    after_ws &= ~_in_sorted(cps[1:], self.added.first_codes)
                inner |= (x == _W) & after_ws
            else:  # generic whitespace rule
                inner = (x != _W) & (y == _W) & ~((x == _P) & nl)
        if self.added is not None:
            mtext = text.translate(self.char_map) if self.char_map else text
            self.added.block(mtext, m, inner)
        hard[1:n] = inner
        return hard


class _AddedTokenContexts:
    """Boundaries that an added token (matched on the raw text before the model) may cover.

    Boundary ``c`` is blocked when ``text[c-1:c+1]`` is an adjacent pair ``w[k-1:k+1]`` of an
    added token ``w`` and ``text[:c]`` ends with ``w[:k]`` - only then can a match of ``w`` span
    ``c``; a match that would need characters past the prefix is covered because the pair at
    ``c`` is already inside the prefix. ``rstrip`` tokens swallow the whitespace after them,
    ``lstrip`` tokens the whitespace before them (blocked unconditionally: that needs lookahead).
    Work is proportional to the few positions whose pair occurs in some added token.
    """

    def __init__(self, added: list, char_map: dict):
        table: dict = {}

        def add(a: str, b: str, context: str) -> None:
            # context: what text[:c] must end with; "" or one character = the pair alone suffices
            per = table.setdefault((ord(a) << 21) | ord(b), {})
            if len(context) <= 1:
                per[None] = [""]
            else:
                per.setdefault(context[-2], []).append(context)

        self.rstrip: list[str] = []
        first: set = set()
        for tok in added:
            w = tok["content"].translate(char_map) if char_map else tok["content"]
            if w:
                first.add(ord(w[0]))
            for k in range(1, len(w)):
                add(w[k - 1], w[k], w[:k])
            if w and tok.get("rstrip"):
                self.rstrip.append(w)
                for ws in _mapped_ws(char_map):
                    add(w[-1], ws, w)
            if w and tok.get("lstrip"):
                for ws in _mapped_ws(char_map):
                    add(ws, w[0], "")
                    for ws2 in _mapped_ws(char_map):
                        add(ws, ws2, "")
        # drop contexts implied by a shorter one (Gemma's 31 newline tokens -> one context)
        for per in table.values():
            for key, ctxs in per.items():
                ctxs = sorted(set(ctxs), key=len)
                per[key] = [c for i, c in enumerate(ctxs) if not any(c.endswith(d) for d in ctxs[:i])]
        self.table = table
        self.codes = np.array(sorted(table), dtype=np.int64)
        self.first_codes = np.array(sorted(first), dtype=np.int64)  # characters an added token starts with
        self.ws_codes = np.array(sorted({ord(c) for c in _mapped_ws(char_map)}), dtype=np.int64)

    def block(self, text: str, cps: np.ndarray, inner: np.ndarray) -> None:
        """Clear ``inner[c - 1]`` (boundary ``c``) where an added token may span ``c``."""
        if self.codes.size:
            codes = _pair_codes(cps)
            for i in np.nonzero(inner & _in_sorted(codes, self.codes))[0].tolist():
                c = i + 1
                per = self.table[int(codes[i])]
                if None in per or any(text.endswith(ctx, 0, c) for ctx in per.get(text[c - 2] if c >= 2 else "", ())):
                    inner[i] = False
        if self.rstrip:
            ws = _in_sorted(cps, self.ws_codes)
            run = _run_offset(ws)
            for i in np.nonzero(inner & ws[:-1] & ws[1:])[0].tolist():
                start = i - int(run[i])  # first whitespace of the run holding text[i]
                if any(text.endswith(w, 0, start) for w in self.rstrip):
                    inner[i] = False


def _mapped_ws(char_map: dict) -> set:
    return {chr(char_map.get(ord(w), ord(w))) for w in WHITESPACE}


_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RULES_BY_ID: dict = {}


def settle_rule(tokenizer) -> SettleRule:
    """The settle rule of a source tokenizer (built once per tokenizer object, then cached).

    Args:
        tokenizer: a fast transformers tokenizer.

    Returns:
        Its :class:`SettleRule`, derived from the backend's normalizer, pre-tokenizer, model
        and added tokens.

    Raises:
        ValueError: for slow tokenizers (see :func:`check_fast_tokenizer`).
    """
    check_fast_tokenizer(tokenizer)
    try:
        rule = _RULES.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: keep it alive, compare identity
        entry = _RULES_BY_ID.get(id(tokenizer))
        rule = entry[1] if entry is not None and entry[0] is tokenizer else None
    if rule is not None:
        return rule
    rule = _build_rule(tokenizer)
    if not rule.proven:
        warnings.warn(
            f"fusion_llm.alignment: no proof of causal settling for tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '')!r} ({rule.description}); using the whitespace "
            "rule. Check it with verify=True.",
            stacklevel=2,
        )
    try:
        _RULES[tokenizer] = rule
    except TypeError:
        _RULES_BY_ID[id(tokenizer)] = (tokenizer, rule)
    return rule


def _build_rule(tokenizer) -> SettleRule:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    added = spec.get("added_tokens") or []
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

    # Byte-level BPE behind a known split regex: hardness follows from the regex alone.
    if norm is None and _is_bytelevel(pre):
        regex = _split_regex(pre)
        if regex == LLAMA3_SPLIT_REGEX:
            return SettleRule("bytelevel-regex", True, f"{name}: byte-level, Llama-3 split regex",
                              added=_AddedTokenContexts(added, {}), regex="llama3")
        if regex == "gpt2":
            return SettleRule("bytelevel-regex", True, f"{name}: byte-level, GPT-2 split regex",
                              added=_AddedTokenContexts(added, {}), regex="gpt2")

    # SentencePiece-style: character-level BPE/Unigram over the whole (normalized) text.
    char_map = _char_map(norm, pre)
    if char_map is not None and _model_ok(model):
        # the vocabulary is in normalized space already
        pairs = set(_model_join_pairs(model))
        fuse = None
        if model.get("fuse_unk") and not _has_all_byte_tokens(model):
            vocab = model["vocab"]
            pieces = vocab.keys() if isinstance(vocab, dict) else (p for p, _ in vocab)
            fuse = np.array(sorted({ord(p) for p in pieces if len(p) == 1}), dtype=np.int64)
        return SettleRule("sentencepiece", True,
                          f"{name}: {model.get('type')} over normalized characters, {len(pairs)} joinable pairs",
                          join_codes=_codes(pairs), char_map=char_map, unknown_fuse_chars=fuse,
                          added=_AddedTokenContexts(added, char_map))

    return SettleRule("whitespace", False,
                      f"{name}: unrecognised pipeline (normalizer {_type(norm)}, pre-tokenizer {_type(pre)}, "
                      f"model {model.get('type')})", added=_AddedTokenContexts(added, {}))


def _type(obj) -> str | None:
    return obj.get("type") if isinstance(obj, dict) else None


def _is_bytelevel(pre) -> bool:
    if _type(pre) == "ByteLevel":
        return True
    return _type(pre) == "Sequence" and any(_type(p) == "ByteLevel" for p in pre["pretokenizers"])


def _split_regex(pre) -> str | None:
    """The split regex of a byte-level pre-tokenizer: Split(regex, Isolated) + ByteLevel(no regex),
    or ByteLevel(use_regex=True) alone ("gpt2"). None for anything else."""
    if _type(pre) == "ByteLevel":
        return "gpt2" if pre.get("use_regex", True) else None
    steps = pre["pretokenizers"]
    if (len(steps) == 2 and _type(steps[0]) == "Split" and _type(steps[1]) == "ByteLevel"
            and not steps[1].get("use_regex", True) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and "Regex" in steps[0].get("pattern", {})):
        return steps[0]["pattern"]["Regex"]
    return None


def _char_map(norm, pre) -> dict | None:
    """Per-character normalization (code point -> code point) for normalizers / pre-tokenizers
    that only replace single characters and prepend; None when anything else is involved."""
    cmap: dict = {}

    def add(a: str, b: str) -> bool:
        if len(a) != 1 or len(b) != 1:
            return False
        for k, v in list(cmap.items()):  # compose with earlier replacements
            if v == ord(a):
                cmap[k] = ord(b)
        cmap.setdefault(ord(a), ord(b))
        return True

    def walk_norm(n) -> bool:
        t = _type(n)
        if n is None or t == "Prepend":
            return True
        if t == "Sequence":
            return all(walk_norm(x) for x in n["normalizers"])
        if t == "Replace" and "String" in n.get("pattern", {}):
            return add(n["pattern"]["String"], n["content"])
        return False

    def walk_pre(p) -> bool:
        t = _type(p)
        if p is None:
            return True
        if t == "Sequence":
            return all(walk_pre(x) for x in p["pretokenizers"])
        if t == "Metaspace":
            return add(" ", p.get("replacement", "\u2581"))
        # A split on one literal character only adds boundaries, decided locally.
        return t == "Split" and len(p.get("pattern", {}).get("String", "")) == 1 and not p.get("invert")

    if not walk_norm(norm) or not walk_pre(pre):
        return None
    return {k: v for k, v in cmap.items() if k != v}


def _model_ok(model) -> bool:
    if model.get("type") == "Unigram":
        return True
    return (model.get("type") == "BPE" and not model.get("dropout") and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix"))


def _model_join_pairs(model) -> Iterable[tuple[str, str]]:
    """Character pairs a merge can join (BPE: last char of the left part, first of the right;
    Unigram: adjacent characters of any piece)."""
    if model["type"] == "Unigram":
        for piece, _ in model["vocab"]:
            yield from itertools.pairwise(piece)
        return
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a and b:
            yield a[-1], b[0]


def _has_all_byte_tokens(model) -> bool:
    if not model.get("byte_fallback"):
        return False
    vocab = model["vocab"]
    return all(f"<0x{i:02X}>" in vocab for i in range(256))


def _codes(pairs) -> np.ndarray:
    if not pairs:
        return np.zeros(0, np.int64)
    arr = np.array([(ord(a) << 21) | ord(b) for a, b in pairs], dtype=np.int64)
    return np.unique(arr)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)


def _pair_codes(cps: np.ndarray) -> np.ndarray:
    return (cps[:-1] << 21) | cps[1:]


def _in_sorted(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.searchsorted(sorted_set, values).clip(max=sorted_set.size - 1)
    return sorted_set[pos] == values


def _run_offset(mask: np.ndarray) -> np.ndarray:
    """For each position, its distance from the start of the run of True it belongs to."""
    idx = np.arange(mask.size)
    starts = np.where(mask & ~np.concatenate(([False], mask[:-1])), idx, 0)
    return idx - np.maximum.accumulate(starts)


# Character classes of the split regexes, filled lazily (255 = not classified yet).
_CLASS_TABLE = np.full(0x110000, _UNCLASSIFIED, dtype=np.uint8)


def _char_classes(cps: np.ndarray) -> np.ndarray:
    cls = _CLASS_TABLE[cps]
    missing = cps[cls == _UNCLASSIFIED]
    if missing.size:
        _classify(np.unique(missing))
        cls = _CLASS_TABLE[cps]
    return cls


def _classify(cps: np.ndarray) -> None:
    unassigned = []
    for cp in cps.tolist():
        ch = chr(cp)
        if ch in WHITESPACE:
            _CLASS_TABLE[cp] = _W
            continue
        cat = unicodedata.category(ch)
        if cat == "Cn":
            unassigned.append(ch)  # Python's Unicode may be older than the regex engine's
        else:
            _CLASS_TABLE[cp] = _L if cat[0] == "L" else _N if cat[0] == "N" else _P
    if unassigned:
        from tokenizers import Regex, pre_tokenizers

        s = "".join(c for c in unassigned if not 0xD800 <= ord(c) < 0xE000)
        cls = np.full(len(s), _P, dtype=np.uint8)
        for code, pattern in ((_W, r"\s"), (_N, r"\p{N}"), (_L, r"\p{L}")):
            # "removed" drops the matches, so characters missing from the splits match.
            kept = np.zeros(len(s), dtype=bool)
            for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(s):
                kept[a:b] = True
            cls[~kept] = code
        for ch, c in zip(s, cls.tolist()):
            _CLASS_TABLE[ord(ch)] = c
        for ch in unassigned:
            if _CLASS_TABLE[ord(ch)] == _UNCLASSIFIED:
                _CLASS_TABLE[ord(ch)] = _P


for _c in range(128):
    _classify(np.array([_c]))


# ---------------------------------------------------------------------------------------
# Core alignment
# ---------------------------------------------------------------------------------------


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


def _encode(tokenizer, texts: list[str]):
    return tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True,
                     return_special_tokens_mask=True, return_attention_mask=False)


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
    enc = _encode(source_tokenizer, [prefix])
    left = _token_left_ends(np.asarray(enc["offset_mapping"][0], np.int64).reshape(-1, 2),
                            np.asarray(enc["special_tokens_mask"][0]))
    return int(np.searchsorted(left, safe_cut(prefix, source_tokenizer), side="right"))


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
    if bad.any():  # the rule's claim failed on this text: drop those boundaries and count it
        hard &= ~bad
        k = int(bad.sum())
        stats.crossing_fallbacks += k
        stats.failures_by_source[_name(source_tokenizer)] += k
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


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


# ---------------------------------------------------------------------------------------
# Data-pipeline and model helpers
# ---------------------------------------------------------------------------------------


def source_keys(name: str) -> tuple[str, str]:
    """Column names of one source in :func:`align_batch`'s output: ``(ids_key, index_key)``."""
    return f"{name}_input_ids", f"{name}_align"


#: Extra columns of a source packed with its tails (``align_batch(tails=True)``), per packed token.
TAIL_COLUMNS = ("group", "ctx", "pos")


def pack_tails(ids: list[int], index: list[int], tails: list[list[int]]) -> dict[str, list[int]]:
    """One source sequence that gives every anchor position its tokenization of exactly the anchor's prefix.

    The settled full-text tokens come first (``ids``, already trimmed); then, for each distinct
    ``(index, tail)`` with a non-empty tail, its tail tokens. A tail token attends to the settled
    tokens ``0..index`` and to the earlier tokens of its own tail, at the positions it has in the
    prefix's own encoding - so its hidden state is the source's, run on ``tokenize(prefix)``.

    Returns:
        ``input_ids`` (settled + tails), ``align`` (per anchor position, the packed index of its last
        token: the tail's last, or the settled ``index``; ``-1`` none), and per packed token ``group``
        (``-1`` settled, else the tail's number), ``ctx`` (settled tokens visible to it) and ``pos``
        (its position id). `tail_attention_mask` turns them into the attention mask.
    """
    n = len(ids)
    out = {"input_ids": list(ids), "group": [-1] * n, "ctx": list(range(1, n + 1)), "pos": list(range(n))}
    last_of: dict[tuple, int] = {}  # (index, tail) -> packed index of the tail's last token
    align = []
    for j, tail in zip(index, tails):
        if not tail:
            align.append(j)
            continue
        key = (j, tuple(tail))
        if key not in last_of:
            out["group"] += [len(last_of)] * len(tail)
            out["input_ids"] += tail
            out["ctx"] += [j + 1] * len(tail)
            out["pos"] += list(range(j + 1, j + 1 + len(tail)))
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
    for name, tok in source_tokenizers.items():
        settle_rule(tok)  # refuses slow tokenizers before any work
        enc = _encode(tok, texts)
        ids_key, idx_key = source_keys(name)
        out[ids_key], out[idx_key] = [], []
        if tails:
            for c in TAIL_COLUMNS:
                out[f"{name}_{c}"] = []
        for i, text in enumerate(texts):
            aligned = align_source(
                text, anchor["offset_mapping"][i], tok,
                source_encoding=(enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i]),
                verify=verify, tails=tails, stats=stats,
            )
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


def gather_aligned(source_hidden, index, nothing_vector):
    """Pick each anchor position's settled source feature, or the "nothing yet" vector.

    Args:
        source_hidden: ``(B, S, H)`` source features (e.g. an adapted tap).
        index: ``(B, T)`` integer tensor from :func:`align_batch` (padded with ``-1``);
            ``-1`` means no settled source token.
        nothing_vector: ``(H,)`` learned vector used where ``index < 0``; gradients reach it.

    Returns:
        ``(B, T, H)`` tensor in ``source_hidden``'s dtype.

    Raises:
        IndexError: when an index points past ``S`` (source ids were cut shorter than the
            alignment assumes).
    """
    import torch

    if source_hidden.dim() != 3 or index.dim() != 2 or index.shape[0] != source_hidden.shape[0]:
        raise ValueError(f"expected source_hidden (B, S, H) and index (B, T), got {tuple(source_hidden.shape)} "
                         f"and {tuple(index.shape)}")
    b, s, h = source_hidden.shape
    t = index.shape[1]
    index = index.to(device=source_hidden.device, dtype=torch.long)
    nothing = nothing_vector.to(device=source_hidden.device, dtype=source_hidden.dtype).expand(b, t, h)
    if s == 0 or index.numel() == 0:
        if index.numel() and bool((index >= 0).any()):
            raise IndexError("alignment index points into an empty source sequence")
        return nothing.clone()
    if int(index.max()) >= s:
        raise IndexError(f"alignment index {int(index.max())} is out of range for {s} source positions")
    picked = torch.gather(source_hidden, 1, index.clamp(min=0).unsqueeze(-1).expand(b, t, h))
    return torch.where((index < 0).unsqueeze(-1), nothing, picked)
