"""Presets of the comparison: how long every trained part trains, which merge settings are searched.

Every trained part uses the seed's optimizer (AdamW lr 1e-3, betas (0.9, 0.98), weight decay 0.5,
linear warmup over 50 updates, then constant; batches drawn with replacement), except the homogeneous
experts (below) and the fusion heads, which add a linear cooldown over their last fifth
(`head_schedule`, chosen on the holdout). The experts use their own recipe (`EXPERT_RECIPE`: lr 3e-3,
weight decay 1.0, batches of 256, a linear cooldown to 0 at the end), chosen on the holdout slice of train because
with the seed's optimizer no expert but x_plus_y generalised within a CPU-sized schedule, and fusing
frozen experts can only be as good as the experts. Other models trained on tokens (base, from-scratch
control, family experts) draw batches of 128 (`TOKEN_BATCH`), heads on cached features batches of 512
(the seed's).

- ``micro``: a smoke run (< 60 s): 48 examples per task and split, a few updates everywhere.
- ``quick`` (default): one seed, every split complete, short schedules: the seed baseline 50
  updates of 512 per task (a placeholder: it needs thousands to grok), a base trained 200 updates of
  128 on the union, experts 1300 updates of 256 (their recipe; the permutation expert 2000 of 512 at lr 1e-2,
  `PERMUTATION_RECIPE`), the from-scratch control 200 of 128,
  the homogeneous fusion heads 500 of 512, one-layer family stand-ins 40 of 128 and their fusion heads
  100 of 512 (the family track's costs are mostly fixed: scoring and feature extraction over every
  validation row, about 140 s). Measured (2026-11-28, 1 torch thread, load about 1): 486 s wall,
  488 s CPU, of which the four experts about 230 s.
- ``medium``: the largest run that fits a CPU work session (about 35 minutes of one core): one seed,
  the seed baseline 1500 updates of 512, experts 3000 of 256 (cooldown over the last 300), the
  from-scratch control 1000, homogeneous heads 1500, family stand-ins 600 and their heads 500.
- ``full``: three seeds and the seed's number of updates (7500 for the baseline, each expert (its
  recipe, cooldown over the last 1000), each family expert and the from-scratch control; base 1000;
  heads 3000); hours on CPU, resumable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fusion_llm.data.grokking import TASKS


@dataclass(frozen=True)
class UpdateSchedule:
    """How one trained part trains; the defaults are the seed's optimizer.

    Args:
        num_updates: optimizer updates.
        batch_size: examples per update, drawn with replacement.
        eval_every: updates between evaluations on the validation probe (and train-metric windows).
        learning_rate, betas, weight_decay: AdamW.
        warmup_updates: linear warmup from 0 (the seed's ``LambdaLR(min(s / 50, 1))``).
        cooldown_updates: linear decay of the rate to 0 over the last this many updates (0, the seed's:
            constant after warmup). Decoupled weight decay shrinks with the rate, so the cooldown also
            settles the weights.
    """

    num_updates: int
    batch_size: int = 512
    eval_every: int = 50
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.5
    warmup_updates: int = 50
    cooldown_updates: int = 0

    def __post_init__(self):
        for name in ("num_updates", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.cooldown_updates <= self.num_updates:
            raise ValueError(f"cooldown_updates must be in 0..num_updates, got {self.cooldown_updates}")

    def learning_rate_at(self, update: int) -> float:
        """The rate of update ``update`` (0-based): linear warmup, constant, then the linear cooldown (if any)."""
        rate = self.learning_rate
        if self.warmup_updates:
            rate *= min(update / self.warmup_updates, 1.0)
        left = self.num_updates - update  # updates left, this one included
        if self.cooldown_updates and left <= self.cooldown_updates:
            rate *= left / (self.cooldown_updates + 1)
        return rate

    def describe(self) -> str:
        """``N x B`` plus whatever differs from the seed's optimizer."""
        seed = UpdateSchedule(1)
        text = f"{self.num_updates} x {self.batch_size}"
        extra = [f"{label} {getattr(self, name)}" for name, label in
                 (("learning_rate", "lr"), ("weight_decay", "wd"), ("betas", "betas"),
                  ("warmup_updates", "warmup")) if getattr(self, name) != getattr(seed, name)]
        if self.cooldown_updates:
            extra.append(f"linear cooldown to 0 over the last {self.cooldown_updates}")
        return text + (f" ({', '.join(extra)})" if extra else "")


# Batch of the models trained on tokens (base, from-scratch control, family experts); heads train on cached
# features at the seed's batch of 512. Chosen on the holdout slice of train: benchmarks/README.md.
TOKEN_BATCH = 128

# The homogeneous experts' recipe (fine-tuned from the shared base, the seed's warmup, then a linear cooldown
# over the last 200 updates). Chosen on the holdout slice of train: benchmarks/README.md.
EXPERT_RECIPE = dict(batch_size=256, learning_rate=3e-3, weight_decay=1.0)


def expert_schedule(num_updates: int, eval_every: int = 50, cooldown_updates: int = 200, **changes) -> UpdateSchedule:
    return UpdateSchedule(num_updates, eval_every=eval_every, cooldown_updates=cooldown_updates,
                          **{**EXPERT_RECIPE, **changes})


# The permutation expert's recipe in `quick`: with EXPERT_RECIPE it groks late and not on every seed (holdout: >
# 0.99 at update 1700 of 2000 on seed 0, 0.118 after 2000 on seed 1), so it takes twice the batch at lr 1e-2.
# Chosen on the holdout slice of train: benchmarks/README.md.
PERMUTATION_RECIPE = dict(batch_size=512, learning_rate=1e-2)


# Fusion heads: the seed's optimizer plus a linear cooldown to 0 over the last fifth of their updates (at a
# constant rate a head's accuracy oscillates). Chosen on the holdout slice of train: benchmarks/README.md.
def head_schedule(num_updates: int, eval_every: int = 10) -> UpdateSchedule:
    return UpdateSchedule(num_updates, eval_every=eval_every, cooldown_updates=num_updates // 5)


# Which stand-in family is the expert of which task. Gemma-2's stand-in is the narrowest (128) and the
# permutation texts the longest (24-25 tokens), which keeps the four experts' costs close.
FAMILY_TASKS = {"llama3": "x_plus_y", "mistral": "x_minus_y", "phi3": "x_div_y", "gemma2": "permutation"}

_UNIFORM_AND_ONE_UP = [[1.0] * len(TASKS)] + [[2.0 if j == i else 1.0 for j in range(len(TASKS))]
                                              for i in range(len(TASKS))]


@dataclass(frozen=True)
class ComparePreset:
    """Everything that sets the size of a comparison run.

    Args:
        name: the preset's name (also the results folder).
        seeds: training seeds; every method runs once per seed (the split stays fixed).
        baseline: the preset of `benchmarks.grokking.baseline.PRESETS` for the seed baseline.
        baseline_updates: overrides that preset's number of updates (None: keep it).
        base: the shared base, trained on the union of the four tasks.
        expert: each homogeneous expert, fine-tuned from the base on its task.
        expert_by_task: task -> its expert's own schedule, where it differs from ``expert``.
        scratch: the from-scratch control on the union (sized like a fusion head).
        head: every fusion head, trained on cached features of the union.
        family_head: the families track's fusion heads (None: ``head``).
        family: each family expert (a stand-in fine-tuned on its task).
        expert_width, expert_layers, expert_intermediate: the homogeneous experts' `LlamaForCausalLM`
            (width 128, 2 layers, SwiGLU 256: 0.46M parameters, close to the seed model's 0.42M).
        family_overrides: stand-in config overrides (smaller depth for CPU).
        shared_width: the fusion heads' shared width.
        fusion_methods: fusion methods of `fusion_llm.fusion` to compare.
        merge_grid: merge method -> {mergekit parameter: candidate values}; the product is searched
            on the holdout slice of the training split.
        split_seed: the train / validation split seed (the benchmark's default, 0).
        holdout_fraction: share of each task's training pairs held out for merge selection.
        max_examples_per_task: cap on each task's examples per split (``None``: all).
        probe_examples_per_task: validation examples per task evaluated every ``eval_every`` updates.
        train_eval_examples_per_task: training examples per task in the final train metrics (``None``: all).
        inference_examples: examples timed for inference (shared across the tasks).
        quantization: how the frozen experts are loaded for fusion (``none`` = float32, or ``nf4``).
    """

    name: str
    seeds: tuple[int, ...]
    baseline: str
    base: UpdateSchedule
    expert: UpdateSchedule
    scratch: UpdateSchedule
    head: UpdateSchedule
    family: UpdateSchedule
    baseline_updates: int | None = None
    expert_width: int = 128
    expert_layers: int = 2
    expert_intermediate: int = 256
    family_overrides: dict = field(default_factory=lambda: {"num_hidden_layers": 2})
    shared_width: int = 128
    fusion_methods: tuple[str, ...] = ("concat", "weighted", "gated", "attention")
    merge_grid: dict = field(default_factory=dict)
    split_seed: int = 0
    holdout_fraction: float = 0.1
    max_examples_per_task: int | None = None
    probe_examples_per_task: int = 1024
    train_eval_examples_per_task: int | None = 1024
    inference_examples: int = 1000
    quantization: str = "none"
    family_head: UpdateSchedule | None = None
    expert_by_task: dict = field(default_factory=dict)

    def expert_for(self, task: str) -> UpdateSchedule:
        """The schedule of ``task``'s homogeneous expert."""
        return self.expert_by_task.get(task, self.expert)

    def head_for(self, track: str) -> UpdateSchedule:
        """The fusion heads' schedule of ``track`` (``homogeneous`` or ``families``)."""
        return self.family_head if track == "families" and self.family_head is not None else self.head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Densities across 0.1-0.9. ``normalize``: mergekit divides the merged task vector by the experts' summed weights, so
# a normalised merge moves the base by at most one mean task vector (``ties`` normalises by default; ``dare_ties`` and
# ``dare_linear`` do not, so without it they add up all four task vectors); task_arithmetic's weight 0.25 is the
# normalised sum of four.
QUICK_GRID = {
    "linear": {"weight": _UNIFORM_AND_ONE_UP},
    "task_arithmetic": {"weight": [0.25, 0.5, 1.0]},
    "ties": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [1.0, 2.0]},
    "dare_ties": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "normalize": [True, False], "lambda": [1.0, 2.0]},
    "dare_linear": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "normalize": [True, False], "weight": [0.5, 1.0]},
}

FULL_GRID = {
    "linear": {"weight": _UNIFORM_AND_ONE_UP + [[4.0 if j == i else 1.0 for j in range(len(TASKS))]
                                                 for i in range(len(TASKS))]},
    "task_arithmetic": {"weight": [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]},
    "ties": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [0.5, 1.0, 1.5, 2.0]},
    "dare_ties": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "normalize": [True, False], "lambda": [0.5, 1.0, 1.5, 2.0]},
    "dare_linear": {"density": [0.1, 0.3, 0.5, 0.7, 0.9], "normalize": [True, False],
                    "weight": [0.25, 0.5, 0.75, 1.0]},
}

MICRO_GRID = {
    "linear": {"weight": [[1.0] * len(TASKS)]},
    "task_arithmetic": {"weight": [0.5, 1.0]},
    "ties": {"density": [0.5]},
    "dare_ties": {"density": [0.5]},
    "dare_linear": {"density": [0.5]},
}

PRESETS = {
    "micro": ComparePreset(
        name="micro", seeds=(0,), baseline="micro",
        base=UpdateSchedule(6, batch_size=32, eval_every=3, warmup_updates=2),
        expert=UpdateSchedule(6, batch_size=32, eval_every=3, warmup_updates=2),
        scratch=UpdateSchedule(6, batch_size=32, eval_every=3, warmup_updates=2),
        head=UpdateSchedule(10, batch_size=32, eval_every=5, warmup_updates=2),
        family=UpdateSchedule(3, batch_size=16, eval_every=3, warmup_updates=1),
        expert_width=64, expert_intermediate=128, family_overrides={"num_hidden_layers": 1}, shared_width=64,
        merge_grid=MICRO_GRID,
        max_examples_per_task=48, probe_examples_per_task=16, train_eval_examples_per_task=16,
        inference_examples=64,
    ),
    "quick": ComparePreset(
        name="quick", seeds=(0,), baseline="quick", baseline_updates=50,
        base=UpdateSchedule(200, batch_size=TOKEN_BATCH, eval_every=50),
        expert=expert_schedule(1300),
        expert_by_task={"permutation": expert_schedule(2000, cooldown_updates=300, **PERMUTATION_RECIPE)},
        scratch=UpdateSchedule(200, batch_size=TOKEN_BATCH, eval_every=25),
        head=head_schedule(500),
        family=UpdateSchedule(40, batch_size=TOKEN_BATCH, eval_every=10),
        family_head=head_schedule(100),
        family_overrides={"num_hidden_layers": 1},
        merge_grid=QUICK_GRID, probe_examples_per_task=512, train_eval_examples_per_task=1024,
    ),
    "medium": ComparePreset(
        name="medium", seeds=(0,), baseline="full", baseline_updates=1500,
        base=UpdateSchedule(200, batch_size=TOKEN_BATCH, eval_every=50),
        expert=expert_schedule(3000, cooldown_updates=300),
        scratch=UpdateSchedule(1000, batch_size=TOKEN_BATCH, eval_every=50),
        head=head_schedule(1500),
        family=UpdateSchedule(600, batch_size=TOKEN_BATCH, eval_every=50),
        family_head=head_schedule(500),
        family_overrides={"num_hidden_layers": 1},
        merge_grid=QUICK_GRID, probe_examples_per_task=1024, train_eval_examples_per_task=None,
    ),
    "full": ComparePreset(
        name="full", seeds=(0, 1, 2), baseline="full",
        base=UpdateSchedule(1000, batch_size=TOKEN_BATCH, eval_every=100),
        expert=expert_schedule(7500, cooldown_updates=1000),
        scratch=UpdateSchedule(7500, batch_size=TOKEN_BATCH, eval_every=50),
        head=head_schedule(3000),
        family=UpdateSchedule(7500, batch_size=TOKEN_BATCH, eval_every=100),
        merge_grid=FULL_GRID, probe_examples_per_task=1024, train_eval_examples_per_task=None,
    ),
}


def get_preset(name: str) -> ComparePreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
