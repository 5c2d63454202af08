#!/usr/bin/env python
"""Evaluate a saved fused LM head with EleutherAI's lm-evaluation-harness (``lm_eval``) and print its table.

(Not named ``evaluate.py``: a script's folder comes first on ``sys.path``, so that name would shadow the
``evaluate`` package for every other script here.)

    python scripts/lm_harness.py --head outputs/standins_lm/head                       # the local fusion_continuation
    python scripts/lm_harness.py --head outputs/standins_lm/head --anchor-only         # its anchor alone, same adapter
    python scripts/lm_harness.py --head HEAD --tasks fusion_continuation_code --limit 20 --batch-size 4
    python scripts/lm_harness.py --head HEAD --tasks hellaswag,arc_easy --device cuda  # hub tasks (needs the hub)
    python scripts/lm_harness.py --build-task [--n-per-domain 100 --seed 0]            # only write the local task

The model is ``fusion_llm.harness.FusedLM`` (registered as ``fusion_llm``); the local task
``fusion_continuation`` (a group of ``fusion_continuation_{shakespeare,code,prose}``, see
``fusion_llm.data.continuation``) is (re)built from the prepared corpora's test split into the fusion_llm
cache whenever it is asked for, and its folder is given to lm_eval's ``TaskManager(include_path=...)``.
Exit 2 with one line on bad input (no saved head, an unknown task, corpora not prepared, a hub task's dataset
out of reach).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusion_llm.errors import ConfigError


def _limit(value: str) -> int | float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return int(number) if number.is_integer() and number >= 1 else number


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, help="a saved LM head folder (save_pretrained / train's output_dir/head)")
    parser.add_argument("--tasks", default="fusion_continuation",
                        help="comma-separated lm_eval task / group names (default fusion_continuation)")
    parser.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction when < 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per fused forward (default 8)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--anchor-only", action="store_true", help="evaluate the anchor alone (an untrained head)")
    parser.add_argument("--device", default=None, help="where the backbones load (cuda, cuda:0; default as loaded)")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="generated tokens when a task does not say")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--build-task", action="store_true", help="write the local fusion_continuation task and stop "
                                                                   "(unless --head is given)")
    parser.add_argument("--n-per-domain", type=int, default=100, help="items per domain of the local task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the local task's items")
    return parser.parse_args(argv)


def task_manager(names: list[str], build: bool, n: int, seed: int):
    """lm_eval's TaskManager with the local task folder included (built first when asked for); built-in tasks
    are indexed only when a name is not a local one. Unknown names are a ConfigError."""
    from lm_eval.tasks import TaskManager

    from fusion_llm.data.continuation import TASK, build_continuation_tasks

    local = [name for name in names if name.startswith(TASK)]
    folder = build_continuation_tasks(n=n, seed=seed) if (local or build) else None
    manager = TaskManager(include_path=str(folder) if folder else None, include_defaults=len(local) < len(names))
    known = set(manager.all_tasks)
    unknown = [name for name in names if name not in known and not Path(name).is_file()]
    if unknown:
        raise ConfigError(f"unknown task {', '.join(map(repr, unknown))}; local: {TASK} and {TASK}_<domain> "
                          "(shakespeare, code, prose); built-in: see lm-eval ls tasks")
    return manager, folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if args.head is None and not args.build_task:
            raise ConfigError("give --head PATH (a saved LM head) or --build-task")
        if args.head is not None and not (args.head / "config.json").is_file():
            raise ConfigError(f"{args.head}: no saved fusion head here (config.json missing)")
        if not names:
            raise ConfigError("--tasks: give at least one task name")
        if args.head is None:  # --build-task alone
            from fusion_llm.data.continuation import build_continuation_tasks

            print(build_continuation_tasks(n=args.n_per_domain, seed=args.seed))
            return 0
        manager, folder = task_manager(names, args.build_task, args.n_per_domain, args.seed)

        import lm_eval
        from lm_eval.utils import make_table

        from fusion_llm.harness import FusedLM

        lm = FusedLM(head=str(args.head), anchor_only=args.anchor_only, batch_size=args.batch_size,
                     device=args.device, max_gen_toks=args.max_gen_toks)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=args.limit, num_fewshot=args.num_fewshot,
                                          task_manager=manager, log_samples=False)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"lm_harness: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ConnectionError as err:  # a hub task (its dataset) on a machine that does not reach the hub
        print(f"lm_harness: error: {' '.join(str(err).split())}; hub tasks need the hub or its datasets cache",
              file=sys.stderr)
        return 2
    what = "anchor alone" if args.anchor_only else "fused"
    print(f"{args.head} ({what}), tasks {', '.join(names)}" + (f", local task in {folder}" if folder else ""))
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({k: results[k] for k in ("results", "groups", "configs", "versions",
                                                                  "n-shot", "config") if k in results},
                                          indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
