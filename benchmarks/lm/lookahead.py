"""Probe: does looking ahead over the source's unsettled tail carry more of the other member than the tail route?

    python benchmarks/real_track.py --lookahead-probe      # ~2 min on 1 core once the real members are converted

The prediction route (`fusion_llm.vocab_bridge`, ``head.source_predictions``) reads the source's next-token
distribution after its tokenization of exactly the anchor's prefix (its settled tokens plus the unsettled tail).
When the anchor's token ends inside what would be one source token, that tail is a split the source rarely saw
(the boundary effect of the stand-in probe). The look-ahead alternative marginalises over where the source's
token boundary falls: at each tail step ``i``, the source tokens that spell the rest of the tail *and go past the
prefix's end* (weighted by the probability of the tail's first ``i - 1`` tokens and their own), each placing its
mass on the anchor token that starts where the prefix ends in the anchor tokenizer's own cut of its bytes (left out
where the anchor would not cut there); plus the tail route itself,
weighted by the probability of the whole tail. Everything here is untrained, mixed log-linearly with the anchor
at fixed weights, scored on validation rows (nothing is chosen on test rows). Writes ``real_lookahead_probe.json``.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import torch

from benchmarks.store import write_json_atomic


class _Placer:
    """Anchor ids and shares for a byte string, by the bridge's fallback rule (`VocabBridge`): the longest anchor
    token those bytes start with, or, when an anchor token spells them whole and at most 64 extend it, shared among
    those in proportion to the anchor's own probabilities. ``cuts``: per source token, how the anchor's tokenizer
    cuts its bytes (`fusion_llm.vocab_bridge.anchor_cuts`), used first: a source token's mass beyond the prefix goes
    to the anchor token starting where the prefix ends, if the anchor would cut there at all."""

    def __init__(self, anchor_tokenizer, anchor_bytes: list, source_bytes: list):
        from fusion_llm.vocab_bridge import AnchorIndex, anchor_cuts

        self.bytes, self.anchors = anchor_bytes, AnchorIndex(anchor_bytes)
        self.cuts = anchor_cuts(anchor_tokenizer, anchor_bytes, source_bytes)

    def __call__(self, r: bytes, anchor_log_probs: torch.Tensor) -> list[tuple[int, float]]:
        v = self.anchors.first(r)
        if v is None:
            return []
        longer = self.anchors.extensions(r) if self.bytes[v] == r else []
        if 1 < len(longer) <= 64:
            ids = torch.tensor(longer)
            p = anchor_log_probs[ids].exp()
            if p.sum() > 0:
                return list(zip(ids.tolist(), (p / p.sum()).tolist()))
        return [(v, 1.0)]


def _lookahead(log_probs, tail_route, q, settled, ids, source_bytes, place, anchor_lp, k):
    """The look-ahead distribution (V_anchor,) of one anchor position whose tail sits at packed positions ``q``."""
    tail_bytes = [source_bytes[ids[i]] or b"" for i in q]
    before = [settled] + q[:-1]  # the state each tail token is predicted from
    log_path, extra, beyond = 0.0, {}, 0.0
    for i in range(len(q)):
        rest = b"".join(tail_bytes[i:])
        top, top_ids = log_probs[before[i]].topk(k)
        for lp, w in zip(top.tolist(), top_ids.tolist()):
            b = source_bytes[w]
            if b and len(b) > len(rest) and b.startswith(rest):
                cut = place.cuts[w]  # how the anchor's own tokenizer cuts u's bytes
                if cut is not None and len(rest) not in cut:  # it would not have cut the prefix here: no way on
                    continue
                mass = math.exp(log_path + lp)
                beyond += mass
                spots = [(cut[len(rest)], 1.0)] if cut is not None else place(b[len(rest):], anchor_lp)
                for c, share in spots:
                    extra[c] = extra.get(c, 0.0) + mass * share
        log_path += float(log_probs[before[i], ids[q[i]]])
    whole = math.exp(log_path)
    total = whole + beyond
    p = tail_route.exp() * (whole / total)
    if extra:
        p.index_add_(0, torch.tensor(list(extra)), torch.tensor(list(extra.values()), dtype=p.dtype) / total)
    return p.clamp_min(1e-30).log(), beyond / total


def lookahead_probe(out_dir: Path, texts: dict[str, list[str]], configs: dict, *, weights=(0.25, 0.5), k: int = 256,
                    log=print, filename: str = "real_lookahead_probe.json") -> dict:
    """``texts``: domain -> validation rows; ``configs``: anchor name -> the untrained fused model's `FusionConfig`
    (two members, the prediction route; `benchmarks.lm.real.probe_configs`). ``k``: the source tokens both routes
    carry per position (the tail route's top-k, `head.source_top_k`, and the look-ahead's candidates)."""
    from fusion_llm.alignment import align_batch, tail_attention_mask
    from fusion_llm.data.pipeline import LMCollator
    from fusion_llm.modeling import FusionModel
    from fusion_llm.vocab_bridge import bridge_for, token_bytes

    val_rows = len(next(iter(texts.values())))
    out = {"val_rows": val_rows, "weights": list(weights), "top_k": k, "anchors": {},
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    for anchor_name, config in configs.items():
        model = FusionModel.from_config(config)
        anchor = model.anchor
        (source_name, source), = [(n, b) for n, b in model.backbones.items() if n != anchor.name]
        bridge = bridge_for(source, anchor)
        source_bytes = token_bytes(source.tokenizer) + [None] * source.lm_head.weight.shape[0]
        place = _Placer(anchor.tokenizer, token_bytes(anchor.tokenizer) + [None] * anchor.lm_head.weight.shape[0],
                        source_bytes)
        collate = LMCollator(anchor.name, {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()})
        nll = {"anchor": {}, **{f"{route}@{w}": {} for route in ("tail", "lookahead") for w in weights}}
        beyond, positions = 0.0, 0
        for domain, rows in texts.items():
            for key in nll:
                nll[key][domain] = 0.0
            for text in rows:
                aligned = align_batch([text], anchor.tokenizer, {source_name: source.tokenizer}, tails=True)
                batch = collate([{c: v[0] for c, v in aligned.items()}])
                enc, src = batch["inputs"][anchor.name], batch["inputs"][source_name]
                with torch.no_grad():
                    last = anchor.taps(enc["input_ids"], enc["attention_mask"], layers=[anchor.spec.num_hidden_layers])
                    anchor_lps = torch.log_softmax(anchor.lm_logits(last[-1])[0].float(), -1)
                    hidden = source.taps(src["input_ids"], tail_attention_mask(src["tail_group"], src["tail_ctx"]),
                                         layers=[source.spec.num_hidden_layers], position_ids=src["position_ids"])
                    source_lps = torch.log_softmax(source.lm_logits(hidden[-1][0]).float(), -1)
                group, ctx = src["tail_group"][0].tolist(), src["tail_ctx"][0].tolist()
                ids, align = src["input_ids"][0].tolist(), batch["alignment"][source_name][0].tolist()
                for t, y in enumerate(batch["labels"][0].tolist()):
                    if y < 0:
                        continue
                    lp = anchor_lps[t]
                    nll["anchor"][domain] -= float(lp[y])
                    a = align[t]
                    routes = {"tail": lp, "lookahead": lp}  # no source position yet: the anchor alone
                    if a >= 0:
                        tail = bridge.log_probs(source_lps[a:a + 1], lp.unsqueeze(0), top_k=k)[0]
                        routes = {"tail": tail, "lookahead": tail}
                        if group[a] >= 0:
                            q = [i for i in range(a + 1) if group[i] == group[a]]
                            routes["lookahead"], share = _lookahead(source_lps, tail, q, ctx[a] - 1, ids,
                                                                    source_bytes, place, lp, k)
                            beyond, positions = beyond + share, positions + 1
                    for route, p in routes.items():
                        for w in weights:
                            mixed = (1 - w) * lp + w * p
                            nll[f"{route}@{w}"][domain] -= float(mixed[y] - torch.logsumexp(mixed, -1))
        size = {d: sum(len(t.encode()) for t in rows) for d, rows in texts.items()}
        bits = {key: {**{d: v / math.log(2) / size[d] for d, v in per.items()},
                      "mixture": sum(per.values()) / math.log(2) / sum(size.values())} for key, per in nll.items()}
        out["anchors"][anchor_name] = {"bits_per_byte": bits, "tail_positions": positions,
                                       "mean_mass_beyond_the_prefix": beyond / max(1, positions)}
        for key, row in bits.items():
            log(f"[lookahead] {anchor_name} anchor, {key}: " + ", ".join(f"{d} {v:.4f}" for d, v in row.items()))
        log(f"[lookahead] {anchor_name} anchor: mean source mass on tokens past the prefix "
            f"{beyond / max(1, positions):.3f} over {positions} positions with a tail")
        del model
    write_json_atomic(Path(out_dir) / filename, out)
    return out
