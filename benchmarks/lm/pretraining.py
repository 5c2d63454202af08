"""Brief pre-training of stand-in backbones on one text domain, cached on disk under a hash of the recipe.

The LM-track stand-ins must *know different things*: the Llama stand-in reads Shakespeare, the
Mistral one code, and so on (`PretrainRecipe`). Training a 128k- or 262k-token output layer on two
CPU cores would take most of the time, so the model is trained over its **active vocabulary** only:
the tokens of its training text plus the special tokens. The output (tied embedding) rows of every
other token are frozen at exactly zero, so their logits are exactly 0, and the loss counts them in
the partition function as ``log(n_inactive)`` (``log sum exp 0``). That is the full-vocabulary
cross-entropy of the saved model, not an approximation: the model written to disk has the real
vocabulary size, the family's real tokenizer, zeros in the inactive rows, and any evaluation through
its ordinary ``forward`` scores it exactly as it was trained.

    path = pretrain_standin(PretrainRecipe("llama3", "shakespeare", steps=200))  # cached
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusion_llm.data.corpora import DOMAINS, load_corpus, read_manifest
from fusion_llm.paths import FAMILIES, atomic_dir, cache_dir, tokenizer_dir
from fusion_llm.standins import standin_config


@dataclass
class PretrainRecipe:
    """What one pre-trained stand-in is: family, sizes, training text and schedule.

    Args:
        family: ``llama3``, ``mistral``, ``gemma2`` or ``phi3`` (the real tokenizer of that family).
        domain: training text: ``shakespeare``, ``code``, ``prose`` or ``mixture`` (prepared corpora, for
            `pretrain_standin`); a label when `train_standin` is given the texts.
        sizes: stand-in config overrides (``hidden_size``, ``num_hidden_layers``, ...); every Linear
            dimension must stay a multiple of 64 (bitsandbytes 4-bit on CPU).
        steps, batch_size, seq_len: optimizer steps, sequences per step, tokens per sequence.
        lr, min_lr, warmup_steps, weight_decay: AdamW with linear warmup and cosine decay to ``min_lr``.
        seed: weight initialisation and batch order.
        init: a pre-trained stand-in folder to continue from (a shared base) instead of a fresh init.
    """

    family: str
    domain: str
    sizes: dict = field(default_factory=dict)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 96
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    init: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"PretrainRecipe.family: {self.family!r} is not one of {FAMILIES}")
        for key in ("steps", "batch_size", "seq_len", "lr"):
            if getattr(self, key) <= 0:
                raise ValueError(f"PretrainRecipe.{key}: must be positive, got {getattr(self, key)}")
        check_linear_dims(standin_config(self.family, **self.sizes))

    def key(self) -> str:
        """Hash of the recipe, the prepared corpus, the tokenizer and the starting weights."""
        tokenizer = (tokenizer_dir(self.family) / "tokenizer.json").read_bytes()
        base = None
        if self.init:
            stamp = Path(self.init) / "pretrain.json"
            base = json.loads(stamp.read_text())["key"] if stamp.is_file() else str(self.init)
        data = {"recipe": {**asdict(self), "init": base}, "corpus": read_manifest()["fingerprint"],
                "tokenizer": hashlib.sha256(tokenizer).hexdigest()}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.family}-{self.domain}"


def check_linear_dims(config) -> None:
    """Refuse a config with a Linear dimension that is not a multiple of 64 (bitsandbytes 4-bit on CPU)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dims = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads * head_dim": config.num_attention_heads * head_dim,
            "num_key_value_heads * head_dim": config.num_key_value_heads * head_dim}
    bad = {k: v for k, v in dims.items() if v % 64}
    if bad:
        raise ValueError(f"stand-in sizes: {bad} must be multiples of 64 (bitsandbytes 4-bit on CPU)")


def pretrained_root() -> Path:
    """Folder of the cached pre-trained stand-ins: ``$FUSION_LLM_CACHE/pretrained``."""
    return cache_dir() / "pretrained"


def get_lr(step: int, recipe: PretrainRecipe) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / (recipe.warmup_steps + 1)
    ratio = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (recipe.lr - recipe.min_lr)


def active_lm_loss(logits: torch.Tensor, labels: torch.Tensor, n_inactive: int) -> torch.Tensor:
    """Mean cross-entropy over the full vocabulary when the ``n_inactive`` left-out tokens have logit 0.

    Args:
        logits: (B, T, V_active) logits over the active vocabulary.
        labels: (B, T) compact target ids, -100 where ignored.
        n_inactive: tokens of the real vocabulary outside the active one (their logit is exactly 0).
    """
    logits = logits.float()
    if n_inactive:
        rest = torch.full_like(logits[..., :1], math.log(n_inactive))  # log sum_{inactive} exp(0)
        logits = torch.cat([logits, rest], dim=-1)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _token_sequences(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=seq_len)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None:
        ids = [x if x[:1] == [bos] else [bos, *x][:seq_len] for x in ids]
    return [x for x in ids if len(x) >= 2]


def _special_ids(tokenizer, config) -> set[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id,
           config.bos_token_id, config.eos_token_id, getattr(config, "pad_token_id", None)}
    flat = set()
    for x in ids:
        flat.update(x if isinstance(x, (list, tuple)) else [x])
    return {int(x) for x in flat if x is not None and 0 <= int(x) < config.vocab_size}


def _batch(seqs: list[list[int]], rows: list[int], remap: torch.Tensor, pad: int):
    length = max(len(seqs[r]) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(seqs[r])] = remap[torch.tensor(seqs[r])]
        mask[i, : len(seqs[r])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return ids, mask, labels


def _compact_config(family: str, sizes: dict, full_config, active: torch.Tensor, remap: torch.Tensor):
    def compact(token):
        if token is None or isinstance(token, (list, tuple)):
            return None
        return int(remap[token]) if 0 <= token < len(remap) and remap[token] >= 0 else None

    return standin_config(family, **{**sizes, "vocab_size": len(active), "bos_token_id": compact(full_config.bos_token_id),
                                     "eos_token_id": compact(full_config.eos_token_id),
                                     "pad_token_id": compact(getattr(full_config, "pad_token_id", None))})


def pretrain_standin(recipe: PretrainRecipe, root: str | Path | None = None, *, force: bool = False,
                     log=print) -> Path:
    """Pre-train one stand-in on a prepared corpus as ``recipe`` says, or reuse the cached one with the same key.

    Args:
        recipe: family, sizes, domain and schedule.
        root: cache folder (default :func:`pretrained_root`); the model lands in ``<root>/<name>-<key>``.
        force: train again even when cached.
        log: progress printer.

    Returns:
        The ``from_pretrained`` folder (see `train_standin`).
    """
    if recipe.domain not in (*DOMAINS, "mixture"):
        raise ValueError(f"PretrainRecipe.domain: {recipe.domain!r} is not one of {(*DOMAINS, 'mixture')}")
    key = recipe.key()
    root = Path(root or pretrained_root())
    out_dir = root / f"{recipe.name}-{key}"
    if not force and (out_dir / "pretrain.json").is_file():
        return out_dir
    corpus = load_corpus(recipe.domain)
    return train_standin(recipe, list(corpus["train"]["text"]), list(corpus["validation"]["text"][:32]), out_dir,
                         key=key, log=log)


def train_standin(recipe: PretrainRecipe, train_texts: list[str], validation_texts: list[str], out_dir: str | Path,
                  *, key: str | None = None, log=print) -> Path:
    """Train one stand-in from ``recipe`` on ``train_texts`` and save it to ``out_dir`` (atomically).

    Returns:
        A ``from_pretrained`` folder: config, weights (real vocabulary), the family's tokenizer and
        ``pretrain.json`` (recipe, key, active vocabulary size, loss curve, validation loss, seconds).
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(recipe.family))
    full_config = standin_config(recipe.family, **recipe.sizes)
    seqs = _token_sequences(tokenizer, train_texts, recipe.seq_len)
    val_seqs = _token_sequences(tokenizer, validation_texts, recipe.seq_len)

    base_state = None
    used = {t for s in seqs for t in s} | _special_ids(tokenizer, full_config)
    if recipe.init:
        base = AutoModelForCausalLM.from_pretrained(recipe.init, dtype=torch.float32)
        base_state = base.state_dict()
        embed_key = next(k for k in base_state if k.endswith("embed_tokens.weight"))
        used |= set(torch.nonzero(base_state[embed_key].abs().sum(1)).flatten().tolist())
        del base
    active = torch.tensor(sorted(used))  # compact id -> real id
    remap = torch.full((full_config.vocab_size,), -1, dtype=torch.long)
    remap[active] = torch.arange(len(active))
    n_inactive = full_config.vocab_size - len(active)

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_compact_config(recipe.family, recipe.sizes, full_config, active, remap),
                                             dtype=torch.float32)
    if base_state is not None:
        state = {k: (v[active] if k.endswith(("embed_tokens.weight", "lm_head.weight")) else v)
                 for k, v in base_state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
            raise RuntimeError(f"{recipe.init}: weights do not fit {recipe.family} {recipe.sizes}")
    pad = int(remap[tokenizer.pad_token_id]) if tokenizer.pad_token_id is not None and remap[tokenizer.pad_token_id] >= 0 else 0

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)
    losses = []
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, recipe)
        rows = torch.randint(len(seqs), (recipe.batch_size,), generator=generator).tolist()
        ids, mask, labels = _batch(seqs, rows, remap, pad)
        loss = active_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, n_inactive)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, recipe.steps // 5) == 0:
            log(f"  pretrain {recipe.name} step {step + 1}/{recipe.steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")

    # Back to the real vocabulary: active rows trained, every other row exactly zero.
    torch.manual_seed(recipe.seed)
    full = AutoModelForCausalLM.from_config(full_config, dtype=torch.float32)
    state = model.state_dict()
    for k, v in full.state_dict().items():
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = torch.zeros_like(v)
            rows[active] = state[k]
            state[k] = rows
    full.load_state_dict(state, strict=True)
    full.eval()
    identity = torch.arange(full_config.vocab_size)
    with torch.no_grad():  # the saved model's own forward, full vocabulary: exact, tokens unseen in training included
        total, count = 0.0, 0
        for start in range(0, len(val_seqs), recipe.batch_size):
            ids, mask, labels = _batch(val_seqs, list(range(start, min(start + recipe.batch_size, len(val_seqs)))),
                                       identity, tokenizer.pad_token_id or 0)
            n = int((labels != -100).sum())
            total += active_lm_loss(full(input_ids=ids, attention_mask=mask).logits, labels, 0).item() * n
            count += n
    stamp = {"key": key, "recipe": asdict(recipe), "active_vocab": len(active), "vocab_size": full_config.vocab_size,
             "parameters": sum(p.numel() for p in full.parameters()),
             "train_sequences": len(seqs), "tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
             "loss_curve": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)],
             "validation_loss": total / max(count, 1), "seconds": time.perf_counter() - started}
    with atomic_dir(out_dir) as tmp:
        full.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(stamp, indent=2))
    log(f"  pretrained {recipe.name} in {stamp['seconds']:.0f}s: validation loss {stamp['validation_loss']:.3f} "
        f"nats/token, active vocabulary {len(active)}/{full_config.vocab_size}")
    return out_dir
