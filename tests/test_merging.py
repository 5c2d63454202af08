"""fusion_llm.merging: mergekit's merges of tiny experts equal the hand-computed ones; refusals are mergekit's words."""

import pytest
import torch
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

from benchmarks.grokking.experts import expert_config, grokking_tokenizer, load_causal_lm, save_expert
from fusion_llm.merging import MergeRefused, merge_from_disk, merge_in_memory, merge_recipe


@pytest.fixture(scope="module")
def tiny_experts(tmp_path_factory):
    """A tiny shared base and two experts that differ from it (saved with the grokking tokenizer)."""
    root = tmp_path_factory.mktemp("experts")
    config = expert_config(hidden_size=64, num_layers=1, intermediate_size=128)
    folders, states = {}, {}
    for index, name in enumerate(("base", "a", "b")):
        torch.manual_seed(index)
        model = LlamaForCausalLM(config)
        folders[name] = save_expert(model, grokking_tokenizer(), root / name)
        states[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return folders, states


def _assert_close(merged: dict, expected: dict):
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_linear_in_memory_is_the_average(tiny_experts):
    _, states = tiny_experts
    merged = merge_in_memory({"a": states["a"], "b": states["b"]}, "linear")
    _assert_close(merged, {k: (states["a"][k] + states["b"][k]) / 2 for k in states["a"]})


def test_linear_weights_are_normalised(tiny_experts):
    _, states = tiny_experts
    merged = merge_in_memory({"a": states["a"], "b": states["b"]}, "linear", {"weight": [3.0, 1.0]})
    _assert_close(merged, {k: 0.75 * states["a"][k] + 0.25 * states["b"][k] for k in states["a"]})


def test_linear_from_disk_is_the_average_and_loads(tiny_experts, tmp_path):
    folders, states = tiny_experts
    recipe = merge_recipe({"a": folders["a"], "b": folders["b"]}, "linear")
    out = merge_from_disk(recipe, tmp_path / "merged")
    assert (out / "mergekit_config.yml").is_file() and (out / "tokenizer.json").is_file()
    merged = load_causal_lm(out).state_dict()
    _assert_close(merged, {k: (states["a"][k] + states["b"][k]) / 2 for k in states["a"]})


def test_task_arithmetic_adds_scaled_task_vectors(tiny_experts):
    _, states = tiny_experts
    base, a, b = states["base"], states["a"], states["b"]
    merged = merge_in_memory({"a": a, "b": b}, "task_arithmetic", {"weight": 0.5}, base=base)
    _assert_close(merged, {k: base[k] + 0.5 * (a[k] - base[k]) + 0.5 * (b[k] - base[k]) for k in base})


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_normalised_dare_moves_the_base_by_the_mean_task_vector(tiny_experts, method):
    """With every parameter kept (density 1), ``normalize`` divides the merged task vector by the summed weights (of
    the experts whose sign won, for dare_ties); without it the task vectors add up (mergekit's default for dare_*,
    which the grokking merge grids search beside the normalised merges)."""
    _, states = tiny_experts
    base, a, b = states["base"], states["a"], states["b"]
    experts = {"a": a, "b": b}
    normalised = merge_in_memory(experts, method, {"density": 1.0, "normalize": True}, base=base, seed=0)
    summed = merge_in_memory(experts, method, {"density": 1.0, "normalize": False}, base=base, seed=0)
    if method == "dare_linear":
        _assert_close(normalised, {k: base[k] + ((a[k] - base[k]) + (b[k] - base[k])) / 2 for k in base})
        _assert_close(summed, {k: base[k] + (a[k] - base[k]) + (b[k] - base[k]) for k in base})
    for k in base:  # elected signs: each kept entry is divided by how many experts kept it (1 or 2)
        if base[k].is_floating_point() and base[k].dim() > 0:
            delta_n, delta_s = normalised[k] - base[k], summed[k] - base[k]
            assert torch.all(delta_n.abs() <= delta_s.abs() + 1e-6), k
            assert torch.all(delta_n.abs().max() <= (torch.stack([a[k], b[k]]) - base[k]).abs().max() + 1e-6), k


def test_dare_is_reproducible_by_seed(tiny_experts):
    _, states = tiny_experts
    experts = {"a": states["a"], "b": states["b"]}
    first = merge_in_memory(experts, "dare_ties", {"density": 0.5}, base=states["base"], seed=3)
    again = merge_in_memory(experts, "dare_ties", {"density": 0.5}, base=states["base"], seed=3)
    other = merge_in_memory(experts, "dare_ties", {"density": 0.5}, base=states["base"], seed=4)
    _assert_close(first, again)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_method_and_base_are_checked(tiny_experts):
    _, states = tiny_experts
    with pytest.raises(ValueError, match="needs the shared base"):
        merge_in_memory({"a": states["a"]}, "ties")
    with pytest.raises(ValueError, match="known: linear"):
        merge_in_memory({"a": states["a"]}, "slerpy")


def test_mixed_architectures_are_refused_in_mergekits_words(tiny_experts, tmp_path):
    folders, _ = tiny_experts
    mistral = MistralForCausalLM(MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    mistral.save_pretrained(tmp_path / "mistral")
    recipe = merge_recipe({"a": folders["a"], "m": tmp_path / "mistral"}, "linear")
    with pytest.raises(MergeRefused, match="allow-crimes"):
        merge_from_disk(recipe, tmp_path / "out")
