"""The training loop under accelerate: only the head is prepared; backbones are frozen and placed per process.

Entry point: ``accelerate launch scripts/train_fusion.py --config configs/<x>.yaml [--train.lr 3e-4 ...]``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from fusion_llm.budget import check_budget
from fusion_llm.errors import ConfigError, NonFiniteLoss
from fusion_llm.data.pipeline import (Collator, LMCollator, align_splits, alignment_fallbacks, check_labels, load_raw,
                                      tokenize_splits)
from fusion_llm.features import FeatureCache, collate_features
from fusion_llm.metrics import load_metric
from fusion_llm.modeling import FusionModel
from fusion_llm.paths import cache_dir, replace_dir, write_atomic
from fusion_llm.runconfig import RunConfig, load_run_config


class JSONLTracker(GeneralTracker):
    """An accelerate tracker that appends one JSON object per `log` call to ``<dir>/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        with self.path.open("a") as fh:
            fh.write(json.dumps({"config": values}, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **values}, default=float) + "\n")


def _tracker(kind: str, output_dir: Path):
    if kind == "none":
        return None
    if kind in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401

            return "tensorboard"
        except ImportError:
            if kind == "tensorboard":
                raise ConfigError("tracker: tensorboard is not installed; pip install tensorboard or use jsonl") from None
    return JSONLTracker("fusion", str(output_dir / "logs"))


def _checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint appears only once fully written)."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, state: dict, run: RunConfig, keep: int) -> Path:
    """`accelerator.save_state` into a temp folder, then `replace_dir`: a kill mid-save leaves the older ones usable.
    ``state`` (the step, the best eval loss so far, the loss history, the last and the anchor's evals) goes
    into ``trainer_state.json``, so a resumed run goes on from all of it."""
    step = state["step"]
    root = output_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "run_config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        replace_dir(tmp, final)  # one of this step already there stays if the move fails
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _batches_per_epoch(n: int, batch_size: int, num_processes: int) -> int:
    return max(1, math.ceil(n / (batch_size * num_processes)))


def _epoch_loader(dataset, epoch: int, seed: int, batch_size: int, collate, accelerator: Accelerator):
    """The epoch's DataLoader: a permutation fixed by (seed, epoch), sharded over processes by accelerate."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(dataset), generator=generator).tolist()
    # Its own generator: a DataLoader draws a base seed at every iterator, from the global RNG without one, which
    # would shift the dropout draws that a resumed run restores from its checkpoint.
    loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size, collate_fn=collate,
                        shuffle=False, generator=generator)
    return accelerator.prepare_data_loader(loader)


def freeze_all_but(head, parts: list[str]) -> None:
    """Only the head's parameters whose names start with one of ``parts`` train (``train.train_only``)."""
    def within(name: str, part: str) -> bool:
        return name == part or name.startswith(part + ".")

    names = [n for n, _ in head.named_parameters()]
    for part in parts:
        if not any(within(n, part) for n in names):
            roots = sorted({n.split(".")[0] for n in names})
            raise ConfigError(f"train.train_only: {part!r} names no part of this head (its parts: {', '.join(roots)})")
    for name, param in head.named_parameters():
        param.requires_grad_(any(within(name, part) for part in parts))


def _param_groups(head, tcfg) -> list[dict]:
    """The head's parameters, with the member adapters (each backbone's ``lora_lr``, else ``train.member_lr``) and
    the prediction mixer in groups of their own rate."""
    members = getattr(head, "members", None) or {}
    rates = {b["name"]: b.get("lora_lr") for b in head.config.backbones}
    parts = [(module, rates.get(name) or tcfg.member_lr) for name, module in members.items()]
    parts.append((getattr(head, "mixer", None), tcfg.mixer_lr))
    groups, taken = [], set()
    for module, lr in parts:
        if module is not None and lr is not None:
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr})
            taken |= {id(p) for p in module.parameters()}
    rest = [p for p in head.parameters() if id(p) not in taken and p.requires_grad]
    return ([{"params": rest}] if rest else []) + groups


def _step_batch(model: FusionModel, batch: dict, logits: bool = True):
    if "alignment" in batch:  # training needs only the loss: computed without the (B, T, vocab) logits
        return model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"], return_logits=logits)
    if "features" in batch:
        return model(features=batch["features"], labels=batch["labels"])
    return model(inputs=batch["inputs"], labels=batch["labels"])


@torch.no_grad()
def evaluate_lm(model: FusionModel, loader, accelerator: Accelerator) -> dict:
    """Token loss and perplexity in the anchor's tokens over the eval split (gathered across processes)."""
    model.head.eval()
    metric = load_metric("perplexity")
    for batch in loader:
        logits = _step_batch(model, batch).logits
        labels = batch["labels"].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                                                ignore_index=-100).view(labels.shape)
        nll = nll.masked_fill(labels == -100, float("nan"))  # (B, T): one row per example
        # rows, so gather_for_metrics drops the examples the sampler repeated to even out the processes
        nll = accelerator.gather_for_metrics(accelerator.pad_across_processes(nll, dim=1, pad_index=float("nan")))
        metric.add_batch(nll=nll[~torch.isnan(nll)].cpu().tolist())
    model.head.train()
    return {f"eval_{k}": v for k, v in metric.compute().items()}


@torch.no_grad()
def evaluate_model(model: FusionModel, loader, accelerator: Accelerator) -> dict:
    """Accuracy and mean loss over the eval split (gathered across processes)."""
    if model.config.head["kind"] == "lm":
        return evaluate_lm(model, loader, accelerator)
    model.head.eval()
    accuracy = load_metric("accuracy")
    total_loss, count = 0.0, 0
    for batch in loader:
        out = _step_batch(model, batch)
        logits = out.logits
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none")
        preds, refs, losses = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"].to(logits.device),
                                                              losses))
        accuracy.add_batch(predictions=preds.cpu().tolist(), references=refs.cpu().tolist())
        total_loss += losses.sum().item()
        count += losses.numel()
    model.head.train()
    return {"eval_loss": total_loss / max(count, 1), **{f"eval_{k}": v for k, v in accuracy.compute().items()}}


def train(run: RunConfig, *, resume: bool = False, cache_features: bool | None = None,
          stop_after: int | None = None, log=print) -> dict:
    """Train a fusion head as ``run`` says; returns a summary (final metrics, paths, loss curve).

    Args:
        run: the validated run config.
        resume: continue from the latest complete checkpoint in ``run.output_dir``.
        cache_features: override ``run.train.cache_features``.
        stop_after: stop (as if killed) after this many optimizer steps — for resume tests.
    """
    tcfg = run.train
    cache_features = tcfg.cache_features if cache_features is None else cache_features
    output_dir = Path(run.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file; give a folder (it will hold checkpoints and the head)")
    if not resume and (output_dir / "head").exists():
        raise ConfigError(f"output_dir: {output_dir} already holds a finished run; use --resume or a new output_dir")
    checkpoints = _checkpoints(output_dir)
    if resume and not checkpoints:
        raise ConfigError(f"--resume: no checkpoint in {output_dir} to resume from; run without --resume to start")
    if not resume and checkpoints:
        raise ConfigError(f"output_dir: {output_dir} holds checkpoints of an unfinished run ({checkpoints[-1].name}); "
                          "use --resume to continue it, or a new output_dir")
    config = run.fusion_config()
    lm = config.head["kind"] == "lm"
    if lm and cache_features:
        raise ConfigError("train.cache_features: the feature cache serves classification heads (pooled features); "
                          "LM heads train from the backbones")
    check_budget(config, tcfg.batch_size, run.data.max_length)  # parameters, and GPU memory where there is one
    tracker = _tracker(run.tracker, output_dir)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # lets torchrun's processes form a gloo group on CPU
        mixed_precision=tcfg.mixed_precision,
        gradient_accumulation_steps=tcfg.gradient_accumulation,
        log_with=tracker,
        project_dir=str(output_dir),
    )
    is_main = accelerator.is_main_process
    if not is_main:
        log = lambda *_: None  # noqa: E731  (one voice: the main process)
    set_seed(tcfg.seed)

    raw = load_raw(run.data, need_labels=not lm)  # data errors surface before any backbone loads
    if not lm:
        check_labels(raw, run.data.label_column, config.head["num_labels"])
    device_map = {"": accelerator.local_process_index} if torch.cuda.is_available() else None
    model = FusionModel.from_config(config, device_map=device_map)
    if tcfg.init_head and not resume:  # a resumed run restores its own checkpoint
        try:
            fresh = model.warm_start(tcfg.init_head)
        except ConfigError as err:
            raise ConfigError(f"train.init_head: {err}") from None
        log(f"started from the head in {tcfg.init_head}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
    if tcfg.train_only:
        freeze_all_but(model.head, tcfg.train_only)

    tokenizers = {n: b.tokenizer for n, b in model.backbones.items()}
    pad_ids = {n: b.tokenizer.pad_token_id for n, b in model.backbones.items()}
    with accelerator.main_process_first():
        if lm:
            anchor = model.anchor
            sources = {n: t for n, t in tokenizers.items() if n != anchor.name}
            tokenized = align_splits(raw, anchor.tokenizer, sources, run.data.text_column,
                                     min(run.data.max_length, anchor.max_length), config.head_spec.source_tails)
        else:
            max_lengths = {n: min(run.data.max_length, b.max_length) for n, b in model.backbones.items()}
            tokenized = tokenize_splits(raw, tokenizers, run.data.text_column, run.data.label_column, max_lengths)
    collate = LMCollator(model.anchor.name, pad_ids) if lm else Collator(pad_ids)
    train_set, eval_set = tokenized["train"], tokenized["validation"]
    fallbacks = {split: alignment_fallbacks(tokenized[split]) for split in ("train", "validation")} if lm else {}
    if any(n for counts in fallbacks.values() for n in counts.values()):
        log(f"warning: the causal alignment fell back to its safety nets {fallbacks} times (per split and source; "
            "it should be 0): those positions' source features are less fresh, never from the future")
    if cache_features:
        cache = FeatureCache(cache_dir() / "features", model, tcfg.cache_limit_gb * 1e9)
        with accelerator.main_process_first():
            train_set = cache.build(train_set, collate, log=log)
            eval_set = cache.build(eval_set, collate, log=log)
        collate = collate_features(model)

    per_epoch = _batches_per_epoch(len(train_set), tcfg.batch_size, accelerator.num_processes)
    updates_per_epoch = max(1, per_epoch // tcfg.gradient_accumulation)
    max_steps = tcfg.max_steps or math.ceil(tcfg.epochs * updates_per_epoch)

    # The fused AdamW kernel (CPU and CUDA) takes the head's many small tensors in one pass: ~4x faster steps.
    groups = _param_groups(model.head, tcfg)
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tcfg.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=max_steps)
    # Only the trainable head is prepared (wrapped in DDP when there are several processes).
    head, optimizer, scheduler = accelerator.prepare(model.head, optimizer, scheduler)
    model.head = head
    eval_loader = accelerator.prepare_data_loader(DataLoader(eval_set, batch_size=tcfg.batch_size, collate_fn=collate,
                                                             generator=torch.Generator().manual_seed(tcfg.seed)))

    step, state = 0, {}
    if resume:
        accelerator.load_state(str(checkpoints[-1]))
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        step = state["step"]
        log(f"resumed from {checkpoints[-1]} at step {step}")
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "run_config.yaml", yaml.safe_dump(run.to_dict(), sort_keys=False))
    accelerator.init_trackers("fusion", config={"output_dir": str(output_dir), **run.train.__dict__})

    losses_path = output_dir / "train_losses.jsonl"
    if is_main and not resume:
        losses_path.unlink(missing_ok=True)
    # Restored on resume: the first eval after it cannot replace a better best/ than the run already had.
    best, summary, history = state.get("best"), state.get("summary", {}), state.get("history", [])
    anchor_eval = state.get("anchor_eval")
    if lm and step == 0:  # the untrained head scores exactly the anchor: the number to beat
        anchor_eval = evaluate_model(model, eval_loader, accelerator)
        log("anchor alone: " + ", ".join(f"{k} {v:.4f}" for k, v in anchor_eval.items()))
    # Micro-batches consumed so far: accelerate also updates at the end of each epoch, so an epoch whose length is
    # not a multiple of the accumulation makes this more than step x accumulation; the checkpoint records it.
    micro = state.get("micro", step * tcfg.gradient_accumulation)
    progress = tqdm(total=max_steps, initial=step, disable=not is_main, desc="training", dynamic_ncols=True)
    head.train()
    started, seen, tokens = time.perf_counter(), 0, 0
    while step < max_steps:
        epoch, offset = divmod(micro, per_epoch)
        loader = _epoch_loader(train_set, epoch, tcfg.seed, tcfg.batch_size, collate, accelerator)
        if offset:
            loader = accelerator.skip_first_batches(loader, offset)
        for batch in loader:
            with accelerator.accumulate(head):
                out = _step_batch(model, batch, logits=False)
                loss = out.loss if out.member_loss is None else out.loss + out.member_loss
                every = accelerator.gather(loss.detach().float().reshape(1))  # one rank's NaN stops them all alike
                if not torch.isfinite(every).all():
                    progress.close()
                    last = _checkpoints(output_dir)
                    bad = [i for i, v in enumerate(every.tolist()) if not math.isfinite(v)]
                    where = f" on process(es) {bad}" if accelerator.num_processes > 1 else ""
                    raise NonFiniteLoss(f"the loss became {every[bad[0]].item()}{where} at step {step + 1}; last good "
                                        f"checkpoint: {last[-1] if last else 'none'} (lower train.lr or check the data)")
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.grad_clip:
                    accelerator.clip_grad_norm_(head.parameters(), tcfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            seen += batch["labels"].shape[0] * accelerator.num_processes
            tokens += int((batch["labels"] != -100).sum()) * accelerator.num_processes if lm else 0
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            history.append(loss_value)
            rate = seen / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", ex_s=f"{rate:.1f}")
            accelerator.log({"train_loss": loss_value, "lr": scheduler.get_last_lr()[0]}, step=step)
            if is_main:
                with losses_path.open("a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss_value}) + "\n")
            if step % tcfg.eval_every == 0 or step == max_steps:
                summary = evaluate_model(model, eval_loader, accelerator)
                accelerator.log(summary, step=step)
                log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
                if best is None or summary["eval_loss"] < best:
                    best = summary["eval_loss"]
                    if is_main:
                        accelerator.unwrap_model(head).config = config
                        _save_head(model, accelerator, output_dir / "best")
            if step % tcfg.checkpoint_every == 0 and step < max_steps:
                _save_checkpoint(accelerator, output_dir, {"step": step, "micro": micro, "best": best, "summary": summary,
                                                           "history": history, "anchor_eval": anchor_eval},
                                 run, tcfg.keep_checkpoints)
            if stop_after is not None and step >= stop_after:
                progress.close()
                accelerator.end_training()
                return {"stopped_at": step, "losses": history}
            if step >= max_steps:
                break
    progress.close()
    # Every process must end with the same head (DDP keeps them in sync): record each one's checksum.
    flat = torch.cat([p.detach().float().flatten() for p in accelerator.unwrap_model(head).parameters()])
    checksums = accelerator.gather(torch.stack([flat.sum(), (flat * flat).sum()]).unsqueeze(0).double())
    result = {
        "steps": step, "final": summary, "best_eval_loss": best, "losses": history, "anchor_eval": anchor_eval,
        "output": str(output_dir / "head"), "num_processes": accelerator.num_processes,
        "effective_batch": tcfg.batch_size * tcfg.gradient_accumulation * accelerator.num_processes,
        "examples_per_step": seen / max(len(history) - len(state.get("history", [])), 1),  # this invocation's steps
        "examples_per_second": seen / (time.perf_counter() - started),
        "tokens_per_second": tokens / (time.perf_counter() - started),
        "train_seconds": time.perf_counter() - started,  # the loop of this invocation, its evaluations included
        "process_head_checksums": checksums.cpu().tolist(),
        "alignment_fallbacks": fallbacks,
    }
    if is_main:
        _save_head(model, accelerator, output_dir / "head")
        write_atomic(output_dir / "run_summary.json", json.dumps(result, indent=2, default=float))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _save_head(model: FusionModel, accelerator: Accelerator, path: Path) -> None:
    """save_pretrained of the unwrapped head (atomic), with the resolved config beside it."""
    wrapped = model.head
    model.head = accelerator.unwrap_model(wrapped)
    try:
        model.save_pretrained(path)
    finally:
        model.head = wrapped


def main(argv: list[str] | None = None) -> int:
    import argparse


    parser = argparse.ArgumentParser(
        description="Train a fusion head over frozen backbones. Extra --section.key value pairs override the config.")
    parser.add_argument("--config", default=None, help="run config YAML (default: configs/standins_4llm.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--cache-features", action="store_true", help="train from a cache of backbone features")
    args, overrides = parser.parse_known_args(argv)
    try:
        run = load_run_config(args.config, overrides)
        summary = train(run, resume=args.resume, cache_features=args.cache_features or None)
    except (ConfigError, NonFiniteLoss, FileNotFoundError) as err:
        if getattr(err, "table", ""):  # an over-budget plan: the table on stdout, the line on stderr
            print(err.table)
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.get("output") and os.environ.get("RANK", "0") == "0":
        print(f"saved head to {summary['output']} (load with FusionModel.from_pretrained)")
    return 0
