"""The real-members track end to end at the micro preset, on two stand-ins of different families (the real
members are not in CI): each member alone, LoRA on each sized to the fusion head with that anchor (within 5%),
the fused model with each anchor, the headline chosen on validation rows, the files written atomically."""

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def real_track(standin_paths, small_corpora, monkeypatch):
    from benchmarks.lm import real as module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module, {"mistral": (standin_paths["mistral"], [2, -1]), "llama": (standin_paths["llama3"], [2, -1])}
    torch.set_num_threads(threads)


def test_micro_real_track_scores_members_lora_and_both_anchors(real_track, tmp_path):
    module, members = real_track
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"track": "grokking"}))
    results = module.run_real_track("micro", out, members=members, workers=0, task_items=4, log=lambda *_: None)

    groups = [e["group"] for e in results["entries"]]
    assert groups == ["backbone", "backbone", "lora", "lora", "fused", "fused"]
    for e in results["entries"]:
        assert set(e["bits_per_byte"]) == {"shakespeare", "code", "prose", "mixture"}
        assert all(math.isfinite(v) and v > 0 for v in e["bits_per_byte"].values())
        assert math.isfinite(e["validation_bits_per_byte"])
    fused = {e["anchor"]: e for e in results["entries"] if e["group"] == "fused"}
    assert set(fused) == {"mistral", "llama"} and {e["vocabulary"] for e in fused.values()} == {"mistral", "llama"}
    headline = [e for e in results["entries"] if e.get("headline")]
    assert len(headline) == 1 and headline[0]["group"] == "fused"
    assert headline[0]["validation_bits_per_byte"] == min(e["validation_bits_per_byte"] for e in fused.values())
    for e in results["entries"]:
        if e["group"] == "lora":  # the control holds as many trainable parameters as the head on its member
            assert abs(e["params_vs_head"]) <= 0.05, e["params_vs_head"]
            assert e["lora"]["steps"] == module.PRESETS["micro"].head_steps
    assert all(isinstance(e.get("sample"), str) for e in results["entries"] if e["group"] != "lora")
    for e in results["entries"]:  # every entry scored on the harness task, through FusedLM or HFLM (LoRA)
        acc = e["task_accuracy"]
        assert set(acc["items"]) == {"shakespeare", "code", "prose"} and all(0 < n <= 4 for n in acc["items"].values())
        assert all(0.0 <= v <= 1.0 for v in acc["acc"].values()) and "all" in acc["acc_norm"]
    targets = results["targets"]
    assert set(targets["per_column"]) == {"shakespeare", "code", "prose", "mixture"}
    best = min(e["bits_per_byte"]["mixture"] for e in results["entries"] if e["group"] in ("backbone", "lora"))
    assert targets["per_column"]["mixture"]["best"] == best

    shared = json.loads((out / "results.json").read_text())
    assert shared["track"] == "grokking" and shared["real_track"]["preset"] == "micro"  # the other entry kept
    table = (out / "real_results.md").read_text()
    assert table.startswith("# Real-members track") and "| task acc |" in table
    assert not list(out.glob(".*.tmp"))


def test_sized_head_matches_the_lora_count(real_track):
    module, members = real_track
    preset = module.PRESETS["micro"]
    for anchor in members:
        target = 4 * module._lora_per_rank(Path(members[anchor][0]))
        head, count = module.sized_head(anchor, members, preset, target)
        assert abs(count / target - 1) <= 0.05
