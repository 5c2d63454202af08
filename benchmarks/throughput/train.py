"""Training throughput of a fusion head over frozen 4-bit backbones (issue 4, "Performance").

One run measures three things on the stand-in backbones and prints their ratios:

1. **Head overhead** - examples/s of a full training step (backbones forward under ``no_grad`` +
   head forward + backward + AdamW step) vs. the backbones' forward alone (``FusionModel.features``:
   taps + pooling, what every step must pay anyway) on the same batch.
   Target: training >= 0.9 x forward-only throughput.
2. **Feature cache** - one training epoch from ``fusion_llm.features.FeatureCache`` (+
   ``collate_features``) vs. the same epoch uncached (tokenized data, ``Collator``, backbones run).
   Only the epochs are timed; building the cache is reported on its own. Target: >= 20x faster.
3. **Truncation** - time per training step of a Llama stand-in with 2 x L layers tapped at layer L,
   loaded truncated (the normal ``load_backbone``: only L layers exist) vs. at full depth (loaded
   with an extra tap at the last layer, so nothing is cut, while the head still uses the layer-L tap
   only).

Noise: repetitions are interleaved (A B A B ...) after a warm-up and medians are reported.

Widths:
- ``--widths standin`` (default): the four stand-ins of ``configs/standins_4llm.yaml`` (built into
  the fusion_llm cache when missing), its fusion/head config, its data length (32 tokens).
- ``--widths real``: stand-ins at the real models' widths (hidden, intermediate, heads, head_dim
  from ``configs/backbones/*.json``), ``--layers`` layers each (default 4), random weights saved in
  bf16 and loaded back through ``from_pretrained`` + ``BitsAndBytesConfig`` (nf4, bf16 compute).
  Meant for a GPU (``--device cuda``); it also reports peak GPU memory next to the budget plan's
  estimate (``fusion_llm.budget.plan(config, batch, seq).memory_bytes``) for the same shapes.
  Where a family's real tokenizer is not in the cache, that backbone gets random token ids of its
  vocabulary size (reported under ``tokens``).

Writes ``results/benchmarks/train_throughput.json`` (atomically, after each part, so a run cut short
keeps what it measured).

    python benchmarks/train_throughput.py                 # CPU, stand-in widths
    python benchmarks/train_throughput.py --quick         # smoke run (< 1 min on 2 cores)
    python benchmarks/train_throughput.py --device cuda --widths real --out $OUT/train_throughput.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fusion_llm import paths
from fusion_llm.paths import FAMILIES, cache_dir, tokenizer_dir

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = ROOT / "results" / "benchmarks" / "train_throughput.json"
STANDINS_YAML = ROOT / "configs" / "standins_4llm.yaml"
NAMES = {"llama3": "llama", "mistral": "mistral", "gemma2": "gemma", "phi3": "phi"}
REAL_CONFIGS = {
    "llama3": "Meta-Llama-3-8B.json",
    "mistral": "Mistral-7B-v0.3.json",
    "gemma2": "gemma-2-2b.json",
    "phi3": "Phi-3-mini-4k-instruct.json",
}
# Real-config keys copied onto a stand-in for --widths real. Vocabulary sizes stay the stand-ins'
# (those of the tokenizers we have: Gemma uses Gemma-3's 262208), max positions stay 1024.
REAL_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "query_pre_attn_scalar", "rms_norm_eps", "attn_logit_softcapping", "final_logit_softcapping")
TARGETS = {"head_overhead_ratio": 0.9, "cache_speedup": 20.0}


# ---------------------------------------------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """``data`` as JSON (indent 2), atomically (`fusion_llm.paths.write_json_atomic`)."""
    paths.write_json_atomic(path, data, indent=2)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Seconds of each callable, ``repeats`` times, interleaved (A B A B ...) after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def memory_stats(device: str) -> dict | None:
    if not device.startswith("cuda"):
        return None
    return {"allocated_bytes": torch.cuda.memory_allocated(), "max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved()}


def gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------------
# Backbones: stand-in widths (the project's stand-ins) or real widths (built here)
# ---------------------------------------------------------------------------------------------------------------


def has_tokenizer(family: str) -> bool:
    return (tokenizer_dir(family) / "tokenizer.json").is_file()


def real_overrides(family: str, layers: int) -> dict:
    """Config values that make a stand-in as wide as the real model (``layers`` decoder layers)."""
    real = json.loads((ROOT / "configs" / "backbones" / REAL_CONFIGS[family]).read_text())
    out = {k: real[k] for k in REAL_KEYS if real.get(k) is not None}
    out.setdefault("head_dim", real["hidden_size"] // real["num_attention_heads"])
    out["num_hidden_layers"] = layers
    if family == "gemma2":
        out["sliding_window"] = real.get("sliding_window") or 4096
    return out


def _placeholder_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A minimal fast tokenizer (so ``load_backbone`` can load the folder) when the real one is missing.

    The benchmark feeds such a backbone random token ids of ``vocab_size``; this tokenizer only
    provides a pad token and a fingerprint.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out_dir)
    (out_dir / "placeholder_tokenizer.json").write_text(json.dumps({"vocab_size": vocab_size}))


def build_real_width(family: str, layers: int, root: Path, device: str) -> Path:
    """A stand-in at the real model's widths with ``layers`` layers, random weights saved in bf16.

    Built on ``device`` (fast random init on a GPU), saved with ``save_pretrained`` next to the
    family's real tokenizer (or a placeholder one, see `_placeholder_tokenizer`), and reused when
    the recipe matches.
    """
    import transformers
    from transformers import AutoTokenizer

    from fusion_llm.standins import standin_config

    overrides = real_overrides(family, layers)
    out_dir = root / f"{family}_L{layers}"
    recipe = {"family": family, "overrides": overrides, "tokenizer": has_tokenizer(family), "version": 1}
    stamp = out_dir / "standin.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return out_dir
    config = standin_config(family, **overrides)
    cls = {"llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "phi3": "Phi3ForCausalLM"}[family]
    torch.manual_seed(0)
    init_device = "cuda" if device.startswith("cuda") else "cpu"
    with torch.device(init_device):
        model = getattr(transformers, cls)._from_config(config, dtype=torch.bfloat16)
    try:
        with paths.atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            params = sum(p.numel() for p in model.parameters())
            del model
            if has_tokenizer(family):
                AutoTokenizer.from_pretrained(tokenizer_dir(family)).save_pretrained(tmp)
            else:
                _placeholder_tokenizer(tmp, config.vocab_size)
            (tmp / "standin.json").write_text(json.dumps({"family": family, "recipe": recipe, "parameters": params}))
    finally:
        if init_device == "cuda":
            torch.cuda.empty_cache()
    return out_dir


def head_settings(path: Path) -> tuple[dict, str]:
    """shared_width / adapter / fusion / head of a run YAML's model section (an LM head becomes classification)."""
    import yaml

    model = yaml.safe_load(Path(path).read_text())["model"]
    head = dict(model.get("head") or {})
    note = ""
    if head.get("kind", "classification") != "classification":
        note = f"head.kind {head.get('kind')!r} of {path.name} replaced by classification (4 labels, mean pooling)"
        head = {"kind": "classification", "num_labels": 4, "pooling": "mean"}
    return {"shared_width": model.get("shared_width", 256), "adapter": model.get("adapter"),
            "fusion": model.get("fusion"), "head": head}, note


def make_config(args, backbone_dirs: dict[str, Path]):
    """The FusionConfig of the benchmark: the four backbones, taps and head settings of ``args``."""
    import yaml

    from fusion_llm.config import FusionConfig

    settings, note = head_settings(args.head_config)
    taps = {b["name"]: b["tap_layers"] for b in yaml.safe_load(STANDINS_YAML.read_text())["model"]["backbones"]}
    families = list(backbone_dirs)
    anchor = "llama3" if "llama3" in families else families[0]
    backbones = [{"name": NAMES[f], "model": str(backbone_dirs[f]), "tap_layers": list(taps[NAMES[f]]),
                  "quantization": args.quantization, "compute_dtype": args.dtype, "anchor": f == anchor}
                 for f in families]
    return FusionConfig(backbones=backbones, **settings), note


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def long_texts(n: int, min_chars: int, seed: int = 0) -> list[str]:
    """``n`` texts of topic sentences, each at least ``min_chars`` long (so every tokenizer fills seq_len)."""
    import random

    try:
        from fusion_llm.data.topics import TEMPLATES, TOPICS
    except Exception:  # noqa: BLE001 - datasets missing: any words will do for timing
        TOPICS = {"a": ["cat", "dog", "bread", "seven", "red", "otter", "honey", "blue"]}
        TEMPLATES = ["I keep thinking about the {a} and the {b}."]
    rng = random.Random(seed)
    words = [w for ws in TOPICS.values() for w in ws]
    out = []
    for _ in range(n):
        parts = []
        while sum(len(p) + 1 for p in parts) < min_chars:
            a, b = rng.sample(words, 2)
            parts.append(rng.choice(TEMPLATES).format(a=a, b=b, A=a.capitalize()))
        out.append(" ".join(parts))
    return out


def vocab_size(backbone) -> int:
    return int(backbone.model.get_input_embeddings().weight.shape[0])


def uses_random_ids(backbone) -> bool:
    return (Path(backbone.spec.model) / "placeholder_tokenizer.json").is_file()


def make_inputs(backbones: dict, batch: int, seq_len: int, device: str, seed: int = 0) -> dict:
    """name -> {input_ids, attention_mask} of shape (batch, seq_len), on ``device``.

    Real tokenizers tokenize long topic texts truncated to ``seq_len``; a backbone with a placeholder
    tokenizer gets random ids of its vocabulary size.
    """
    texts = long_texts(batch, min_chars=seq_len * 8, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, b in backbones.items():
        if uses_random_ids(b):
            ids = torch.randint(0, vocab_size(b), (batch, seq_len), generator=gen)
            enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            enc = dict(b.tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len,
                                   return_tensors="pt"))
            enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out[name] = {k: v.to(device) for k, v in enc.items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The three measurements
# ---------------------------------------------------------------------------------------------------------------


ADAMW = {"default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}
_ADAMW_KWARGS: dict = {}


def make_optimizer(params):
    """AdamW as the trainer builds it (``--adamw default``), or its fused / foreach implementation."""
    return torch.optim.AdamW(params, lr=1e-4, **_ADAMW_KWARGS)


def train_step_fn(model, optimizer, inputs=None, features=None, labels=None):
    def step():
        out = model(inputs=inputs, features=features, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss
    return step


def measure_head_overhead(args, model, device: str) -> dict:
    """Part 1: full training step vs. backbones forward alone, same batch."""
    inputs = make_inputs(model.backbones, args.batch_size, args.seq_len, device)
    labels = torch.randint(0, model.config.head["num_labels"], (args.batch_size,),
                           generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = make_optimizer(model.head.parameters())
    model.head.train()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = interleaved({"forward_only": lambda: model.features(inputs),
                         "train_step": train_step_fn(model, optimizer, inputs=inputs, labels=labels)},
                        args.repeats, args.warmup, device)
    fwd, step = median(times["forward_only"]), median(times["train_step"])
    tokens = {n: int(enc["attention_mask"].sum()) for n, enc in inputs.items()}
    tokens_per_example = sum(tokens.values()) / len(tokens) / args.batch_size
    ratio = fwd / step  # = train examples/s / forward-only examples/s
    result = {
        "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats, "warmup": args.warmup,
        "tokens_per_example_per_backbone": tokens_per_example, "real_tokens_per_backbone": tokens,
        "forward_only_s": fwd, "train_step_s": step,
        "forward_only_examples_per_s": args.batch_size / fwd, "train_examples_per_s": args.batch_size / step,
        "forward_only_tokens_per_s": args.batch_size * tokens_per_example / fwd,
        "train_tokens_per_s": args.batch_size * tokens_per_example / step,
        "ratio": ratio, "target": TARGETS["head_overhead_ratio"], "meets_target": ratio >= TARGETS["head_overhead_ratio"],
        "samples_s": times,
        "trainable_parameters": sum(p.numel() for p in model.head.parameters()),
    }
    if device.startswith("cuda"):
        result["peak_allocated_bytes_during_steps"] = torch.cuda.max_memory_allocated()
    log(f"[1] head overhead: forward-only {args.batch_size / fwd:.1f} ex/s ({fwd * 1e3:.1f} ms), "
        f"train step {args.batch_size / step:.1f} ex/s ({step * 1e3:.1f} ms), "
        f"{args.batch_size * tokens_per_example / step:.0f} tok/s -> ratio {ratio:.3f} "
        f"(target >= {TARGETS['head_overhead_ratio']}: {'met' if result['meets_target'] else 'NOT met'})")
    return result


def token_dataset(model, n: int, max_length: int, seed: int = 0):
    """A tokenized topics split (``{name}_input_ids`` + ``labels``) as the trainer builds it; random ids for
    backbones with a placeholder tokenizer."""
    from datasets import Dataset, DatasetDict

    from fusion_llm.data.pipeline import tokenize_splits
    from fusion_llm.data.topics import topics_dataset

    raw = topics_dataset(num_train=n, num_eval=8, seed=seed)["train"]
    real = {n_: b for n_, b in model.backbones.items() if not uses_random_ids(b)}
    lengths = {n_: min(max_length, b.max_length) for n_, b in real.items()}
    data = tokenize_splits(DatasetDict(train=raw), {n_: b.tokenizer for n_, b in real.items()}, "text", "label",
                           lengths)["train"]
    columns = {c: data[c] for c in data.column_names}
    gen = torch.Generator().manual_seed(seed)
    typical = [len(x) for x in next(iter(columns[c] for c in columns if c.endswith("_input_ids")), [])] or \
        [max_length] * n
    for name, b in model.backbones.items():
        if name not in real:
            columns[f"{name}_input_ids"] = [torch.randint(0, vocab_size(b), (typical[i],), generator=gen).tolist()
                                            for i in range(n)]
    return Dataset.from_dict(columns)


def measure_feature_cache(args, model, device: str, workdir: Path) -> dict:
    """Part 2: one epoch from the feature cache vs. one uncached epoch over the same tokenized data."""
    from torch.utils.data import DataLoader

    from fusion_llm.data.pipeline import Collator
    from fusion_llm.features import FeatureCache, collate_features

    n, bs = args.cache_examples, args.cache_batch_size
    data = token_dataset(model, n, args.cache_max_length)
    collate = Collator({name: b.tokenizer.pad_token_id for name, b in model.backbones.items()})
    cache = FeatureCache(workdir / "feature_cache", model, limit_bytes=50e9)
    start = time.perf_counter()
    cached = cache.build(data, collate, batch_size=bs, log=lambda *_: None)
    sync(device)
    build_s = time.perf_counter() - start
    fcollate = collate_features(model)
    optimizer = make_optimizer(model.head.parameters())
    model.head.train()

    def epoch(dataset, coll):
        def run():
            for batch in DataLoader(dataset, batch_size=bs, collate_fn=coll, shuffle=False):
                if "features" in batch:
                    train_step_fn(model, optimizer, features=batch["features"], labels=batch["labels"])()
                else:
                    inputs = {k: {kk: vv.to(device) for kk, vv in v.items()} for k, v in batch["inputs"].items()}
                    train_step_fn(model, optimizer, inputs=inputs, labels=batch["labels"])()
        return run

    def loading_only(dataset, coll):
        def run():
            for _ in DataLoader(dataset, batch_size=bs, collate_fn=coll, shuffle=False):
                pass
        return run

    times = interleaved({"uncached_epoch": epoch(data, collate), "cached_epoch": epoch(cached, fcollate)},
                        args.epoch_repeats, 1, device)
    loading = interleaved({"uncached": loading_only(data, collate), "cached": loading_only(cached, fcollate)},
                          args.epoch_repeats, 1, device)
    unc, cac = median(times["uncached_epoch"]), median(times["cached_epoch"])
    cac_load = median(loading["cached"])
    speedup = unc / cac
    cache_bytes = sum(f.stat().st_size for f in cache.path(data).rglob("*") if f.is_file())
    result = {
        "examples": n, "batch_size": bs, "max_length": args.cache_max_length, "repeats": args.epoch_repeats,
        "cache_build_s": build_s, "cache_bytes": cache_bytes,
        "uncached_epoch_s": unc, "cached_epoch_s": cac,
        "uncached_examples_per_s": n / unc, "cached_examples_per_s": n / cac,
        "speedup": speedup, "target": TARGETS["cache_speedup"], "meets_target": speedup >= TARGETS["cache_speedup"],
        "break_even_epochs": build_s / max(unc - cac, 1e-12),
        "cached_epoch_loading_only_s": cac_load, "uncached_epoch_loading_only_s": median(loading["uncached"]),
        "cached_epoch_loading_fraction": cac_load / cac,
        "samples_s": times, "loading_samples_s": loading,
    }
    log(f"[2] feature cache: uncached epoch {unc:.3f} s, cached epoch {cac * 1e3:.1f} ms ({n} examples, batch {bs}) "
        f"-> {speedup:.1f}x (target >= {TARGETS['cache_speedup']:.0f}x: {'met' if result['meets_target'] else 'NOT met'}); "
        f"cache build {build_s:.2f} s, {cache_bytes / 2**20:.2f} MiB; of the cached epoch, {cac_load * 1e3:.1f} ms "
        f"({cac_load / cac:.0%}) is reading + collating the cache")
    return result


def measure_truncation(args, build_dir, device_map, device: str) -> dict:
    """Part 3: a stand-in (Llama by default) with 2L layers tapped at layer L, loaded truncated vs. at full depth."""
    from fusion_llm.backbones import load_backbone
    from fusion_llm.config import BackboneSpec, FusionConfig
    from fusion_llm.modeling import FusionModel

    total = args.trunc_layers
    tap = total // 2
    family = args.trunc_family
    path = build_dir(total, family)
    name = NAMES[family]
    spec = BackboneSpec(name=name, model=str(path), tap_layers=[tap], quantization=args.quantization,
                        compute_dtype=args.dtype)
    truncated = load_backbone(spec, device_map=device_map)
    # Full depth: the deepest tap is the last layer, so nothing is cut; the head still sees layer `tap` only.
    full = load_backbone(dataclasses.replace(spec, tap_layers=[tap, -1]), device_map=device_map)
    full.spec = dataclasses.replace(full.spec, tap_layers=[tap])
    layers_on, layers_off = len(truncated.model.layers), len(full.model.layers)
    settings, _ = head_settings(args.head_config)
    config = FusionConfig(backbones=[truncated.spec.to_dict()], **settings)
    inputs = make_inputs({name: truncated}, args.batch_size, args.seq_len, device, seed=2)
    labels = torch.randint(0, config.head["num_labels"], (args.batch_size,)).to(device)
    torch.manual_seed(0)
    on = FusionModel(copy.deepcopy(config), {name: truncated})
    torch.manual_seed(0)
    off = FusionModel(copy.deepcopy(config), {name: full})
    for m in (on, off):
        m.head.to(device).train()
    opt_on = make_optimizer(on.head.parameters())
    opt_off = make_optimizer(off.head.parameters())
    with torch.no_grad():  # same features either way: the tap means the same at any depth
        a, b = on.features(inputs)[name][0], off.features(inputs)[name][0]
        same = torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    times = interleaved({"truncated": train_step_fn(on, opt_on, inputs=inputs, labels=labels),
                         "full_depth": train_step_fn(off, opt_off, inputs=inputs, labels=labels)},
                        args.repeats, args.warmup, device)
    t_on, t_off = median(times["truncated"]), median(times["full_depth"])
    result = {
        "family": family, "model": str(path), "num_hidden_layers": total, "tap_layer": tap, "layers_run_truncated": layers_on,
        "layers_run_full_depth": layers_off, "same_tap_values": bool(same),
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "truncated_step_s": t_on, "full_depth_step_s": t_off, "speedup": t_off / t_on,
        "samples_s": times,
    }
    log(f"[3] truncation: {total}-layer {family} stand-in tapped at layer {tap}: truncated ({layers_on} layers) "
        f"{t_on * 1e3:.1f} ms/step, full depth ({layers_off} layers) {t_off * 1e3:.1f} ms/step -> "
        f"{t_off / t_on:.2f}x faster truncated (tap values equal: {same})")
    del on, off, truncated, full
    return result


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--widths", choices=["standin", "real"], default="standin",
                    help="stand-in widths (configs/standins_4llm.yaml) or the real models' widths (GPU)")
    ap.add_argument("--layers", type=int, default=4, help="--widths real: decoder layers per backbone")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="backbone compute dtype (default: float32 at stand-in widths, bfloat16 at real widths)")
    ap.add_argument("--quantization", choices=["nf4", "fp4", "int8", "none"], default="nf4")
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (stand-in widths) / 8 (real widths)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 32 (stand-in widths) / 512 (real widths)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant (default 15; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; quick 1)")
    ap.add_argument("--cache-examples", type=int, default=None, help="part 2 examples (default 256; quick 64)")
    ap.add_argument("--cache-batch-size", type=int, default=32)
    ap.add_argument("--epoch-repeats", type=int, default=None, help="part 2 epochs per variant (default 5; quick 2)")
    ap.add_argument("--trunc-layers", type=int, default=8, help="part 3: layers of the stand-in (tapped at half)")
    ap.add_argument("--trunc-family", choices=FAMILIES, default=None,
                    help="part 3: which family's stand-in (default llama3; quick: mistral, the fastest to build)")
    ap.add_argument("--families", default=None,
                    help="comma-separated backbones for parts 1-2 (default: all four; quick: mistral,phi3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a shared, oversubscribed CPU, 1 thread can be far "
                         "faster than 2: OpenMP threads spin while waiting for a busy core")
    ap.add_argument("--head-config", type=Path, default=STANDINS_YAML,
                    help="run YAML whose model.shared_width/adapter/fusion/head the head uses")
    ap.add_argument("--adamw", choices=sorted(ADAMW), default="default",
                    help="AdamW implementation: default (as scripts/train_fusion.py builds it), fused or foreach")
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. 1,3")
    ap.add_argument("--quick", action="store_true", help="small and fast: a smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    real = args.widths == "real"
    args.dtype = args.dtype or ("bfloat16" if real else "float32")
    args.batch_size = args.batch_size or (8 if real else 32)
    args.seq_len = args.seq_len or (512 if real else 32)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.cache_examples = args.cache_examples or (64 if args.quick else 256)
    args.epoch_repeats = args.epoch_repeats or (2 if args.quick else 5)
    args.cache_max_length = 32 if not real else min(args.seq_len, 128)
    if args.quick and not real:
        args.trunc_layers = min(args.trunc_layers, 4)
    args.trunc_family = args.trunc_family or ("mistral" if args.quick and not real else "llama3")
    families = args.families or ("mistral,phi3" if args.quick and not real else ",".join(FAMILIES))
    args.families = [f.strip() for f in families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown or not args.families:
        ap.error(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    args.parts = {int(p) for p in str(args.parts).split(",") if p.strip()}
    if args.trunc_layers < 2:
        ap.error("--trunc-layers must be at least 2")
    if args.layers < 3:
        ap.error("--layers must be at least 3 (the taps are layers 2 and -1, as in configs/standins_4llm.yaml)")
    return args


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average_1_5_15": list(os.getloadavg()), "device": device}
    for pkg in ("bitsandbytes", "datasets", "accelerate"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as err:  # noqa: BLE001
            env[pkg] = f"unavailable ({type(err).__name__}: {str(err)[:120]})"
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    _ADAMW_KWARGS.clear()
    _ADAMW_KWARGS.update(ADAMW[args.adamw])
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    real = args.widths == "real"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fusion_llm.modeling import FusionModel

    result = {
        "benchmark": "train_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else
        "python benchmarks/train_throughput.py " + " ".join(argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "settings": {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                     for k, v in vars(args).items() if k != "out"},
        "targets": TARGETS, "errors": {}, "notes": [],
    }
    out = args.out

    def save():
        write_json_atomic(out, result)

    used = sorted(set(args.families) | ({args.trunc_family} if 3 in args.parts else set()), key=FAMILIES.index)
    missing = [f for f in used if not has_tokenizer(f)]
    if missing and not real:
        print(f"error: tokenizers {missing} are not in the cache ({tokenizer_dir('llama3').parent}); "
              "run: python scripts/fetch_tokenizers.py", file=sys.stderr)
        return 2
    result["tokens"] = {"real_tokenizers": [f for f in used if f not in missing],
                        "random_ids_for": missing,
                        "note": (f"no real tokenizer for {missing} in {tokenizer_dir('llama3').parent}: those "
                                 "backbones get random token ids of their vocabulary size") if missing else
                        "all four real tokenizers"}
    if missing:
        log(f"note: {result['tokens']['note']}")

    # ---- backbones ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if real:
        root = cache_dir() / "standins_real"

        def build_dir(layers, family="llama3"):
            return build_real_width(family, layers, root, device)

        dirs = {f: build_real_width(f, args.layers, root, device) for f in args.families}
    else:
        from fusion_llm.standins import build_standin

        def build_dir(layers, family="llama3"):
            return build_standin(family, cache_dir() / "standins" / f"{family}_L{layers}", num_hidden_layers=layers)

        dirs = {f: build_standin(f) for f in args.families}
    result["standin_build_s"] = time.perf_counter() - t0
    config, note = make_config(args, dirs)
    if note:
        result["notes"].append(note)
    device_map = {"": 0} if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = FusionModel.from_config(config, device_map=device_map)
    model.head.to(device)
    sync(device)
    result["backbone_load_s"] = time.perf_counter() - t0
    result["backbones"] = [
        {"name": n, "model": b.spec.model, "hidden_size": b.spec.hidden_size, "layers_total": b.spec.num_hidden_layers,
         "layers_run": len(b.model.layers), "taps": b.spec.resolved_taps(), "vocab_size": vocab_size(b),
         "random_ids": uses_random_ids(b), "quantization": b.spec.quantization, "compute_dtype": b.spec.compute_dtype}
        for n, b in model.backbones.items()]
    result["head"] = {k: model.config.to_dict()[k] for k in ("shared_width", "adapter", "fusion", "head")}
    mem_load = memory_stats(device)
    desc = ", ".join(f"{b['name']} h{b['hidden_size']} {b['layers_run']}/{b['layers_total']} layers"
                     for b in result["backbones"])
    log(f"backbones: {desc}; built in {result['standin_build_s']:.1f} s, loaded in {result['backbone_load_s']:.1f} s on {device}")
    save()

    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
        for part, key, fn in (
            (1, "head_overhead", lambda: measure_head_overhead(args, model, device)),
            (2, "feature_cache", lambda: measure_feature_cache(args, model, device, Path(tmp))),
        ):
            if part not in args.parts:
                continue
            try:
                result[key] = fn()
            except Exception as err:  # noqa: BLE001 - keep measuring the other parts; the error is reported
                result["errors"][key] = f"{type(err).__name__}: {err}"
                log(f"[{part}] {key} FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}")
            save()

        # ---- memory vs. the plan (measured on a GPU; the plan's estimate everywhere) -------------------------
        if 1 in args.parts:
            try:
                from fusion_llm.budget import plan

                p = plan(copy.deepcopy(config), args.batch_size, args.seq_len)
                step_peak = result.get("head_overhead", {}).get("peak_allocated_bytes_during_steps")
                result["memory"] = {
                    "plan_estimate_bytes": p.memory_bytes,
                    "plan_stored_backbone_bytes": sum(b.stored_bytes for b in p.backbones),
                    "after_load": mem_load,
                    "peak_during_train_steps_bytes": step_peak,
                    "peak_over_plan": (step_peak / p.memory_bytes) if step_peak else None,
                    "shape": {"batch_size": args.batch_size, "seq_len": args.seq_len},
                    "note": "peak_during_train_steps = torch.cuda.max_memory_allocated over part 1 (reset after "
                            "loading); after_load.max_allocated_bytes includes quantization transients at load",
                }
                mem_load = mem_load or {}
                log(f"memory: plan estimate {gib(p.memory_bytes)} (stored backbones "
                    f"{gib(result['memory']['plan_stored_backbone_bytes'])}), after load "
                    f"{gib(mem_load.get('allocated_bytes'))}, load peak {gib(mem_load.get('max_allocated_bytes'))}, "
                    f"train-step peak {gib(step_peak)}" + ("" if device == "cuda" else " (no GPU: nothing measured)"))
            except Exception as err:  # noqa: BLE001
                result["errors"]["memory"] = f"{type(err).__name__}: {err}"
                log(f"memory FAILED: {err}\n{traceback.format_exc()}")
            save()

        if 3 in args.parts:
            if device == "cuda":
                del model
                torch.cuda.empty_cache()
            try:
                result["truncation"] = measure_truncation(args, build_dir, device_map, device)
            except Exception as err:  # noqa: BLE001
                result["errors"]["truncation"] = f"{type(err).__name__}: {err}"
                log(f"[3] truncation FAILED: {type(err).__name__}: {err}\n{traceback.format_exc()}")

    result["ratios"] = {
        "head_overhead_train_over_forward": result.get("head_overhead", {}).get("ratio"),
        "cache_speedup": result.get("feature_cache", {}).get("speedup"),
        "truncation_speedup": result.get("truncation", {}).get("speedup"),
    }
    save()
    r = result["ratios"]
    fmt = lambda x, f, unit="": "n/a" if x is None else format(x, f) + unit
    log(f"ratios: train/forward-only throughput {fmt(r['head_overhead_train_over_forward'], '.3f')} (target >= 0.9), "
        f"cached/uncached epoch speedup {fmt(r['cache_speedup'], '.1f', 'x')} (target >= 20x), "
        f"truncation speedup {fmt(r['truncation_speedup'], '.2f', 'x')}")
    log(f"wrote {out}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
