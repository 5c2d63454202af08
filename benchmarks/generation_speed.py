#!/usr/bin/env python
"""Fused decoding speed against what its backbones allow.

    python benchmarks/generation_speed.py                      # the four stand-ins of configs/standins_lm.yaml
    python benchmarks/generation_speed.py --config configs/real_pair_lm_gemma_anchor.yaml   # the real pair

The limit of fused decoding is one KV-cached step of every backbone per token: ``limit = 1 / sum_i t_i`` tokens/s
per sequence, with ``t_i`` backbone ``i``'s own cached decoding time per token (its prompt, then one token per
step for the same number of tokens, with its output layer where the fused model runs it). The fused model
(`fusion_llm.generation.generate`, greedy, one prompt) is timed for the same number of new tokens, and the anchor
alone through transformers' own ``generate`` beside it. Everything is measured in one process, interleaved, one
torch thread by default; the ratio fused / limit is what to read (absolute times drift on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "It was the best of times, it was the worst of times, it was the age of"
TARGET = 0.7  # fused tokens/s as a fraction of the limit


@torch.no_grad()
def own_decoding_seconds(backbone, prompt: str, new_tokens: int, with_lm_head: bool) -> float:
    """Seconds one backbone takes to decode ``new_tokens`` alone with its KV cache: its prompt, then one token per
    step (the taps the fused model reads, and its output layer when ``with_lm_head``)."""
    from transformers import DynamicCache

    layers = sorted(set(backbone.spec.resolved_taps() + [backbone.spec.num_hidden_layers]))
    ids = backbone.tokenizer(prompt, return_tensors="pt")["input_ids"].to(backbone.device)
    cache = DynamicCache(config=backbone.model.config)
    started = time.perf_counter()
    position = 0
    for _ in range(new_tokens + 1):
        out = backbone.model(input_ids=ids, position_ids=torch.arange(position, position + ids.shape[1]).unsqueeze(0),
                             cache=cache, use_cache=True, output_hidden_states=layers)
        position += ids.shape[1]
        last = out.hidden_states[-1][:, -1:]
        token = backbone.lm_logits(last).argmax(-1) if with_lm_head else ids[:, -1:]
        ids = token.view(1, 1)
    return time.perf_counter() - started


@torch.no_grad()
def anchor_alone_seconds(model, prompt: str, new_tokens: int) -> float:
    """transformers' ``generate`` on the anchor model alone (same quantization), greedy, ``new_tokens`` tokens."""
    from transformers import AutoModelForCausalLM

    from fusion_llm.backbones import quantization_config

    spec = model.anchor.spec
    if not hasattr(anchor_alone_seconds, "model"):
        anchor_alone_seconds.model = AutoModelForCausalLM.from_pretrained(
            spec.model, dtype=getattr(torch, spec.compute_dtype), quantization_config=quantization_config(spec))
    alone, tokenizer = anchor_alone_seconds.model, model.anchor.tokenizer
    enc = tokenizer(prompt, return_tensors="pt")
    started = time.perf_counter()
    alone.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - started


def measure(model, lengths: list[int], repeats: int, log=print) -> list[dict]:
    from fusion_llm.generation import generate

    predictions = model.config.head_spec.source_predictions
    generate(model, PROMPT, max_new_tokens=2, stop_tokens=[])  # warm-up (bitsandbytes repacks on first use)
    for name, backbone in model.backbones.items():
        own_decoding_seconds(backbone, PROMPT, 2, backbone.lm_head is not None)
    anchor_alone_seconds(model, PROMPT, 2)
    rows = []
    for n in lengths:
        own, fused, alone, split = {name: [] for name in model.backbones}, [], [], []
        for _ in range(repeats):  # interleaved: every measurement of a repeat sees the same machine
            for name, backbone in model.backbones.items():
                lm_head = backbone.lm_head is not None and (name == model.anchor.name or predictions)
                own[name].append(own_decoding_seconds(backbone, PROMPT, n, lm_head))
            out = generate(model, PROMPT, max_new_tokens=n, stop_tokens=[])
            fused.append(out.timings["total"])
            split.append(out.timings)
            alone.append(anchor_alone_seconds(model, PROMPT, n))
        per_backbone = {name: statistics.median(v) for name, v in own.items()}
        limit = n / sum(per_backbone.values())
        rate = n / statistics.median(fused)
        timings = split[fused.index(statistics.median(fused))] if repeats % 2 else split[-1]
        row = {"new_tokens": n, "limit_tokens_per_s": limit, "fused_tokens_per_s": rate, "ratio": rate / limit,
               "anchor_alone_tokens_per_s": n / statistics.median(alone),
               "backbone_seconds_per_token": {k: v / n for k, v in per_backbone.items()},
               "fused_seconds": {k: round(timings[k], 4) for k in ("anchor", "sources", "head", "sampling", "total")},
               "source_runs": timings["source_runs"], "met": rate / limit >= TARGET}
        rows.append(row)
        log(f"[generation] {n:4d} new tokens: limit {limit:7.1f} tok/s, fused {rate:7.1f} tok/s "
            f"({rate / limit:.2f} x limit, target {TARGET}), anchor alone {row['anchor_alone_tokens_per_s']:7.1f} "
            f"tok/s; fused time: " + ", ".join(f"{k} {v:.2f}s" for k, v in row["fused_seconds"].items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "standins_lm.yaml"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "generation_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from fusion_llm.errors import ConfigError
    from fusion_llm.modeling import FusionModel
    from fusion_llm.paths import write_json_atomic
    from fusion_llm.runconfig import load_run_config

    hf_logging.set_verbosity_error()
    try:
        run = load_run_config(args.config)
        model = FusionModel.from_config(run.fusion_config())
    except ConfigError as err:
        print(f"generation_speed: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if model.config.head_spec.kind != "lm":
        print(f"generation_speed: error: {args.config}: head.kind must be lm", file=sys.stderr)
        return 2
    rows = measure(model, args.lengths, args.repeats)
    result = {"config": args.config, "prompt": PROMPT, "repeats": args.repeats, "target_ratio": TARGET,
              "rows": rows, "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
                         f"{torch.__version__}, {args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}"}
    write_json_atomic(Path(args.out), result)
    print(json.dumps({r["new_tokens"]: round(r["ratio"], 3) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
