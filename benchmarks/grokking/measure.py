"""Measurements: accuracy and loss per task, inference time and FLOPs per 1000 examples, peak memory, FLOPs.

FLOPs are counted by torch's own ``FlopCounterMode`` (`counting_flops`): the matrix products and attention of
every op that runs inside, forward and backward (elementwise work, the optimizer's update and mergekit's
weight arithmetic are not counted: a small share for these models).

Peak memory is the process's peak resident set size (``VmHWM``) while a piece of work runs, minus the
resident size just before it: Linux lets a process reset its own peak by writing ``5`` to
``/proc/self/clear_refs``; freed heap memory is first handed back (glibc ``malloc_trim``) so that the
work's allocations are not hidden in pages freed earlier. Weights already loaded are not part of it
(`weights_mib` counts them). Where that is not possible the fallback is the growth of
``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which only shows a new all-time peak (so it can read 0);
``memory_method`` in the results says which was used.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fusion_llm.data.grokking import TASKS

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # row indices (B,) -> logits (B, 217)


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total. torch's tracker hooks each
    module's outputs for backward, which fails inside ``nn.MultiheadAttention`` ("Expected gradient function to be
    set", torch 2.13), and only the total is wanted here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def counting_flops() -> FlopCounterMode:
    """A silent FLOP counter: ``with counting_flops() as c: ...`` then ``c.get_total_flops()``."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _TotalOnly()
    return counter


@torch.no_grad()
def evaluate(logits_fn: LogitsFn, labels: torch.Tensor, indices: dict[str, torch.Tensor],
             batch_size: int = 1024) -> dict[str, dict]:
    """Accuracy and mean cross-entropy per task.

    Args:
        logits_fn: row indices -> logits over the shared answer classes.
        labels: (N,) the split's labels.
        indices: task -> row indices to score.

    Returns:
        ``{task: {"acc", "loss", "n"}}``
    """
    out = {}
    for task, rows in indices.items():
        if len(rows) == 0:
            continue
        loss_sum, correct = 0.0, 0
        for batch in rows.split(batch_size):
            logits = logits_fn(batch).float()
            target = labels[batch]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
        out[task] = {"acc": correct / len(rows), "loss": loss_sum / len(rows), "n": len(rows)}
    return out


def _status_kib(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so new allocations show up in the resident size
    instead of silently reusing pages freed earlier."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory(contextlib.AbstractContextManager):
    """``with PeakMemory() as peak: ...`` then ``peak.mib``: peak resident memory above the start, MiB."""

    def __enter__(self):
        self.method = "VmHWM" if _reset_peak() and _status_kib("VmHWM") is not None else "ru_maxrss"
        if self.method == "VmHWM":
            self.start = _status_kib("VmRSS")
        else:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = 0.0
        return self

    def __exit__(self, *exc):
        end = _status_kib("VmHWM") if self.method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib = max(end - self.start, 0) / 1024
        return False


def inference_cost(run: Callable[[object], object], batches: list, num_examples: int, repeats: int = 3) -> dict:
    """Time and peak memory of answering prepared batches, per 1000 examples.

    After one warm-up pass (which also counts the FLOPs), all batches are answered ``repeats`` times; the fastest pass is reported
    (other processes share the CPU), and the peak memory over all passes.

    Args:
        run: a prepared batch -> the method's answer (everything the method needs from token ids on:
            for fusion, every frozen backbone and the head).
        batches: inputs prepared beforehand (tokenization is not timed, for any method).
        num_examples: examples in all batches together.
    """
    passes = []
    with torch.no_grad():
        with counting_flops() as flops:  # the warm-up pass (lazy inits, allocator) counts the FLOPs
            for batch in batches:
                run(batch)
        with PeakMemory() as peak:
            for _ in range(repeats):
                start = time.perf_counter()
                for batch in batches:
                    run(batch)
                passes.append(time.perf_counter() - start)
    return {"inference_ms_per_1000": 1e6 * min(passes) / num_examples, "inference_peak_mib": peak.mib,
            "memory_method": peak.method, "inference_flops_per_1000": 1000 * flops.get_total_flops() / num_examples}


def weights_mib(*modules: nn.Module) -> float:
    """Bytes of all parameters and buffers of the modules a method needs to answer, MiB."""
    total = 0
    for module in modules:
        total += sum(t.numel() * t.element_size() for t in module.parameters())
        total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total / 2**20


def mixed_rows(indices: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """``count`` rows spread evenly over the tasks (the first of each task's indices)."""
    per_task = max(count // len(TASKS), 1)
    return torch.cat([indices[t][:per_task] for t in TASKS if t in indices])
