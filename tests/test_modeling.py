"""FusionHead / FusionModel: frozen backbones, gradients only in the head, every fusion method learns,
save -> load -> identical outputs, head-only files, fingerprints."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fusion_llm.config import ConfigError, FusionConfig
from fusion_llm.fusion import available_fusions, build_fusion
from fusion_llm.modeling import FusionHead, FusionModel

from conftest import backbone_dicts


def frozen_snapshot(model):
    """Every tensor that defines a backbone's weights, read without calling state_dict().

    (bitsandbytes' CPU backend keeps 4-bit weights in its kernel's packed layout, and
    Linear4bit.state_dict() converts them back and forth, which re-quantizes the block scales:
    reading a state dict would itself change the model.)
    """
    out = {n: p.data.clone() for n, p in model.named_parameters()}
    out.update({n: b.clone() for n, b in model.named_buffers()})
    for n, m in model.named_modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            out[n + ".absmax"] = state.absmax.clone()
            if state.nested:
                out[n + ".nested_absmax"] = state.state2.absmax.clone()
    return out


def make_model(four_backbones, standin_paths, **kw):
    config = FusionConfig(backbones=backbone_dicts(standin_paths), shared_width=64, head={"num_labels": 4}, **kw)
    torch.manual_seed(0)
    return FusionModel(config, four_backbones)


@pytest.mark.parametrize("method", ["concat", "weighted", "gated", "attention"])
@pytest.mark.parametrize("lead", [(5,), (3, 7)])
def test_fusion_output_shapes(method, lead):
    fusion = build_fusion({"method": method}, num_inputs=6, width=32)
    assert fusion(torch.randn(*lead, 6, 32)).shape == (*lead, 32)


def test_only_the_head_trains_and_backbones_stay_bit_identical(four_backbones, standin_paths, topics_batches):
    model = make_model(four_backbones, standin_paths, fusion={"method": "attention"})
    before = {n: frozen_snapshot(b.model) for n, b in four_backbones.items()}
    head_params = sum(p.numel() for p in model.parameters())
    # 8 taps: LayerNorm + Linear(hidden, 64) each; attention fusion; Linear(64, 4)
    widths = {"llama": 256, "mistral": 192, "gemma": 128, "phi": 320}
    adapters = sum(2 * (2 * h + h * 64 + 64) for h in widths.values())
    attention = 64 + 8 * 64 + (3 * 64 * 64 + 3 * 64) + (64 * 64 + 64) + 2 * 64
    assert head_params == adapters + attention + (64 * 4 + 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, labels = topics_batches["train"]
    for _ in range(3):
        out = model(inputs=inputs, labels=labels)
        out.loss.backward()
        for backbone in four_backbones.values():
            assert all(p.grad is None for p in backbone.model.parameters())
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    for n, b in four_backbones.items():
        after = frozen_snapshot(b.model)
        assert before[n].keys() == after.keys()
        assert all(torch.equal(before[n][k], after[k]) for k in before[n]), n


@pytest.mark.parametrize("method", ["concat", "weighted", "gated", "attention"])
def test_every_fusion_method_lowers_the_loss(four_backbones, standin_paths, topics_batches, method):
    model = make_model(four_backbones, standin_paths, fusion={"method": method})
    inputs, labels = topics_batches["train"]
    features = model.features(inputs)  # the backbones are frozen: compute once
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(features=features, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_load_identical_outputs_and_head_only_files(four_backbones, standin_paths, topics_batches, tmp_path):
    model = make_model(four_backbones, standin_paths, fusion={"method": "gated"}, adapter={"kind": "lowrank", "rank": 16})
    inputs, _ = topics_batches["validation"]
    model.eval()
    expected = model(inputs=inputs).logits
    model.save_pretrained(tmp_path / "head")
    files = sorted(p.name for p in (tmp_path / "head").iterdir())
    assert files == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "head" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.split(".")[0] in {"adapters", "fusion", "classifier"} for k in keys), keys
    n_saved = sum(safe_open(tmp_path / "head" / "model.safetensors", "pt").get_tensor(k).numel() for k in keys)
    assert n_saved == sum(p.numel() for p in model.parameters())
    assert (tmp_path / "head" / "model.safetensors").stat().st_size < 4 * n_saved + 100_000
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert set(saved["fingerprints"]) == {"llama", "mistral", "gemma", "phi"}
    assert saved["backbones"][0]["quantization"] == "nf4" and saved["backbones"][0]["tap_layers"] == [2, -1]
    again = FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones)
    again.eval()
    assert torch.equal(again(inputs=inputs).logits, expected)
    # and from the paths in the config alone (backbones reloaded)
    reloaded = FusionModel.from_pretrained(tmp_path / "head")
    reloaded.eval()
    torch.testing.assert_close(reloaded(inputs=inputs).logits, expected)


def test_automodel_loads_the_head(four_backbones, standin_paths, tmp_path):
    from transformers import AutoConfig, AutoModel

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "h")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "h"), FusionConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "h"), FusionHead)


def test_fingerprint_mismatch_is_refused(four_backbones, standin_paths, tmp_path):
    from fusion_llm.backbones import load_backbone
    from fusion_llm.standins import build_standin

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    other = build_standin("mistral", tmp_path / "mistral_seed1", seed=1)  # same config, other weights
    swapped = dict(four_backbones)
    spec = four_backbones["mistral"].spec
    swapped["mistral"] = load_backbone(type(spec)(**{**spec.to_dict(), "model": str(other)}))
    with pytest.raises(ConfigError, match="backbone 'mistral'.*weights"):
        FusionModel.from_pretrained(tmp_path / "head", backbones=swapped)


def test_weights_that_cannot_be_fingerprinted_are_refused_unless_asked(four_backbones, standin_paths, tmp_path,
                                                                         caplog):
    import dataclasses

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    unknown = dict(four_backbones)
    llama = four_backbones["llama"]
    unknown["llama"] = dataclasses.replace(llama, fingerprint={**llama.fingerprint, "weights": None})
    with pytest.raises(ConfigError, match="backbone 'llama': its weights cannot be fingerprinted.*verify_weights=False"):
        FusionModel.from_pretrained(tmp_path / "head", backbones=unknown)
    FusionModel.from_pretrained(tmp_path / "head", backbones=unknown, verify_weights=False)
    # a head saved before weights were fingerprinted in full: loads, and says the weights are not verified
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    config["fingerprints"]["llama"]["weights"] = "0123456789abcdef"
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones)
    assert "older fusion_llm" in caplog.text


def test_a_head_saved_without_a_weights_fingerprint_is_refused_unless_asked(four_backbones, standin_paths,
                                                                            tmp_path, caplog):
    """Weights that could not be fingerprinted at save: the save says so in one warning line (once per model), and
    the head is refused at load, whichever backbone it meets, unless ``verify_weights=False``."""
    import dataclasses

    llama = four_backbones["llama"]
    unknown = {**four_backbones,
               "llama": dataclasses.replace(llama, fingerprint={**llama.fingerprint, "weights": None})}
    config = FusionConfig(backbones=backbone_dicts(standin_paths), shared_width=64, head={"num_labels": 4})
    model = FusionModel(config, unknown)
    with caplog.at_level("WARNING", logger="fusion_llm.modeling"):
        model.save_pretrained(tmp_path / "head")
        model.save_pretrained(tmp_path / "head")  # training saves many times: one line, not one per save
    warned = [r.getMessage() for r in caplog.records if r.name == "fusion_llm.modeling"]
    assert len(warned) == 1 and "backbone 'llama': its weights cannot be fingerprinted" in warned[0], warned
    assert "--unverified-weights" in warned[0] and "\n" not in warned[0]
    saved = json.loads((tmp_path / "head" / "config.json").read_text())["fingerprints"]
    assert saved["llama"]["weights"] is None and saved["mistral"]["weights"]
    for backbones in (four_backbones, unknown):  # the real weights do not make it checkable either
        with pytest.raises(ConfigError, match="backbone 'llama': the head was saved without a fingerprint of its "
                                              "weights.*verify_weights=False.*--unverified-weights") as err:
            FusionModel.from_pretrained(tmp_path / "head", backbones=backbones)
        assert "\n" not in str(err.value)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fusion_llm.modeling"):
        FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones, verify_weights=False)
    assert "backbone 'llama': weights not verified" in caplog.text


@pytest.mark.parametrize("damage", ["one backbone", "all backbones"])
def test_a_head_without_a_backbones_fingerprints_is_refused_unless_asked(four_backbones, standin_paths, tmp_path,
                                                                          caplog, damage):
    """A saved head whose config holds no fingerprints for a backbone (an edited or foreign config.json) cannot
    check it: refused, naming the backbone and the way to load anyway."""
    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    path = tmp_path / "head" / "config.json"
    config = json.loads(path.read_text())
    if damage == "one backbone":
        del config["fingerprints"]["gemma"]
    else:
        del config["fingerprints"]
    path.write_text(json.dumps(config))
    name = "gemma" if damage == "one backbone" else "llama"  # the first backbone it cannot check
    with pytest.raises(ConfigError, match=f"backbone '{name}': the head was saved without its fingerprints"
                                          ".*verify_weights=False") as err:
        FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones)
    assert "\n" not in str(err.value)
    with caplog.at_level("WARNING", logger="fusion_llm.modeling"):
        loaded = FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones, verify_weights=False)
    assert f"backbone '{name}': not verified" in caplog.text
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("field, value", [("quantization", "none"), ("compute_dtype", "bfloat16"),
                                          ("tap_layers", [1, -1])])
def test_a_head_is_refused_on_a_backbone_loaded_otherwise(four_backbones, standin_paths, tmp_path, field, value):
    """Quantization, compute dtype and tap layers are part of a head's identity: a head trained on nf4 backbones
    does not load silently onto float ones, nor onto other taps."""
    import dataclasses

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    swapped = dict(four_backbones)
    swapped["llama"] = dataclasses.replace(four_backbones["llama"],
                                           spec=dataclasses.replace(four_backbones["llama"].spec, **{field: value}))
    with pytest.raises(ConfigError, match=f"backbone 'llama': loaded with {field}"):
        FusionModel.from_pretrained(tmp_path / "head", backbones=swapped)
    FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones)  # as trained: loads


def test_save_is_atomic_over_an_existing_head(four_backbones, standin_paths, tmp_path, monkeypatch):
    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    before = (tmp_path / "head" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(FusionHead, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        model.save_pretrained(tmp_path / "head")
    assert (tmp_path / "head" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_a_failed_final_rename_puts_the_old_head_back(four_backbones, standin_paths, tmp_path, monkeypatch):
    from fusion_llm import paths

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    before = (tmp_path / "head" / "model.safetensors").read_bytes()
    replace = paths.os.replace

    def failing(source, target):  # the new head's move into place fails (say, a full disk on a network mount)
        if Path(source).name.startswith(".head-"):
            raise OSError("rename failed")
        return replace(source, target)

    monkeypatch.setattr(paths.os, "replace", failing)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "head")
    assert (tmp_path / "head" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_every_registered_fusion_is_covered():
    assert set(available_fusions()) == {"concat", "weighted", "gated", "attention"}


def test_feature_cache_key_names_model_id_revision_and_code_version(four_backbones, standin_paths, monkeypatch):
    import dataclasses

    from fusion_llm import features

    model = make_model(four_backbones, standin_paths)
    key = features.cache_key(model, "data")
    assert features.cache_key(model, "data") == key and features.cache_key(model, "other data") != key
    llama = four_backbones["llama"]
    for change in ({"revision": "v2"}, {"model": "org/llama-copy"}):
        moved = {**four_backbones, "llama": dataclasses.replace(llama, spec=dataclasses.replace(llama.spec, **change))}
        assert features.cache_key(type(model)(model.config, moved), "data") != key, change
    monkeypatch.setattr(features, "FEATURES_VERSION", features.FEATURES_VERSION + 1)
    assert features.cache_key(model, "data") != key


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors: not a readable safetensors file"),
    ("delete", "model.safetensors: missing"),
    ("nan", "model.safetensors: tensor .* holds NaN"),
    ("config", "config.json: not a readable head config"),
])
def test_a_damaged_head_is_one_line_naming_the_file(four_backbones, standin_paths, tmp_path, capsys, damage, message):
    from safetensors.torch import load_file, save_file

    model = make_model(four_backbones, standin_paths)
    model.save_pretrained(tmp_path / "head")
    weights, config = tmp_path / "head" / "model.safetensors", tmp_path / "head" / "config.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "delete":
        weights.unlink()
    elif damage == "nan":
        tensors = load_file(weights)
        first = sorted(tensors)[0]
        tensors[first][0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        config.write_text(config.read_text()[:-20])
    with pytest.raises(ConfigError, match=message) as err:
        FusionModel.from_pretrained(tmp_path / "head", backbones=four_backbones)
    assert "\n" not in str(err.value)
    # the script: exit 2 and one line naming the damaged file, before any backbone loads
    capsys.readouterr()  # what saving printed
    assert check_head_script().main([str(tmp_path / "head")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    damaged = config if damage == "config" else weights
    assert len(lines) == 1 and lines[0].startswith(f"error: {damaged}: "), lines
    assert re.search(message, lines[0]), lines


def check_head_script():
    """``scripts/check_head.py`` as a module (scripts are not a package)."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "check_head.py"
    spec = importlib.util.spec_from_file_location("check_head_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_backbone_is_placed_where_its_device_map_says(standin_paths, monkeypatch):
    """Per-backbone placement: a backbone's own ``device_map`` wins over the run's (under accelerate, the process's
    GPU); the others take the run's. A bad value is one line naming the field."""
    from fusion_llm import modeling

    dicts = backbone_dicts(standin_paths)
    dicts[0]["device_map"], dicts[1]["device_map"] = "cpu", {"": "cpu"}
    config = FusionConfig(backbones=dicts, shared_width=64, head={"num_labels": 4})
    placed = {}
    monkeypatch.setattr(modeling, "load_backbone", lambda spec, **kw: placed.setdefault(spec.name, kw["device_map"]))
    FusionModel.load_backbones(config, device_map={"": 0})
    names = [d["name"] for d in dicts]
    assert placed == {names[0]: "cpu", names[1]: {"": "cpu"}, names[2]: {"": 0}, names[3]: {"": 0}}
    saved = FusionConfig(**config.to_dict())  # the placement travels with a saved head's config
    assert [s.device_map for s in saved.backbone_specs] == ["cpu", {"": "cpu"}, None, None]
    with pytest.raises(ConfigError, match=r"backbones\[.*\]\.device_map: expected 'auto'"):
        FusionConfig(backbones=[{**dicts[2], "device_map": "gpu0"}], shared_width=64, head={"num_labels": 4})


def test_a_backbone_loads_on_the_device_its_device_map_names(standin_paths):
    from fusion_llm.config import BackboneSpec

    spec = BackboneSpec(name="phi", model=standin_paths["phi3"], tap_layers=[2], quantization="none",
                        compute_dtype="float32", device_map="cpu")
    backbone = FusionModel.load_backbones(FusionConfig(backbones=[spec.to_dict()], shared_width=32,
                                                       head={"num_labels": 2}))["phi"]
    assert backbone.device.type == "cpu"
