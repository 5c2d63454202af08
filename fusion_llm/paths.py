"""Where fusion_llm keeps what it builds (fetched tokenizers, stand-in backbones, feature caches), and how a
file is written so that no reader ever sees half of it.

Everything lives under one cache folder, ``$FUSION_LLM_CACHE`` or ``~/.cache/fusion_llm``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The four backbone families; each name is also the tokenizer's folder name in the cache.
FAMILIES = ("llama3", "mistral", "gemma2", "phi3")


def cache_dir() -> Path:
    """The root of fusion_llm's on-disk cache (``$FUSION_LLM_CACHE`` or ``~/.cache/fusion_llm``)."""
    return Path(os.environ.get("FUSION_LLM_CACHE", Path.home() / ".cache" / "fusion_llm")).expanduser()


def tokenizer_dir(family: str) -> Path:
    """Folder holding the fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) of one family."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(FAMILIES)}")
    return cache_dir() / "tokenizers" / family


def standin_dir(family: str) -> Path:
    """Folder holding the saved stand-in backbone of one family (a ``from_pretrained`` directory)."""
    return cache_dir() / "standins" / family


def tokenizers_available() -> bool:
    """True when all four real tokenizers have been fetched into the cache."""
    return all((tokenizer_dir(f) / "tokenizer.json").is_file() for f in FAMILIES)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a reader sees
    the old file or the new one, never half of it; on failure the old file stays and the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, value, *, indent: int = 1, default=str) -> Path:
    """`write_atomic` of ``value`` as JSON (``default`` converts what JSON cannot hold)."""
    return write_atomic(path, json.dumps(value, indent=indent, default=default) + "\n")
