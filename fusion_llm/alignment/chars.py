"""Characters as the hard-boundary rules see them: Unicode whitespace, the character classes of the split
regexes (``L``, ``N``, ``W``, ``P``; filled lazily, from the tokenizer's own regex engine for code points Python's
Unicode table does not know) and the numpy helpers over code points and code-point pairs."""

from __future__ import annotations

import unicodedata

import numpy as np


# Unicode White_Space: what ``\s`` matches in the tokenizers' regex engine (Oniguruma).
# Python's str.isspace() differs (it also accepts \x1c-\x1f), so it is not used.
WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

_L, _N, _W, _P = 0, 1, 2, 3  # character classes of the split regexes
_UNCLASSIFIED = 255


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
