"""The four real backbone configurations (configs/backbones/*.json) build on the meta device.

They are the models' published config.json files; instantiated without weights they must
have the published parameter counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "backbones"

# file stem -> (model_type, causal-LM class, published parameter count). Exact counts from
# this build: 8_030_261_248, 7_248_023_552, 2_614_341_888, 3_821_079_552.
BACKBONES = {
    "Meta-Llama-3-8B": ("llama", "LlamaForCausalLM", 8.03e9),
    "Mistral-7B-v0.3": ("mistral", "MistralForCausalLM", 7.25e9),
    "gemma-2-2b": ("gemma2", "Gemma2ForCausalLM", 2.61e9),
    "Phi-3-mini-4k-instruct": ("phi3", "Phi3ForCausalLM", 3.82e9),
}
VOCAB = {"Meta-Llama-3-8B": 128256, "Mistral-7B-v0.3": 32768, "gemma-2-2b": 256000, "Phi-3-mini-4k-instruct": 32064}


def _load(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def test_exactly_the_four_configs():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.json")) == sorted(BACKBONES)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_real_config_builds_on_meta_with_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, cls_name, published = BACKBONES[name]
    raw = _load(name)
    assert raw["model_type"] == model_type and raw["architectures"] == [cls_name]
    assert raw["vocab_size"] == VOCAB[name]
    cfg = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == cls_name
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.01, f"{name}: {n:,} parameters, published {published:,.0f}"
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_real_config_loads_as_config_json(name, tmp_path):
    from transformers import AutoConfig, AutoModel

    shutil.copy(CONFIG_DIR / f"{name}.json", tmp_path / "config.json")
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    assert cfg.model_type == BACKBONES[name][0]
    with torch.device("meta"):
        base = AutoModel.from_config(cfg)  # what non-anchor backbones are loaded as
    assert base.get_input_embeddings().weight.shape == (VOCAB[name], cfg.hidden_size)
