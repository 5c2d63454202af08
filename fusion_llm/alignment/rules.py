"""Settle rules per source tokenizer: refuse slow tokenizers (:func:`check_fast_tokenizer`), read a fast
tokenizer's backend pipeline (normalizer, pre-tokenizer, model, added tokens) and build its :class:`SettleRule`,
once per tokenizer object (:func:`settle_rule`)."""

from __future__ import annotations

import itertools
import json
import warnings
import weakref
from collections.abc import Iterable

import numpy as np

from fusion_llm.alignment.boundaries import SettleRule, _AddedTokenContexts
from fusion_llm.alignment.chars import _codes


# The Llama-3 / cl100k split regex, exactly as it appears in tokenizer.json.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


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
