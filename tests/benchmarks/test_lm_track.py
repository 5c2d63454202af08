"""The LM track end to end at the micro preset (offline: a stand-in Shakespeare archive, the real stdlib and
pydoc prose): every model is scored in bits/byte, the LoRA control matches the head's size, the files are
written and the shared results.json keeps what was there."""

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def lm_track(standin_paths, small_corpora, tmp_path, monkeypatch):
    from benchmarks.lm import pretraining
    from benchmarks.lm import track as module

    monkeypatch.setattr(pretraining, "pretrained_root", lambda: tmp_path / "pretrained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


def test_micro_lm_track_scores_every_model_and_writes_its_files(lm_track, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"track": "grokking", "methods": {}}))
    results = lm_track.run_lm_track("micro", out, log=lambda *_: None)

    groups = [e["group"] for e in results["entries"]]
    assert groups.count("backbone") == 4 and groups.count("merge") == 3 and "fused" in groups and "lora" in groups
    for e in results["entries"]:
        for d in ("shakespeare", "code", "prose", "mixture"):
            assert math.isfinite(e["bits_per_byte"][d]) and e["bits_per_byte"][d] > 0
    fused = [e for e in results["entries"] if e["group"] == "fused"]
    assert len(fused) == 2 and sum(bool(e.get("headline")) for e in fused) == 1  # both variants, one headline
    headline = next(e for e in fused if e.get("headline"))
    assert headline["validation_bits_per_byte"] == min(e["validation_bits_per_byte"] for e in fused)
    loras = {e["control"]: e for e in results["entries"] if e["group"] == "lora"}
    assert set(loras) == {"same steps", "same time"}
    for lora in loras.values():
        assert abs(lora["trainable_params"] - headline["trainable_params"]) / headline["trainable_params"] < 0.1
    assert loras["same time"]["lora"]["steps"] >= loras["same steps"]["lora"]["steps"]
    anchor = next(e for e in results["entries"] if e["group"] == "backbone" and "[anchor]" in e["name"])
    bytes_ = {d: anchor["scores"][d]["bytes"] for d in ("shakespeare", "code", "prose")}
    assert all(e["scores"][d]["bytes"] == b for e in results["entries"] for d, b in bytes_.items())  # one scale
    assert set(results["targets"]["per_domain"]) == {"shakespeare", "code", "prose"}
    assert len(results["targets"]["mixture"]) == 7  # three merges and the four backbones
    assert len(results["targets"]["lora"]) == 8  # two LoRA controls x (three domains and the mixture)
    assert results["targets"]["headline"] == headline["name"]
    assert results["generation"]["fused_tokens_per_s"] > 0 and results["generation"]["anchor_tokens_per_s"] > 0
    # the harness task's column (--task-items) goes through lm_track.task_accuracy, which the micro real track's
    # test runs for members, fused models and LoRA; here it is off, as by default
    assert not any(e.get("task_accuracy") for e in results["entries"])

    for name in ("lm_results.json", "lm_results.md", "lm_shakespeare.png", "lm_code.png", "lm_prose.png",
                 "lm_mixture.png"):
        assert (out / name).is_file(), name
    shared = json.loads((out / "results.json").read_text())
    assert shared["track"] == "grokking" and shared["lm_track"]["preset"] == "micro"
    table = (out / "lm_results.md").read_text()
    assert "(headline) | fused |" in table and "| task acc |" in table  # the column, empty
