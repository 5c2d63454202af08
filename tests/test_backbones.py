"""Frozen backbones: 4-bit through from_pretrained, truncated to the deepest tap, taps equal the full model's."""

import bitsandbytes as bnb
import pytest
import torch

from fusion_llm.backbones import load_backbone
from fusion_llm.config import BackboneSpec, ConfigError
from fusion_llm.paths import FAMILIES


def test_standins_load_quantized_with_their_own_tokenizers(four_backbones):
    widths = set()
    for name, backbone in four_backbones.items():
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in backbone.model.modules()), name
        assert backbone.tokenizer.is_fast
        assert not any(p.requires_grad for p in backbone.model.parameters())
        assert not backbone.model.training
        widths.add(backbone.hidden_size)
        # every Linear of a stand-in has dimensions that are multiples of 64 (bitsandbytes on CPU)
        for m in backbone.model.modules():
            if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit)):
                assert m.in_features % 64 == 0 and m.out_features % 64 == 0
    assert len(widths) == 4  # one hidden size per family


def test_truncated_backbone_runs_only_k_layers_and_holds_nothing_above(standin_paths):
    spec = BackboneSpec(name="m", model=standin_paths["mistral"], tap_layers=[1, 2], compute_dtype="float32")
    backbone = load_backbone(spec)
    assert len(backbone.model.layers) == 2
    assert not any(".layers.2." in k or k.startswith("layers.2.") or ".layers.3." in k
                   for k in backbone.model.state_dict())
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in backbone.model.layers]
    enc = backbone.tokenize(["counting layer calls"])
    taps = backbone.taps(enc["input_ids"], enc["attention_mask"])
    for h in hooks:
        h.remove()
    assert len(calls) == 2
    assert [t.shape[-1] for t in taps] == [192, 192]


@pytest.mark.parametrize("family", FAMILIES)
def test_taps_equal_the_untruncated_models_hidden_states(standin_paths, family):
    full = load_backbone(BackboneSpec(name="f", model=standin_paths[family], tap_layers=[0, 2, -1],
                                      quantization="none", compute_dtype="float32"))
    cut = load_backbone(BackboneSpec(name="c", model=standin_paths[family], tap_layers=[2],
                                     quantization="none", compute_dtype="float32"))
    enc = full.tokenize(["The same text, twice.", "short"])
    full_taps = full.taps(enc["input_ids"], enc["attention_mask"])
    (cut_tap,) = cut.taps(enc["input_ids"], enc["attention_mask"])
    assert len(full.model.layers) == 4 and len(cut.model.layers) == 2
    torch.testing.assert_close(cut_tap, full_taps[1], rtol=0, atol=0)
    assert full_taps[0].shape == full_taps[2].shape


def test_tap_out_of_range_for_the_loaded_model(standin_paths):
    with pytest.raises(ConfigError, match="out of range for a 4-layer model"):
        BackboneSpec(name="m", model=standin_paths["mistral"], tap_layers=[5])


def test_missing_model_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        load_backbone(BackboneSpec(name="m", model=str(tmp_path / "nope"), tap_layers=[1], num_hidden_layers=4))


@pytest.mark.parametrize("change", ["drop", "extra"])
def test_a_checkpoint_that_does_not_fit_its_config_is_refused_naming_the_backbone(standin_paths, tmp_path, change):
    """A weight missing from the checkpoint (it would be newly initialised: a partly random frozen backbone) or one
    the model has no place for is refused with one line; the layers truncation leaves out are not a problem."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(standin_paths["mistral"], folder)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    if change == "drop":
        tensors.pop(next(k for k in tensors if ".layers.1.mlp.up_proj" in k))
    else:
        tensors["model.adapter.weight"] = torch.zeros(4)
    save_file(tensors, weights, metadata={"format": "pt"})
    spec = BackboneSpec(name="broken", model=str(folder), tap_layers=[2], quantization="none", compute_dtype="float32")
    with pytest.raises(ConfigError, match=r"backbones\['broken'\].*(newly initialised|no place for)"):
        load_backbone(spec)
    # truncated at layer 1 the dropped weight of layer 1 is still needed; above the deepest tap nothing is
    load_backbone(BackboneSpec(name="ok", model=standin_paths["mistral"], tap_layers=[1], compute_dtype="float32"))


def test_weights_fingerprint_covers_every_byte_and_is_memoised(standin_paths, tmp_path, monkeypatch):
    """A change anywhere in a weights file (here one byte in the middle) changes the fingerprint; a file is hashed
    once per (path, size, mtime)."""
    import hashlib
    import shutil

    from fusion_llm import backbones as B

    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(standin_paths["mistral"], tmp_path / "mistral")
    before = B.weights_fingerprint(str(folder))
    assert before.startswith(B.WEIGHTS_FINGERPRINT)
    weights = folder / "model.safetensors"
    calls = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(B.hashlib, "sha256", lambda *a: calls.append(1) or real_sha256(*a))
    assert B.weights_fingerprint(str(folder)) == before and len(calls) == 1  # the file's hash came from the memo
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert B.weights_fingerprint(str(folder)) != before  # same size, first and last 64 KiB unchanged


def test_a_hub_snapshot_file_is_fingerprinted_by_its_blob_name_without_reading_it(tmp_path):
    from fusion_llm.backbones import file_sha256

    sha = "ab" * 32
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / sha).write_bytes(b"not what the name says")  # never read: the hub recorded the sha256
    (tmp_path / "snapshots" / "c0ffee").mkdir(parents=True)
    link = tmp_path / "snapshots" / "c0ffee" / "model.safetensors"
    link.symlink_to(tmp_path / "blobs" / sha)
    assert file_sha256(link) == sha
