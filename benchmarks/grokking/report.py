"""From per-seed records to the results: means and standard errors, targets, the table and the plots.

Conventions:
- ``*_mean`` / ``*_stderr``: over seeds (standard error = sample std / sqrt(n); 0 with one seed).
- ``step_val_acc_99``: the first evaluated update with val acc > 0.99; when never reached, the
  number of updates trained (the seed's convention), and ``reached_99`` says on how many seeds it was
  reached. Methods that do not train (merges, experts off their task) have None.
- ``train_flops_to_99``: the total training compute (FLOPs, the experts or base a method is built from included)
  spent when val acc first passed 0.99; when never reached, all the compute it had (the same convention).
- ``normalized_acc``: val acc / the val acc of the task's own expert of the same track and seed
  (homogeneous expert for the homogeneous track and the controls, family expert for the families).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from benchmarks.grokking.presets import FAMILY_TASKS
from benchmarks.store import write_json_atomic
from fusion_llm.data.grokking import TASKS
from fusion_llm.paths import write_atomic

# The seed experiment's own baseline means (3 seeds, 7500 updates), for reference.
SEED_REPORTED = {
    "x_div_y": {"final_val_acc_mean": 0.99984, "step_val_acc_99_mean": 3853},
    "x_minus_y": {"final_val_acc_mean": 0.95931, "step_val_acc_99_mean": 4533},
    "x_plus_y": {"final_val_acc_mean": 0.99919, "step_val_acc_99_mean": 2877},
    "permutation": {"final_val_acc_mean": 0.65234, "step_val_acc_99_mean": 7460},
}
METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
SEED_FORMAT = {"val_acc": "final_val_acc", "val_loss": "final_val_loss", "train_acc": "final_train_acc",
               "train_loss": "final_train_loss"}
COSTS = ("trainable_params", "total_params", "wall_s", "upstream_wall_s", "train_flops", "upstream_flops",
         "total_train_flops", "inference_ms_per_1000", "inference_flops_per_1000", "inference_peak_mib", "weights_mib",
         "produce_peak_mib")
SHORT = {"x_plus_y": "x+y", "x_minus_y": "x-y", "x_div_y": "x/y", "permutation": "perm"}


def mean_stderr(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _own_expert(records: dict, track: str, task: str) -> float | None:
    if track == "families":
        family = next(f for f, t in FAMILY_TASKS.items() if t == task)
        record = records.get(f"family expert {family}")
    else:
        record = records.get(f"expert {task}")
    if not record or task not in record.get("per_task", {}):
        return None
    return record["per_task"][task]["val_acc"]


def _step(record: dict, task: str) -> tuple[float | None, bool | None]:
    """(step_val_acc_99 with the seed's never-reached convention, reached) or (None, None) when untrained."""
    if task not in record.get("trained_tasks", []):
        return None, None
    step = record["per_task"][task].get("step_val_acc_99")
    if step is None:
        return record["details"].get("updates"), False
    return step, True


def _flops_to_99(record: dict, task: str) -> tuple[float | None, bool | None]:
    """(train_flops_to_99 with the never-reached convention, reached) or (None, None) when untrained or uncounted."""
    if task not in record.get("trained_tasks", []):
        return None, None
    entry = record["per_task"][task]
    if entry.get("train_flops_to_99") is not None:
        return entry["train_flops_to_99"], True
    budget = entry.get("train_flops_budget", record.get("total_train_flops"))
    return (budget, False) if budget is not None and "train_flops_to_99" in entry else (None, None)


def _mean_curve(curves: list[list]) -> list[list[float]]:
    by_step: dict[float, list] = {}
    for curve in curves:
        for step, acc in curve:
            by_step.setdefault(step, []).append(acc)
    return [[step, sum(v) / len(v)] for step, v in sorted(by_step.items()) if len(v) == len(curves)]


def aggregate(seeds: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Method name -> seed-format summary (means, standard errors, per task, costs, mean curves)."""
    names = list(next(iter(seeds.values())))
    out = {}
    for name in names:
        runs = [seeds[s][name] for s in seeds]
        first = runs[0]
        if not first.get("per_task"):  # mergekit refused: nothing to score
            out[name] = {"group": first["group"], "track": first["track"], "details": first["details"]}
            continue
        per_task, task_means = {}, {m: [] for m in (*METRICS, "normalized_acc", "step_val_acc_99")}
        by_seed_mean = {m: [] for m in (*METRICS, "normalized_acc")}
        for task in TASKS:
            entry = {}
            for metric in METRICS:
                entry[f"{SEED_FORMAT[metric]}_mean"], entry[f"{SEED_FORMAT[metric]}_stderr"] = mean_stderr(
                    [r["per_task"][task][metric] for r in runs])
            normalized = []
            for seed, run in zip(seeds, runs):
                own = _own_expert(seeds[seed], first["track"], task)
                normalized.append(run["per_task"][task]["val_acc"] / own if own else None)
            entry["normalized_acc_mean"], entry["normalized_acc_stderr"] = mean_stderr(normalized)
            steps = [_step(r, task) for r in runs]
            if steps[0][0] is not None:
                entry["step_val_acc_99_mean"], entry["step_val_acc_99_stderr"] = mean_stderr([s for s, _ in steps])
                entry["reached_99"] = f"{sum(bool(r) for _, r in steps)}/{len(steps)}"
            else:
                entry["step_val_acc_99_mean"] = entry["step_val_acc_99_stderr"] = entry["reached_99"] = None
            flops = [_flops_to_99(r, task) for r in runs]
            if all(f is not None for f, _ in flops):
                entry["train_flops_to_99_mean"], entry["train_flops_to_99_stderr"] = mean_stderr([f for f, _ in flops])
            else:
                entry["train_flops_to_99_mean"] = entry["train_flops_to_99_stderr"] = None
            per_task[task] = entry
            for metric in METRICS:
                task_means[metric].append(entry[f"{SEED_FORMAT[metric]}_mean"])
            task_means["normalized_acc"].append(entry["normalized_acc_mean"])
            task_means["step_val_acc_99"].append(entry["step_val_acc_99_mean"])
        for seed, run in zip(seeds, runs):  # per seed task-means, for the method-level standard errors
            for metric in METRICS:
                by_seed_mean[metric].append(sum(run["per_task"][t][metric] for t in TASKS) / len(TASKS))
        summary = {"group": first["group"], "track": first["track"]}
        for metric in METRICS:
            summary[f"{SEED_FORMAT[metric]}_mean"] = sum(task_means[metric]) / len(TASKS)
            summary[f"{SEED_FORMAT[metric]}_stderr"] = mean_stderr(by_seed_mean[metric])[1]
        steps = [s for s in task_means["step_val_acc_99"] if s is not None]
        summary["step_val_acc_99_mean"] = sum(steps) / len(steps) if steps else None
        normalized = [v for v in task_means["normalized_acc"] if v is not None]
        summary["normalized_acc_mean"] = sum(normalized) / len(normalized) if normalized else None
        for cost in COSTS:
            summary[f"{cost}_mean"], summary[f"{cost}_stderr"] = mean_stderr([r.get(cost) for r in runs])
        summary["memory_method"] = first.get("memory_method")
        summary["per_task"] = per_task
        summary["curves"] = {t: _mean_curve([r["curve"][t] for r in runs]) for t in first.get("curve", {})}
        summary["details"] = [r["details"] for r in runs]
        out[name] = summary
    return out


def check_targets(methods: dict[str, dict]) -> dict:
    """The issue's three targets for every fusion method (no method is picked on validation)."""
    fusion = {n: m for n, m in methods.items() if m["group"] == "fusion"}
    merges = {n: m for n, m in methods.items() if m["group"] == "merge" and "per_task" in m}
    baseline = methods.get("seed baseline")
    best_merge = max(merges.items(), key=lambda kv: kv[1]["normalized_acc_mean"] or 0) if merges else None
    out = {}
    for name, method in fusion.items():
        accs = {t: method["per_task"][t]["final_val_acc_mean"] for t in TASKS}
        worst = min(accs, key=accs.get)
        entry = {"val_acc_ge_0.99_all_tasks": {
            "met": all(a >= 0.99 for a in accs.values()), "per_task": accs,
            "shortfall": {t: round(0.99 - a, 6) for t, a in accs.items() if a < 0.99}, "worst_task": worst}}
        if best_merge and method["track"] == "homogeneous":
            gap = (method["normalized_acc_mean"] or 0) - (best_merge[1]["normalized_acc_mean"] or 0)
            entry["above_every_merge_normalized"] = {
                "met": gap > 0, "fusion": method["normalized_acc_mean"], "best_merge": best_merge[0],
                "best_merge_value": best_merge[1]["normalized_acc_mean"], "margin": gap}
        if baseline:  # total training compute to 0.99, the experts included (the head's updates alone hide them)
            per_task = {}
            for task in TASKS:
                f, b = method["per_task"][task], baseline["per_task"][task]
                reached = f["reached_99"] is not None and f["reached_99"].split("/")[0] == f["reached_99"].split("/")[1]
                known = f.get("train_flops_to_99_mean") is not None and b.get("train_flops_to_99_mean") is not None
                per_task[task] = {"fusion": f.get("train_flops_to_99_mean"), "fusion_reached": f["reached_99"],
                                  "baseline": b.get("train_flops_to_99_mean"), "baseline_reached": b["reached_99"],
                                  "met": bool(reached and known and
                                              f["train_flops_to_99_mean"] < b["train_flops_to_99_mean"])}
            entry["compute_to_99_below_baseline_all_tasks"] = {"met": all(v["met"] for v in per_task.values()),
                                                               "per_task": per_task}
        out[name] = entry
    return out


# ---- the table ---------------------------------------------------------------------------------------

def _fmt(mean, stderr=None, digits=3, seeds=1) -> str:
    if mean is None:
        return "—"
    text = f"{mean:.{digits}f}"
    if seeds > 1 and stderr:
        text += f" ± {stderr:.{digits}f}"
    return text


def _flops(n) -> str:
    return "—" if n is None else f"{n:.2e}"


def _count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _load(machine: dict) -> str:
    start, end = machine.get("load_average_start"), machine.get("load_average_end")
    return f"{start[0]:.1f} → {end[0]:.1f}" if start and end else "?"


def render_table(results: dict) -> str:
    """results.md: accuracy, steps, cost, merge choices, refusal, seed comparison, targets."""
    methods, n = results["methods"], len(results["config"]["seeds"])
    lines = [f"# compare_merges — grokking track, preset `{results['preset']}`", "",
             f"{results['date']} · {results['machine']['description']} · {n} seed(s) · wall {results['wall_s']:.0f} s"
             f" (CPU {results.get('cpu_s', 0):.0f} s) · {results.get('workers', 1)} worker process(es)"
             f" · torch threads {results['machine']['torch_threads']}"
             " · load average "
             f"{_load(results['machine'])}", ""]
    lines += [f"Schedules: {results['schedules']}", ""]
    head = "| method | track | " + " | ".join(SHORT[t] for t in TASKS) + \
        " | mean val acc | norm. acc | val loss | train acc | train loss |"
    lines += ["## Accuracy (validation = the seed's 50% split; ± standard error over seeds)", "", head,
              "|" + "---|" * (2 + len(TASKS) + 5)]
    for name, m in methods.items():
        if "per_task" not in m:
            refusal = m["details"].get("refused") or "merged (no refusal)"
            lines.append(f"| {name} | {m['track']} | " + " | ".join(["refused"] * len(TASKS))
                         + f" | mergekit: “{refusal}” | | | | |")
            continue
        cells = [_fmt(m["per_task"][t]["final_val_acc_mean"], m["per_task"][t]["final_val_acc_stderr"], seeds=n)
                 for t in TASKS]
        lines.append(f"| {name} | {m['track']} | " + " | ".join(cells) + " | "
                     + " | ".join([_fmt(m["final_val_acc_mean"], m["final_val_acc_stderr"], seeds=n),
                                   _fmt(m["normalized_acc_mean"]), _fmt(m["final_val_loss_mean"]),
                                   _fmt(m["final_train_acc_mean"]), _fmt(m["final_train_loss_mean"])]) + " |")
    lines += ["", "## Updates to val acc > 0.99 (first evaluated update; `n/N`: seeds that reached it, else the "
              "budget is shown)", "", "| method | " + " | ".join(SHORT[t] for t in TASKS) + " |",
              "|" + "---|" * (1 + len(TASKS))]
    for name, m in methods.items():
        if "per_task" not in m or all(m["per_task"][t]["step_val_acc_99_mean"] is None for t in TASKS):
            continue
        cells = []
        for t in TASKS:
            e = m["per_task"][t]
            cells.append("—" if e["step_val_acc_99_mean"] is None else
                         f"{e['step_val_acc_99_mean']:.0f} ({e['reached_99']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Total training compute to val acc > 0.99 (FLOPs, the base and experts a method is built from "
              "included; `n/N` as above, else all the compute it had)", "",
              "| method | " + " | ".join(SHORT[t] for t in TASKS) + " |", "|" + "---|" * (1 + len(TASKS))]
    for name, m in methods.items():
        if "per_task" not in m or all(m["per_task"][t].get("train_flops_to_99_mean") is None for t in TASKS):
            continue
        lines.append(f"| {name} | " + " | ".join(
            "—" if m["per_task"][t].get("train_flops_to_99_mean") is None else
            f"{_flops(m['per_task'][t]['train_flops_to_99_mean'])} ({m['per_task'][t]['reached_99']})"
            for t in TASKS) + " |")
    lines += ["", "## Cost", "", "| method | trainable | total params | produce s | + experts s | train FLOPs | "
              "+ experts FLOPs | infer ms/1000 | infer FLOPs/1000 | infer peak MiB | weights MiB | produce peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        if "per_task" not in m:
            continue
        lines.append(f"| {name} | {_count(m['trainable_params_mean'])} | {_count(m['total_params_mean'])} | "
                     f"{_fmt(m['wall_s_mean'], digits=1)} | {_fmt(m['upstream_wall_s_mean'], digits=1)} | "
                     f"{_flops(m.get('train_flops_mean'))} | {_flops(m.get('upstream_flops_mean'))} | "
                     f"{_fmt(m['inference_ms_per_1000_mean'], digits=1)} | "
                     f"{_flops(m.get('inference_flops_per_1000_mean'))} | "
                     f"{_fmt(m['inference_peak_mib_mean'], digits=1)} | "
                     f"{_fmt(m['weights_mib_mean'], digits=1)} | {_fmt(m['produce_peak_mib_mean'], digits=1)} |")
    lines += ["", "Peak memory: resident-set peak above the start of the measured work "
              f"({next((m.get('memory_method') for m in methods.values() if m.get('memory_method')), '?')}, "
              "reset per measurement through /proc/self/clear_refs). `produce s` for merges = the holdout search plus "
              "the final mergekit run; for fusion = feature extraction plus head training; `+ experts s` = training of "
              "the base and experts the method is built from. FLOPs: counted by torch's FlopCounterMode (matrix "
              "products and attention, forward and backward): a model's updates (the first one counted, times the "
              "updates), a merge's holdout search, a fusion head's feature extraction over the training rows "
              "(a 256-row sample, scaled) plus its updates.", ""]
    lines += ["## Merge settings chosen on the holdout slice of train (never on validation)", "",
              "| merge | chosen (per seed) | holdout acc (search → final mergekit run) |", "|---|---|---|"]
    for name, m in methods.items():
        if m["group"] == "merge" and "per_task" in m:
            chosen = "; ".join(str(d["chosen"]) for d in m["details"])
            scores = "; ".join(f"{d['holdout_acc_search']:.3f} → {d['final']['holdout_acc']:.3f}" for d in m["details"])
            lines.append(f"| {name} | {chosen} | {scores} |")
    refusal = results.get("mergekit_refusal") or {}
    if refusal:
        lines += ["", "## mergekit on the four families", "",
                  f"- as configured: `{refusal.get('refused')}`",
                  f"- with `allow_crimes: true`: `{refusal.get('refused_with_allow_crimes')}`"]
    base = methods.get("seed baseline")
    if base:
        lines += ["", "## Seed baseline: this reproduction vs the seed's reported means (7500 updates, 3 seeds)", "",
                  "| task | val acc here | val acc (seed protocol: 8 x 512 draws) here | seed's val acc | "
                  "step_val_acc_99 here | seed's step |", "|---|---|---|---|---|---|"]
        for t in TASKS:
            protocol = [d["seed_protocol"][t]["final_val_acc"] for d in base["details"]]
            lines.append(f"| {t} | {_fmt(base['per_task'][t]['final_val_acc_mean'], digits=5)} | "
                         f"{_fmt(sum(protocol) / len(protocol), digits=5)} | "
                         f"{SEED_REPORTED[t]['final_val_acc_mean']} | "
                         f"{_fmt(base['per_task'][t]['step_val_acc_99_mean'], digits=0)} "
                         f"({base['per_task'][t]['reached_99']}) | {SEED_REPORTED[t]['step_val_acc_99_mean']} |")
        lines.append(f"\nBaseline here: {base['details'][0]['updates']} updates per task.")
    lines += ["", "## Targets (reported, not tuned for)", ""]
    for name, entry in results["targets"].items():
        acc = entry["val_acc_ge_0.99_all_tasks"]
        text = f"- **{name}**: val acc ≥ 0.99 on all tasks: {'met' if acc['met'] else 'missed'}"
        if not acc["met"]:
            text += " (short by " + ", ".join(f"{SHORT[t]} {v:.3f}" for t, v in acc["shortfall"].items()) + ")"
        above = entry.get("above_every_merge_normalized")
        if above:
            text += (f"; above every merge in normalized acc: {'met' if above['met'] else 'missed'} "
                     f"({above['fusion']:.3f} vs {above['best_merge']} {above['best_merge_value']:.3f}, "
                     f"margin {above['margin']:+.3f})")
        compute = entry.get("compute_to_99_below_baseline_all_tasks")
        if compute:
            text += (f"; less total training compute to 0.99 than the baseline (experts included) on every task: "
                     f"{'met' if compute['met'] else 'missed'} (")
            text += ", ".join(f"{SHORT[t]} {_flops(v['fusion'])} [{v['fusion_reached']}] vs {_flops(v['baseline'])} "
                              f"[{v['baseline_reached']}]" for t, v in compute["per_task"].items()) + ")"
        lines.append(text)
    for note in results.get("notes", []):
        lines.append(f"\n> {note}")
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot(results: dict, out_dir: Path) -> list[str]:
    """Four PNGs: val acc vs update per task, per-task accuracy by method, accuracy vs inference cost and vs total
    training compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {n: m for n, m in results["methods"].items() if "per_task" in m}
    written = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey=True)
    for ax, task in zip(axes.flat, TASKS):
        for name, m in methods.items():
            curve = m["curves"].get(task)
            if not curve or not (name == "seed baseline" or m["group"] == "fusion"):
                continue
            style = {"color": "black", "linewidth": 2} if name == "seed baseline" else \
                {"linestyle": "--" if m["track"] == "families" else "-"}
            ax.plot([p[0] for p in curve], [p[1] for p in curve], label=name, **style)
        ax.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(task)
        ax.set_xlabel("updates of the trained part")
        ax.set_ylabel("val acc")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"validation accuracy vs update — seed baseline vs fusion heads ({results['preset']})")
    fig.tight_layout()
    _save(fig, out_dir / "val_acc_vs_step.png")
    plt.close(fig)
    written.append("val_acc_vs_step.png")

    names = list(methods)
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(names) * 1.2 + 1.5))
    height = 0.8 / len(TASKS)
    for i, task in enumerate(TASKS):
        values = [methods[n]["per_task"][task]["final_val_acc_mean"] for n in names]
        ax.barh([k + i * height for k in range(len(names))], values, height=height, label=task)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("val acc")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"per-task validation accuracy by method ({results['preset']})")
    _save(fig, out_dir / "accuracy_by_method.png")
    plt.close(fig)
    written.append("accuracy_by_method.png")

    markers = {"fusion": "o", "merge": "s", "expert": "^", "control": "D"}
    for key, label, title, name in (
            ("inference_ms_per_1000_mean", "inference ms per 1000 examples (log)", "inference cost",
             "accuracy_vs_inference.png"),
            ("total_train_flops_mean", "total training FLOPs, the base and experts a method is built from included "
             "(log)", "total training compute", "accuracy_vs_training_compute.png")):
        fig, ax = plt.subplots(figsize=(9, 6))
        for method, m in methods.items():
            x, y = m.get(key), m["final_val_acc_mean"]
            if not x:
                continue
            ax.scatter(x, y, marker=markers.get(m["group"], "x"), s=40)
            ax.annotate(method, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean val acc over the four tasks")
        ax.set_title(f"accuracy vs {title} ({results['preset']})")
        _save(fig, out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def write_results(results: dict, out_dir: Path) -> dict[str, Path]:
    """results.json, results.md and the plots, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, out_dir)
    previous = out_dir / "results.json"
    if previous.is_file():  # other tracks add their own entries (e.g. "lm_track"): keep them
        try:
            kept = {k: v for k, v in json.loads(previous.read_text()).items() if k not in results}
        except ValueError:
            kept = {}
        results = {**results, **kept}
    write_json_atomic(out_dir / "results.json", results)
    table = render_table(results)
    write_atomic(out_dir / "results.md", table)
    return {"json": out_dir / "results.json", "md": out_dir / "results.md",
            **{p: out_dir / p for p in results["plots"]}}
