"""Carry a source model's next-token distribution onto the anchor's vocabulary, through shared byte strings.

A source LM with its own tokenizer predicts ``P_src(u)`` over its tokens ``u`` for the text that follows a
prefix. The anchor needs the probability of its own *next token*. The mass of each of the source's ``top_k``
tokens, less the probability of the next token down (`less_next`: so the truncation is continuous), goes where
the anchor's tokenizer would put those bytes:

- to the anchor's first token for ``bytes(u)`` (the first token of the anchor tokenizer's own cut of those
  bytes, `anchor_first_tokens`; not simply the longest anchor token they start with)
  when that token is shorter than ``u``: the anchor would emit it and go on with the rest;
- when an anchor token spells ``u`` whole, the anchor might also merge ``u`` with what follows into a longer
  token ``w``, but only where the source's own tokenizer would start ``bytes(w)`` with ``u`` too (otherwise the
  source would have predicted another token for those bytes: Llama-3 predicting " the" has *not* put that mass
  on " them", which it spells as one token): ``P_src(u)`` is shared among those anchor tokens (the one that
  spells ``u`` included), in proportion to the anchor's own distribution over them (at most ``max_extensions``
  of them; otherwise it all goes to the token that spells ``u``). Sharing with every anchor token that starts
  with ``bytes(u)`` let the anchor's own beliefs take back most of what the source knew: the stand-in probe
  (`benchmarks/lm/lookahead.py`) carried 61% of Llama-3's lead on Shakespeare and 32% of Gemma-2's on prose that
  way, 80% and 70% this way;
- the mass outside the top-k is spread like the anchor's distribution: ``rest * P_anchor(v)``.

So ``p`` is a distribution over the anchor's vocabulary (it sums to one), and most anchor tokens get only the
last term. The bridge returns the rest as a *correction* to ``log(rest * P_anchor(v))``:
``log p(v) = log P_anchor(v) + log(rest) + log1p(placed(v) / (rest * P_anchor(v)))``; the first two terms are
the anchor's own log-probabilities and a per-position constant, which a softmax does not see, so a log-linear
mix of the anchor and the source is the anchor's logits rescaled plus this correction. Anchor tokens without
bytes (special tokens) get no correction.

Everything here runs under ``no_grad`` on frozen outputs; it only ever sees the source's distribution at a
position the causal alignment chose, so it adds nothing the anchor's prefix does not hold.
"""

from __future__ import annotations

import bisect
import functools
import json
import re

import torch

from fusion_llm.output_loss import logsumexp, top_k_log_probs
from fusion_llm.paths import cache_dir, write_atomic

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (byte-level BPE token strings -> bytes)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = tokenizer.backend_tokenizer
    parts = [backend.pre_tokenizer, backend.decoder]
    return any(p is not None and "ByteLevel" in repr(p) for p in parts)


def token_bytes(tokenizer) -> list[bytes | None]:
    """The UTF-8 bytes each token id stands for; ``None`` for special tokens (BOS, EOS, control tokens).

    Byte-level BPE tokens (Llama-3) are mapped back through GPT-2's byte table; SentencePiece-style tokens
    (Mistral, Gemma, Llama-2 / Phi-3) turn ``▁`` into a space and ``<0xNN>`` byte-fallback pieces into the byte.
    """
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    added_tokens = tokenizer.added_tokens_decoder  # a property that rebuilds its dict: read it once
    for token_id, added in added_tokens.items():
        if added.special:
            special.add(token_id)
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder() if byte_level else None
    out: list[bytes | None] = []
    for token_id, piece in enumerate(pieces):
        if piece is None or token_id in special:
            out.append(None)
            continue
        if byte_level and token_id in added_tokens:  # a non-special added token stands for its own text
            out.append(piece.encode("utf-8"))
            continue
        if byte_level:
            try:
                out.append(bytes(decoder[c] for c in piece))
            except KeyError:
                out.append(piece.encode("utf-8"))
            continue
        match = _BYTE_TOKEN.match(piece)
        out.append(bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8"))
    return [b if b else None for b in out]


class AnchorIndex:
    """The anchor's tokens by their bytes: the anchor's first token for a byte string (the longest anchor token it
    starts with) and the anchor tokens that start with a byte string (a range of the byte-sorted vocabulary).

    Args:
        anchor_bytes: per anchor token id its bytes (`token_bytes`), ``None`` for tokens without bytes.
    """

    def __init__(self, anchor_bytes: list[bytes | None]):
        self.index: dict[bytes, int] = {}
        for v, b in enumerate(anchor_bytes):
            if b and b not in self.index:
                self.index[b] = v
        self.order = sorted((v for v, b in enumerate(anchor_bytes) if b), key=lambda v: anchor_bytes[v])
        self.keys = [anchor_bytes[v] for v in self.order]
        self.top = b"\xff" * (max(map(len, self.keys), default=0) + 1)  # above every key that extends a prefix

    def first(self, b: bytes) -> int | None:
        return next((self.index[b[:k]] for k in range(len(b), 0, -1) if b[:k] in self.index), None)

    def extensions(self, b: bytes) -> list[int]:
        """The anchor tokens whose bytes start with ``b`` (``b`` itself included when it is one)."""
        return self.order[bisect.bisect_left(self.keys, b):bisect.bisect_left(self.keys, b + self.top)]


#: What `anchor_cuts` writes before a source token's text, so that the anchor tokenizes it as it would
#: after a line break (no SentencePiece dummy space glued to its first word, no merge with what went before).
_SENTINEL = "\n"


def anchor_cuts(anchor_tokenizer, anchor_bytes: list[bytes | None], byte_strings: list[bytes | None],
                batch: int = 8192) -> list[dict[int, int] | None]:
    """Per byte string, how the anchor's own tokenizer cuts it: ``{byte offset: anchor token starting there}``
    (``None`` where the string is empty, not UTF-8, or the anchor's tokens do not spell it after `_SENTINEL`).

    The longest anchor token a string starts with is often not the one the anchor emits: BPE reads " bishop" as
    " b" "ishop" though Mistral has a token " bis", and "," is Mistral's token 29493, not its byte-fallback twin
    "<0x2C>" with the same bytes and a lower id. A source's mass placed on the longest prefix lands on a token the
    anchor never emits there: measured on 20 Shakespeare validation rows, 207 of the 279 Llama-3 tokens that start
    where a Mistral token starts and run past it (11 with this rule).
    """
    out: list[dict[int, int] | None] = [None] * len(byte_strings)
    texts, which = [], []
    for i, b in enumerate(byte_strings):
        if not b:
            continue
        try:
            texts.append(_SENTINEL + b.decode("utf-8"))
            which.append(i)
        except UnicodeDecodeError:
            continue
    start = len(_SENTINEL)
    for a in range(0, len(texts), batch):
        enc = anchor_tokenizer(texts[a:a + batch], add_special_tokens=False, return_offsets_mapping=True)
        for i, ids, offsets in zip(which[a:a + batch], enc["input_ids"], enc["offset_mapping"]):
            b, at, cuts = byte_strings[i], 0, {}
            for t, (lo, hi) in zip(ids, offsets):
                if lo < start or hi <= lo:  # the sentinel's tokens (a token that merged it in fails below)
                    continue
                piece = anchor_bytes[t] if t < len(anchor_bytes) else None
                if not piece or not b.startswith(piece, at):
                    cuts = None
                    break
                cuts[at] = t
                at += len(piece)
            out[i] = cuts if cuts and at == len(b) else None
    return out


def anchor_twins(anchor_tokenizer, anchor_bytes: list[bytes | None]) -> set[int]:
    """The anchor tokens its tokenizer never emits for their bytes because another token has the same bytes and is
    the one emitted (Mistral's byte-fallback "<0x2C>" beside ","): no source mass goes to them."""
    ids: dict[bytes, list[int]] = {}
    for v, b in enumerate(anchor_bytes):
        if b:
            ids.setdefault(b, []).append(v)
    twins = [b for b, group in ids.items() if len(group) > 1]
    hidden = set()
    for b, cuts in zip(twins, anchor_cuts(anchor_tokenizer, anchor_bytes, twins)):
        if cuts is not None and len(cuts) == 1 and cuts[0] in ids[b]:
            hidden.update(v for v in ids[b] if v != cuts[0])
    return hidden


def anchor_first_tokens(anchor_tokenizer, anchor_bytes: list[bytes | None], byte_strings: list[bytes | None],
                        index: AnchorIndex | None = None) -> list[int | None]:
    """Per byte string, the anchor token its own tokenizer starts those bytes with (`anchor_cuts`); where the
    anchor's tokens do not spell the string (a sentinel merged, bytes that are not UTF-8), the longest anchor token
    the string starts with; ``None``: no anchor token spells its start."""
    index = index or AnchorIndex(anchor_bytes)
    cuts = anchor_cuts(anchor_tokenizer, anchor_bytes, byte_strings)
    return [c[0] if c else index.first(b) if b else None for b, c in zip(byte_strings, cuts)]


class VocabBridge:
    """The fixed index tables that map one source's distribution onto the anchor's vocabulary.

    Args:
        source_tokenizer, anchor_tokenizer: fast tokenizers.
        source_size, anchor_size: rows of each LM head (may exceed the tokenizer's size: padded vocabularies;
            the extra rows have no bytes).
        top_k: source tokens kept per position.
        max_extensions: a source token spelled whole by an anchor token that more than this many anchor tokens
            extend gives all its mass to that anchor token instead of sharing it among the extensions.
        min_rest: floor of ``rest`` (keeps the correction finite when the top-k hold all the mass).
        tables: ``{"first": anchor_first_tokens(anchor, source bytes), "back": anchor_first_tokens(source, anchor
            bytes)}`` when already known (`bridge_for` keeps them on disk: tokenizing a 262k vocabulary takes ~9 s).
    """

    def __init__(self, source_tokenizer, anchor_tokenizer, source_size: int | None = None,
                 anchor_size: int | None = None, top_k: int = 256, max_extensions: int = 64,
                 min_rest: float = 1e-4, tables: dict[str, list] | None = None):
        src = token_bytes(source_tokenizer)
        anc = token_bytes(anchor_tokenizer)
        src += [None] * max(0, (source_size or 0) - len(src))
        anc += [None] * max(0, (anchor_size or 0) - len(anc))
        self.source_size, self.anchor_size = len(src), len(anc)
        self.top_k, self.min_rest, self.max_extensions = top_k, min_rest, max_extensions
        hidden = anchor_twins(anchor_tokenizer, anc)
        anchors = AnchorIndex([None if v in hidden else b for v, b in enumerate(anc)])
        tables = tables or {}
        cut = tables.get("first") or anchor_first_tokens(anchor_tokenizer, anc, src, anchors)
        back = tables.get("back") or anchor_first_tokens(source_tokenizer, src, anc)
        # per source token the anchor's first token for its bytes; per anchor token the source's (None: none)
        self.tables = {"first": cut, "back": back}
        first, extensions = [], []
        for u, (b, v) in enumerate(zip(src, cut)):
            first.append(self.anchor_size if v is None else v)
            longer = anchors.extensions(b) if v is not None and anc[v] == b else []
            longer = [w for w in longer if w == v or back[w] == u]  # the source too would start w's bytes with u
            extensions.append(longer if 1 < len(longer) <= max_extensions else [])
        self.first_anchor = torch.tensor(first, dtype=torch.long)  # (V_src,), anchor_size = none
        # Each source token's extensions (the anchor tokens that share its mass, its own spelling included), in
        # compressed rows: those of token u are extension_ids[extension_start[u]:extension_start[u + 1]]. Most source
        # tokens have none (0.2-1.6 on average for the stand-ins' tokenizers), so a padded (V_src, 64) table would
        # make `sparse_correction` gather 40-300 times more than it uses.
        counts = torch.tensor([len(e) for e in extensions], dtype=torch.long)
        self.extension_count = counts  # (V_src,)
        self.extension_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # (V_src + 1,)
        self.extension_ids = torch.tensor([v for e in extensions for v in e], dtype=torch.long)  # (nnz,)
        self.mapped = torch.tensor([b is not None for b in anc])  # (V_anchor,)

    @torch.no_grad()
    def sparse_correction(self, top_log_probs: torch.Tensor, top_ids: torch.Tensor, anchor_log_probs: torch.Tensor,
                          anchor_lse: torch.Tensor | None = None, dense: bool | None = None,
                          rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's distribution in the anchor's vocabulary, as a correction to ``log(rest * P_anchor)``,
        kept sparse: the correction is zero except where the top-k's mass lands (each top-k token's first anchor
        token or its extensions), so a (N, V_anchor) tensor is never built.

        The mass landing on one anchor token from several entries is summed either by sorting the entries' keys
        (cost ~ k x extensions per position) or, with ``dense``, in a (rows, V_anchor) scratch ``rows`` positions at a
        time, read back where it is not zero (cost ~ V_anchor per position, no sort). By default ``dense`` when the
        top-k is at least 1/8 of the anchor's vocabulary (a wide route: 4096 tokens over Mistral's 32k, where the
        sort cost more than everything else); both give the same result.

        Args:
            top_log_probs, top_ids: (N, k) the source's most likely next tokens and their log-probabilities
                (`top_log_probs`).
            anchor_log_probs: (N, V_anchor) the anchor's own next-token log-probabilities; or its logits, with
                ``anchor_lse`` (N,) their logsumexp (then no normalised (N, V_anchor) copy is needed: only the
                entries read here are normalised).

        Returns:
            ``(keys, values)``: (U,) distinct indices into the flattened (N, V_anchor) correction
            (``row * V_anchor + token``), ascending, and (U,) float32 ``log p(v) - log(rest * P_anchor(v)) > 0`` there.
        """
        n, size = top_ids.shape[0], self.anchor_size
        anchor_log_probs = anchor_log_probs[:, :size]
        lse = torch.zeros(n, device=anchor_log_probs.device) if anchor_lse is None else anchor_lse.float()
        rest = self.rest(top_log_probs, top_ids)
        if dense is None:
            dense = top_ids.shape[1] * 8 >= size
        if not dense:
            at, placed = self._placed(top_log_probs, top_ids, anchor_log_probs, lse)
            keep = (placed > 0) & (at % (size + 1) < size)  # unspellable tokens (and shared first tokens): nothing
            spare = at[keep]
            keys, inverse = torch.unique(spare // (size + 1) * size + spare % (size + 1), return_inverse=True)
            mass = torch.zeros(keys.shape[0]).scatter_add_(0, inverse, placed[keep])
            return self._values(keys, mass, anchor_log_probs, lse, rest)
        keys, values = [], []
        scratch = torch.zeros(min(rows, n) * (size + 1))
        for a in range(0, n, rows):
            b = min(a + rows, n)
            at, placed = self._placed(top_log_probs[a:b], top_ids[a:b], anchor_log_probs[a:b], lse[a:b])
            part = scratch[: (b - a) * (size + 1)]
            part.index_add_(0, at, placed)
            landed = part.view(b - a, size + 1)[:, :size]
            r, c = landed.nonzero(as_tuple=True)  # ascending, distinct
            k_, v_ = self._values(r * size + c, landed[r, c], anchor_log_probs[a:b], lse[a:b], rest[a:b])
            part.zero_()
            keys.append(k_ + a * size)
            values.append(v_)
        return torch.cat(keys), torch.cat(values)

    def _placed(self, top_log_probs, top_ids, anchor_logits, lse) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each top-k entry's mass lands: ``(at, mass)``, ``at`` indexing a (n, V_anchor + 1) table (the spare
        column: no anchor token spells the source token's start; its mass goes to the rest) and ``mass`` >= 0."""
        n, k, size = top_ids.shape[0], top_ids.shape[1], self.anchor_size
        top_p = top_log_probs.float().exp().flatten()  # (n*k,)
        ids = top_ids.flatten()
        # every (top-k entry, extension) pair, in the compressed rows' order: entry e has count[e] of them
        count = self.extension_count[ids]
        entry = torch.repeat_interleave(torch.arange(n * k), count)  # (P,) the entry of each pair
        offset = torch.arange(entry.shape[0]) - torch.repeat_interleave(count.cumsum(0) - count, count)
        ext = self.extension_ids[self.extension_start[ids][entry] + offset]  # (P,) anchor token
        ext_row = entry // k
        ext_p = (anchor_logits[ext_row, ext].float() - lse[ext_row]).exp_()  # (P,) the anchor's own mass there
        z = torch.zeros(n * k).index_add_(0, entry, ext_p)  # anchor mass on the tokens that spell u or extend it
        shared = z > 0  # u's mass is shared among its extensions, else all on its first token
        first = self.first_anchor[ids]  # anchor_size = no anchor token spells u's start (mass -> the spare column)
        placed = torch.cat([torch.where(shared, torch.zeros_like(top_p), top_p),
                            top_p[entry] * ext_p / z[entry].clamp_min(1e-30)])  # (n*k + P,)
        starts = torch.arange(n).unsqueeze(1) * (size + 1)  # (n, 1) each row's start in the table
        return torch.cat([(starts + first.view(n, k)).flatten(), starts.flatten()[ext_row] + ext]), placed

    def _values(self, keys, mass, anchor_logits, lse, rest) -> tuple[torch.Tensor, torch.Tensor]:
        """``log1p(mass / (rest * P_anchor))`` at ``keys`` (into the flattened (n, V_anchor)), anchor tokens without
        bytes left out."""
        size = self.anchor_size
        rows, cols = keys // size, keys % size
        floor = ((anchor_logits[rows, cols].float() - lse[rows]).exp() * rest[rows]).clamp_min_(1e-30)
        values = mass.div_(floor).log1p_()
        mapped = self.mapped[cols]
        return keys[mapped], values[mapped]

    def correction(self, top_log_probs: torch.Tensor, top_ids: torch.Tensor,
                   anchor_log_probs: torch.Tensor) -> torch.Tensor:
        """`sparse_correction` as a dense (N, V_anchor) float32 tensor (>= 0; for inspection and tests)."""
        keys, values = self.sparse_correction(top_log_probs, top_ids, anchor_log_probs)
        out = torch.zeros(top_ids.shape[0] * self.anchor_size)
        return out.index_put_((keys,), values).view(-1, self.anchor_size)

    def rest(self, top_log_probs: torch.Tensor, top_ids: torch.Tensor) -> torch.Tensor:
        """(N,) the source's mass spread like the anchor's distribution: outside the top-k (or unspellable)."""
        top_p = top_log_probs.float().exp()
        lost = self.first_anchor[top_ids] == self.anchor_size  # no anchor token spells its start
        return (1.0 - top_p.sum(-1) + (top_p * lost).sum(-1)).clamp_min(self.min_rest)

    def log_probs(self, source_log_probs: torch.Tensor, anchor_log_probs: torch.Tensor,
                  top_k: int | None = None) -> torch.Tensor:
        """``log p(v)`` itself (N, V_anchor), from full (N, V_src) source log-probabilities: the anchor's
        log-probabilities + log(rest) + the correction (for inspection, tests and probes; ``top_k``: the source
        tokens carried, default the bridge's)."""
        k = top_k or self.top_k
        source = source_log_probs[:, : self.source_size].float()
        top, ids = less_next(*source.topk(min(k + 1, self.source_size), -1), k)
        rest = self.rest(top, ids)
        correction = self.correction(top, ids, anchor_log_probs.float())
        mapped = anchor_log_probs.float() + rest.log().unsqueeze(-1) + correction
        return torch.where(self.mapped, mapped, anchor_log_probs.float())


@torch.no_grad()
def less_next(top_log_probs: torch.Tensor, top_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of a distribution, each token less the probability of the next one down.

    A hard top-k is discontinuous: two near-tied tokens at its edge (a float rounding apart, as between a batch
    and its rows run alone) swap in and out, and the one kept can move a rare anchor token's logit by nats. Less
    the (k+1)-th probability, a token enters or leaves the top-k with no mass, so the bridged distribution is a
    continuous function of the source's logits. The mass taken off goes to the rest.

    Args:
        top_log_probs, top_ids: (N, k + 1) (or (N, k) when the vocabulary has only k tokens) the most likely
            tokens in descending order and their log-probabilities.

    Returns:
        (N, k) log-probabilities (``-inf`` for a token tied with the next) and their ids.
    """
    p = top_log_probs.float().exp()
    if p.shape[-1] > k:
        p = (p[:, :k] - p[:, k:k + 1]).clamp_min_(0.0)
    return p.log(), top_ids[:, :k]


def top_log_probs(backbone, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A frozen LM's ``k`` most likely next tokens (through its own output layer, `FrozenBackbone.lm_logits`),
    each less the probability of the (k+1)-th (`less_next`).

    Args:
        backbone: a `FrozenBackbone` loaded with its LM head.
        hidden: (N, H) last-layer (pre-norm) hidden states.

    Returns:
        ``(log_probs, ids, entropy)``: (N, k) log-probabilities and token ids, and (N,) the entropy (nats) of the
        top-k part plus the rest taken as one outcome (a cheap stand-in for the full entropy).
    """
    head = backbone.lm_head
    if type(head) is torch.nn.Linear:  # a few rows at a time, never the (N, V) logits or their gradient
        top, ids = top_k_log_probs(backbone.final_norm(hidden), head.weight, min(k + 1, head.weight.shape[0]),
                                   bias=head.bias, softcap=backbone.logit_softcap)
    else:  # a quantized or wrapped output layer: the plain path
        logits = backbone.lm_logits(hidden).float()  # (N, V)
        top, ids = logits.topk(min(k + 1, logits.shape[-1]), dim=-1)
        top = top - logsumexp(logits).unsqueeze(-1)
    log_probs = top[:, :k]
    p = log_probs.exp()
    rest = (1.0 - p.sum(-1)).clamp_min(1e-12)
    entropy = -(p * log_probs).sum(-1) - rest * rest.log()
    return (*less_next(top, ids, k), entropy)


_BRIDGES: dict[tuple, VocabBridge] = {}
_TABLES_VERSION = 3  # of `VocabBridge.tables` and their rules (`anchor_cuts`): a bump recomputes those kept on disk


def bridge_for(source, anchor) -> VocabBridge:
    """The `VocabBridge` of two `FrozenBackbone` objects, built once per process (a few seconds). Its tables do not
    depend on how many source tokens a caller carries (`sparse_correction` takes a top-k of any k). Its two
    tokenizer tables (`VocabBridge.tables`, ~15 s for a 262k vocabulary) are kept in
    ``$FUSION_LLM_CACHE/bridges``, by both tokenizers' fingerprints and sizes."""
    key = (source.fingerprint.get("tokenizer"), anchor.fingerprint.get("tokenizer"), id(source.tokenizer),
           id(anchor.tokenizer))
    if key not in _BRIDGES:
        sizes = source.lm_head.weight.shape[0], anchor.lm_head.weight.shape[0]
        stored = None
        if key[0] and key[1]:
            stored = cache_dir() / "bridges" / f"{key[0]}-{key[1]}-{sizes[0]}-{sizes[1]}-v{_TABLES_VERSION}.json"
        tables = None
        if stored is not None and stored.is_file():
            try:
                tables = json.loads(stored.read_text())
            except ValueError:  # a damaged file: computed again and rewritten
                tables = None
            if not (isinstance(tables, dict) and len(tables.get("first") or ()) == sizes[0]
                    and len(tables.get("back") or ()) == sizes[1]):
                tables = None
        bridge = VocabBridge(source.tokenizer, anchor.tokenizer, *sizes, tables=tables)
        if stored is not None and tables is None:
            write_atomic(stored, json.dumps(bridge.tables))
        _BRIDGES[key] = bridge
    return _BRIDGES[key]
