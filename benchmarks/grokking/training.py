"""The one training loop of the comparison: the seed's optimizer, batches drawn with replacement,
a validation probe every ``eval_every`` updates, and per task the first update with val acc > 0.99."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.grokking.measure import counting_flops
from benchmarks.grokking.presets import UpdateSchedule


def fit(
    module: nn.Module,
    batch_logits: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    num_train: int,
    schedule: UpdateSchedule,
    seed: int,
    probe: Callable[[], dict[str, dict]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``module``'s trainable parameters.

    Args:
        module: what trains (its parameters with ``requires_grad``); put in train / eval mode here.
        batch_logits: training-row indices (B,) -> ``(logits (B, C), labels (B,))``.
        num_train: number of training rows to draw from.
        schedule: updates, batch size, evaluation period and AdamW settings.
        seed: seeds the batch draws (initialisation is the caller's).
        probe: returns ``{task: {"acc": ..., "loss": ...}}`` on the validation probe.
        log: progress lines (about ten per run).

    Returns:
        ``curve`` (one point per evaluation: ``step``, ``train_loss`` / ``train_acc`` averaged over
        the last ``eval_every`` updates, ``val`` = the probe), ``step_val_acc_99`` (task -> first
        evaluated update with probe accuracy > 0.99, None when never), ``num_updates``, ``wall_s``,
        ``flops_per_update`` (forward and backward of the first update, `counting_flops`) and ``train_flops``
        (that times the updates).
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.learning_rate_at(0), betas=schedule.betas,
                                  weight_decay=schedule.weight_decay)
    sampler = torch.Generator().manual_seed(seed)
    curve, first_99 = [], {}
    loss_sum = correct = seen = 0.0
    started = time.perf_counter()
    report_every = max(schedule.num_updates // 10, 1)
    module.train()
    for update in range(schedule.num_updates):
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate_at(update)
        rows = torch.randint(num_train, (schedule.batch_size,), generator=sampler)
        with counting_flops() if update == 0 else contextlib.nullcontext() as counter:  # one update's FLOPs
            logits, labels = batch_logits(rows)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if update == 0:
            flops_per_update = counter.get_total_flops()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.detach().argmax(-1) == labels).sum().item()
        seen += len(labels)

        step = update + 1
        if step % schedule.eval_every and step != schedule.num_updates:
            continue
        point = {"step": step, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        if probe is not None:
            module.eval()
            with torch.no_grad():
                point["val"] = probe()
            module.train()
            for task, metrics in point["val"].items():
                if task not in first_99 and metrics["acc"] > 0.99:
                    first_99[task] = step
        curve.append(point)
        loss_sum = correct = seen = 0.0
        if log is not None and (step % report_every < schedule.eval_every or step == schedule.num_updates):
            val = point.get("val", {})
            accs = " ".join(f"{t}={m['acc']:.3f}" for t, m in val.items())
            log(f"  update {step}/{schedule.num_updates} train_loss {point['train_loss']:.4f} "
                f"train_acc {point['train_acc']:.3f} {('val ' + accs) if accs else ''} "
                f"({time.perf_counter() - started:.0f}s)")
    module.eval()
    tasks = curve[-1].get("val", {}) if curve else {}
    return {
        "curve": curve,
        "step_val_acc_99": {task: first_99.get(task) for task in tasks},
        "num_updates": schedule.num_updates,
        "wall_s": time.perf_counter() - started,
        "flops_per_update": flops_per_update,
        "train_flops": flops_per_update * schedule.num_updates,
    }
