"""Probes of what the LM track's fused model can import from its members (issue: fusion that imports knowledge).

    python benchmarks/lm_probes.py --rows 12            # ~5 min on 2 CPU cores once the LM track's stand-ins exist

Prediction-route reachability: for each specialist, its own next-token distribution carried onto the anchor's
vocabulary (`fusion_llm.vocab_bridge`, the ``head.source_predictions`` route) *alone* - the mixing weights set
by hand to (anchor -1, that source +1), nothing trained - scored in bits per byte on the specialist's domain,
beside the specialist scored on its own tokens. The gap is what the route loses before any head learns anything.
It is split by the kind of anchor position (the boundary effect): where the next anchor token starts a word
(whitespace or punctuation first) and where it continues one, so the source sees a prefix cut inside a word
that its own tokenizer would not have cut there.

``--top-k K``: the source tokens the route carries per position (the model's ``head.source_top_k``, default 256).
``--lookahead``: the look-ahead probe of the real pair (`benchmarks.lm.lookahead`) on the stand-ins instead: the
Mistral anchor with one specialist (Llama-3 on Shakespeare, Gemma-2 on prose), the tail route and the look-ahead
mixed at fixed weights (1.0: the route alone), on ``--rows`` *validation* rows, beside the specialist on its own
tokens.

Route mix (``--route-mix``): the track's trained fused model (hidden-state head; trained here or read from the track's
cache under ``--out``) mixed log-linearly with each member's prediction route at ``--top-k`` and *fixed* weights,
one per member for every position and domain, chosen on the validation rows from a grid and then scored on the test
rows: what a wide route adds to the trained model before any mixer is trained (a trained mixer can only choose its
weights per position on top of this).

Budget curves (``--budget-curve``): the fused model (the track's hidden-state head) and the LoRA control on the
anchor (rank matched to the head's parameters), each trained afresh at several step counts (same rows, batch,
schedule and rates as the track) and at several head widths, scored on the validation rows (mixture and per
domain): where, if anywhere, do they cross? Trains in worker processes (``--workers``, one torch thread each).

Writes ``<out>/lm_probes.json`` (``lm_budget_curve.json`` for the curves) and prints a table.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from benchmarks.store import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]

SPECIALISTS = (("llama", "shakespeare"), ("gemma", "prose"), ("phi", "code"))


def position_nll(model, texts: list[str]) -> tuple[list[float], list[bool], int]:
    """Per predicted anchor token: NLL (nats) and whether it starts a word; and the texts' UTF-8 bytes."""
    from fusion_llm.alignment import align_batch
    from fusion_llm.data.pipeline import LMCollator

    anchor = model.anchor
    sources = {n: b.tokenizer for n, b in model.backbones.items() if n != anchor.name}
    collate = LMCollator(anchor.name, {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()})
    nll, word_start = [], []
    for start in range(0, len(texts), 4):
        chunk = texts[start:start + 4]
        aligned = align_batch(chunk, anchor.tokenizer, sources, tails=True)
        batch = collate([{k: v[i] for k, v in aligned.items()} for i in range(len(chunk))])
        with torch.no_grad():
            logits = model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"]).logits
        labels = batch["labels"]
        losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp_min(0),
                                                   reduction="none")
        for i in range(len(chunk)):
            for t in range(labels.shape[1]):
                if labels[i, t] >= 0:
                    piece = anchor.tokenizer.convert_ids_to_tokens(int(labels[i, t]))
                    nll.append(float(losses[i, t]))
                    word_start.append(piece[:1] in ("▁", " ", "Ġ", "\n", "Ċ") or not piece[:1].isalnum())
    return nll, word_start, sum(len(t.encode()) for t in texts)


def route_probe(rows: int, log=print, top_k: int = 256) -> dict:
    from benchmarks.lm import track as L

    from fusion_llm.config import FusionConfig
    from fusion_llm.scoring import backbone_logits_fn, score_causal_lm
    from fusion_llm.modeling import FusionModel

    preset = L.get_preset("quick")
    dirs = L.pretrain_all(preset, lambda *a: None)
    texts = L.eval_texts(preset)
    loaded = L.load_members(dirs, preset)
    specs = [L.backbone_spec(name, dirs[f"{family}-{domain}"], preset, name == L.ANCHOR)
             for name, family, domain in L.BACKBONES]
    config = FusionConfig(backbones=[s.to_dict() for s in specs], **{
        **L.FUSION_MODEL, "head": {**L.FUSION_MODEL["head"], "source_predictions": True, "source_top_k": top_k}})
    model = FusionModel(config, loaded)
    order = [n for n in model.backbones if n != L.ANCHOR]
    out = {}
    for source, domain in SPECIALISTS:
        sample = texts[domain][:rows]
        with torch.no_grad():
            bias = torch.zeros(1 + len(order))
            bias[0], bias[1 + order.index(source)] = -1.0, 1.0
            model.head.mixer.out.bias.copy_(bias)
        routed, starts, size = position_nll(model, sample)
        with torch.no_grad():
            model.head.mixer.out.bias.zero_()
        anchor_nll, _, _ = position_nll(model, sample)
        own = score_causal_lm(backbone_logits_fn(loaded[source]), loaded[source].tokenizer, sample)
        bits = lambda values: sum(values) / math.log(2) / size  # noqa: E731

        def split(values):
            return {kind: bits([v for v, s in zip(values, starts) if s == flag])
                    for kind, flag in (("word_start", True), ("inside_word", False))}

        out[source] = {"domain": domain, "rows": len(sample), "top_k": top_k, "own_tokens": own.bits_per_byte,
                       "routed_alone": bits(routed), "anchor_alone": bits(anchor_nll),
                       "routed_by_position": split(routed), "anchor_by_position": split(anchor_nll),
                       "share_inside_word": 1 - sum(starts) / len(starts)}
        v = out[source]
        log(f"{source} on {domain}: own tokens {v['own_tokens']:.3f}, routed alone {v['routed_alone']:.3f}, anchor "
            f"{v['anchor_alone']:.3f} bits/byte; contribution at word starts routed {v['routed_by_position']['word_start']:.3f}"
            f" vs anchor {v['anchor_by_position']['word_start']:.3f}, inside words routed "
            f"{v['routed_by_position']['inside_word']:.3f} vs anchor {v['anchor_by_position']['inside_word']:.3f} "
            f"({v['share_inside_word']:.0%} of anchor tokens continue a word)")
    return out


def lookahead_standins(out: Path, rows: int, top_k: int, log=print) -> dict:
    """The look-ahead probe (`benchmarks.lm.lookahead.lookahead_probe`) for each stand-in specialist."""
    from benchmarks.lm import track as L
    from benchmarks.lm.lookahead import lookahead_probe
    from fusion_llm.config import FusionConfig
    from fusion_llm.scoring import backbone_logits_fn, score_causal_lm

    preset = L.get_preset("quick")
    dirs = L.pretrain_all(preset, lambda *a: None)
    family = {name: f"{f}-{d}" for name, f, d in L.BACKBONES}
    validation = L.eval_texts(preset, "validation")
    head = {**L.FUSION_MODEL, "head": {**L.FUSION_MODEL["head"], "source_predictions": True, "source_top_k": top_k}}
    out_rows = {}
    for source, domain in SPECIALISTS[:2]:
        specs = [L.backbone_spec(n, dirs[family[n]], preset, n == L.ANCHOR) for n in (L.ANCHOR, source)]
        config = FusionConfig(backbones=[s.to_dict() for s in specs], **head)
        texts = {domain: validation[domain][:rows]}
        result = lookahead_probe(out, texts, {L.ANCHOR: config}, weights=(0.5, 1.0), k=top_k, log=log,
                                 filename=f"lm_lookahead_{source}_top{top_k}.json")
        specialist = L.load_lm(source, dirs[family[source]], preset)
        own = score_causal_lm(backbone_logits_fn(specialist), specialist.tokenizer, texts[domain])
        out_rows[source] = {"domain": domain, "own_tokens": own.bits_per_byte, **result["anchors"][L.ANCHOR]}
        log(f"[lookahead] {source} on its own tokens ({domain}): {own.bits_per_byte:.4f}")
    return {"top_k": top_k, "rows": rows, "split": "validation", "specialists": out_rows}


def _route_logprobs(model, text: str, top_k: int) -> tuple[torch.Tensor, dict, torch.Tensor, int]:
    """One row: the fused model's next-token log-probabilities (T, V), each source's route onto them (`VocabBridge`
    at ``top_k``; the anchor's distribution where a source has no position yet), the labels (T,) and the bytes."""
    from fusion_llm.alignment import align_batch, tail_attention_mask
    from fusion_llm.data.pipeline import LMCollator
    from fusion_llm.vocab_bridge import bridge_for

    anchor = model.anchor
    sources = {n: b for n, b in model.backbones.items() if n != anchor.name}
    aligned = align_batch([text], anchor.tokenizer, {n: b.tokenizer for n, b in sources.items()}, tails=True)
    batch = LMCollator(anchor.name, {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()})(
        [{c: v[0] for c, v in aligned.items()}])
    with torch.no_grad():
        logits = model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"]).logits[0].float()
        fused = torch.log_softmax(logits, -1)
        routes = {}
        for name, source in sources.items():
            src = batch["inputs"][name]
            hidden = source.taps(src["input_ids"], tail_attention_mask(src["tail_group"], src["tail_ctx"]),
                                 layers=[source.spec.num_hidden_layers], position_ids=src["position_ids"])[-1][0]
            index = batch["alignment"][name][0]
            source_lps = torch.log_softmax(source.lm_logits(hidden[index.clamp_min(0)]).float(), -1)
            route = bridge_for(source, anchor).log_probs(source_lps, fused, top_k=top_k)
            routes[name] = torch.where((index >= 0).unsqueeze(-1), route, fused)
    return fused, routes, batch["labels"][0], len(text.encode())


def route_mix(out: Path, rows: int, top_k: int, grid=(0.0, 0.25, 0.5, 0.75), log=print) -> dict:
    """The trained fused model mixed with each member's route at fixed weights chosen on validation rows."""
    import itertools

    from benchmarks.lm import track as L
    from fusion_llm.modeling import FusionModel

    preset = L.get_preset("quick")
    dirs = L.pretrain_all(preset, lambda *a: None)
    head_dir, _ = L.train_fused(preset, dirs, out / "cache" / "lm", True, log)
    loaded = L.load_members(dirs, preset)
    model = FusionModel.from_pretrained(head_dir, backbones=loaded)
    names = [n for n in model.backbones if n != L.ANCHOR]
    combos = [w for w in itertools.product(grid, repeat=len(names)) if sum(w) < 1.0]
    nll = {split: {d: torch.zeros(len(combos), dtype=torch.float64) for d in L.DOMAINS} for split in ("validation", "test")}
    size = {split: dict.fromkeys(L.DOMAINS, 0) for split in nll}
    for split in nll:
        for domain, texts in L.eval_texts(preset, split).items():
            for text in texts[:rows]:
                fused, routes, labels, n_bytes = _route_logprobs(model, text, top_k)
                keep = labels >= 0
                stack = torch.stack([fused] + [routes[n] for n in names])[:, keep]  # (1 + S, T', V)
                y = labels[keep]
                for c, w in enumerate(combos):
                    weights = torch.tensor([1.0 - sum(w), *w]).view(-1, 1, 1)
                    mixed = (weights * stack).sum(0)
                    lp = mixed.gather(1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(mixed, -1)
                    nll[split][domain][c] -= float(lp.sum())
                size[split][domain] += n_bytes
        log(f"[route-mix] {split} rows scored")

    def bits(split, c):
        per = {d: float(nll[split][d][c]) / math.log(2) / size[split][d] for d in L.DOMAINS}
        return {**per, "mixture": sum(float(nll[split][d][c]) for d in L.DOMAINS) / math.log(2)
                / sum(size[split].values())}

    best = min(range(len(combos)), key=lambda c: bits("validation", c)["mixture"])
    none = combos.index(tuple(0.0 for _ in names))
    # Weights per domain (each chosen on that domain's validation rows): what a mixer that recognises the domain from
    # the text could reach with fixed weights; the domain label itself is never an input of the model.
    per_domain = {d: min(range(len(combos)), key=lambda c: bits("validation", c)[d]) for d in L.DOMAINS}
    by_domain = {split: {d: bits(split, per_domain[d])[d] for d in L.DOMAINS} for split in nll}
    for split, row in by_domain.items():
        row["mixture"] = (sum(float(nll[split][d][per_domain[d]]) for d in L.DOMAINS) / math.log(2)
                          / sum(size[split].values()))
    out_row = {"top_k": top_k, "rows": rows, "grid": list(grid), "members": names,
               "chosen_weights": dict(zip(names, combos[best])), "chosen_on": "validation mixture",
               "fused_alone": {"validation": bits("validation", none), "test": bits("test", none)},
               "fused_with_routes": {"validation": bits("validation", best), "test": bits("test", best)},
               "weights_by_domain": {d: dict(zip(names, combos[c])) for d, c in per_domain.items()},
               "fused_with_routes_by_domain": by_domain}
    for key in ("fused_alone", "fused_with_routes", "fused_with_routes_by_domain"):
        weights = {"fused_alone": "none", "fused_with_routes": out_row["chosen_weights"],
                   "fused_with_routes_by_domain": out_row["weights_by_domain"]}[key]
        log(f"[route-mix] {key} (weights {weights}), test: "
            + ", ".join(f"{d} {v:.3f}" for d, v in out_row[key]["test"].items()))
    return out_row


def _curve_point(kind: str, steps: int, width: int, cache: str, threads: int) -> dict:
    """One point of the budget curves, in a worker process: train (or reuse) and score on the validation rows. The
    LoRA control's rank matches the parameters of the fused head of the same width (counted without training it)."""
    import dataclasses

    from benchmarks.lm import track as L
    from benchmarks.lm.track import quiet
    from fusion_llm.modeling import FusionModel
    from fusion_llm.scoring import hf_logits_fn, score_causal_lm, score_fused

    quiet(threads)
    preset = dataclasses.replace(L.get_preset("quick"), head_steps=steps)
    dirs = L.pretrain_all(preset, lambda *a: None)
    texts = L.eval_texts(preset, "validation")
    spec = {**L.FUSION_MODEL, "shared_width": width}
    if kind == "fused":
        head_dir, summary = L.train_fused(preset, dirs, Path(cache), True, lambda *a: None, model=spec)
        loaded = L.load_members(dirs, preset)
        model = FusionModel.from_pretrained(head_dir, backbones=loaded)
        scores = {d: score_fused(model, t) for d, t in texts.items()}
        params, seconds = sum(x.numel() for x in model.head.parameters()), summary.get("train_seconds")
    else:
        untrained = FusionModel.from_config(L.fused_run_config(preset, dirs, Path(cache) / "unused", spec).fusion_config())
        target = sum(x.numel() for x in untrained.head.parameters())
        tokenizer = untrained.anchor.tokenizer
        del untrained
        peft_model, info = L.train_lora(preset, dirs["mistral-code"], target, Path(cache), True, lambda *a: None)
        fn = hf_logits_fn(peft_model)
        scores = {d: score_causal_lm(fn, tokenizer, t, max_positions=1024) for d, t in texts.items()}
        params, seconds = info["trainable_params"], info["train_seconds"]
    entry = L._entry(f"{kind} {steps} steps, width {width}", kind, scores)
    return {"kind": kind, "steps": steps, "width": width, "trainable_params": params, "train_seconds": seconds,
            "bits_per_byte": entry["bits_per_byte"]}


def budget_curve(cache: Path, steps=(100, 300, 900), widths=(32, 64, 128), workers: int = 2, log=print) -> dict:
    """Fused vs LoRA against head steps (at the track's width 64) and against head width (at 300 steps)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    points = sorted({(k, s, 64) for k in ("fused", "lora") for s in steps}
                    | {(k, 300, w) for k in ("fused", "lora") for w in widths},
                    key=lambda p: (-p[1] * (4 if p[0] == "fused" else 1), p))  # longest first
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_curve_point, *point, str(cache), 1) for point in points]
        rows = [f.result() for f in futures]
    rows.sort(key=lambda r: (r["width"], r["steps"], r["kind"]))
    for r in rows:
        log(f"{r['kind']:5s} steps {r['steps']:4d} width {r['width']:3d} ({r['trainable_params']:,} trainable, "
            f"{r['train_seconds']:.0f}s): " + ", ".join(f"{d} {v:.3f}" for d, v in r["bits_per_byte"].items()))
    return {"split": "validation", "points": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="test rows per domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=256, help="source tokens the prediction route carries")
    parser.add_argument("--budget-curve", action="store_true",
                        help="fused vs LoRA against head steps and head width instead of the route probe")
    parser.add_argument("--workers", type=int, default=2, help="(--budget-curve) worker processes")
    parser.add_argument("--route-mix", action="store_true",
                        help="the trained fused model mixed with each member's route at weights chosen on validation")
    parser.add_argument("--lookahead", action="store_true",
                        help="the look-ahead probe on the stand-in specialists (validation rows) instead")
    parser.add_argument("--out", default=str(ROOT / "results" / "compare_merges" / "quick"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.route_mix:
        write_json_atomic(out / f"lm_route_mix_top{args.top_k}.json", route_mix(out, args.rows, args.top_k))
        return 0
    if args.lookahead:
        write_json_atomic(out / f"lm_lookahead_top{args.top_k}.json", lookahead_standins(out, args.rows, args.top_k))
        return 0
    if args.budget_curve:
        write_json_atomic(out / "lm_budget_curve.json", budget_curve(out / "cache" / "lm", workers=args.workers))
        return 0
    results = {"prediction_route": route_probe(args.rows, top_k=args.top_k)}
    write_json_atomic(out / f"lm_probes{'' if args.top_k == 256 else f'_top{args.top_k}'}.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
