"""Stand-in backbones: the real transformers classes of the four families at small sizes.

Each stand-in is created from config (random weights, seeded), paired with its family's real
tokenizer, and saved with ``save_pretrained`` so it loads through exactly the
``from_pretrained`` + ``BitsAndBytesConfig`` path a real model takes. Every Linear dimension is a
multiple of 64 (bitsandbytes 4-bit runs on CPU then), and each family has its own hidden size, so
fusion really crosses widths.

CLI: ``python -m fusion_llm.standins [--force]`` builds all four into the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma2Config, LlamaConfig, MistralConfig, Phi3Config

from fusion_llm.paths import FAMILIES, atomic_dir, standin_dir, tokenizer_dir

# (config class, config values). Vocab sizes are the real models' (all multiples of 64; Gemma uses
# Gemma-3's 262208, since its tokenizer is the one we can fetch).
STANDIN_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama3": (LlamaConfig, dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=128256, max_position_embeddings=1024,
        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )),
    "mistral": (MistralConfig, dict(
        hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=3,
        num_key_value_heads=1, head_dim=64, vocab_size=32768, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, sliding_window=None, tie_word_embeddings=True,
    )),
    "gemma2": (Gemma2Config, dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, vocab_size=262208,
        max_position_embeddings=1024, sliding_window=128, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True,
    )),
    "phi3": (Phi3Config, dict(
        hidden_size=320, intermediate_size=640, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=5, vocab_size=32064, max_position_embeddings=1024, original_max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=True,
    )),
}


def standin_config(family: str, **overrides):
    """The transformers config of one family's stand-in (``overrides`` change sizes, e.g. for GPU runs)."""
    if family not in STANDIN_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cls, values = STANDIN_CONFIGS[family]
    return cls(**{**values, **overrides})


def _recipe_hash(family: str, seed: int, overrides: dict) -> str:
    _, values = STANDIN_CONFIGS[family]
    tok = tokenizer_dir(family) / "tokenizer.json"
    recipe = {"family": family, "seed": seed, "values": values, "overrides": overrides,
              "tokenizer": hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_standin(family: str, out_dir: Path | None = None, *, seed: int = 0, force: bool = False,
                  **overrides) -> Path:
    """Create (or reuse) one stand-in and save it as a ``from_pretrained`` directory.

    Args:
        family: ``llama3``, ``mistral``, ``gemma2`` or ``phi3``.
        out_dir: where to save; defaults to the cache (``fusion_llm.paths.standin_dir``).
        seed: weight initialisation seed.
        force: rebuild even when a matching stand-in exists.
        overrides: config values replacing the defaults (sizes).

    Returns:
        The directory, holding config.json, model.safetensors and the family's real tokenizer.
    """
    out_dir = Path(out_dir or standin_dir(family))
    if not (tokenizer_dir(family) / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"the {family} tokenizer is not in the cache ({tokenizer_dir(family)}); "
            "run: python scripts/fetch_tokenizers.py"
        )
    recipe = _recipe_hash(family, seed, overrides)
    stamp = out_dir / "standin.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return out_dir
    config = standin_config(family, **overrides)
    cls = {"llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "phi3": "Phi3ForCausalLM"}[family]
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    with atomic_dir(out_dir) as tmp:  # a reader sees the old or the new folder; a failure leaves the old one
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        params = sum(p.numel() for p in model.parameters())
        (tmp / "standin.json").write_text(json.dumps({"family": family, "recipe": recipe, "seed": seed,
                                                      "parameters": params}, indent=2))
    return out_dir


def build_all(force: bool = False) -> dict[str, Path]:
    """Build the four stand-ins into the cache; returns family -> directory."""
    return {family: build_standin(family, force=force) for family in FAMILIES}


def describe(paths: dict[str, Path]) -> str:
    rows = ["| family | class | hidden | layers | vocab | parameters |", "|---|---|---|---|---|---|"]
    for family, path in paths.items():
        cfg = json.loads((path / "config.json").read_text())
        params = json.loads((path / "standin.json").read_text())["parameters"]
        rows.append(f"| {family} | {cfg['architectures'][0]} | {cfg['hidden_size']} | {cfg['num_hidden_layers']} "
                    f"| {cfg['vocab_size']} | {params / 1e6:.1f}M |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusion_llm.standins", description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when present")
    args = parser.parse_args(argv)
    try:
        paths = build_all(force=args.force)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
