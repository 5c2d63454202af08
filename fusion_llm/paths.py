"""Where fusion_llm keeps what it builds (fetched tokenizers, stand-in backbones, feature caches), and how a
file is written so that no reader ever sees half of it.

Everything lives under one cache folder, ``$FUSION_LLM_CACHE`` or ``~/.cache/fusion_llm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's whole content (hex), read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Move the finished folder ``new`` to ``target`` (on one file system): a folder already at ``target`` is moved
    aside first, put back if the move fails, and deleted once the new one is in place - a reader sees the old folder
    or the new one, and a failure leaves the old one."""
    new, target = Path(new), Path(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    replaced = target.exists()
    if replaced:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if replaced and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Build a folder atomically: yields a temporary folder beside ``target`` to fill; when the block ends without an
    error it replaces ``target`` (`replace_dir`), and the temporary folder is removed in any case."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
