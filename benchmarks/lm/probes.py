"""Probes of what the LM track's fused model can import from its members (issue: fusion that imports knowledge).

    python benchmarks/lm_probes.py --rows 12            # ~5 min on 2 CPU cores once the LM track's stand-ins exist

Prediction-route reachability: for each specialist, its own next-token distribution carried onto the anchor's
vocabulary (`fusion_llm.vocab_bridge`, the ``head.source_predictions`` route) *alone* - the mixing weights set
by hand to (anchor -1, that source +1), nothing trained - scored in bits per byte on the specialist's domain,
beside the specialist scored on its own tokens. The gap is what the route loses before any head learns anything.
It is split by the kind of anchor position (the boundary effect): where the next anchor token starts a word
(whitespace or punctuation first) and where it continues one, so the source sees a prefix cut inside a word
that its own tokenizer would not have cut there.

Writes ``<out>/lm_probes.json`` and prints a table.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

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


def route_probe(rows: int, log=print) -> dict:
    from benchmarks.lm import track as L

    from fusion_llm.config import FusionConfig
    from fusion_llm.scoring import backbone_logits_fn, score_causal_lm
    from fusion_llm.modeling import FusionModel

    preset = L.get_preset("quick")
    dirs = L.pretrain_all(preset, lambda *a: None)
    texts = L.eval_texts(preset)
    loaded = {name: L.load_lm(name, dirs[f"{family}-{domain}"], preset, anchor=(name == L.ANCHOR))
              for name, family, domain in L.BACKBONES}
    specs = [L.backbone_spec(name, dirs[f"{family}-{domain}"], preset, name == L.ANCHOR)
             for name, family, domain in L.BACKBONES]
    config = FusionConfig(backbones=[s.to_dict() for s in specs], **{
        **L.FUSION_MODEL, "head": {**L.FUSION_MODEL["head"], "source_predictions": True}})
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

        out[source] = {"domain": domain, "rows": len(sample), "own_tokens": own.bits_per_byte,
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12, help="test rows per domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "compare_merges" / "quick"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    results = {"prediction_route": route_probe(args.rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_probes.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
