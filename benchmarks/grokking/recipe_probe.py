"""Choose an expert's recipe on the holdout slice of train: how many updates it needs to pass 0.99.

    python -m benchmarks.grokking.recipe_probe llama3 x_plus_y --updates 800 --cooldown 100
    python -m benchmarks.grokking.recipe_probe expert x_div_y --updates 1800 --cooldown 200 --seed 1

Trains one family stand-in (`benchmarks.grokking.experts.FamilyExpert`, built as the families track builds it),
or with ``expert`` one homogeneous expert fine-tuned from the ``quick`` preset's shared base of that seed (trained
or read from the track's cache, ``--cache``), on its task with the given AdamW recipe and prints the holdout accuracy
every 50 updates and the first update above 0.99. Validation rows are never read. Measurements:
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.grokking.data import load_splits
from benchmarks.grokking.experts import FamilyExpert, family_tokenizer
from benchmarks.grokking.families import encode, take
from benchmarks.grokking.measure import evaluate
from benchmarks.grokking.presets import FAMILY_TASKS, UpdateSchedule
from benchmarks.grokking.stages import seeded
from benchmarks.grokking.training import fit
from benchmarks.store import recipe_key
from fusion_llm.data.grokking import TASKS
from fusion_llm.paths import cache_dir
from fusion_llm.standins import build_standin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILY_TASKS) + ["expert"],
                        help="a family stand-in, or expert: the homogeneous expert from the quick preset's base")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--updates", type=int, default=800)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--cooldown", type=int, default=100, help="linear cooldown over the last N updates")
    parser.add_argument("--layers", type=int, default=1, help="the stand-in's decoder layers (the presets: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="(expert) the grokking track's stage cache (its base)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    schedule = UpdateSchedule(args.updates, batch_size=args.batch, learning_rate=args.lr,
                              weight_decay=args.weight_decay, cooldown_updates=args.cooldown)
    if args.family == "expert":
        return _homogeneous(args, schedule)
    splits = load_splits(0, 0.1)
    overrides = {"num_hidden_layers": args.layers}
    standin_recipe = {"family": args.family, "seed": args.seed, "overrides": overrides}
    standin = build_standin(args.family, cache_dir() / "standins" / recipe_key("standin", standin_recipe),
                            seed=args.seed, **overrides)
    with seeded(args.seed):
        expert = FamilyExpert.from_standin(standin)
    tokenizer = family_tokenizer(standin)
    train, holdout = splits["train"], splits["holdout"]
    train_ids, holdout_ids = encode(tokenizer, train.texts), encode(tokenizer, holdout.texts)
    rows = train.task_indices(args.task)

    def batch_logits(drawn):
        picked = rows[drawn]
        return expert(*take(train_ids, picked)), train.labels[picked]

    def probe():
        return evaluate(lambda chosen: expert(*take(holdout_ids, chosen)), holdout.labels,
                        {args.task: holdout.sample(None)[args.task]})

    started = time.perf_counter()
    result = fit(expert, batch_logits, len(rows), schedule, args.seed, probe, print)
    curve = " ".join(f"{p['step']}:{p['val'][args.task]['acc']:.3f}" for p in result["curve"])
    print(f"{args.family} on {args.task}, {schedule.describe()}, {args.layers} layer(s): holdout acc {curve}; "
          f"first > 0.99 at {result['step_val_acc_99'][args.task]}; {time.perf_counter() - started:.0f} s")
    return 0


def _homogeneous(args, schedule: UpdateSchedule) -> int:
    """The homogeneous expert of ``args.task``: the quick preset's base of ``args.seed``, fine-tuned on the task."""
    from benchmarks.grokking.experts import load_causal_lm
    from benchmarks.grokking.presets import get_preset
    from benchmarks.grokking.track import _context, stage_base, train_token_model

    cache = args.cache or str(cache_dir() / "grokking_recipe_probe")
    ctx = _context(get_preset("quick"), cache, True, lambda *a: None)
    _, base_folder, _ = stage_base(ctx, args.seed)
    started = time.perf_counter()
    result = train_token_model(ctx, args.seed, load_causal_lm(base_folder).train(), (args.task,), schedule, "holdout")
    curve = " ".join(f"{p['step']}:{p['val'][args.task]['acc']:.3f}" for p in result["curve"])
    print(f"expert on {args.task} (seed {args.seed}), {schedule.describe()}: holdout acc {curve}; "
          f"first > 0.99 at {result['step_val_acc_99'][args.task]}; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
