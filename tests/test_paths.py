"""Folder writes go through one helper (`fusion_llm.paths.replace_dir` / `atomic_dir`): when the final move of a new
folder fails, the old one stays - for the helper itself, the feature cache, stand-in builds and checkpoints - and no
other file hand-writes the rmtree + rename swap that loses it."""

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fusion_llm.paths import atomic_dir, replace_dir

from conftest import NEEDS_TOKENIZERS

ROOT = Path(__file__).resolve().parents[1]


def fail_first_move_onto(monkeypatch, target: Path) -> None:
    """Make the first ``os.replace`` / ``os.rename`` (``Path.rename`` too) onto ``target`` raise, as a full disk or
    a busy folder would; every other move goes through."""
    failed = []
    for name in ("replace", "rename"):
        original = getattr(os, name)

        def move(src, dst, *args, _original=original, **kwargs):
            if Path(dst) == Path(target) and not failed:
                failed.append(src)
                raise OSError(f"injected: cannot move {src} onto {dst}")
            return _original(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, move)


def leftovers(folder: Path) -> list[str]:
    """Hidden entries (temporary or moved-aside folders) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_replace_dir_puts_the_old_folder_back_when_the_move_fails(tmp_path, monkeypatch):
    target, new = tmp_path / "out", tmp_path / ".out-new"
    target.mkdir()
    (target / "a.txt").write_text("old")
    new.mkdir()
    (new / "a.txt").write_text("new")
    fail_first_move_onto(monkeypatch, target)
    with pytest.raises(OSError, match="injected"):
        replace_dir(new, target)
    assert (target / "a.txt").read_text() == "old"
    replace_dir(new, target)  # the next try goes through and leaves nothing aside
    assert (target / "a.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_atomic_dir_keeps_the_old_folder_when_the_block_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert leftovers(tmp_path) == []


def _feature_model(value: float):
    """Just what `FeatureCache` reads of a `FusionModel`: one backbone with one tap of width 4."""
    spec = SimpleNamespace(model="m", revision=None, tap_layers=[1], quantization="none", compute_dtype="float32",
                           resolved_taps=lambda: [1])
    backbone = SimpleNamespace(spec=spec, fingerprint="f", hidden_size=4)
    return SimpleNamespace(backbones={"a": backbone}, config=SimpleNamespace(head={"pooling": "mean"}),
                           features=lambda inputs: {"a": [torch.full((len(inputs), 4), value)]})


def _collate(rows):
    return {"inputs": rows, "labels": torch.tensor([r["label"] for r in rows])}


def test_feature_cache_rewrite_whose_final_move_fails_keeps_the_old_cache(tmp_path, monkeypatch):
    from datasets import Dataset

    from fusion_llm.features import FeatureCache

    data = Dataset.from_dict({"label": [0, 1, 2]})
    cache = FeatureCache(tmp_path / "features", _feature_model(1.0), limit_bytes=1e9)
    assert cache.build(data, _collate, log=lambda _: None)[:]["a_tap0"].tolist() == [[1.0] * 4] * 3
    cache.model = _feature_model(2.0)
    monkeypatch.setattr(cache, "get", lambda dataset: None)  # a miss: the cache is written again over the old one
    fail_first_move_onto(monkeypatch, cache.path(data))
    with pytest.raises(OSError, match="injected"):
        cache.build(data, _collate, log=lambda _: None)
    monkeypatch.undo()
    assert cache.get(data)[:]["a_tap0"].tolist() == [[1.0] * 4] * 3
    assert leftovers(cache.path(data).parent) == []


def test_checkpoint_saved_again_replaces_the_old_one_and_a_failed_move_keeps_it(tmp_path, monkeypatch):
    from fusion_llm.training import _save_checkpoint

    def accelerator(weights: str):
        def save_state(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.bin").write_text(weights)

        return SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, save_state=save_state)

    run = SimpleNamespace(to_dict=lambda: {"seed": 0})
    final = _save_checkpoint(accelerator("first"), tmp_path, {"step": 4}, run, keep=2)
    fail_first_move_onto(monkeypatch, final)
    with pytest.raises(OSError, match="injected"):
        _save_checkpoint(accelerator("second"), tmp_path, {"step": 4, "note": "second"}, run, keep=2)
    assert (final / "model.bin").read_text() == "first"
    assert json.loads((final / "trainer_state.json").read_text()) == {"step": 4}
    _save_checkpoint(accelerator("third"), tmp_path, {"step": 4}, run, keep=2)  # same step again: replaced
    assert (final / "model.bin").read_text() == "third"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [final.name]


@NEEDS_TOKENIZERS
def test_standin_rebuild_whose_final_move_fails_keeps_the_old_standin(tmp_path, monkeypatch):
    from fusion_llm.standins import build_standin

    small = {"num_hidden_layers": 1}
    out = build_standin("mistral", tmp_path / "mistral", **small)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_first_move_onto(monkeypatch, out)
    with pytest.raises(OSError, match="injected"):
        build_standin("mistral", out, seed=1, force=True, **small)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def _hand_written_swaps(path: Path) -> list[str]:
    """Functions in ``path`` that call ``rmtree`` and also move a folder with ``os.replace`` or ``.rename``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        called = {(getattr(c.func.value, "id", None), c.func.attr) for c in ast.walk(node)
                  if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)}
        names = {attr for _, attr in called}
        if "rmtree" in names and ("rename" in names or ("os", "replace") in called):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


def test_folders_are_swapped_only_by_the_helper_in_paths():
    files = [p for d in ("fusion_llm", "benchmarks", "scripts") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    offenders = [hit for p in files if p != ROOT / "fusion_llm" / "paths.py" for hit in _hand_written_swaps(p)]
    assert offenders == [], "use fusion_llm.paths.atomic_dir / replace_dir instead of rmtree + rename"
