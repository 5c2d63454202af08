"""Throughput of the causal cross-tokenizer alignment (fusion_llm.alignment) on CPU.

For each source tokenizer and anchor sequence length (128, 512 by default) this times
``align_batch`` (anchor + source tokenization with offsets, then the alignment) on a realistic
corpus - Python standard-library source files plus the prose of ``pydoc_data/topics.py`` of the
running interpreter - and reports anchor tokens per second, the part spent beyond plain
tokenization, and the cost relative to one backbone forward on the same batch (see
:func:`backbone_forward_seconds`). Prints a table, writes
``results/benchmarks/alignment_throughput.json``.

    python benchmarks/alignment_throughput.py [--anchor llama3] [--lengths 128 512] [--docs 64]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

from fusion_llm import alignment as A
from fusion_llm.paths import FAMILIES, tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "results" / "benchmarks" / "alignment_throughput.json"


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------


def corpus_texts(n_docs: int, chars: int, seed: int = 0) -> tuple[list[str], str]:
    """``n_docs`` windows of ``chars`` characters: half stdlib code, half pydoc prose.

    Args:
        n_docs: number of documents.
        chars: characters per document (enough for the anchor length; the anchor truncates).
        seed: which windows.

    Returns:
        ``(texts, description)``.
    """
    import random
    from pydoc_data import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:120])
    prose = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    rng = random.Random(seed)
    texts = []
    for i in range(n_docs):
        src = code if i % 2 == 0 else prose
        start = rng.randrange(0, len(src) - chars)
        texts.append(src[start:start + chars])
    desc = (f"{n_docs} windows of {chars} chars, alternating {stdlib}/*.py (first 120 files, {len(code)} chars) "
            f"and pydoc_data.topics prose ({len(prose)} chars), Python {platform.python_version()}")
    return texts, desc


# ---------------------------------------------------------------------------------------
# Backbone forward (the denominator of the cost ratio)
# ---------------------------------------------------------------------------------------


def backbone_forward_seconds(family: str, batch_size: int, seq_len: int, repeats: int = 3) -> tuple[float, str]:
    """HOOK: seconds of one backbone forward on a ``(batch_size, seq_len)`` batch on this CPU.

    The main engineer may rewire this to the project's stand-in forward path (quantized load
    through ``fusion_llm.backbones``). Today it builds the family's stand-in architecture from
    ``fusion_llm.standins.standin_config`` as a base model (``AutoModel.from_config``: no LM
    head, as source backbones are loaded), float32, random weights, run under ``no_grad``;
    without ``fusion_llm.standins`` it falls back to a plain ``transformers.LlamaModel`` with
    hidden 256 and 4 layers.

    Args:
        family: backbone family of the source.
        batch_size: batch size.
        seq_len: tokens per example.
        repeats: timed runs (the best is kept) after one warm-up.

    Returns:
        ``(seconds, description of the model)``.
    """
    import torch
    from transformers import AutoModel

    try:
        from fusion_llm.standins import standin_config

        config = standin_config(family)
        what = f"fusion_llm.standins {family} stand-in ({type(config).__name__}"
    except Exception as e:  # noqa: BLE001 - any missing piece means: use the fallback
        from transformers import LlamaConfig

        config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=32000)
        what = f"plain LlamaModel fallback (no usable fusion_llm.standins: {e!s:.80}; LlamaConfig"
    torch.manual_seed(0)
    model = AutoModel.from_config(config).float().eval()
    what += f", hidden {config.hidden_size}, {config.num_hidden_layers} layers, float32, CPU, " \
            f"{torch.get_num_threads()} threads)"
    ids = torch.randint(10, min(config.vocab_size, 30000), (batch_size, seq_len))
    best = float("inf")
    with torch.no_grad():
        model(input_ids=ids)
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids)
            best = min(best, time.perf_counter() - t)
    return best, what


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchor", default="llama3", choices=FAMILIES)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--docs", type=int, default=64, help="documents per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-backbone", action="store_true", help="skip the backbone-forward ratio")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    missing = [f for f in FAMILIES if not (tokenizer_dir(f) / "tokenizer.json").is_file()]
    if missing:
        print(f"tokenizers {missing} are not fetched ({tokenizer_dir('llama3').parent}); "
              "run: python scripts/fetch_tokenizers.py", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    toks = {f: AutoTokenizer.from_pretrained(tokenizer_dir(f)) for f in FAMILIES}
    t = time.perf_counter()
    for tok in toks.values():
        A.settle_rule(tok)
    rule_build_s = time.perf_counter() - t
    anchor = toks[args.anchor]

    rows, backbone, corpora = [], {}, {}
    for length in args.lengths:
        texts, corpora[length] = corpus_texts(args.docs, chars=length * 8)
        n_anchor = sum(len(x) for x in A.align_batch(texts, anchor, {}, max_length=length)["input_ids"])

        def tokenize_only(sources, texts=texts, length=length):
            # what any pipeline pays anyway: the anchor once, every source, with offsets
            anchor(texts, truncation=True, max_length=length, return_offsets_mapping=True)
            for tok in sources.values():
                tok(texts, return_offsets_mapping=True, return_special_tokens_mask=True)

        def align(sources, texts=texts, length=length):
            return A.align_batch(texts, anchor, sources, max_length=length)

        for name in [*FAMILIES, "all"]:
            sources = toks if name == "all" else {name: toks[name]}
            stats = A.AlignmentStats()
            out = A.align_batch(texts, anchor, sources, max_length=length, stats=stats)
            sec = _best(functools.partial(align, sources), args.repeats)
            tok_sec = _best(functools.partial(tokenize_only, sources), args.repeats)
            n_source = sum(len(r) for s in sources for r in out[A.source_keys(s)[0]])
            row = {
                "seq_len": length, "source": name, "docs": len(texts), "anchor_tokens": n_anchor,
                "source_tokens_kept": n_source, "seconds": sec, "anchor_tokens_per_s": n_anchor / sec,
                "tokenize_only_seconds": tok_sec, "alignment_overhead_seconds": max(sec - tok_sec, 0.0),
                "nothing_fraction": stats.nothing_positions / max(stats.anchor_positions, 1),
                "crossing_fallbacks": stats.crossing_fallbacks,
            }
            if not args.no_backbone and name != "all":
                key = (name, length)
                if key not in backbone:
                    backbone[key] = backbone_forward_seconds(name, len(texts), length)
                fwd, what = backbone[key]
                row.update(backbone_forward_seconds=fwd, backbone=what, cost_vs_forward=sec / fwd)
            rows.append(row)

    # source tails (head.source_tails, the default for LM heads): each prefix's unsettled tail, tokenized from the
    # hard boundary before its cut, packed after the settled tokens
    tails = {}
    for length in args.lengths:
        texts, _ = corpus_texts(args.docs, chars=length * 8)
        n = sum(len(x) for x in A.align_batch(texts, anchor, {}, max_length=length)["input_ids"])
        sec = _best(lambda texts=texts, length=length: A.align_batch(texts, anchor, toks, max_length=length,
                                                                      tails=True), args.repeats)
        plain = next(r for r in rows if r["seq_len"] == length and r["source"] == "all")["seconds"]
        tails[length] = {"anchor_tokens_per_s": n / sec, "seconds": sec, "vs_settled_only": sec / plain}

    # verified mode (re-tokenizes every prefix): the audit cost, on a few documents
    texts, _ = corpus_texts(8, chars=128 * 8)
    vsec = _best(lambda: A.align_batch(texts, anchor, toks, max_length=128, verify=True), 1)
    n_v = sum(len(x) for x in A.align_batch(texts, anchor, {}, max_length=128)["input_ids"])

    print(f"anchor {args.anchor}; corpus: " + "; ".join(f"len {k}: {v}" for k, v in corpora.items()))
    print(f"settle rules built in {rule_build_s:.1f}s (once per process)")
    head = f"{'len':>4} {'source':>8} {'anchor tok/s':>13} {'total s':>8} {'tokenize s':>10} {'align s':>8} " \
           f"{'nothing':>7} {'fwd s':>7} {'cost/fwd':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['seq_len']:>4} {r['source']:>8} {r['anchor_tokens_per_s']:>13,.0f} {r['seconds']:>8.3f} "
              f"{r['tokenize_only_seconds']:>10.3f} {r['alignment_overhead_seconds']:>8.3f} "
              f"{r['nothing_fraction']:>7.1%} {r.get('backbone_forward_seconds', float('nan')):>7.3f} "
              f"{r.get('cost_vs_forward', float('nan')):>8.2f}")
    for length, t in tails.items():
        print(f"tails=True (all four sources), len {length}: {t['anchor_tokens_per_s']:,.0f} anchor tok/s, "
              f"{t['vs_settled_only']:.1f}x the settled-only alignment")
    print(f"verify=True (every prefix re-tokenized, all four sources, 8 docs x 128): {n_v / vsec:,.0f} anchor tok/s")
    if backbone:
        print("backbone forward:", next(iter(backbone.values()))[1].split(" (")[0],
              "- stand-ins are ~1000x smaller than the real backbones, so cost/fwd is an upper bound")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "anchor": args.anchor, "corpus": {str(k): v for k, v in corpora.items()}, "rule_build_seconds": rule_build_s,
        "verify_anchor_tokens_per_s": n_v / vsec, "tails": {str(k): v for k, v in tails.items()}, "machine": {"cpus": os.cpu_count(), "python": sys.version},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
