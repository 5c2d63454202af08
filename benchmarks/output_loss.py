#!/usr/bin/env python
"""The next-token loss with and without the (N, V) logits (`fusion_llm.output_loss`): ratios measured in one run.

    python benchmarks/output_loss.py              # the output layer alone, Gemma-3's 262k vocabulary (~1 min)
    python benchmarks/output_loss.py --real       # also a whole fused training step of the real pair (~3 min)

Interleaved repeats, medians, one torch thread (set ``--threads``). (a) the output layer alone: 512 positions, a
(262144 x 640) frozen output layer, the log-linear mix with one source's sparse corrections, loss + backward;
(b) with ``--real`` a fused training step of the real members (Gemma-3 anchor, member adapters, SmolLM2's
predictions mixed in, `benchmarks/lm/real.py`'s ``deep`` variant), batch 8 x 64: ``lm_forward(return_logits=True)``
(the loss on the full logits) vs ``False`` (what `fusion_llm.training.train` calls).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def output_layer(repeats: int) -> dict[str, float]:
    from fusion_llm.heads import mixed_logits
    from fusion_llm.output_loss import output_loss

    torch.manual_seed(0)
    n, h, v = 512, 640, 262144
    hidden = (torch.randn(n, h)).requires_grad_()
    weight = torch.randn(v, h) * 0.05
    labels = torch.randint(0, v, (n,))
    mix = torch.full((n, 2), 0.1, requires_grad=True)
    keys = torch.unique(torch.randint(0, n * v, (n * 256,)))
    values = torch.rand(keys.shape[0])

    def full():
        logits = mixed_logits(torch.nn.functional.linear(hidden, weight).unsqueeze(0), mix.unsqueeze(0),
                              [(keys, values)])
        torch.nn.functional.cross_entropy(logits[0].float(), labels).backward()

    def chunked():
        def corrections(a, b, z):
            inside = (keys >= a * v) & (keys < b * v)
            return [(keys[inside] - a * v, values[inside])]

        output_loss(hidden, weight, labels, mix=mix, corrections=corrections).backward()

    return interleaved({"full logits": full, "chunked": chunked}, repeats)


def real_step(repeats: int) -> dict[str, float]:
    from benchmarks.lm import real as R
    from fusion_llm.alignment import align_batch
    from fusion_llm.data.pipeline import LMCollator
    from fusion_llm.modeling import FusionModel
    from fusion_llm.runconfig import build_run_config

    head, ranks, _ = R.VARIANTS["deep"]
    run = build_run_config({"model": {"backbones": R._backbone_dicts("gemma", R.MEMBERS, R.PRESETS["quick"],
                                                                     ranks["gemma"]), **head}})
    model = FusionModel.from_config(run.fusion_config())
    anchor = model.anchor
    texts = [t for rows in R._texts("train", 3).values() for t in rows][:8]
    cut = []
    for text in texts:  # 64 anchor tokens each, as the quick preset trains
        offsets = anchor.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        cut.append(text[:offsets[min(62, len(offsets) - 1)][1]])
    sources = {n: b.tokenizer for n, b in model.backbones.items() if n != anchor.name}
    aligned = align_batch(cut, anchor.tokenizer, sources, tails=True)
    batch = LMCollator(anchor.name, {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()})(
        [{k: v[i] for k, v in aligned.items()} for i in range(len(cut))])
    optimizer = torch.optim.AdamW([p for p in model.head.parameters() if p.requires_grad], lr=1e-5)

    def step(return_logits):
        def run():
            out = model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"], return_logits=return_logits)
            (out.loss + (out.member_loss if out.member_loss is not None else 0)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    return interleaved({"full logits": step(True), "chunked": step(False)}, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real", action="store_true", help="also a fused training step of the real pair")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = [("output layer alone (512 x 262144, mixed)", output_layer(args.repeats))]
    if args.real:
        rows.append(("fused training step, real pair (Gemma-3 anchor, 8 x 64)", real_step(args.repeats)))
    print(f"| measured ({args.threads} thread(s), medians of {args.repeats}) | full logits (s) | chunked (s) | ratio |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t['full logits']:.2f} | {t['chunked']:.2f} | {t['full logits'] / t['chunked']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
