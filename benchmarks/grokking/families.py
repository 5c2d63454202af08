"""The families track: four stand-ins of four families, each an expert on one task, fused; merging refused.

Each family's stand-in (`fusion_llm.standins.build_standin`, the real transformers class and the
family's real tokenizer) is fine-tuned as a `benchmarks.grokking.experts.FamilyExpert` on its task
(`FAMILY_TASKS`), reading the dataset's ``text`` column through its own tokenizer. The four are then
fused like the homogeneous experts. mergekit is asked to merge them too, and its refusal is recorded
verbatim — once as configured and once with ``allow_crimes`` (its option to try anyway).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import torch

from benchmarks.grokking.measure import PeakMemory, evaluate, inference_cost, weights_mib
from benchmarks.grokking.presets import FAMILY_TASKS
from benchmarks.grokking.stages import Context, add_flops, curve_by_task, make_record, score, seeded, trained_per_task
from benchmarks.store import recipe_key
from benchmarks.grokking.training import fit
from benchmarks.grokking.experts import FamilyExpert, count_parameters, family_tokenizer
from fusion_llm.merging import MergeRefused, merge_from_disk, merge_recipe
from fusion_llm.paths import cache_dir
from fusion_llm.standins import build_standin


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), right-padded to the longest text."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def take(encoded: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' ids and mask, cut to the longest of them (modular texts are far shorter than permutations)."""
    ids, mask = encoded[0][rows], encoded[1][rows]
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def stage_family_expert(ctx: Context, seed: int, family: str, task: str):
    """Build the family's stand-in and fine-tune it on ``task``; returns (record, folder, key)."""
    p = ctx.preset
    standin_recipe = {"family": family, "seed": seed, "overrides": p.family_overrides}
    # Stand-ins are a pure function of (family, seed, overrides): kept in fusion_llm's cache, shared by runs.
    standin = build_standin(family, cache_dir() / "standins" / recipe_key("standin", standin_recipe), seed=seed,
                            **p.family_overrides)
    recipe = {"seed": seed, "family": family, "task": task, "standin": standin_recipe,
              "standin_build": json.loads((standin / "standin.json").read_text())["recipe"],
              "schedule": dataclasses.asdict(p.family), "data": ctx.data_recipe}
    folder = ctx.store.folder("family_expert", recipe)

    def compute():
        with seeded(seed):
            expert = FamilyExpert.from_standin(standin)
        tokenizer = family_tokenizer(standin)
        encoded = {split: encode(tokenizer, ctx.splits[split].texts) for split in ("train", "validation")}
        train = ctx.splits["train"]
        rows = train.task_indices(task)

        def batch_logits(drawn):
            picked = rows[drawn]
            return expert(*take(encoded["train"], picked)), train.labels[picked]

        def logits_on(split):
            return lambda chosen: expert(*take(encoded[split], chosen))

        def probe():
            return evaluate(logits_on("validation"), ctx.splits["validation"].labels, {task: ctx.probe_rows[task]})

        with PeakMemory() as peak:
            training = fit(expert, batch_logits, len(rows), p.family, seed, probe, ctx.log)
        expert.save(tokenizer, folder, {"family": family, "task": task, "recipe": recipe})
        per_task = trained_per_task(score(ctx, logits_on), training)
        batches = [take(encoded["validation"], chunk) for chunk in ctx.inference_rows.split(250)]
        cost = inference_cost(lambda batch: expert(*batch), batches, len(ctx.inference_rows))
        return make_record("expert", "families", per_task, trainable=count_parameters(expert, trainable_only=True),
                           total=count_parameters(expert), wall_s=training["wall_s"], cost=cost,
                           weights=weights_mib(expert), trained_tasks=[task], produce_peak_mib=peak.mib,
                           curve=curve_by_task(training["curve"]), train_flops=training["train_flops"],
                           flops_per_update=training["flops_per_update"],
                           details={"family": family, "own_task": task, "class": type(expert.causal_lm).__name__,
                                    "frozen": "token embeddings (and the tied LM head)",
                                    "updates": p.family.num_updates, "folder": str(folder)})

    record = ctx.store.stage("family_expert", recipe, f"seed {seed}: {family} expert on {task}", compute, needs=folder)
    return record, folder, recipe_key("family_expert", recipe)


def mergekit_refusal(folders: dict[str, str]) -> dict:
    """Ask mergekit for a linear merge of the family experts; mergekit's own messages (or success)."""
    recipe = merge_recipe(folders, "linear")
    messages = {}
    for allow_crimes in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                merge_from_disk(recipe, tmp, allow_crimes=allow_crimes)
                messages[allow_crimes] = None
            except MergeRefused as err:
                messages[allow_crimes] = str(err)
    return {"refused": messages[False], "refused_with_allow_crimes": messages[True], "mergekit_recipe": recipe}


def run_families(ctx: Context, seed: int, stage_fusion) -> dict[str, dict]:
    """Family experts, their fusion (``stage_fusion`` of the grokking track) and mergekit's refusal."""
    records, folders, keys = {}, {}, {}
    for family, task in FAMILY_TASKS.items():
        record, folder, key = stage_family_expert(ctx, seed, family, task)
        records[f"family expert {family}"] = record
        folders[family], keys[family] = str(folder), key
    upstream = sum(records[f"family expert {f}"]["wall_s"] for f in FAMILY_TASKS)
    upstream_flops = add_flops(*[records[f"family expert {f}"].get("train_flops") for f in FAMILY_TASKS])
    for method, record in stage_fusion(ctx, seed, "families", folders, keys, upstream, upstream_flops).items():
        records[f"families fusion {method}"] = record
    refusal = ctx.store.stage("refusal", {"seed": seed, "experts": keys}, f"seed {seed}: mergekit on the families",
                              lambda: mergekit_refusal(folders))
    records["families merge (mergekit)"] = {"group": "merge", "track": "families", "per_task": {}, "details": refusal}
    return records
