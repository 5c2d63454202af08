"""benchmarks/compare_merges.py: the micro preset runs end to end, writes its files and keys, and resumes."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.grokking.report import mean_stderr
from benchmarks.store import Store
from fusion_llm.data.grokking import TASKS
from fusion_llm.merging import MERGE_METHODS

from conftest import NEEDS_TOKENIZERS

ROOT = Path(__file__).resolve().parents[2]
SEED_FORMAT = ("final_train_loss_mean", "final_val_loss_mean", "final_train_acc_mean", "final_val_acc_mean",
               "step_val_acc_99_mean")
FUSIONS = ("concat", "weighted", "gated", "attention")


def _load_cli():
    from benchmarks import compare_merges

    return compare_merges


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run (and a second one over the same output folder, which must come from the cache)."""
    out = tmp_path_factory.mktemp("compare_merges")
    cli = _load_cli()
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--preset", "micro", "--track", "grokking", "--out", str(out)]) == 0
        first = json.loads((out / "results.json").read_text())
        assert cli.main(["--preset", "micro", "--track", "grokking", "--out", str(out)]) == 0
        second = json.loads((out / "results.json").read_text())
    finally:
        torch.set_num_threads(threads)
    return out, first, second


@NEEDS_TOKENIZERS
def test_micro_writes_results_table_and_plots(micro_run):
    out, results, _ = micro_run
    for name in ("results.json", "results.md", "val_acc_vs_step.png", "accuracy_by_method.png",
                 "accuracy_vs_inference.png", "accuracy_vs_training_compute.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| method | track | x+y |" in table and "merge ties" in table and "fusion attention" in table
    assert not list(out.glob(".*.tmp*")), "a temporary file was left behind"
    assert results["preset"] == "micro" and results["config"]["seeds"] == [0]


@NEEDS_TOKENIZERS
def test_every_method_reports_the_seed_format(micro_run):
    _, results, _ = micro_run
    methods = results["methods"]
    expected = (["base (union)", "scratch (union, head-sized)", "seed baseline"]
                + [f"expert {t}" for t in TASKS] + [f"merge {m}" for m in MERGE_METHODS]
                + [f"fusion {f}" for f in FUSIONS] + [f"families fusion {f}" for f in FUSIONS])
    for name in expected:
        method = methods[name]
        for key in SEED_FORMAT + ("normalized_acc_mean", "trainable_params_mean", "total_params_mean", "wall_s_mean",
                                  "inference_ms_per_1000_mean", "inference_peak_mib_mean"):
            assert key in method, (name, key)
        assert set(method["per_task"]) == set(TASKS)
        for task in TASKS:
            entry = method["per_task"][task]
            assert 0.0 <= entry["final_val_acc_mean"] <= 1.0 and entry["final_val_loss_mean"] > 0
            assert "normalized_acc_mean" in entry and "step_val_acc_99_mean" in entry
    # Merges do not train (no step counts); fusion heads do, on every task.
    assert all(methods["merge ties"]["per_task"][t]["step_val_acc_99_mean"] is None for t in TASKS)
    assert all(methods["fusion concat"]["per_task"][t]["step_val_acc_99_mean"] is not None for t in TASKS)
    # An expert is its own reference for normalized accuracy on its task.
    assert methods["expert x_plus_y"]["per_task"]["x_plus_y"]["normalized_acc_mean"] in (None, 1.0)
    # The head-sized control really is head-sized; fusion counts the frozen experts in its total.
    head = methods["fusion concat"]["trainable_params_mean"]
    assert abs(methods["scratch (union, head-sized)"]["trainable_params_mean"] - head) <= 0.05 * head
    assert methods["fusion concat"]["total_params_mean"] > head


@NEEDS_TOKENIZERS
def test_compute_is_counted_in_full(micro_run):
    """Every method's training FLOPs include what it is built from: a merge and a fusion head count the base and
    the four experts; an expert counts the base; the families' fusion counts the four family experts. Compute to
    0.99 replaces the head's update count in the baseline comparison."""
    _, results, _ = micro_run
    methods = results["methods"]
    base = methods["base (union)"]["train_flops_mean"]
    experts = [methods[f"expert {t}"]["train_flops_mean"] for t in TASKS]
    assert base > 0 and all(e > 0 for e in experts)
    assert all(methods[f"expert {t}"]["upstream_flops_mean"] == pytest.approx(base) for t in TASKS)
    for name in ("merge ties", "fusion concat"):
        method = methods[name]
        assert method["upstream_flops_mean"] == pytest.approx(base + sum(experts))
        assert method["total_train_flops_mean"] == pytest.approx(method["train_flops_mean"] + base + sum(experts))
        assert method["train_flops_mean"] > 0 and method["inference_flops_per_1000_mean"] > 0
    fusion = methods["fusion concat"]
    assert fusion["train_flops_mean"] > fusion["details"][0]["head_training_flops"] > 0  # + feature extraction
    families = [methods[f"family expert {f}"]["train_flops_mean"] for f in ("llama3", "mistral", "gemma2", "phi3")]
    assert methods["families fusion concat"]["upstream_flops_mean"] == pytest.approx(sum(families))
    for task in TASKS:  # compute to 0.99 (or all of it when never reached) includes the upstream
        assert fusion["per_task"][task]["train_flops_to_99_mean"] >= fusion["upstream_flops_mean"]
        assert methods["seed baseline"]["per_task"][task]["train_flops_to_99_mean"] > 0
    target = results["targets"]["fusion concat"]["compute_to_99_below_baseline_all_tasks"]
    assert set(target["per_task"]) == set(TASKS)
    table = (micro_run[0] / "results.md").read_text()
    assert "| fusion concat |" in table.split("## Total training compute to val acc > 0.99")[1]
    assert "+ experts FLOPs" in table


def test_fit_counts_the_flops_of_its_updates():
    """A linear layer's update on inputs that need no gradient is 4 x batch x in x out FLOPs (the forward product
    and the weight's gradient)."""
    from benchmarks.grokking.presets import UpdateSchedule
    from benchmarks.grokking.training import fit

    layer = torch.nn.Linear(32, 8, bias=False)
    x, y = torch.randn(100, 32), torch.randint(8, (100,))
    out = fit(layer, lambda rows: (layer(x[rows]), y[rows]), 100, UpdateSchedule(5, batch_size=16, warmup_updates=0),
              seed=0)
    assert out["flops_per_update"] == 4 * 16 * 32 * 8
    assert out["train_flops"] == 5 * out["flops_per_update"]


@NEEDS_TOKENIZERS
def test_merge_choices_and_refusal_are_recorded(micro_run):
    _, results, _ = micro_run
    for method in MERGE_METHODS:
        details = results["methods"][f"merge {method}"]["details"][0]
        assert details["chosen_on"] == "holdout slice of train"
        assert details["mergekit_recipe"]["merge_method"] == method
        assert len(details["candidates"]) >= 1
    refusal = results["mergekit_refusal"]
    assert "allow-crimes" in refusal["refused"]
    assert refusal["refused_with_allow_crimes"]  # mergekit fails again when told to try anyway
    assert set(results["targets"]) == {f"fusion {f}" for f in FUSIONS} | {f"families fusion {f}" for f in FUSIONS}


@NEEDS_TOKENIZERS
def test_second_run_resumes_from_the_cache(micro_run):
    _, first, second = micro_run
    # The first run trained the experts, family experts and seed baseline in two worker processes; this process
    # then read them from the cache (hits), and the base twice (a miss, then a hit).
    assert first["workers"] == 2 and first["cache"]["hits"] == 1 + len(TASKS) + 4 + len(TASKS)
    assert second["cache"]["misses"] == 0
    assert second["cache"]["hits"] == first["cache"]["hits"] + first["cache"]["misses"]
    gated = [run["methods"]["fusion gated"]["final_val_acc_mean"] for run in (first, second)]
    assert gated[0] == gated[1]


def test_lm_track_is_called_with_the_cache_and_workers_options(tmp_path, capsys, monkeypatch):
    cli = _load_cli()
    calls = []
    monkeypatch.setattr(cli.lm_track, "run_lm_track", lambda preset, out_dir, *, use_cache=True, workers=1:
                        calls.append((preset, out_dir, use_cache, workers)) or "ran")
    assert cli.run_lm("quick", tmp_path, use_cache=False) == "ran"
    assert calls == [("quick", tmp_path, False, 2)]  # alone, the LM track trains in a second process
    assert cli.run_lm("medium", tmp_path) is None  # a preset the LM track does not have: skipped, said so
    assert "has no preset 'medium'" in capsys.readouterr().out and len(calls) == 1


def test_parallel_lm_track_entry_survives_the_grokking_tracks_write(tmp_path):
    """--track all runs the LM track in a second process; whichever track writes results.json last, the
    finished file holds both (the grokking keys and the LM track's entry)."""
    import subprocess
    import sys

    cli = _load_cli()
    (tmp_path / "lm_results.json").write_text(json.dumps({"track": "lm", "entries": [1]}))
    (tmp_path / "lm_results.md").write_text("lm table\n")
    (tmp_path / "results.json").write_text(json.dumps({"track": "grokking", "methods": {}}))  # written last
    log = open(tmp_path / "lm_track.log", "w")
    process = subprocess.Popen([sys.executable, "-c", "pass"], stdout=log)
    assert cli.finish_lm_process((process, log, tmp_path / "lm_track.log"), tmp_path) == 0
    combined = json.loads((tmp_path / "results.json").read_text())
    assert combined["track"] == "grokking" and combined["lm_track"] == {"track": "lm", "entries": [1]}
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], stdout=open(tmp_path / "x", "w"))
    assert cli.finish_lm_process((failing, open(tmp_path / "y", "w"), tmp_path / "lm_track.log"), tmp_path) == 3


def test_store_is_keyed_by_recipe(tmp_path):
    store = Store(tmp_path, log=lambda *_: None)
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert store.stage("x", {"a": 1}, "x", compute) == {"value": 1}
    assert store.stage("x", {"a": 1}, "x", compute) == {"value": 1}
    assert store.stage("x", {"a": 2}, "x", compute) == {"value": 2}
    assert len(calls) == 2


def test_lm_stage_key_changes_with_the_library_code(tmp_path, monkeypatch):
    """A cached LM-track stage trained by other library code is not reused: the key holds a digest of the code."""
    import fusion_llm

    from benchmarks.lm import track as lm_track

    copy = tmp_path / "fusion_llm"
    (copy / "sub").mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (copy / "sub" / "m.py").write_text("x = 1\n")
    monkeypatch.setattr(fusion_llm, "__file__", str(copy / "__init__.py"))
    lm_track.code_digest.cache_clear()
    before = lm_track._key("fused", {"a": 1})
    assert lm_track._key("fused", {"a": 1}) == before and lm_track._key("fused", {"a": 2}) != before
    (copy / "sub" / "m.py").write_text("x = 2\n")
    lm_track.code_digest.cache_clear()
    assert lm_track._key("fused", {"a": 1}) != before
    lm_track.code_digest.cache_clear()


def test_mean_stderr():
    assert mean_stderr([1.0]) == (1.0, 0.0)
    mean, stderr = mean_stderr([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(stderr - (1.0 / 3**0.5)) < 1e-12
    assert mean_stderr([None]) == (None, None)


@pytest.mark.parametrize("name", ["micro", "quick", "full"])
def test_presets_search_every_merge_method(name):
    from mergekit.config import MergeConfiguration

    from benchmarks.grokking.track import expand_grid
    from benchmarks.grokking.presets import get_preset
    from fusion_llm.merging import merge_recipe

    preset = get_preset(name)
    assert set(preset.merge_grid) == set(MERGE_METHODS)
    for method, grid in preset.merge_grid.items():
        for parameters in expand_grid(grid):  # every candidate is a valid mergekit recipe
            base = None if method == "linear" else "base"
            MergeConfiguration.model_validate(merge_recipe({t: t for t in TASKS}, method, parameters, base=base))
    assert preset.seeds == ((0, 1, 2) if name == "full" else (0,))


def test_schedule_defaults_are_the_seeds_optimizer():
    from benchmarks.grokking.presets import UpdateSchedule

    seed = UpdateSchedule(100)
    assert (seed.learning_rate, seed.betas, seed.weight_decay, seed.warmup_updates, seed.cooldown_updates) == \
        (1e-3, (0.9, 0.98), 0.5, 50, 0)
    assert [seed.learning_rate_at(u) for u in (0, 25, 50, 99)] == [0.0, 5e-4, 1e-3, 1e-3]
    assert seed.describe() == "100 x 512"


def test_schedule_cooldown_decays_linearly_to_zero():
    from benchmarks.grokking.presets import UpdateSchedule

    s = UpdateSchedule(10, warmup_updates=0, learning_rate=1.0, cooldown_updates=4)
    rates = [s.learning_rate_at(u) for u in range(10)]
    assert rates[:6] == [1.0] * 6
    assert rates[6:] == pytest.approx([0.8, 0.6, 0.4, 0.2])  # never 0: every update moves
    assert "cooldown" in s.describe() and "lr 1.0" in s.describe()
    with pytest.raises(ValueError):
        UpdateSchedule(10, cooldown_updates=11)


def test_quick_experts_use_their_own_recipe_heads_a_cooldown_and_everything_else_the_seeds():
    from benchmarks.grokking.presets import UpdateSchedule, get_preset

    quick, seed = get_preset("quick"), UpdateSchedule(1)
    optimizer = lambda s: (s.learning_rate, s.betas, s.weight_decay, s.warmup_updates, s.cooldown_updates)
    assert optimizer(quick.expert) != optimizer(seed)
    for part in ("base", "scratch", "family"):
        assert optimizer(getattr(quick, part)) == optimizer(seed), part
    for part in ("head", "family_head"):  # the seed's optimizer plus a cooldown over the last fifth
        head = getattr(quick, part)
        assert optimizer(head)[:4] == optimizer(seed)[:4] and head.cooldown_updates == head.num_updates // 5, part
    assert quick.head_for("families") is quick.family_head and quick.head_for("homogeneous") is quick.head
    assert get_preset("full").head_for("families") is get_preset("full").head  # None: the shared schedule


def test_recipe_probe_scores_a_family_expert_on_the_holdout_only(capsys, monkeypatch):
    """`benchmarks.grokking.recipe_probe` trains a family stand-in and probes the holdout slice, never validation."""
    from benchmarks.grokking import recipe_probe
    from benchmarks.grokking.data import SplitData

    real_texts = SplitData.texts
    read = []
    monkeypatch.setattr(SplitData, "texts", property(lambda self: read.append(self) or real_texts.fget(self)))
    assert recipe_probe.main(["mistral", "x_minus_y", "--updates", "2", "--cooldown", "0"]) == 0
    out = capsys.readouterr().out
    assert "mistral on x_minus_y, 2 x 256" in out and "holdout acc 2:" in out and "first > 0.99 at None" in out
    assert len(read) == 2 and {len(s) for s in read} == {19139, 2125}  # train and holdout, not validation


@NEEDS_TOKENIZERS
def test_one_process_gives_the_same_results_as_two_workers(micro_run, tmp_path):
    """`--workers 1` trains every stage in this process; the records equal those of the two-worker run."""
    _, two, _ = micro_run
    cli = _load_cli()
    threads = torch.get_num_threads()
    try:
        assert cli.main(["--preset", "micro", "--track", "grokking", "--workers", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    one = json.loads((tmp_path / "results.json").read_text())
    assert one["workers"] == 1 and one["cache"]["hits"] == 0
    for name, method in two["methods"].items():
        for task, entry in method.get("per_task", {}).items():
            for key in ("final_val_acc_mean", "final_val_loss_mean", "step_val_acc_99_mean"):
                assert one["methods"][name]["per_task"][task][key] == entry[key], (name, task, key)
