"""The grokking track: homogeneous experts, their mergekit merges, feature fusion, and the controls.

Per seed, in order (each stage cached by its recipe, see `store`):

1. the **shared base**: a `LlamaForCausalLM` (`benchmarks.grokking.experts.expert_config`) trained on the union;
2. one **expert** per task, fine-tuned from the base on that task alone;
3. **merges** of the four experts by mergekit (`linear`, `task_arithmetic`, `ties`, `dare_ties`,
   `dare_linear`): settings searched on the holdout slice of the training split, the chosen recipe
   run through ``run_merge`` from disk, the merged folder measured;
4. **feature fusion** of the four frozen experts: one `FusionHead` per fusion method, trained on
   cached features of the union;
5. **controls**: a from-scratch `LlamaForCausalLM` on the union with as many parameters as the
   concat fusion head; the seed's grokking transformer per task;
6. the **families** track (`families`): four stand-ins of four families, fused; mergekit's refusal.

With ``workers > 1`` the stages that depend only on the base (the experts), or on nothing (the family experts, the
seed baseline), are trained first in that many processes (`prefetch`); the run then reads them from the cache.
Every stage still measures its own time, FLOPs and memory in the process that trained it.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch
from transformers import LlamaForCausalLM

from benchmarks.grokking.baseline import fit_baseline, get_schedule, seed_encoding
from fusion_llm.budget import trainable_parameters
from benchmarks.grokking import families
from benchmarks.grokking.data import load_splits
from benchmarks.grokking.measure import PeakMemory, counting_flops, evaluate, inference_cost, weights_mib
from benchmarks.grokking.presets import FAMILY_TASKS, ComparePreset
from benchmarks.grokking.stages import (
    Context,
    FrozenFeatures,
    add_flops,
    curve_by_task,
    fusion_config,
    fusion_head_record,
    make_record,
    score,
    seeded,
    trained_per_task,
)
from benchmarks.store import Store, recipe_key
from benchmarks.grokking.training import fit
from fusion_llm.data.grokking import TASKS
from benchmarks.grokking.experts import (
    answer_logits,
    count_parameters,
    expert_config,
    grokking_tokenizer,
    load_causal_lm,
    save_atomic,
    save_expert,
)
from fusion_llm.merging import MERGE_METHODS, NEEDS_BASE, merge_from_disk, merge_in_memory, merge_recipe


# ---- models answering through their LM head ----------------------------------------------------------

def _logits_on(ctx: Context, model):
    return lambda split: (lambda rows: answer_logits(model, ctx.splits[split].input_ids[rows]))


def token_model_record(ctx: Context, model, group: str, *, training: dict | None, wall_s: float,
                       peak_mib: float, upstream_wall_s: float = 0.0, details: dict | None = None,
                       upstream_flops: float | None = 0.0, own_flops: float | None = None) -> dict:
    """Score a causal LM on every task, time its inference; ``training`` adds step_val_acc_99, the curve and the
    training FLOPs (else ``own_flops``: what producing the model took, such as a merge's holdout search)."""
    per_task = score(ctx, _logits_on(ctx, model))
    if training is not None:
        trained_per_task(per_task, training)
    ids = ctx.splits["validation"].input_ids
    batches = [ids[chunk] for chunk in ctx.inference_rows.split(250)]
    cost = inference_cost(lambda batch: answer_logits(model, batch), batches, len(ctx.inference_rows))
    trained_tasks = (details or {}).get("tasks", []) if training is not None else []
    return make_record(group, "homogeneous", per_task, trainable=count_parameters(model),
                       total=count_parameters(model), wall_s=wall_s, cost=cost, weights=weights_mib(model),
                       trained_tasks=trained_tasks,
                       produce_peak_mib=peak_mib, upstream_wall_s=upstream_wall_s,
                       curve=curve_by_task(training["curve"]) if training else {}, details=details,
                       train_flops=training["train_flops"] if training else own_flops, upstream_flops=upstream_flops,
                       flops_per_update=training["flops_per_update"] if training else None)


def train_token_model(ctx: Context, seed: int, model, tasks: tuple[str, ...], schedule, probe_split: str = "validation"
                      ) -> dict:
    """Train a causal LM on the training rows of ``tasks`` (answer position only), probing those tasks on
    ``probe_split`` (the validation probe rows; ``holdout``: every holdout row, for choosing a recipe)."""
    train, probed = ctx.splits["train"], ctx.splits[probe_split]
    rows = torch.cat([train.task_indices(t) for t in tasks])
    probe_rows = ctx.probe_rows if probe_split == "validation" else ctx.holdout_rows

    def batch_logits(drawn):
        picked = rows[drawn]
        return answer_logits(model, train.input_ids[picked]), train.labels[picked]

    def probe():
        return evaluate(_logits_on(ctx, model)(probe_split), probed.labels, {t: probe_rows[t] for t in tasks})

    return fit(model, batch_logits, len(rows), schedule, seed, probe, ctx.log)


def _model_recipe(preset: ComparePreset) -> dict:
    return {"width": preset.expert_width, "layers": preset.expert_layers, "intermediate": preset.expert_intermediate}


def _trained_lm_stage(ctx: Context, seed: int, kind: str, label: str, recipe: dict, tasks, schedule, make_model,
                      group: str, details: dict | None = None, upstream_flops: float | None = 0.0):
    """Train (or load from the cache) a causal LM on ``tasks``; returns (record, folder, key)."""
    folder = ctx.store.folder(kind, recipe)

    def compute():
        model = make_model()
        with PeakMemory() as peak:
            training = train_token_model(ctx, seed, model, tasks, schedule)
        save_expert(model, grokking_tokenizer(), folder, {"tasks": list(tasks), "recipe": recipe,
                                                          "step_val_acc_99": training["step_val_acc_99"]})
        return token_model_record(ctx, model, group, training=training, wall_s=training["wall_s"], peak_mib=peak.mib,
                                  details={"tasks": list(tasks), "updates": schedule.num_updates, **(details or {})},
                                  upstream_flops=upstream_flops)

    record = ctx.store.stage(kind, recipe, f"seed {seed}: {label}", compute, needs=folder)
    return record, folder, recipe_key(kind, recipe)


def stage_base(ctx: Context, seed: int):
    p = ctx.preset
    recipe = {"seed": seed, "schedule": dataclasses.asdict(p.base), "model": _model_recipe(p), "data": ctx.data_recipe}

    def make():
        with seeded(seed):
            return LlamaForCausalLM(expert_config(p.expert_width, p.expert_layers, p.expert_intermediate))

    return _trained_lm_stage(ctx, seed, "base", "shared base on the union", recipe, TASKS, p.base, make, "control")


def stage_expert(ctx: Context, seed: int, task: str, base_folder, base_key: str, base_flops: float | None):
    p = ctx.preset
    recipe = {"seed": seed, "task": task, "schedule": dataclasses.asdict(p.expert_for(task)), "base": base_key,
              "data": ctx.data_recipe}
    return _trained_lm_stage(ctx, seed, "expert", f"expert {task} (from the base)", recipe, (task,), p.expert_for(task),
                             lambda: load_causal_lm(base_folder).train(), "expert", {"own_task": task},
                             upstream_flops=base_flops)


# ---- merges ------------------------------------------------------------------------------------------

def expand_grid(grid: dict) -> list[dict]:
    """{parameter: [values]} -> every combination, as mergekit parameter dicts."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def stage_merge(ctx: Context, seed: int, method: str, base_folder, base_key: str, experts: dict, expert_keys: dict,
                upstream_wall_s: float, upstream_flops: float | None) -> dict:
    """Search the merge settings on the holdout, run the chosen mergekit recipe from disk, measure the result."""
    p = ctx.preset
    grid = p.merge_grid[method]
    recipe = {"seed": seed, "method": method, "grid": grid, "base": base_key, "experts": expert_keys,
              "data": ctx.data_recipe}
    folder = ctx.store.folder("merge", recipe)
    holdout = ctx.splits["holdout"]
    needs_base = method in NEEDS_BASE

    def holdout_scores(model):
        scores = evaluate(_logits_on(ctx, model)("holdout"), holdout.labels, ctx.holdout_rows)
        return {"holdout_acc": sum(s["acc"] for s in scores.values()) / len(scores),
                "holdout_loss": sum(s["loss"] for s in scores.values()) / len(scores),
                "holdout_acc_per_task": {t: s["acc"] for t, s in scores.items()}}

    def compute():
        with PeakMemory() as peak:
            start = time.perf_counter()
            base_weights = load_causal_lm(base_folder).state_dict()
            expert_weights = {task: load_causal_lm(path).state_dict() for task, path in experts.items()}
            work = load_causal_lm(base_folder)
            candidates = []
            with counting_flops() as search:  # scoring every candidate on the holdout
                for parameters in expand_grid(grid):
                    merged = merge_in_memory(expert_weights, method, parameters,
                                             base=base_weights if needs_base else None, seed=seed)
                    work.load_state_dict(merged)
                    candidates.append({"parameters": parameters, **holdout_scores(work)})
            best = max(candidates, key=lambda c: (c["holdout_acc"], -c["holdout_loss"]))
            mergekit_yaml = merge_recipe({t: str(f) for t, f in experts.items()}, method, best["parameters"],
                                         base=str(base_folder) if needs_base else None)
            save_atomic(folder, lambda tmp: merge_from_disk(mergekit_yaml, tmp, seed=seed))
            merged_model = load_causal_lm(folder)
            wall = time.perf_counter() - start
        details = {"method": method, "chosen": best["parameters"], "chosen_on": "holdout slice of train",
                   "holdout_acc_search": best["holdout_acc"], "final": holdout_scores(merged_model),
                   "candidates": candidates, "mergekit_recipe": mergekit_yaml, "folder": str(folder)}
        return token_model_record(ctx, merged_model, "merge", training=None, wall_s=wall, peak_mib=peak.mib,
                                  upstream_wall_s=upstream_wall_s, details=details, upstream_flops=upstream_flops,
                                  own_flops=search.get_total_flops())

    label = f"seed {seed}: merge {method} ({len(expand_grid(grid))} settings on the holdout)"
    return ctx.store.stage("merge", recipe, label, compute, needs=folder)


# ---- feature fusion ----------------------------------------------------------------------------------

def stage_fusion(ctx: Context, seed: int, track: str, folders: dict, keys: dict, upstream_wall_s: float,
                 upstream_flops: float | None) -> dict:
    """One record per fusion method; the frozen experts and their features load only if a method is missing."""
    p = ctx.preset
    frozen = None
    records = {}
    for method in p.fusion_methods:
        recipe = {"seed": seed, "track": track, "method": method, "experts": keys,
                  "schedule": dataclasses.asdict(p.head_for(track)),
                  "width": p.shared_width, "quantization": p.quantization, "data": ctx.data_recipe}
        head_folder = ctx.store.folder("fusion_head", recipe)

        def compute():
            nonlocal frozen
            if frozen is None:
                frozen = FrozenFeatures(ctx, folders, keys)
            return fusion_head_record(ctx, seed, track, frozen, method, head_folder, upstream_wall_s, upstream_flops)

        records[method] = ctx.store.stage("fusion", recipe, f"seed {seed}: {track} fusion {method}", compute)
    return records


# ---- controls ----------------------------------------------------------------------------------------

def scratch_size(target: int, vocab: int, layers: int, head_dim: int = 32) -> tuple[int, int]:
    """(hidden, intermediate) of a Llama with about ``target`` parameters (MLP width nearest 4 x hidden
    among the sizes within 1%, else the closest)."""
    def count(h, i):
        return 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h

    options = [(h, i) for h in range(head_dim, 1025, head_dim) for i in range(head_dim, 8 * h + 1, head_dim)]
    close = [o for o in options if abs(count(*o) - target) <= 0.01 * target]
    if close:
        return min(close, key=lambda o: (abs(o[1] - 4 * o[0]), abs(count(*o) - target)))
    return min(options, key=lambda o: abs(count(*o) - target))


def stage_scratch(ctx: Context, seed: int, expert_folders: dict):
    p = ctx.preset
    target = trainable_parameters(fusion_config(p, expert_folders, "concat"))
    vocab = expert_config(p.expert_width).vocab_size
    hidden, inter = scratch_size(target, vocab, p.expert_layers)
    recipe = {"seed": seed, "schedule": dataclasses.asdict(p.scratch), "hidden": hidden, "intermediate": inter,
              "layers": p.expert_layers, "data": ctx.data_recipe}

    def make():
        with seeded(seed):
            return LlamaForCausalLM(expert_config(hidden, p.expert_layers, inter))

    details = {"matched_to": "concat fusion head", "head_trainable_params": target, "hidden": hidden,
               "intermediate": inter}
    record, _, _ = _trained_lm_stage(ctx, seed, "scratch", "from scratch on the union (head-sized)", recipe, TASKS,
                                     p.scratch, make, "control", details)
    return record


def stage_baseline(ctx: Context, seed: int) -> dict:
    """The seed's grokking transformer, one per task, scored on the same rows as every other method."""
    p = ctx.preset
    schedule = get_schedule(p.baseline)
    if p.baseline_updates is not None:
        schedule = dataclasses.replace(schedule, num_updates=p.baseline_updates)
    per_task, curves, seed_protocol = {}, {}, {}
    wall = params = 0
    timed_ms = timed_n = peak = flops = inference_flops = 0.0
    for task in TASKS:
        recipe = {"seed": seed, "task": task, "schedule": dataclasses.asdict(schedule), "split_seed": p.split_seed,
                  "data": ctx.data_recipe}

        def progress(point, every=max(schedule.num_updates // 10, schedule.eval_every)):
            if point["step"] % every < schedule.eval_every:
                ctx.log(f"  update {point['step']}/{schedule.num_updates} train_loss {point['train_loss']:.4f} "
                        f"train_acc {point['train_acc']:.3f} val {point['val_acc']:.3f} ({point['elapsed_s']:.0f}s)")

        def compute(task=task):
            with PeakMemory() as memory:
                model, metrics = fit_baseline(task, seed, schedule=schedule, split_seed=p.split_seed, callback=progress)
            scored = {}
            for split, rows in (("validation", ctx.val_rows[task]), ("train", ctx.train_rows[task])):
                data = ctx.splits[split]
                inputs, labels = seed_encoding(task, data.input_ids[rows].numpy(), data.labels[rows].numpy())
                inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
                scored[split] = evaluate(lambda r: model(inputs[r]), labels, {task: torch.arange(len(labels))})[task]
                if split == "validation":
                    own = data.task_ids[ctx.inference_rows] == TASKS.index(task)
                    timed = ctx.inference_rows[own]
                    local, _ = seed_encoding(task, data.input_ids[timed].numpy(), data.labels[timed].numpy())
                    cost = inference_cost(model, [torch.from_numpy(local)], len(timed))
            reached = [pt["step"] for pt in metrics["curve"] if pt["val_acc"] > 0.99]
            return {"val_acc": scored["validation"]["acc"], "val_loss": scored["validation"]["loss"],
                    "train_acc": scored["train"]["acc"], "train_loss": scored["train"]["loss"],
                    "step_val_acc_99": reached[0] if reached else None, "n_timed": len(timed), **cost,
                    "curve": [[pt["step"], pt["val_acc"]] for pt in metrics["curve"]],
                    "seed_protocol": {k: metrics[k] for k in ("final_train_loss", "final_val_loss", "final_train_acc",
                                                              "final_val_acc", "step_val_acc_99")},
                    "num_parameters": metrics["num_parameters"], "wall_s": metrics["wall_time_s"],
                    "produce_peak_mib": memory.mib, "flops_per_update": metrics["flops_per_update"],
                    "train_flops": metrics["train_flops"]}

        result = ctx.store.stage("baseline", recipe, f"seed {seed}: seed baseline {task} ({schedule.num_updates} "
                                 "updates)", compute)
        per_task[task] = {k: result[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss", "step_val_acc_99")}
        step, per_update = result["step_val_acc_99"], result.get("flops_per_update")
        per_task[task]["train_flops_to_99"] = None if step is None or per_update is None else per_update * step
        per_task[task]["train_flops_budget"] = result.get("train_flops")  # this task's own model, all its updates
        flops = add_flops(flops, result.get("train_flops"))
        curves[task] = result["curve"]
        seed_protocol[task] = result["seed_protocol"]
        wall += result["wall_s"]
        params += result["num_parameters"]
        timed_ms += result["inference_ms_per_1000"] * result["n_timed"] / 1000
        per_1000 = result.get("inference_flops_per_1000")
        inference_flops = add_flops(inference_flops, None if per_1000 is None else per_1000 * result["n_timed"] / 1000)
        timed_n += result["n_timed"]
        peak = max(peak, result["produce_peak_mib"])
        memory_info = {k: result[k] for k in ("inference_peak_mib", "memory_method")}
    cost = {"inference_ms_per_1000": 1000 * timed_ms / max(timed_n, 1), **memory_info,
            "inference_flops_per_1000": None if inference_flops is None else 1000 * inference_flops / max(timed_n, 1)}
    return make_record("control", "homogeneous", per_task, trainable=params, total=params, wall_s=wall, cost=cost,
                       weights=params * 4 / 2**20, trained_tasks=TASKS, produce_peak_mib=peak, curve=curves,
                       train_flops=flops,
                       details={"models": "one per task (the seed's setup)", "updates": schedule.num_updates,
                                "seed_protocol": seed_protocol,
                                "loss_note": "cross-entropy over the task's own classes (97 or 120), as the seed"})


# ---- the track ---------------------------------------------------------------------------------------

def run_seed(ctx: Context, seed: int) -> dict[str, dict]:
    """Every method of the track for one seed: method name -> record."""
    records = {}
    base, base_folder, base_key = stage_base(ctx, seed)
    records["base (union)"] = base
    experts, expert_keys = {}, {}
    for task in TASKS:
        record, folder, key = stage_expert(ctx, seed, task, base_folder, base_key, base.get("train_flops"))
        records[f"expert {task}"] = record
        experts[task], expert_keys[task] = str(folder), key
    upstream = base["wall_s"] + sum(records[f"expert {t}"]["wall_s"] for t in TASKS)
    upstream_flops = add_flops(base.get("train_flops"), *[records[f"expert {t}"].get("train_flops") for t in TASKS])
    for method in MERGE_METHODS:
        records[f"merge {method}"] = stage_merge(ctx, seed, method, base_folder, base_key, experts, expert_keys,
                                                 upstream, upstream_flops)
    for method, record in stage_fusion(ctx, seed, "homogeneous", experts, expert_keys, upstream,
                                       upstream_flops).items():
        records[f"fusion {method}"] = record
    records["scratch (union, head-sized)"] = stage_scratch(ctx, seed, experts)
    records["seed baseline"] = stage_baseline(ctx, seed)
    records.update(families.run_families(ctx, seed, stage_fusion))
    return records


def _context(preset: ComparePreset, cache_root, use_cache: bool, log) -> Context:
    splits = load_splits(preset.split_seed, preset.holdout_fraction, preset.max_examples_per_task)
    return Context(preset, splits, Store(cache_root, enabled=use_cache, log=log), log)


_WORKER: dict = {}  # a prefetch worker's Context, built once per process


def _start_worker(preset: ComparePreset, cache_root, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["ctx"] = _context(preset, cache_root, True, print)


def _prefetch_job(seed: int, kind: str, name: str) -> None:
    """One independent stage, in a worker process: it lands in the cache, where `run_seed` finds it."""
    ctx = _WORKER["ctx"]
    if kind == "expert":
        base, base_folder, base_key = stage_base(ctx, seed)  # trained already: a cache hit
        stage_expert(ctx, seed, name, base_folder, base_key, base.get("train_flops"))
    elif kind == "family":
        families.stage_family_expert(ctx, seed, name, FAMILY_TASKS[name])
    else:
        stage_baseline(ctx, seed)


def prefetch(ctx: Context, cache_root, seed: int, workers: int) -> None:
    """Train the base here, then the experts, the family experts and the seed baseline in ``workers`` processes
    (spawned, one torch thread each unless this process has more), the longest jobs first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    stage_base(ctx, seed)
    size = {t: ctx.preset.expert_for(t).num_updates * ctx.preset.expert_for(t).batch_size for t in TASKS}
    jobs = ([("expert", t) for t in sorted(TASKS, key=lambda t: -size[t])] + [("baseline", "")]
            + [("family", f) for f in FAMILY_TASKS])
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(ctx.preset, cache_root, torch.get_num_threads())) as pool:
        for future in [pool.submit(_prefetch_job, seed, kind, name) for kind, name in jobs]:
            future.result()


def run_grokking_track(preset: ComparePreset, cache_root, *, use_cache: bool = True, log=print,
                       workers: int = 1) -> dict:
    """Run every seed of the track; returns ``{"seeds": {seed: {method: record}}, "wall_s", ...}``.
    ``workers > 1`` (with the cache on): the independent stages train in that many processes first (`prefetch`)."""
    start = time.perf_counter()
    ctx = _context(preset, cache_root, use_cache, log)
    store, splits = ctx.store, ctx.splits
    sample = splits["validation"]
    if grokking_tokenizer()(sample.texts[:8])["input_ids"] != sample.input_ids[:8].tolist():
        raise RuntimeError("the grokking tokenizer does not reproduce the dataset's input_ids")
    log("data: " + ", ".join(f"{name} {len(split)}" for name, split in splits.items())
        + f" rows (split seed {preset.split_seed}, holdout {preset.holdout_fraction} of train)")
    seeds = {}
    for seed in preset.seeds:
        if workers > 1 and use_cache:
            prefetch(ctx, cache_root, seed, workers)
        seeds[seed] = run_seed(ctx, seed)
    return {"seeds": seeds, "wall_s": time.perf_counter() - start, "cache_hits": store.hits,
            "cache_misses": store.misses, "split_sizes": {n: len(s) for n, s in splits.items()}}
