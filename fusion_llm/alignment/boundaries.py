"""Hard boundaries of one source tokenizer (:class:`SettleRule`), and the added tokens that may cover one.

A boundary ``c`` (between characters ``c-1`` and ``c``) is *hard* for a tokenizer if, in every text, no token
spans it and the tokens left of it do not depend on anything right of it (``settled.py`` builds the causal
index on them). Which boundaries are hard is proved per tokenizer kind (:func:`settle_rule`):

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusion_llm.alignment.chars import (
    WHITESPACE,
    _L,
    _N,
    _P,
    _W,
    _char_classes,
    _codepoints,
    _in_sorted,
    _pair_codes,
    _run_offset,
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
