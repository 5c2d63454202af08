"""Token-level fusion for language modelling: causal safety of the fused features across the four real
tokenizers, the untrained model is the anchor exactly, training beats the anchor, only the head trains."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_llm.alignment import (
    TAIL_COLUMNS,
    align_batch,
    align_source,
    causal_char_ends,
    pack_tails,
    prefix_tokens,
    tail_attention_mask,
)
from fusion_llm.data.pipeline import LMCollator
from fusion_llm.config import FusionConfig
from fusion_llm.modeling import FusionModel

SOURCES = ("llama", "gemma", "phi")


@pytest.fixture(scope="session")
def lm_model(standin_paths):
    """The four stand-ins unquantized (float32), so position-wise comparisons can be exact: bitsandbytes' CPU
    4-bit kernels add batch-shape-dependent noise of ~1e-3 in the logits, which would blur a leak test.
    Every source is loaded with its LM head, so the same backbones serve ``head.source_predictions``."""
    backbones = [
        dict(name="mistral", model=standin_paths["mistral"], tap_layers=[2, -1], compute_dtype="float32", anchor=True),
        dict(name="llama", model=standin_paths["llama3"], tap_layers=[2], compute_dtype="float32"),
        dict(name="gemma", model=standin_paths["gemma2"], tap_layers=[-1], compute_dtype="float32"),
        dict(name="phi", model=standin_paths["phi3"], tap_layers=[1, 3], compute_dtype="float32"),
    ]
    for b in backbones:
        b["quantization"] = "none"
    config = FusionConfig(backbones=backbones, shared_width=64, head={"kind": "lm", "source_predictions": True},
                          fusion={"method": "attention"})
    torch.manual_seed(0)
    loaded = FusionModel.from_config(config)
    plain = FusionConfig(**{**config.to_dict(), "head": {"kind": "lm"}})
    return FusionModel(plain, loaded.backbones)


def with_predictions(model, seed=0, scale=0.0):
    """The same backbones under a head that also mixes the sources' own predictions (``head.source_predictions``)."""
    config = FusionConfig(backbones=model.config.backbones, shared_width=64,
                          head={"kind": "lm", "source_predictions": True}, fusion={"method": "attention"})
    torch.manual_seed(seed)
    fused = FusionModel(config, model.backbones)
    if scale:
        with torch.no_grad():
            fused.head.residual.out.weight.normal_(0, scale)
            fused.head.mixer.out.weight.normal_(0, scale)
            fused.head.mixer.out.bias.normal_(0, scale)
    return fused


def batch_from(model, rows):
    """inputs/alignment for lm_forward from rows of `align_batch` columns, through the training collator."""
    collate = LMCollator("mistral", {n: b.tokenizer.pad_token_id or 0 for n, b in model.backbones.items()})
    batch = collate(rows)
    return batch["inputs"], batch["alignment"]


def encode(model, texts, tails=None):
    tails = model.config.head_spec.source_tails if tails is None else tails
    tokenizers = {n: model.backbones[n].tokenizer for n in SOURCES}
    al = align_batch(texts, model.anchor.tokenizer, tokenizers, tails=tails)
    return al, batch_from(model, [{k: v[i] for k, v in al.items()} for i in range(len(texts))])


def prefix_row(model, text: str, anchor_ids, offsets, tails: bool) -> dict:
    """The `align_batch` row of a prefix of a text, with the anchor tokens it has (no re-tokenization)."""
    row = {"input_ids": list(anchor_ids)}
    for name in SOURCES:
        ids, index, tail = align_source(text, offsets, model.backbones[name].tokenizer, tails=True)
        ids = ids[: max(max(index, default=-1) + 1, 1)] or [model.backbones[name].tokenizer.pad_token_id]
        if tails:
            packed = pack_tails(ids, index, tail)
            ids, index = packed["input_ids"], packed["align"]
            row.update({f"{name}_{c}": packed[c] for c in TAIL_COLUMNS})
        row[f"{name}_input_ids"], row[f"{name}_align"] = ids, index
    return row


PIECES = list("abcXYZ019 \t\n.,;:'\"()[]{}=+-_#éß中文😀🦙ا’—") + ["  ", "\n\n", "1234", "don't", "def ", "    "]
TEXT = st.lists(st.sampled_from(PIECES), min_size=1, max_size=14).map("".join)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=TEXT, tails=st.booleans(), predictions=st.booleans())
def test_fused_logits_at_t_depend_only_on_text_up_to_end_t(lm_model, text, tails, predictions):
    model = with_predictions(lm_model, scale=0.2) if predictions else lm_model
    with torch.no_grad():
        model.head.residual.out.weight.normal_(0, 0.2)  # make the sources matter
    al, (inputs, alignment) = encode(model, [text], tails=tails)
    full = model.lm_forward(inputs, alignment).logits[0]  # (T, V)
    offsets = al["offset_mapping"][0]
    ends = causal_char_ends(offsets, len(text))
    rows = [prefix_row(model, text[: int(ends[t])], al["input_ids"][0][: t + 1], offsets[: t + 1], tails)
            for t in range(len(al["input_ids"][0]))]
    inputs_p, alignment_p = batch_from(model, rows)
    prefix_logits = model.lm_forward(inputs_p, alignment_p).logits  # row t: the run on text[:end_t]
    # The test has power: hiding every source ("nothing yet" everywhere) changes the logits a lot.
    blind = model.lm_forward(inputs, {n: torch.full_like(a, -1) for n, a in alignment.items()}).logits[0]
    assert (blind - full).abs().max() > 0.05
    for t in range(len(rows)):
        # float rounding only: the mixed logits reach ~50 with predictions (a leak moves them by far more)
        torch.testing.assert_close(prefix_logits[t, t], full[t], rtol=0, atol=1e-4 if predictions else 1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_windowed_tails_equal_the_tails_of_the_whole_prefix(lm_model, text):
    """Tails are tokenized from the hard boundary before the cut (O(length)); ``verify=True`` re-tokenizes every
    whole prefix. Both give the same settled index and the same tail ids."""
    offsets = lm_model.anchor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    for name in SOURCES:
        tokenizer = lm_model.backbones[name].tokenizer
        assert (align_source(text, offsets, tokenizer, tails=True)
                == align_source(text, offsets, tokenizer, tails=True, verify=True)), name


def test_with_tails_a_source_sees_exactly_the_anchors_prefix(lm_model):
    """A packed source position's features equal the source run alone on its own tokenization of the prefix:
    no lag behind the anchor (without tails, the source's last settled token ends about a word earlier)."""
    text = "Shakespeare wrote sonnets; def f(x): return 12345 * x  # done"
    al, (inputs, _) = encode(lm_model, [text], tails=True)
    ends = causal_char_ends(al["offset_mapping"][0], len(text))
    for name in SOURCES:
        backbone = lm_model.backbones[name]
        src = inputs[name]
        packed = backbone.taps(src["input_ids"], tail_attention_mask(src["tail_group"], src["tail_ctx"]),
                               position_ids=src["position_ids"])[0][0]
        lagging = 0
        for t, end in enumerate(ends.tolist()):
            ids = prefix_tokens(backbone.tokenizer, text[:end])
            j = al[f"{name}_align"][0][t]
            assert (j < 0) == (not ids), (name, t)
            if not ids:
                continue
            alone = backbone.taps(torch.tensor([ids]))[0][0, -1]
            torch.testing.assert_close(packed[j], alone, rtol=0, atol=1e-4)
            settled = align_source(text[:end], al["offset_mapping"][0][: t + 1], backbone.tokenizer)[1][-1]
            lagging += settled + 1 < len(ids)
        assert lagging > len(ends) // 4, (name, lagging)  # the tails matter: often the settled token lags


def test_packed_tails_keep_the_sliding_window_past_it(lm_model):
    """Gemma-2's sliding-window layers (a 128-token window on the stand-in) get their own mask on packed tails:
    past the window, a packed position's features still equal Gemma-2 run alone on its tokenization of the prefix
    (which is what generation runs)."""
    text = " ".join(f"line {i}: the {['red', 'blue', 'green'][i % 3]} fox jumps over {i * 37} fences;"
                    for i in range(40))
    al, (inputs, _) = encode(lm_model, [text], tails=True)
    backbone, src = lm_model.backbones["gemma"], inputs["gemma"]
    window = backbone.model.config.sliding_window
    assert int(src["position_ids"].max()) > 2 * window  # the text runs well past the window
    packed = backbone.taps(src["input_ids"], tail_attention_mask(src["tail_group"], src["tail_ctx"]),
                           position_ids=src["position_ids"])[0][0]
    ends = causal_char_ends(al["offset_mapping"][0], len(text)).tolist()
    checked = 0
    for t in range(0, len(ends), 5):
        ids = prefix_tokens(backbone.tokenizer, text[:ends[t]])
        if len(ids) <= window:
            continue
        alone = backbone.taps(torch.tensor([ids]))[0][0, -1]
        torch.testing.assert_close(packed[al["gemma_align"][0][t]], alone, rtol=0, atol=1e-4)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_packed_tails_keep_a_window_every_layer_slides_in(lm_model, tmp_path, monkeypatch, family):
    """Mistral's and Phi-3's ``sliding_window`` applies to every layer (no ``layer_types``): a stand-in with a
    16-token window, as a source with packed tails, keeps it on every layer past the window; a packed position's
    features equal the stand-in run alone on its tokenization of the prefix. With the window dropped (one plain
    mask for every layer) they do not: the comparison can fail."""
    from fusion_llm.backbones import load_backbone
    from fusion_llm.config import BackboneSpec
    from fusion_llm.standins import build_standin

    window = 16
    folder = build_standin(family, tmp_path / family, sliding_window=window)
    backbone = load_backbone(BackboneSpec(name="window", model=str(folder), tap_layers=[-1], quantization="none",
                                          compute_dtype="float32"))
    config = backbone.model.config
    assert config.sliding_window == window and not getattr(config, "layer_types", None)
    text = " ".join(f"line {i}: the {['red', 'blue', 'green'][i % 3]} fox jumps over {i * 37} fences;"
                    for i in range(10))
    anchor = lm_model.anchor
    al = align_batch([text], anchor.tokenizer, {"window": backbone.tokenizer}, tails=True)
    collate = LMCollator(anchor.name, {anchor.name: anchor.tokenizer.pad_token_id or 0,
                                       "window": backbone.tokenizer.pad_token_id or 0})
    src = collate([{k: v[0] for k, v in al.items()}])["inputs"]["window"]
    assert int(src["position_ids"].max()) > 4 * window  # the text runs well past the window
    mask = tail_attention_mask(src["tail_group"], src["tail_ctx"])
    packed = backbone.taps(src["input_ids"], mask, position_ids=src["position_ids"])[0][0]
    with monkeypatch.context() as m:  # the window dropped: one plain mask for every layer
        m.setattr(backbone, "_packed_masks", lambda allowed, position_ids: backbone._custom_mask(allowed))
        unwindowed = backbone.taps(src["input_ids"], mask, position_ids=src["position_ids"])[0][0]
    ends = causal_char_ends(al["offset_mapping"][0], len(text)).tolist()
    checked = differs = 0
    for t in range(0, len(ends), 3):
        ids = prefix_tokens(backbone.tokenizer, text[:ends[t]])
        if len(ids) <= window:
            continue
        j = al["window_align"][0][t]
        alone = backbone.taps(torch.tensor([ids]))[0][0, -1]
        torch.testing.assert_close(packed[j], alone, rtol=0, atol=1e-4)
        differs += bool((unwindowed[j] - alone).abs().max() > 1e-2)
        checked += 1
    assert checked >= 10 and differs == checked, (checked, differs)


@pytest.mark.parametrize("predictions,residual_scale", [(False, "none"), (True, "none"), (False, "anchor_rms")],
                         ids=["hidden_states", "source_predictions", "rms_residual"])
def test_untrained_fused_model_is_the_anchor_exactly(lm_model, standin_paths, predictions, residual_scale):
    from transformers import AutoModelForCausalLM

    from fusion_llm.backbones import quantization_config

    config = FusionConfig(**{**lm_model.config.to_dict(), "fingerprints": None})
    fresh = FusionModel(FusionConfig(backbones=config.backbones, shared_width=64,
                                     head={"kind": "lm", "source_predictions": predictions,
                                           "residual_scale": residual_scale},
                                     fusion={"method": "gated"}), lm_model.backbones)
    _, (inputs, alignment) = encode(fresh, ["Hello world, 1234 cats!", "def f(x):\n    return x  # 中文 😀"])
    fused = fresh.lm_forward(inputs, alignment).logits
    anchor = AutoModelForCausalLM.from_pretrained(standin_paths["mistral"], dtype=torch.float32,
                                                  quantization_config=quantization_config(lm_model.anchor.spec))
    with torch.no_grad():
        expected = anchor(**inputs["mistral"]).logits
    mask = inputs["mistral"]["attention_mask"].bool()
    assert torch.equal(fused[mask], expected[mask])


@pytest.mark.parametrize("predictions", [False, True], ids=["hidden_states", "source_predictions"])
def test_training_lowers_the_loss_below_the_anchors_and_only_the_head_trains(lm_model, predictions):
    config = FusionConfig(backbones=lm_model.config.backbones, shared_width=64,
                          head={"kind": "lm", "source_predictions": predictions}, fusion={"method": "concat"})
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
    assert trainable == {"adapters", "fusion", "nothing", "residual"} | ({"mixer"} if predictions else set())
    if predictions:  # the mixer learned to use the sources' predictions
        assert model.head.mixer.out.weight.abs().sum() > 0


@pytest.mark.parametrize("predictions", [False, True], ids=["hidden_states", "source_predictions"])
def test_lm_head_save_load_identical_and_fingerprinted(lm_model, tmp_path, predictions):
    model = with_predictions(lm_model, scale=0.1) if predictions else lm_model
    _, (inputs, alignment) = encode(model, ["a small text to check", "another one"])
    expected = model.lm_forward(inputs, alignment).logits
    model.save_pretrained(tmp_path / "lm")
    again = FusionModel.from_pretrained(tmp_path / "lm", backbones=model.backbones)
    assert torch.equal(again.lm_forward(inputs, alignment).logits, expected)
    from safetensors import safe_open

    with safe_open(tmp_path / "lm" / "model.safetensors", "pt") as f:
        assert all(k.split(".")[0] in {"adapters", "fusion", "nothing", "residual", "mixer"} for k in f.keys())
        assert any(k.startswith("mixer.") for k in f.keys()) == predictions


@pytest.mark.parametrize("anchor", ["mistral", "gemma"], ids=["linear_output_layer", "soft_capped"])
def test_mixed_logits_equal_the_dense_log_linear_mix(lm_model, anchor):
    """`mixed_logits` scales the anchor's logits and adds the sparse corrections in place; values and gradients
    equal ``(1 + sum(mix)) * logits + sum_i mix_i * correction_i`` over dense corrections."""
    from fusion_llm.modeling import mixed_logits

    backbone = lm_model.backbones[anchor]
    size = backbone.lm_head.weight.shape[0]
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, backbone.spec.hidden_size, requires_grad=True)
    mix = (0.3 * torch.randn(2, 5, 3)).requires_grad_()
    dense, corrections = [], []
    for _ in range(2):
        keys = torch.randperm(10 * size)[:40]  # distinct entries of the flattened (B * T, V) logits
        values = torch.rand(40) * 5
        dense.append(torch.zeros(10 * size).index_put_((keys,), values).view(2, 5, size))
        corrections.append((keys, values))
    dense = torch.stack(dense, dim=2)
    got = mixed_logits(backbone.lm_logits(hidden), mix, corrections)
    want = ((1 + mix.sum(-1, keepdim=True)) * backbone.lm_logits(hidden)
            + torch.einsum("bts,btsv->btv", mix[..., 1:], dense))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum(), (hidden, mix))
    for g, w in zip(grads, torch.autograd.grad((want * weights).sum(), (hidden, mix))):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_nothing_vector_is_used_before_any_source_token_settles(lm_model):
    """Phi-3's tokenizer adds no BOS: its first anchor positions see the learned "nothing yet" vector."""
    for tails in (False, True):
        al, _ = encode(lm_model, ["Hello"], tails=tails)
        assert al["phi_align"][0][0] == -1
    al, _ = encode(lm_model, ["Hello world, again"], tails=False)
    assert np.all(np.diff(al["llama_align"][0]) >= 0)


def test_rms_scaled_residual_moves_the_logits_alike_at_any_hidden_scale(lm_model):
    """``head.residual_scale: anchor_rms``: the residual is in the units the anchor's final norm sees, so the same
    head output changes the logits the same way whether the anchor's hidden states are O(1) or O(1000) (real
    models: ~30 for SmolLM2-135M, ~1000 for Gemma-3-270M); a plain residual is drowned at the large scale."""
    from fusion_llm.modeling import add_residual

    anchor = lm_model.anchor
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, anchor.hidden_size)
    residual = 0.5 * torch.randn(2, 5, anchor.hidden_size)
    with torch.no_grad():
        base = anchor.lm_logits(hidden)
        for scale, expect_same in (("anchor_rms", True), ("none", False)):
            small = anchor.lm_logits(add_residual(hidden, residual, {"residual_scale": scale}))
            large = anchor.lm_logits(add_residual(1000 * hidden, residual, {"residual_scale": scale}))
            assert (small - base).abs().max() > 0.1  # the residual matters at the O(1) scale
            assert torch.allclose(small, large, atol=1e-3) == expect_same, scale
        assert torch.equal(add_residual(hidden, torch.zeros_like(hidden), {"residual_scale": "anchor_rms"}), hidden)


def test_source_top_k_sets_how_many_source_tokens_are_carried(lm_model):
    """``head.source_top_k``: each source's top-k at every aligned position has that many tokens, and the bridge
    carries all of them onto the anchor's vocabulary (more than the bridge's own default of 256 included)."""
    torch.manual_seed(0)
    source_last = {n: torch.randn(2, 6, lm_model.backbones[n].spec.hidden_size) for n in SOURCES}
    alignment = {n: torch.tensor([[-1, 0, 1, 3, 4, 5], [0, 0, 2, 2, 5, 5]]) for n in SOURCES}
    carried = {}
    for k in (8, 300):
        config = FusionConfig(backbones=lm_model.config.backbones, shared_width=64, fusion={"method": "attention"},
                              head={"kind": "lm", "source_predictions": True, "source_top_k": k})
        fused = FusionModel(config, lm_model.backbones)
        tops, _ = fused.source_predictions(source_last, alignment)
        for name, (top, ids, valid) in tops.items():
            assert top.shape == ids.shape == (12, k) and valid.tolist() == [False] + [True] * 11
        logits = torch.randn(2, 6, fused.anchor.lm_head.weight.shape[0])
        corrections = fused.source_corrections(tops, logits)
        for keys, values in corrections:  # every position that has a source token gets a correction, none other
            assert set((keys // logits.shape[-1]).tolist()) == set(range(1, 12)) and bool((values > 0).all())
        carried[k] = [len(keys) for keys, _ in corrections]
    assert all(many > few for few, many in zip(carried[8], carried[300]))  # more tokens carried, more entries


@pytest.mark.parametrize("predictions", [False, True], ids=["hidden_states", "source_predictions"])
def test_training_loss_without_logits_equals_the_loss_on_the_logits(lm_model, predictions):
    """`lm_forward(return_logits=False)` (what training calls) gives the same loss and head gradients."""
    model = with_predictions(lm_model, scale=0.05) if predictions else lm_model
    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"]
    _, (inputs, alignment) = encode(model, texts)
    grads = []
    for return_logits in (True, False):
        model.head.zero_grad()
        out = model.lm_forward(inputs, alignment, return_logits=return_logits)
        out.loss.backward()
        assert (out.logits is None) != return_logits
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.head.named_parameters()
                                          if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    model.head.zero_grad()
