"""benchmarks/train_throughput.py --quick runs end to end on the stand-ins and writes the JSON the issue asks for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_llm.paths import tokenizers_available

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not tokenizers_available(),
                    reason="real tokenizers not fetched: run python scripts/fetch_tokenizers.py (.ci/run does)")
def test_train_throughput_quick_writes_the_three_ratios(tmp_path):
    out = tmp_path / "bench" / "train_throughput.json"
    # One thread: on a shared 2-core machine OpenMP threads spinning for a busy core make 2 threads far slower.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--quick", "--threads", "1",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratios:" in proc.stdout
    result = json.loads(out.read_text())
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file
    assert result["errors"] == {}
    for key in ("benchmark", "command", "environment", "settings", "backbones", "head", "tokens", "head_overhead",
                "feature_cache", "truncation", "memory", "ratios", "targets"):
        assert key in result, key

    head = result["head_overhead"]
    for key in ("forward_only_examples_per_s", "train_examples_per_s", "train_tokens_per_s", "ratio", "target",
                "meets_target", "samples_s"):
        assert key in head, key
    assert head["ratio"] > 0 and len(head["samples_s"]["train_step"]) == result["settings"]["repeats"]

    cache = result["feature_cache"]
    for key in ("cache_build_s", "uncached_epoch_s", "cached_epoch_s", "speedup", "target", "meets_target"):
        assert key in cache, key
    assert cache["speedup"] > 1  # no backbone runs from the cache

    trunc = result["truncation"]
    for key in ("truncated_step_s", "full_depth_step_s", "speedup", "tap_layer"):
        assert key in trunc, key
    assert trunc["layers_run_truncated"] == trunc["tap_layer"] < trunc["layers_run_full_depth"]
    assert trunc["same_tap_values"] is True

    assert result["memory"]["plan_estimate_bytes"] > 0
    assert set(result["ratios"]) == {"head_overhead_train_over_forward", "cache_speedup", "truncation_speedup"}
    assert all(isinstance(v, float) for v in result["ratios"].values())
