"""The training script: eval loss falls, resume equals an uninterrupted run, 2 processes agree,
the feature cache runs no backbone, and each error case gives one line and exit code 2."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fusion_llm.runconfig import build_run_config
from fusion_llm.training import train

ROOT = Path(__file__).resolve().parent.parent


def tiny(tmp_path, **changes):
    data = {
        "model": {
            "backbones": [
                {"name": "mistral", "model": "cache:standins/mistral", "tap_layers": [1, 2], "compute_dtype": "float32"},
                {"name": "phi", "model": "cache:standins/phi3", "tap_layers": [2], "compute_dtype": "float32"},
            ],
            "shared_width": 64, "fusion": {"method": "concat", "hidden": 128},
            "head": {"num_labels": 4, "pooling": "mean"},
        },
        "data": {"task": "topics", "max_length": 24, "max_train_examples": 128, "max_eval_examples": 64},
        "train": {"lr": 3e-3, "batch_size": 8, "max_steps": 12, "warmup_steps": 1, "eval_every": 6,
                  "checkpoint_every": 4, "seed": 3},
        "output_dir": str(tmp_path / "run"), "tracker": "jsonl",
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return data


def run_cli(args, cwd=ROOT, launcher=None):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "scripts" / "train_fusion.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          timeout=600)


def test_default_config_style_run_lowers_eval_loss_and_saves_a_loadable_head(standin_paths, tmp_path):
    from fusion_llm.modeling import FusionModel

    run = build_run_config(tiny(tmp_path, train__max_steps=30, train__eval_every=10, train__lr=1e-2))
    summary = train(run)
    logs = [json.loads(x) for x in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    evals = [x["eval_loss"] for x in logs if "eval_loss" in x]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (tmp_path / "run/run_config.yaml").is_file() and (tmp_path / "run/best/config.json").is_file()
    model = FusionModel.from_pretrained(summary["output"])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.head.parameters())
    assert (tmp_path / "run/checkpoints").is_dir()
    for ckpt in (tmp_path / "run/checkpoints").iterdir():
        assert (ckpt / "run_config.yaml").is_file()  # the resolved config beside every checkpoint


def test_resume_reaches_the_same_losses_as_an_uninterrupted_run(standin_paths, tmp_path):
    full = train(build_run_config(tiny(tmp_path / "a")))
    partial_cfg = build_run_config(tiny(tmp_path / "b"))
    stopped = train(partial_cfg, stop_after=10)  # "killed" after step 10; eval at 6, last checkpoint at step 8
    assert stopped["stopped_at"] == 10
    resumed = train(build_run_config(tiny(tmp_path / "b")), resume=True)
    # the checkpoint carried the loss history and the best eval so far (step 6's): the resumed run reports all
    assert resumed["losses"] == full["losses"] and resumed["best_eval_loss"] == full["best_eval_loss"]
    curve = [json.loads(x) for x in (tmp_path / "b/run/train_losses.jsonl").read_text().splitlines()]
    by_step = {}
    for row in curve:  # steps 9-10 ran twice (before the "kill" and after resuming from step 8)
        by_step.setdefault(row["step"], []).append(row["loss"])
    assert all(len(set(v)) == 1 for v in by_step.values()), by_step
    assert [by_step[s][0] for s in sorted(by_step)] == full["losses"]
    assert resumed["final"] == full["final"]


def test_interrupted_checkpoint_write_leaves_the_previous_one_usable(standin_paths, tmp_path):
    train(build_run_config(tiny(tmp_path)), stop_after=8)
    ckpts = tmp_path / "run/checkpoints"
    (ckpts / ".tmp_step_000012").mkdir()  # what a kill during save_state leaves behind
    (ckpts / ".tmp_step_000012" / "garbage.bin").write_bytes(b"partial")
    summary = train(build_run_config(tiny(tmp_path)), resume=True)
    assert summary["steps"] == 12


def test_feature_cache_runs_no_backbone_on_a_hit(standin_paths, tmp_path, monkeypatch):
    from fusion_llm.backbones import FrozenBackbone

    first = train(build_run_config(tiny(tmp_path / "a")), cache_features=True)
    calls = []
    original = FrozenBackbone.taps
    monkeypatch.setattr(FrozenBackbone, "taps", lambda self, *a, **k: calls.append(self.name) or original(self, *a, **k))
    second = train(build_run_config(tiny(tmp_path / "b")), cache_features=True)
    assert calls == []
    assert second["losses"] == first["losses"]


def test_cache_over_its_limit_is_refused_with_the_estimate(standin_paths, tmp_path):
    cfg = tiny(tmp_path, train__cache_limit_gb=1e-6)
    cfg["data"]["seed"] = 11  # data no other test caches: a miss, so the limit applies
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli(["--config", str(path), "--cache-features"])
    assert result.returncode == 2
    assert "cache_limit_gb" in result.stderr and "GB" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "head").exists()


def test_two_processes_end_with_identical_heads(standin_paths, tmp_path):
    cfg = tiny(tmp_path, train__max_steps=6, train__checkpoint_every=100, train__eval_every=6)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577"]
    result = run_cli(["--config", str(path)], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["effective_batch"] == 16 and summary["examples_per_step"] == 16
    first, second = summary["process_head_checksums"]
    assert first == second


def lm_tiny(tmp_path, **changes):
    """An LM run on two stand-ins: Mistral as anchor with member adapters (LoRA inside it, used outside the
    head's own modules), Phi-3 aligned with packed tails; 5 validation rows, so two processes split them
    unevenly."""
    animals, colors = ["fox", "dog", "cat", "owl"], ["red", "blue", "green"]
    rows = [f"the {colors[i % 3]} {animals[i % 4]} jumps over {i % 7} fences, and the {animals[(i + 1) % 4]} sleeps."
            for i in range(80)]
    for split, texts in (("train", rows[:64]), ("validation", rows[64:69])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = tiny(tmp_path, train__max_steps=10, train__eval_every=10, train__checkpoint_every=100, train__lr=1e-2)
    cfg["model"]["backbones"][0].update(anchor=True, lora_rank=1)
    cfg["model"]["head"] = {"kind": "lm", "source_tails": True}
    cfg["data"] = {"files": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")},
                   "max_length": 32, "max_train_examples": 64, "max_eval_examples": 5}
    cfg["train"]["batch_size"] = 4
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def test_two_processes_train_an_lm_head_with_member_adapters_alike(standin_paths, tmp_path):
    """LM training under DDP: every trainable part (alignment's "nothing" vectors, member adapters) goes
    through the wrapped head; both processes end with the same head, the loss falls below the anchor's, and
    the evaluation counts each validation row once (the 2-process anchor score equals the 1-process one)."""
    single = train(build_run_config(lm_tiny(tmp_path, train__max_steps=1, output_dir=str(tmp_path / "one"))))
    fallbacks = single["alignment_fallbacks"]  # the safety nets' count reaches the summary, per split and source
    assert set(fallbacks) == {"train", "validation"} and fallbacks["train"] and not any(fallbacks["train"].values())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(lm_tiny(tmp_path)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29578"]
    result = run_cli(["--config", str(path)], launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["num_processes"] == 2
    first, second = summary["process_head_checksums"]
    assert first == second
    assert summary["anchor_eval"]["eval_loss"] == pytest.approx(single["anchor_eval"]["eval_loss"], abs=1e-4)
    assert summary["final"]["eval_loss"] < summary["anchor_eval"]["eval_loss"] - 0.1


def test_resuming_an_lm_run_keeps_the_anchors_eval_and_the_best_head(standin_paths, tmp_path, monkeypatch):
    """An LM run resumed from its checkpoint takes the anchor-alone eval from it (not evaluated again, not lost) and
    the best eval so far: an eval after the resume that scores worse leaves best/ as it was."""
    import fusion_llm.training as T

    def cfg():
        return build_run_config(lm_tiny(tmp_path, train__max_steps=6, train__eval_every=2, train__checkpoint_every=2))

    original, evals = T.evaluate_model, []
    monkeypatch.setattr(T, "evaluate_model", lambda *a, **k: evals.append(original(*a, **k)) or evals[-1])
    assert train(cfg(), stop_after=4)["stopped_at"] == 4  # evals: the anchor alone, steps 2 and 4; checkpoint at 4
    assert len(evals) == 3
    anchor, before = evals[0], [e["eval_loss"] for e in evals[1:]]
    best = tmp_path / "run" / "best"
    saved = {f.name: f.read_bytes() for f in best.iterdir()}
    assert "model.safetensors" in saved

    evals.clear()  # after the resume every eval scores worse than any before it
    worse = max(before) + 1.0
    monkeypatch.setattr(T, "evaluate_model",
                        lambda *a, **k: evals.append({**original(*a, **k), "eval_loss": worse}) or evals[-1])
    lines = []
    resumed = train(cfg(), resume=True, log=lines.append)
    assert len(evals) == 1 and not any(line.startswith("anchor alone") for line in lines), lines  # step 6's only
    assert resumed["anchor_eval"] == anchor
    assert json.loads((tmp_path / "run/run_summary.json").read_text())["anchor_eval"] == anchor
    assert resumed["final"]["eval_loss"] == worse and resumed["best_eval_loss"] == min(before)
    assert {f.name: f.read_bytes() for f in best.iterdir()} == saved  # not replaced by the worse head


def test_an_alignment_fallback_shows_in_the_log_and_the_summary(standin_paths, tmp_path, monkeypatch):
    """A text whose alignment takes a safety net (forced here on one training row, for the Phi-3 source) shows in
    a warning line of the run's log and in run_summary.json's ``alignment_fallbacks``, per split and source."""
    from fusion_llm.alignment import AlignmentStats
    from fusion_llm.alignment import batch as B

    cfg = lm_tiny(tmp_path, train__max_steps=1)
    forced = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[3])["text"]
    original = B.align_source

    def one_fallback(text, *args, stats, **kwargs):
        if text == forced:
            stats.crossing_fallbacks += 1  # what the crossing safety net counts when it acts
        return original(text, *args, stats=stats, **kwargs)

    monkeypatch.setattr(B, "align_source", one_fallback)
    monkeypatch.setattr(B, "ALIGNMENT_STATS", AlignmentStats())  # the process-wide counters stay as they were
    lines = []
    train(build_run_config(cfg), log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:") and "fell back" in line]
    assert len(warnings) == 1 and "'phi': 1" in warnings[0], lines
    summary = json.loads((tmp_path / "run/run_summary.json").read_text())
    assert summary["alignment_fallbacks"] == {"train": {"phi": 1}, "validation": {"phi": 0}}


def test_a_nan_on_one_process_stops_every_process_with_the_same_line(standin_paths, tmp_path):
    """Process 1 alone sees a non-finite loss at its third step: both processes stop with the same one-line error
    (none is left waiting in the gradient all-reduce), and nothing is saved."""
    driver = tmp_path / "nan_on_rank1.py"
    driver.write_text(
        "import os, sys, time\n"
        "import fusion_llm.training as T\n"
        "original, calls = T._step_batch, []\n"
        "def step(model, batch, **kwargs):\n"
        "    out = original(model, batch, **kwargs)\n"
        "    calls.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(calls) == 3:\n"
        "        out.loss = out.loss * float('nan')\n"
        "    return out\n"
        "T._step_batch = step\n"
        "code = T.main(sys.argv[1:])\n"
        "if os.environ['RANK'] == '1':  # torchrun stops the others once one exits: give process 0 time to end itself\n"
        "    time.sleep(15)\n"
        "sys.exit(code)\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path, train__max_steps=6, train__checkpoint_every=100)))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29579"]
    result = subprocess.run([*launcher, str(driver), "--config", str(path)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode != 0
    errors = re.findall(r"\berror: .*", result.stderr)  # a line may follow a progress bar's last refresh
    assert len(errors) == 2 and len(set(errors)) == 1, result.stderr[-3000:]  # both print the same line
    assert "the loss became nan on process(es) [1] at step 3" in errors[0]
    # process 0 saw a finite loss itself, yet ended through that error (exit code 2) while process 1 was still
    # alive, not killed by torchrun while waiting in an all-reduce
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*exitcode\s*:\s*2\b", result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "run" / "head").exists()


@pytest.mark.parametrize("change, message", [
    ({"train__lr": -1}, "train.lr"),
    ({"train__bogus": 1}, "unknown key"),
    ({"data": {"files": {"train": "/nope/train.jsonl", "validation": "/nope/v.jsonl"}}}, "does not exist"),
    ({"model__head": {"num_labels": 2, "pooling": "mean"}}, "outside 0..1"),
])
def test_errors_are_one_line_with_exit_code_2(standin_paths, tmp_path, change, message):
    (key, value), = change.items()
    cfg = tiny(tmp_path)
    section, _, name = key.partition("__")
    if name:
        cfg[section][name] = value
    else:
        cfg[section] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli(["--config", str(path)])
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "head").exists()


def test_output_dir_states_are_refused_before_anything_loads(standin_paths, tmp_path):
    """A file as output_dir, --resume with nothing to resume, and a fresh run over an unfinished run's
    checkpoints: one ConfigError each, and nothing already there is touched."""
    from fusion_llm.config import ConfigError

    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match="is a file"):
        train(build_run_config(tiny(tmp_path)))
    (tmp_path / "run").unlink()
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        train(build_run_config(tiny(tmp_path)), resume=True)
    stale = tmp_path / "run" / "checkpoints" / "step_000004"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text('{"step": 4}')
    with pytest.raises(ConfigError, match="checkpoints of an unfinished run"):
        train(build_run_config(tiny(tmp_path)))
    assert (stale / "trainer_state.json").read_text() == '{"step": 4}'


def test_empty_dataset_is_refused(standin_paths, tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "v.jsonl").write_text('{"text": "a", "label": 0}\n')
    cfg = tiny(tmp_path, data={"files": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "v.jsonl")}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli(["--config", str(path)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "empty" in result.stderr.strip().splitlines()[-1] or "cannot read" in result.stderr


def test_non_finite_loss_stops_with_the_step_and_checkpoint(standin_paths, tmp_path):
    cfg = tiny(tmp_path, train__lr=1e30, train__grad_clip=0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = run_cli(["--config", str(path)])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "at step" in last and "checkpoint" in last, result.stderr[-2000:]


def test_cli_overrides_single_keys(tmp_path):
    from fusion_llm.runconfig import load_run_config

    run = load_run_config(ROOT / "configs/standins_4llm.yaml", ["--train.lr", "3e-4", "--data.max_length=48"])
    assert run.train.lr == 3e-4 and run.data.max_length == 48


def test_resume_is_exact_with_dropout_accumulation_and_an_uneven_epoch_boundary(standin_paths, tmp_path):
    """Dropout on (its random draws restored with the checkpoint), 3 micro-batches per update, and an epoch of 16
    micro-batches (not a multiple of 3): the run is killed past an epoch boundary and resumed from a checkpoint
    taken inside the next epoch; every loss equals the uninterrupted run's."""
    def cfg(folder):
        data = tiny(folder, train__gradient_accumulation=3, train__max_steps=12, train__checkpoint_every=8,
                    train__eval_every=12)
        data["model"]["head"]["dropout"] = 0.3
        data["model"]["adapter"] = {"dropout": 0.2}
        return build_run_config(data)

    full = train(cfg(tmp_path / "a"))
    assert train(cfg(tmp_path / "b"), stop_after=10)["stopped_at"] == 10
    resumed = train(cfg(tmp_path / "b"), resume=True)
    assert resumed["losses"] == full["losses"]
    assert resumed["final"] == full["final"]


def test_a_head_started_from_a_saved_one_trains_only_the_parts_named(standin_paths, tmp_path):
    """``train.init_head`` + ``train.train_only``: a trained hidden-state head, given the prediction mixer of
    ``head.source_predictions`` and trained with only the mixer free, keeps every other weight bit for bit and
    learns the mixer; a missing head or a part the head lacks is a one-line ConfigError naming the field."""
    from safetensors.torch import load_file

    from fusion_llm.config import ConfigError

    first = train(build_run_config(lm_tiny(tmp_path, train__max_steps=3, output_dir=str(tmp_path / "one"))))
    base = load_file(str(Path(first["output"]) / "model.safetensors"))

    def second(out="two", **changes):
        cfg = lm_tiny(tmp_path, train__max_steps=3, output_dir=str(tmp_path / out), **changes)
        cfg["model"]["head"]["source_predictions"] = True
        return build_run_config(cfg)

    lines = []
    summary = train(second(train__init_head=first["output"], train__train_only=["mixer"]), log=lines.append)
    assert any("new: mixer." in line for line in lines), lines
    after = load_file(str(Path(summary["output"]) / "model.safetensors"))
    assert set(after) == set(base) | {k for k in after if k.startswith("mixer.")}
    assert all(torch.equal(after[k], base[k]) for k in base)  # nothing but the mixer moved
    assert after["mixer.out.weight"].abs().sum() > 0  # zero-initialised, now trained

    with pytest.raises(ConfigError, match=r"^train.init_head: .*no saved fusion head"):
        train(second("three", train__init_head=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"^train.train_only: 'bogus' names no part of this head"):
        train(second("three", train__train_only=["bogus"]))
