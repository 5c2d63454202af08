"""The seed experiment's grokking transformer, reproduced in plain torch.

Model (the seed's ``Transformer``): token + learned position embeddings (5 positions, of
which the 4-token input uses 4), 2 post-LN decoder blocks (causal self-attention with 4
heads, FFN 128 -> 512 -> 128 with GELU), a final LayerNorm and a linear output read at the
last position. Per task it uses the seed's own encoding: input vocabulary ``["o", "="] +
elements`` (p + 2 = 99 tokens for the modular tasks, 122 for permutations) and an output
over the elements (97 or 120 classes), so the modular model has 422,625 parameters.

Training (the seed's ``run``): AdamW lr 1e-3, betas (0.9, 0.98), weight decay 0.5; the
learning rate of update ``s`` (0-based) is ``1e-3 * min(s / 50, 1)``, as the seed's
``LambdaLR`` gives (update 0 runs at lr 0); batches of 512 drawn with replacement from the
training split; 7500 updates; every 10 updates, train loss/acc are the mean over those 10
batches and validation is 8 x 512 examples drawn with replacement.

Differences from the seed, none of which changes the function computed: the split is
seeded (`fusion_llm.data.grokking`); training and validation draws come from two seeded
torch generators (the seed used Python's unseeded ``random``), so the evaluation schedule
never changes the training batches; attention runs through ``scaled_dot_product_attention``
on ``nn.MultiheadAttention``'s own parameters and initialisation; and the last block only
computes the last position, the one the output reads (about 30% fewer FLOPs per update).
A test loads the seed's module layout into this model and checks the logits agree.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.grokking.measure import counting_flops
from fusion_llm.data.grokking import DEFAULT_SPLIT_SEED, TRAIN_FRACTION, VOCABULARY, split_indices, task_examples

SEED_TOKENS = ("o", "=")  # the seed's two non-element tokens, ids 0 and 1


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with `nn.MultiheadAttention`'s parameters and init."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # As nn.MultiheadAttention._reset_parameters: xavier in-projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (B, 1, C) for the last position alone when ``last_only``."""
        batch, length, width = x.shape  # (B, T, C)
        heads, head_width = self.num_heads, width // self.num_heads
        if last_only:
            # The last query sees every key, so no mask is needed (is_causal would align a
            # 1-row mask top-left and hide all but the first key).
            w_q, w_kv = self.in_proj_weight.split((width, 2 * width))
            b_q, b_kv = self.in_proj_bias.split((width, 2 * width))
            q = F.linear(x[:, -1:], w_q, b_q).view(batch, 1, heads, head_width).transpose(1, 2)  # (B, H, 1, C/H)
            kv = F.linear(x, w_kv, b_kv).view(batch, length, 2, heads, head_width).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, H, 1, C/H)
            length = 1
        else:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
            qkv = qkv.view(batch, length, 3, heads, head_width).permute(2, 0, 3, 1, 4)  # (3, B, H, T, C/H)
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)  # (B, H, T, C/H)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """The seed's post-LN block: ``x = LN(x + attn(x)); x = LN(x + ffn(x))``."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.self_attn = CausalSelfAttention(width, num_heads)
        self.self_attn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ffn_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``last_only`` only the last position is computed -> (B, 1, C)."""
        residual = x[:, -1:] if last_only else x
        x = self.self_attn_norm(residual + self.self_attn(x, last_only))
        return self.ffn_norm(x + self.ffn(x))


class GrokkingTransformer(nn.Module):
    """The seed's decoder-only classifier: ``(B, T)`` token ids -> ``(B, output_size)`` logits.

    Args:
        vocab_size: input tokens (seed: number of elements + 2).
        output_size: classes (seed: number of elements).
        width: model width (128).
        num_layers: decoder blocks (2).
        num_heads: attention heads (4).
        max_positions: learned positions (the seed allocates 5 for its 4-token input).
    """

    def __init__(self, vocab_size: int, output_size: int, width: int = 128, num_layers: int = 2,
                 num_heads: int = 4, max_positions: int = 5):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        self.output = nn.Linear(width, output_size)

    def hidden_states(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Final-LayerNorm features: (B, T) -> (B, T, C), or (B, 1, C) with ``last_only``.

        ``last_only`` skips the last block's work on earlier positions, which nothing
        downstream reads (the same values, about 30% fewer FLOPs).
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, C)
        for index, block in enumerate(self.blocks):
            x = block(x, last_only=last_only and index == len(self.blocks) - 1)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits at the last position: (B, T) -> (B, output_size)."""
        return self.output(self.hidden_states(input_ids, last_only=True)[:, -1])  # (B, classes)


def num_elements(task: str) -> int:
    """Size of a task's element set: 97 for the modular tasks, 120 for permutations."""
    return len(VOCABULARY.answer_token_ids(task))


def build_baseline_model(task: str) -> GrokkingTransformer:
    """The seed's model for ``task``: input vocabulary elements + 2, output over the elements."""
    return GrokkingTransformer(vocab_size=num_elements(task) + len(SEED_TOKENS), output_size=num_elements(task))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_encoding(task: str, input_ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map shared-vocabulary examples of one task to the seed's per-task ids.

    Inputs: operator -> 0 ("o"), "=" -> 1, element k -> k + 2. Labels: element k -> k.
    """
    elements = VOCABULARY.answer_token_ids(task)
    token_map = np.full(VOCABULARY.size, -1, dtype=np.int64)
    token_map[elements] = np.arange(len(elements)) + len(SEED_TOKENS)
    token_map[VOCABULARY.operator_id(task)] = 0
    token_map[VOCABULARY.equals_id] = 1
    local_inputs, local_labels = token_map[input_ids], token_map[labels] - len(SEED_TOKENS)
    if (local_inputs < 0).any() or (local_labels < 0).any():
        raise ValueError(f"examples contain tokens outside task {task!r}")
    return local_inputs, local_labels


@dataclass(frozen=True)
class BaselineSchedule:
    """The training schedule; defaults are the seed's.

    Args:
        num_updates: optimizer updates (7500).
        eval_every: updates between evaluations; train metrics average over these (10).
        batch_size: training batch, drawn with replacement (512).
        eval_batches: validation batches per evaluation (8).
        eval_batch_size: examples per validation batch, drawn with replacement (512).
        learning_rate: AdamW peak learning rate (1e-3).
        betas: AdamW betas ((0.9, 0.98)).
        weight_decay: AdamW weight decay (0.5).
        warmup_updates: linear warmup length (50).
    """

    num_updates: int = 7500
    eval_every: int = 10
    batch_size: int = 512
    eval_batches: int = 8
    eval_batch_size: int = 512
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.5
    warmup_updates: int = 50

    def __post_init__(self):
        for name in ("num_updates", "eval_every", "batch_size", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_updates < 0:
            raise ValueError(f"warmup_updates must be >= 0, got {self.warmup_updates}")


# `full` is the seed's schedule (about 5-6 min per task on 2 free CPU cores, under 1 min on
# one H200). `quick` (~25 s per task on 2 cores) fits the benchmark's 10-minute CPU preset: it shows memorisation (train acc ~1 by
# update ~500 on x_plus_y) but ends before grokking, which the seed saw at ~2900-7500 updates.
PRESETS = {
    "full": BaselineSchedule(),
    "quick": BaselineSchedule(num_updates=600, eval_every=20),
    "micro": BaselineSchedule(num_updates=20, eval_every=10, batch_size=64, eval_batches=1, eval_batch_size=256),
}


def get_schedule(preset: str) -> BaselineSchedule:
    """The `BaselineSchedule` of a named preset; the error lists the names."""
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown baseline preset {preset!r}; known: {', '.join(sorted(PRESETS))}") from None


def learning_rate_at(update: int, schedule: BaselineSchedule) -> float:
    """The seed's ``LambdaLR(min(s / warmup, 1))``: update ``update`` (0-based) runs at this lr."""
    if schedule.warmup_updates == 0:
        return schedule.learning_rate
    return schedule.learning_rate * min(update / schedule.warmup_updates, 1.0)


def _split_tensors(task: str, split_seed: int, train_fraction: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    input_ids, labels = task_examples(task)
    local_inputs, local_labels = seed_encoding(task, input_ids, labels)
    return {
        split: (torch.from_numpy(local_inputs[indices]), torch.from_numpy(local_labels[indices]))
        for split, indices in split_indices(task, split_seed, train_fraction).items()
    }


def fit_baseline(
    task: str,
    seed: int,
    num_updates: int | None = None,
    eval_every: int | None = None,
    *,
    schedule: BaselineSchedule | str = "full",
    split_seed: int = DEFAULT_SPLIT_SEED,
    train_fraction: float = TRAIN_FRACTION,
    callback: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GrokkingTransformer, dict]:
    """Train the seed's grokking transformer on one task; return the model and its metrics.

    Args:
        task: one of `fusion_llm.data.grokking.TASKS`.
        seed: seeds the initialisation and the batch sampling (the seed used ``1337 + offset``
            for init only; here one seed controls both, so a run is reproducible).
        num_updates: overrides ``schedule.num_updates`` when given.
        eval_every: overrides ``schedule.eval_every`` when given.
        schedule: a `BaselineSchedule` or a preset name (``"full"``, ``"quick"``, ``"micro"``).
        split_seed: the train/validation split seed, shared with every other method of the
            benchmark (the split stays fixed while ``seed`` varies).
        train_fraction: share of all pairs used for training (0.5).
        callback: called after every evaluation with that curve point
            (``step, train_loss, train_acc, val_loss, val_acc, elapsed_s``).
        device: where to train.

    Returns:
        ``(model, metrics)``: the trained model (in eval mode) and the metrics dict of
        `train_baseline`.
    """
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    overrides = {k: v for k, v in (("num_updates", num_updates), ("eval_every", eval_every)) if v is not None}
    schedule = replace(schedule, **overrides)
    device = torch.device(device)
    data = {s: (x.to(device), y.to(device)) for s, (x, y) in _split_tensors(task, split_seed, train_fraction).items()}
    (train_inputs, train_labels), (val_inputs, val_labels) = data["train"], data["validation"]

    # Initialise under a forked RNG so the caller's global torch RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_baseline_model(task).to(device)
    # Separate streams for training and validation draws, so how often one evaluates never
    # changes which training batches are drawn.
    train_seed, val_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    train_sampler = torch.Generator(device="cpu").manual_seed(train_seed)
    val_sampler = torch.Generator(device="cpu").manual_seed(val_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate_at(0, schedule), betas=schedule.betas,
                                  weight_decay=schedule.weight_decay)

    def draw(inputs, labels, size, generator):  # with replacement, as the seed's random.choice
        picks = torch.randint(len(labels), (size,), generator=generator).to(device)
        return inputs[picks], labels[picks]

    curve: list[dict] = []
    step_val_acc_99 = schedule.num_updates
    loss_sum = torch.zeros((), device=device)  # accumulated on device: no host sync per update
    correct_sum = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    model.train()
    for update in range(schedule.num_updates):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(update, schedule)
        inputs, labels = draw(train_inputs, train_labels, schedule.batch_size, train_sampler)
        with counting_flops() if update == 0 else contextlib.nullcontext() as counter:  # one update's FLOPs
            logits = model(inputs)  # (B, classes)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if update == 0:
            flops_per_update = counter.get_total_flops()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct_sum += (logits.detach().argmax(-1) == labels).sum()
        seen += len(labels)

        step = update + 1
        if step % schedule.eval_every and step != schedule.num_updates:
            continue
        val_inputs_drawn, val_labels_drawn = draw(val_inputs, val_labels, schedule.eval_batches * schedule.eval_batch_size,
                                                  val_sampler)
        val_loss, val_acc = _evaluate(model, val_inputs_drawn, val_labels_drawn, schedule.eval_batch_size)
        point = {"step": step, "train_loss": float(loss_sum) / seen, "train_acc": float(correct_sum) / seen,
                 "val_loss": val_loss, "val_acc": val_acc, "elapsed_s": time.perf_counter() - start}
        curve.append(point)
        if step_val_acc_99 == schedule.num_updates and val_acc > 0.99:
            step_val_acc_99 = step
        if callback is not None:
            callback(point)
        loss_sum.zero_(), correct_sum.zero_()
        seen = 0
        model.train()

    model.eval()
    last = curve[-1]
    return model, {
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "final_train_acc": last["train_acc"],
        "final_val_acc": last["val_acc"],
        "step_val_acc_99": step_val_acc_99,
        "curve": curve,
        "num_parameters": count_parameters(model),
        "wall_time_s": time.perf_counter() - start,
        "flops_per_update": flops_per_update,
        "train_flops": flops_per_update * schedule.num_updates,
        "task": task,
        "seed": seed,
        "split_seed": split_seed,
        "train_fraction": train_fraction,
        "schedule": asdict(schedule),
    }


def train_baseline(task: str, seed: int, num_updates: int | None = None, eval_every: int | None = None,
                   **options) -> dict:
    """Train the seed's grokking transformer on one task and report in the seed's format.

    Args:
        task, seed, num_updates, eval_every, **options: as `fit_baseline` (``schedule``,
            ``split_seed``, ``train_fraction``, ``callback``, ``device``).

    Returns:
        ``final_train_loss``, ``final_val_loss``, ``final_train_acc``, ``final_val_acc``
        (train values: mean over the last ``eval_every`` training batches, as the seed),
        ``step_val_acc_99`` (first evaluation step with val acc > 0.99, else the number of
        updates), ``curve`` (one dict per evaluation: ``step, train_loss, train_acc,
        val_loss, val_acc, elapsed_s``), ``num_parameters``, ``wall_time_s``, ``flops_per_update`` (the first
        update's forward and backward, counted) and ``train_flops`` (times the updates), and the run's
        ``task``, ``seed``, ``split_seed``, ``train_fraction`` and ``schedule``. JSON-ready.
    """
    return fit_baseline(task, seed, num_updates, eval_every, **options)[1]


@torch.no_grad()
def _evaluate(model: GrokkingTransformer, inputs: torch.Tensor, labels: torch.Tensor,
              batch_size: int) -> tuple[float, float]:
    """Mean loss and accuracy over the drawn validation examples, in the seed's batches."""
    model.eval()
    loss_sum = correct = 0.0
    for batch_inputs, batch_labels in zip(inputs.split(batch_size), labels.split(batch_size)):
        logits = model(batch_inputs)  # (b, classes)
        loss_sum += float(F.cross_entropy(logits, batch_labels, reduction="sum"))
        correct += float((logits.argmax(-1) == batch_labels).sum())
    return loss_sum / len(labels), correct / len(labels)
