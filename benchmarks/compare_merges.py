"""Feature fusion vs mergekit merges (linear, TIES, DARE, task arithmetic) vs the seed's grokking transformer.

    python benchmarks/compare_merges.py                      # quick preset, both tracks (one core each)
    python benchmarks/compare_merges.py --track grokking     # the grokking track alone (two worker processes)
    python benchmarks/compare_merges.py --track real         # real SmolLM2-135M + Gemma-3-270M (fetched once)
    python benchmarks/compare_merges.py --preset medium --track grokking   # 1 seed, longer; ~35 min
    python benchmarks/compare_merges.py --preset full        # 3 seeds, the seed's budget; hours, resumable
    python benchmarks/compare_merges.py --preset micro --out /tmp/cm   # smoke run (< 60 s)

The grokking track (`benchmarks.grokking.track`): four homogeneous experts (a small
`LlamaForCausalLM` over the grokking vocabulary, fine-tuned from one shared base), their merges by
mergekit, feature fusion of the frozen experts (one head per fusion method), four stand-ins of four
families fused, and the controls (experts alone, a head-sized model from scratch on the union, the
seed baseline). The LM tracks live in `benchmarks.lm` (``track.run_lm_track``, ``real.run_real_track``).

Writes ``results/compare_merges/<preset>/results.json``, ``results.md`` and four PNG plots (the last:
accuracy vs total training compute), and prints the table. Finished stages are cached under
``<out>/cache/grokking`` by a hash of their recipe, so an interrupted run resumes where it stopped (``--fresh``
deletes that cache first).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(ROOT)

import torch  # noqa: E402

from benchmarks.grokking.presets import FAMILY_TASKS, PRESETS, get_preset  # noqa: E402
from benchmarks.lm import real as real_track  # noqa: E402
from benchmarks.lm import track as lm_track  # noqa: E402
from fusion_llm.paths import write_json_atomic  # noqa: E402
from fusion_llm.standins.real_members import REAL_MEMBERS, RealMemberError, is_provisioned  # noqa: E402


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished worker processes: what the run costs on otherwise
    idle cores."""
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def quiet_libraries() -> None:
    """No per-call progress bars from transformers / datasets (hundreds of model loads and maps)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"description": f"{model}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "cpu_count": os.cpu_count(), "torch_threads": threads, "load_average_start": load,
            "platform": platform.platform()}


def schedules(preset) -> str:
    from benchmarks.grokking.baseline import get_schedule

    baseline = get_schedule(preset.baseline)
    if preset.baseline_updates is not None:
        baseline = dataclasses.replace(baseline, num_updates=preset.baseline_updates)
    parts = [f"seed baseline {baseline.num_updates} updates x batch {baseline.batch_size} per task"]
    for name in ("base", "expert", "scratch", "head", "family"):
        parts.append(f"{name} {getattr(preset, name).describe()}")
        if name == "expert":
            parts += [f"expert {task} {schedule.describe()}" for task, schedule in preset.expert_by_task.items()]
    if preset.family_head is not None:
        parts.append(f"families' heads {preset.family_head.describe()}")
    return "; ".join(parts) + (" (updates x batch; AdamW lr 1e-3, betas (0.9, 0.98), wd 0.5, warmup 50, constant "
                               "rate — the seed's — unless a part says otherwise)")


def run_grokking(preset, out_dir: Path, use_cache: bool, threads: int, workers: int = 1) -> dict:
    from benchmarks.grokking.track import run_grokking_track
    from benchmarks.grokking.report import aggregate, check_targets, render_table, write_results

    started, cpu_started = time.perf_counter(), cpu_seconds()
    info = machine(threads)
    track = run_grokking_track(preset, out_dir / "cache" / "grokking", use_cache=use_cache, workers=workers)
    methods = aggregate(track["seeds"])
    refusal = methods.get("families merge (mergekit)", {}).get("details", {})
    results = {
        "preset": preset.name, "track": "grokking", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {**info, "load_average_end": os.getloadavg()}, "workers": workers,
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu_seconds() - cpu_started, "config": preset.to_dict(), "schedules": schedules(preset),
        "family_tasks": FAMILY_TASKS,
        "split_sizes": track["split_sizes"], "cache": {"hits": track["cache_hits"], "misses": track["cache_misses"]},
        "methods": methods, "targets": check_targets(methods), "mergekit_refusal": refusal,
        "notes": [
            "Validation rows are the seed's 50% split (seeded, split seed recorded); merge settings are chosen on a "
            f"holdout of {preset.holdout_fraction:.0%} of each task's training pairs, which no method trains on "
            "(the seed baseline trains on its full training half).",
            "Fusion step counts are updates of the head alone, on top of the experts' own training "
            "(see `+ experts s` in the cost table); a step is only 'reached' when val acc > 0.99 on every seed.",
            "Normalized accuracy divides by the own expert's val acc; where that expert is near chance "
            "(about 0.01) the ratio is noise, not a result.",
            f"The homogeneous experts train with their own recipe ({preset.expert.describe()}"
            + "".join(f"; {task}: {sch.describe()}" for task, sch in preset.expert_by_task.items())
            + "), chosen on the "
            "holdout slice of train: with the seed's optimizer only x_plus_y generalised within a CPU-sized schedule. "
            f"The fusion heads add a linear cooldown to the seed's optimizer ({preset.head.describe()}), also chosen "
            "on the holdout. Every other trained part (base, from-scratch control, family experts, the seed "
            "baseline) uses the seed's optimizer.",
            "Frozen experts are loaded through fusion_llm.backbones.load_backbone "
            f"(quantization: {preset.quantization}); family stand-ins train with frozen token embeddings.",
        ],
    }
    paths = write_results(results, out_dir)
    print(render_table(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def run_lm(preset_name: str, out_dir: Path, use_cache: bool = True, workers: int = 2):
    """The LM track (`benchmarks.lm.track.run_lm_track`), when it has this preset."""
    if preset_name not in lm_track.PRESETS:
        print(f"the LM track has no preset {preset_name!r} (it has {', '.join(lm_track.PRESETS)}): skipped")
        return None
    return lm_track.run_lm_track(preset_name, out_dir, use_cache=use_cache, workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="micro, quick (default), medium (grokking track only) or full")
    parser.add_argument("--track", default="all", choices=("grokking", "lm", "real", "all"),
                        help="all: grokking and LM tracks side by side, then the real-members track when its members are "
                        "provisioned (--track real fetches them)")
    parser.add_argument("--out", default=None, help="output folder (default results/compare_merges/<preset>)")
    parser.add_argument("--fresh", action="store_true", help="delete this preset's cache first and recompute "
                        "everything (the stand-ins and tokenizers in the fusion_llm cache are kept)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on 2 shared cores, 2 threads can run 10-40x slower)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes for a track's independent stages (grokking: experts, family experts, seed "
                        "baseline; LM: training while scoring); default 2, or 1 each when the two run alongside")
    parser.add_argument("--serial", action="store_true",
                        help="with --track all: run the LM track after the grokking track instead of alongside it "
                        "in a second process (each track uses one core)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    quiet_libraries()
    preset = get_preset(args.preset)
    if args.seeds:
        preset = dataclasses.replace(preset, seeds=tuple(args.seeds))
    out_dir = Path(args.out) if args.out else ROOT / "results" / "compare_merges" / preset.name
    lm_process = None
    if args.track == "all" and not args.serial:
        lm_process = start_lm_process(preset.name, out_dir, args.fresh, args.threads)
    if args.track in ("grokking", "all"):
        if args.fresh and (out_dir / "cache" / "grokking").is_dir():
            shutil.rmtree(out_dir / "cache" / "grokking")  # this track's models, merges, heads and features
        workers = args.workers or (1 if lm_process is not None else 2)
        run_grokking(preset, out_dir, use_cache=True, threads=args.threads, workers=workers)
    if lm_process is not None:
        code = finish_lm_process(lm_process, out_dir)
        if code:
            return code
    elif args.track in ("lm", "all"):
        run_lm(preset.name, out_dir, use_cache=not args.fresh, workers=args.workers or 2)
    if args.track == "real":
        return run_real(preset.name, out_dir, fresh=args.fresh)
    if args.track == "all":
        if all(is_provisioned(name) for name in REAL_MEMBERS):
            return run_real(preset.name, out_dir, fresh=args.fresh)
        print("the real-members track is skipped: its members are not provisioned "
              "(python scripts/fetch_real_members.py, then --track real or all)")
    return 0


def run_real(preset_name: str, out_dir: Path, fresh: bool = False) -> int:
    """The real-members track (`benchmarks.lm.real`): two worker processes, one core each."""
    if preset_name not in real_track.PRESETS:
        print(f"the real-members track has no preset {preset_name!r} (it has {', '.join(real_track.PRESETS)}): skipped")
        return 0
    if fresh and (out_dir / "cache" / "real").is_dir():
        shutil.rmtree(out_dir / "cache" / "real")
    try:
        real_track.run_real_track(preset_name, out_dir)
    except RealMemberError as e:  # a member that cannot be provisioned (no network, a hash mismatch): one line
        print(f"compare_merges: error: real-members track: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def start_lm_process(preset_name: str, out_dir: Path, fresh: bool, threads: int) -> tuple:
    """The LM track in a second process, on the second core, while this one runs the grokking track."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "lm_track.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--preset", preset_name, "--track", "lm",
               "--out", str(out_dir), "--threads", str(threads), "--workers", "1"] + (["--fresh"] if fresh else [])
    log = open(log_path, "w")
    print(f"[lm] running alongside in a second process (log: {log_path})", flush=True)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, log_path


def finish_lm_process(lm_process: tuple, out_dir: Path) -> int:
    """Wait for the LM process, print its table, and make sure results.json holds its entry (both tracks
    update that file; run in parallel, the last writer must not drop the other's entry)."""
    process, log, log_path = lm_process
    started = time.perf_counter()
    code = process.wait()
    log.close()
    if time.perf_counter() - started > 1:
        print(f"[lm] waited {time.perf_counter() - started:.0f}s for the LM track to finish", flush=True)
    if code != 0:
        print(f"the LM track failed (exit {code}); its log: {log_path}\n" + log_path.read_text()[-3000:])
        return code
    lm_json, shared = out_dir / "lm_results.json", out_dir / "results.json"
    if lm_json.is_file():
        combined = json.loads(shared.read_text()) if shared.is_file() else {}
        combined["lm_track"] = json.loads(lm_json.read_text())
        write_json_atomic(shared, combined)
        print((out_dir / "lm_results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
