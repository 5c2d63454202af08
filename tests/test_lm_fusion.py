"""Token-level fusion for language modelling: causal safety of the fused features across the four real
tokenizers, the untrained model is the anchor exactly, training beats the anchor, only the head trains."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_llm.alignment import align_batch, align_source, causal_char_ends
from fusion_llm.config import FusionConfig
from fusion_llm.modeling import FusionModel

SOURCES = ("llama", "gemma", "phi")


@pytest.fixture(scope="session")
def lm_model(standin_paths):
    """The four stand-ins unquantized (float32), so position-wise comparisons can be exact: bitsandbytes' CPU
    4-bit kernels add batch-shape-dependent noise of ~1e-3 in the logits, which would blur a leak test."""
    backbones = [
        dict(name="mistral", model=standin_paths["mistral"], tap_layers=[2, -1], compute_dtype="float32", anchor=True),
        dict(name="llama", model=standin_paths["llama3"], tap_layers=[2], compute_dtype="float32"),
        dict(name="gemma", model=standin_paths["gemma2"], tap_layers=[-1], compute_dtype="float32"),
        dict(name="phi", model=standin_paths["phi3"], tap_layers=[1, 3], compute_dtype="float32"),
    ]
    for b in backbones:
        b["quantization"] = "none"
    config = FusionConfig(backbones=backbones, shared_width=64, head={"kind": "lm"}, fusion={"method": "attention"})
    torch.manual_seed(0)
    return FusionModel.from_config(config)


def pad(seqs, value):
    length = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs])


def batch_from(model, anchor_ids, sources):
    """inputs/alignment for lm_forward from per-row anchor ids and {name: (ids rows, index rows)}."""
    inputs = {"mistral": {"input_ids": pad(anchor_ids, 0), "attention_mask": pad([[1] * len(s) for s in anchor_ids], 0)}}
    alignment = {}
    for name, (ids, index) in sources.items():
        pad_id = model.backbones[name].tokenizer.pad_token_id
        inputs[name] = {"input_ids": pad(ids, pad_id), "attention_mask": pad([[1] * len(s) for s in ids], 0)}
        alignment[name] = pad(index, -1)
    return inputs, alignment


def encode(model, texts):
    tokenizers = {n: model.backbones[n].tokenizer for n in SOURCES}
    al = align_batch(texts, model.anchor.tokenizer, tokenizers)
    return al, batch_from(model, al["input_ids"], {n: (al[f"{n}_input_ids"], al[f"{n}_align"]) for n in SOURCES})


PIECES = list("abcXYZ019 \t\n.,;:'\"()[]{}=+-_#éß中文😀🦙ا’—") + ["  ", "\n\n", "1234", "don't", "def ", "    "]
TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=14).map("".join)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=TEXT)
def test_fused_logits_at_t_depend_only_on_text_up_to_end_t(lm_model, text):
    model = lm_model
    with torch.no_grad():
        model.head.residual.out.weight.normal_(0, 0.2)  # make the sources matter
    al, (inputs, alignment) = encode(model, [text])
    full = model.lm_forward(inputs, alignment).logits[0]  # (T, V)
    offsets = al["offset_mapping"][0]
    ends = causal_char_ends(offsets, len(text))
    anchor_ids, per_source = [], {n: ([], []) for n in SOURCES}
    for t in range(len(al["input_ids"][0])):
        prefix = text[: int(ends[t])]
        anchor_ids.append(al["input_ids"][0][: t + 1])
        for name in SOURCES:
            ids, index = align_source(prefix, offsets[: t + 1], model.backbones[name].tokenizer)
            per_source[name][0].append(ids or [model.backbones[name].tokenizer.pad_token_id])
            per_source[name][1].append(index)
    inputs_p, alignment_p = batch_from(model, anchor_ids, per_source)
    prefix_logits = model.lm_forward(inputs_p, alignment_p).logits  # row t: the run on text[:end_t]
    # The test has power: hiding every source ("nothing yet" everywhere) changes the logits a lot.
    blind = model.lm_forward(inputs, {n: torch.full_like(a, -1) for n, a in alignment.items()}).logits[0]
    assert (blind - full).abs().max() > 0.05
    for t in range(len(anchor_ids)):
        torch.testing.assert_close(prefix_logits[t, t], full[t], rtol=0, atol=1e-5)


def test_untrained_fused_model_is_the_anchor_exactly(lm_model, standin_paths):
    from transformers import AutoModelForCausalLM

    from fusion_llm.backbones import quantization_config

    config = FusionConfig(**{**lm_model.config.to_dict(), "fingerprints": None})
    fresh = FusionModel(FusionConfig(backbones=config.backbones, shared_width=64, head={"kind": "lm"},
                                     fusion={"method": "gated"}), lm_model.backbones)
    _, (inputs, alignment) = encode(fresh, ["Hello world, 1234 cats!", "def f(x):\n    return x  # 中文 😀"])
    fused = fresh.lm_forward(inputs, alignment).logits
    anchor = AutoModelForCausalLM.from_pretrained(standin_paths["mistral"], dtype=torch.float32,
                                                  quantization_config=quantization_config(lm_model.anchor.spec))
    with torch.no_grad():
        expected = anchor(**inputs["mistral"]).logits
    mask = inputs["mistral"]["attention_mask"].bool()
    assert torch.equal(fused[mask], expected[mask])


def test_training_lowers_the_loss_below_the_anchors_and_only_the_head_trains(lm_model):
    config = FusionConfig(backbones=lm_model.config.backbones, shared_width=64, head={"kind": "lm"},
                          fusion={"method": "concat"})
    torch.manual_seed(1)
    model = FusionModel(config, lm_model.backbones)
    texts = ["The quick brown fox jumps over the lazy dog. " * 2, "def add(a, b):\n    return a + b\n" * 2]
    _, (inputs, alignment) = encode(model, texts)
    anchor = model.anchor
    lm_head_before = anchor.lm_head.weight.detach().clone()
    norm_before = anchor.final_norm.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.lm_forward(inputs, alignment).loss.item()  # = the anchor's loss (zero residual)
    for _ in range(12):
        loss = model.lm_forward(inputs, alignment).loss
        loss.backward()
        for backbone in model.backbones.values():
            assert all(p.grad is None for p in backbone.model.parameters())
        assert anchor.lm_head.weight.grad is None
        optimizer.step()
        optimizer.zero_grad()
    last = model.lm_forward(inputs, alignment).loss.item()
    assert last < first - 0.5, (first, last)
    assert torch.equal(anchor.lm_head.weight, lm_head_before) and torch.equal(anchor.final_norm.weight, norm_before)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "fusion", "nothing", "residual"}


def test_lm_head_save_load_identical_and_fingerprinted(lm_model, tmp_path):
    model = lm_model
    _, (inputs, alignment) = encode(model, ["a small text to check", "another one"])
    expected = model.lm_forward(inputs, alignment).logits
    model.save_pretrained(tmp_path / "lm")
    again = FusionModel.from_pretrained(tmp_path / "lm", backbones=model.backbones)
    assert torch.equal(again.lm_forward(inputs, alignment).logits, expected)
    from safetensors import safe_open

    with safe_open(tmp_path / "lm" / "model.safetensors", "pt") as f:
        assert all(k.split(".")[0] in {"adapters", "fusion", "nothing", "residual"} for k in f.keys())


def test_nothing_vector_is_used_before_any_source_token_settles(lm_model):
    """Phi-3's tokenizer adds no BOS: its first anchor positions see the learned "nothing yet" vector."""
    al, _ = encode(lm_model, ["Hello"])
    assert al["phi_align"][0][0] == -1
    assert np.all(np.diff(al["llama_align"][0]) >= 0)
