"""Config validation: every shipped config loads; each bad value gives an error naming its field."""

from pathlib import Path

import pytest

from fusion_llm.budget import plan
from fusion_llm.config import ConfigError, FusionConfig
from fusion_llm.fusion import available_fusions
from fusion_llm.runconfig import load_run_config

ROOT = Path(__file__).resolve().parent.parent
LLAMA = str(ROOT / "configs/backbones/Meta-Llama-3-8B.json")
GEMMA = str(ROOT / "configs/backbones/gemma-2-2b.json")


def backbone(**kw):
    return {"name": "llama", "model": "meta-llama/Meta-Llama-3-8B", "config_path": LLAMA, "tap_layers": [16, -1], **kw}


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        run = load_run_config(path)
        assert run.fusion_config().backbones


def test_an_lm_head_on_a_labelled_task_is_refused(tmp_path):
    """An LM head learns to predict text: a labelled task (templated sentences) is refused with one line; the real
    four-model LM config trains on the text corpora, its classification sibling on topics."""
    lm = load_run_config(ROOT / "configs/fusion_4llm.yaml")
    assert lm.fusion_config().head_spec.kind == "lm" and lm.data.task is None
    assert lm.data.files["train"].endswith("text/mixture/train.jsonl")
    topics = load_run_config(ROOT / "configs/fusion_4llm_topics.yaml")
    assert topics.fusion_config().head_spec.kind == "classification" and topics.data.task == "topics"
    for task in ("topics", "x_plus_y"):
        with pytest.raises(ConfigError, match=r"^data.task: '.*' is a labelled task.*data.files"):
            load_run_config(ROOT / "configs/fusion_4llm.yaml", [f"--data.task={task}", "--data.files=null"])


def test_real_four_model_plan_is_within_8b():
    run = load_run_config(ROOT / "configs/fusion_4llm.yaml")
    result = plan(run.fusion_config(), batch_size=1, seq_len=512)
    assert result.within_budget
    assert 6.5e9 < result.total_bf16_equivalent < 8e9
    full = {b.name: b.total_params for b in result.backbones}
    assert abs(full["llama"] - 8.03e9) / 8.03e9 < 0.01  # Llama-3-8B as published
    assert abs(full["gemma"] - 2.61e9) / 2.61e9 < 0.01


def test_source_predictions_plan_counts_every_sources_lm_head():
    run = load_run_config(ROOT / "configs/fusion_4llm.yaml")
    config = run.fusion_config()
    base = plan(config, batch_size=1, seq_len=512)
    with_predictions = plan(FusionConfig(**{**config.to_dict(), "head": {**config.head, "source_predictions": True}}),
                            batch_size=1, seq_len=512)
    grown = {b.name: w.bf16_equivalent - b.bf16_equivalent for b, w in zip(base.backbones, with_predictions.backbones)}
    anchor = config.anchor_name
    assert grown[anchor] == 0 and all(v >= 0 for v in grown.values())  # a tied LM head (Gemma) adds nothing
    assert sum(v > 0 for n, v in grown.items() if n != anchor) >= 2
    assert with_predictions.within_budget  # the four real models with every LM head still fit the 8B limit


def test_truncation_shrinks_the_plan():
    deep = FusionConfig(backbones=[backbone(tap_layers=[-1])])
    half = FusionConfig(backbones=[backbone(tap_layers=[16])])
    assert plan(half).backbones[0].run_params < 0.6 * plan(deep).backbones[0].run_params
    assert plan(half).backbones[0].layers_run == 16


@pytest.mark.parametrize("kwargs, field", [
    ({"backbones": [backbone(tap_layers=[33])]}, "tap_layers"),
    ({"backbones": [backbone(tap_layers=[-34])]}, "tap_layers"),
    ({"backbones": [backbone(tap_layers=[])]}, "tap_layers"),
    ({"backbones": [backbone(quantization="nf3")]}, "quantization"),
    ({"backbones": [backbone(), backbone()]}, "duplicate"),
    ({"backbones": [backbone(), backbone(name="other")]}, "listed twice"),
    ({"backbones": [backbone(colour="red")]}, "unknown key"),
    ({"backbones": [backbone()], "shared_width": 0}, "shared_width"),
    ({"backbones": [backbone()], "shared_width": -4}, "shared_width"),
    ({"backbones": [backbone()], "fusion": {"method": "nope"}}, "fusion.method"),
    ({"backbones": [backbone()], "fusion": {"method": "concat", "hidden": 0}}, "fusion.hidden"),
    ({"backbones": [backbone()], "fusion": {"method": "weighted", "heads": 2}}, "unknown option"),
    ({"backbones": [backbone()], "adapter": {"kind": "huge"}}, "adapter.kind"),
    ({"backbones": [backbone()], "head": {"kind": "lm"}}, "anchor"),
    ({"backbones": [backbone()], "head": {"num_labels": 1}}, "head.num_labels"),
    ({"backbones": [backbone()], "head": {"residual_scale": "huge"}}, "head.residual_scale"),
    ({"backbones": [backbone()], "budget_limit": 0}, "budget_limit"),
    ({"backbones": [backbone()], "shared_widht": 64}, "unknown key"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FusionConfig(**kwargs)


def test_unknown_fusion_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        FusionConfig(backbones=[backbone()], fusion={"method": "nope"})
    for name in available_fusions():
        assert name in str(err.value)
    assert {"concat", "weighted", "gated", "attention"} <= set(available_fusions())


def test_negative_taps_resolve_against_the_full_depth():
    cfg = FusionConfig(backbones=[backbone(tap_layers=[0, 13, -1]), backbone(name="gemma", model="g", config_path=GEMMA,
                                                                                tap_layers=[-1])])
    specs = {s.name: s for s in cfg.backbone_specs}
    assert specs["llama"].resolved_taps() == [0, 13, 32]
    assert specs["gemma"].resolved_taps() == [26]


def test_config_round_trips_through_save_pretrained(tmp_path):
    cfg = FusionConfig(backbones=[backbone()], fusion={"method": "attention", "num_heads": 2}, shared_width=64)
    cfg.save_pretrained(tmp_path)
    again = FusionConfig.from_pretrained(tmp_path)
    assert again.backbones == cfg.backbones and again.fusion == cfg.fusion and again.shared_width == 64


def _sections():
    """Every dataclass section of a run config with the fields a user writes."""
    from fusion_llm.config import AdapterSpec, BackboneSpec, HeadSpec
    from fusion_llm.runconfig import DataConfig, TrainConfig

    filled = {"lora_modules", "num_hidden_layers", "hidden_size", "max_position_embeddings"}  # filled by the code
    return [(cls, where, name, hint) for cls, where in ((BackboneSpec, "backbones[0]"), (AdapterSpec, "adapter"),
                                                         (HeadSpec, "head"), (DataConfig, "data"), (TrainConfig, "train"))
            for name, hint in __import__("typing").get_type_hints(cls).items() if name not in filled]


def _wrong_value(hint) -> object:
    text = str(hint)
    if "dict" in text:
        return ["not", "a", "mapping"]
    if "list" in text:
        return "not a list"
    return {"not": "a scalar"} if "str" in text else "not a number" if ("int" in text or "float" in text) else 7


@pytest.mark.parametrize("cls, where, name, hint", _sections(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_field_of_the_wrong_type_is_named(cls, where, name, hint):
    """The whole schema, systematically: a value of the wrong type is one ConfigError naming section.field."""
    from fusion_llm.config import _from_dict

    base = {"name": "a", "model": "m"} if where.startswith("backbones") else {}
    with pytest.raises(ConfigError, match=rf"^{__import__('re').escape(where)}\.{name}(\[\d+\])?: expected "):
        _from_dict(cls, where, {**base, name: _wrong_value(hint)})


def _numeric(hint) -> bool:
    text = str(hint)
    return ("int" in text or "float" in text) and "list" not in text and "dict" not in text


@pytest.mark.parametrize("cls, where, name, hint", [s for s in _sections() if _numeric(s[3])],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_number_out_of_range_is_named(cls, where, name, hint):
    """The whole schema, systematically: no numeric field takes a negative value (every count, size, rate,
    probability and seed is >= 0), and each refusal is one ConfigError naming the field."""
    from fusion_llm.config import _from_dict

    base = {"name": "a", "model": "m"} if where.startswith("backbones") else {}
    field = "backbones['a']" if where.startswith("backbones") else where
    with pytest.raises(ConfigError, match=rf"^{__import__('re').escape(field)}\.{name}: "):
        _from_dict(cls, where, {**base, name: -1})


@pytest.mark.parametrize("cls, where, name", [(c, w, f.name) for c, w, *_ in {s[:2]: s for s in _sections()}.values()
                                              for f in __import__("dataclasses").fields(c)
                                              if f.default is f.default_factory is __import__("dataclasses").MISSING])
def test_every_missing_required_field_is_named(cls, where, name):
    from fusion_llm.config import _from_dict

    full = {"name": "a", "model": "m"}
    with pytest.raises(ConfigError, match=rf"^{__import__('re').escape(where)}\.{name}: missing; this field is "):
        _from_dict(cls, where, {k: v for k, v in full.items() if k != name})


def test_numbers_yaml_reads_as_strings_are_taken_and_non_finite_ones_refused(tmp_path):
    """``lr: 3e-4`` (YAML 1.1 reads it as a string) is the number a user meant; nan / inf are refused."""
    from fusion_llm.runconfig import build_run_config

    model = {"backbones": [backbone(anchor=True)], "head": {"kind": "lm"}}
    run = build_run_config({"model": model, "train": {"lr": "3e-4", "max_steps": 5.0}})
    assert run.train.lr == 3e-4 and run.train.max_steps == 5 and isinstance(run.train.max_steps, int)
    for bad, message in (({"lr": float("nan")}, "train.lr: expected a finite number"),
                         ({"lr": "inf"}, "train.lr: expected a finite number"),
                         ({"batch_size": 2.5}, "train.batch_size: expected an integer")):
        with pytest.raises(ConfigError, match=message):
            build_run_config({"model": model, "train": bad})
    with pytest.raises(ConfigError, match="model.backbones: empty"):
        build_run_config({"model": {"backbones": []}})
    with pytest.raises(ConfigError, match="shared_width: expected an integer"):
        build_run_config({"model": {**model, "shared_width": "wide"}})


# ---- budget: what loads is what is planned; over-budget and over-memory plans are refused before loading ----

def test_the_plan_counts_trainable_parameters_in_bf16_equivalents_and_the_depth_load_backbone_keeps():
    """An fp32 trainable parameter weighs two bf16 ones; a backbone tapped at its embeddings (layer 0) still keeps
    one decoder layer when loaded, and the plan says so."""
    from fusion_llm.backbones import loaded_depth

    config = FusionConfig(backbones=[backbone(tap_layers=[0]), {**backbone(name="gemma", model="google/gemma-2-2b",
                                                                          config_path=GEMMA), "tap_layers": [8]}])
    result = plan(config)
    assert result.total_bf16_equivalent == pytest.approx(
        sum(b.bf16_equivalent for b in result.backbones) + 2 * result.trainable_params)
    for spec, planned in zip(config.backbone_specs, result.backbones):
        assert planned.layers_run == loaded_depth(spec, with_lm_head=False)
    assert [b.layers_run for b in result.backbones] == [1, 8]


def test_a_loaded_standin_keeps_the_layers_its_plan_counts(standin_paths):
    from fusion_llm.backbones import load_backbone
    from fusion_llm.config import BackboneSpec

    for taps, with_head in (([0], False), ([2], False), ([2], True)):
        spec = BackboneSpec(name="m", model=standin_paths["mistral"], tap_layers=taps, quantization="none",
                            anchor=with_head)
        layers = load_backbone(spec, with_lm_head=with_head).model.get_decoder().layers
        planned = plan(FusionConfig(backbones=[spec.to_dict()], head={"kind": "lm"} if with_head else None))
        assert planned.backbones[0].layers_run == len(layers), (taps, with_head)


def test_a_hub_only_backbone_is_planned_from_its_config_json(monkeypatch):
    """No local folder or config_path: the plan fetches the model's config.json (never skips the backbone); when
    that cannot be had either, one line names the backbone and the fix."""
    import transformers

    import fusion_llm.config

    real = transformers.AutoConfig.from_pretrained
    asked = []

    def from_pretrained(model, *args, local_files_only=False, **kwargs):
        asked.append((model, local_files_only))
        if model == "someorg/llama-like" and not local_files_only:  # what the hub would serve
            return transformers.AutoConfig.for_model(**__import__("json").loads(Path(LLAMA).read_text()))
        return real(model, *args, local_files_only=True, **kwargs)

    monkeypatch.setattr(fusion_llm.config.AutoConfig, "from_pretrained", from_pretrained)
    config = FusionConfig(backbones=[{"name": "hub", "model": "someorg/llama-like", "tap_layers": [16]}])
    from fusion_llm.budget import check_budget

    result = check_budget(config)
    assert [b.name for b in result.backbones] == ["hub"] and result.backbones[0].layers_run == 16
    assert ("someorg/llama-like", False) in asked
    config = FusionConfig(backbones=[{"name": "gone", "model": "someorg/not-there", "tap_layers": [1]}])
    with pytest.raises(ConfigError, match=r"^backbones\['gone'\]: cannot read the config of 'someorg/not-there' .*"
                                          r"give a local directory or config_path"):
        check_budget(config)


def test_over_budget_is_one_line_on_stderr_and_the_table_on_stdout(tmp_path, capsys):
    from fusion_llm.training import main

    out = tmp_path / "run"
    config = str(ROOT / "configs/fusion_4llm.yaml")
    assert main(["--config", config, "--model.budget_limit", "1e9", "--output_dir", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("error: budget_limit: the plan needs 6.9") and "over the limit of 1.000B" in captured.err
    assert "| **total** |" in captured.out and "OVER budget" in captured.out
    assert not out.exists()  # refused before anything was written or loaded
    sys_argv = ["--config", config, "--model.budget_limit", "1e9"]
    plan_script = __import__("runpy").run_path(str(ROOT / "scripts/plan.py"))
    assert plan_script["main"](sys_argv) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "| **total** |" in captured.out


def test_a_plan_over_the_gpus_free_memory_is_refused_before_loading(monkeypatch):
    """Where the backbones go to GPUs, the memory estimate at the run's batch and length is compared with the
    free memory of those GPUs (here a GPU is simulated: this machine has none)."""
    import torch

    from fusion_llm.budget import BudgetError, check_budget, gpu_free_bytes

    free = {0: 16 * 2**30, 1: 30 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d], 80 * 2**30))
    config = load_run_config(ROOT / "configs/fusion_4llm.yaml").fusion_config()
    assert gpu_free_bytes(config) == free[0]  # every backbone on this process's GPU
    with pytest.raises(BudgetError, match=r"^device memory: the plan needs about 1\d\.\d GiB at batch 4 x 512 tokens "
                                          r"and the GPU\(s\) it goes to have 16\.0 GiB free; lower train.batch_size"):
        check_budget(config, 4, 512)
    assert check_budget(config, 1, 64).within_budget  # a smaller batch fits
    spread = FusionConfig(**{**config.to_dict(), "backbones": [
        {**b, "device_map": "auto" if i == 0 else f"cuda:{i % 2}"} for i, b in enumerate(config.to_dict()["backbones"])]})
    assert gpu_free_bytes(spread) == free[0] + free[1]
    assert check_budget(spread, 4, 512).within_budget
    on_cpu = FusionConfig(**{**config.to_dict(), "backbones": [
        {**b, "device_map": "cpu"} for b in config.to_dict()["backbones"]]})
    assert gpu_free_bytes(on_cpu) is None
