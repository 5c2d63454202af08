"""generate(): greedy decoding equals the step-by-step argmax of the full fused forward on the same text
(KV cache, left padding and per-step re-alignment included), an untrained head generates exactly what
the anchor generates alone, and sampling / stop tokens behave. Also: an untrained fused model scores
the anchor's bits/byte exactly (the metric goes through the same fused path)."""

import pytest
import torch

from fusion_llm.alignment import align_source, pack_tails
from fusion_llm.generation import generate, text_and_offsets

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Whan that Aprille with his shoures soote, the droghte"]


def lm_config(paths, tails=True, predictions=False, residual_scale="none"):
    from fusion_llm.config import FusionConfig

    names = {"llama3": "llama", "mistral": "mistral", "gemma2": "gemma", "phi3": "phi"}
    backbones = [{"name": names[f], "model": paths[f], "tap_layers": [2, -1], "compute_dtype": "float32",
                      "anchor": (f == "mistral")} for f in ("mistral", "llama3", "gemma2", "phi3")]
    return FusionConfig(backbones=backbones, shared_width=64, fusion={"method": "concat", "hidden": 128},
                        head={"kind": "lm", "source_tails": tails, "source_predictions": predictions,
                              "residual_scale": residual_scale})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def lm_backbones(standin_paths):
    from fusion_llm.modeling import FusionModel

    return FusionModel.load_backbones(lm_config(standin_paths, predictions=True))  # every source with its LM head


def fused_model(standin_paths, lm_backbones, scale=None, tails=True, predictions=False, residual_scale="none"):
    """A fused LM over the stand-ins; ``scale`` randomises the head so the sources change the logits."""
    from fusion_llm.modeling import FusionModel

    model = FusionModel(lm_config(standin_paths, tails, predictions, residual_scale), lm_backbones)
    if scale is not None:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.head.parameters():
                p.normal_(0.0, scale)
    return model


def full_forward_argmax(model, prompt: str, new_ids: list[int]) -> int:
    """Next anchor token by argmax of `FusionModel.lm_forward` on the whole text (no cache, no padding)."""
    anchor = model.anchor
    enc = anchor.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    text, offsets = text_and_offsets(anchor.tokenizer, prompt, enc["offset_mapping"], enc["input_ids"], new_ids)
    anchor_ids = torch.tensor([enc["input_ids"] + new_ids])
    inputs = {anchor.name: {"input_ids": anchor_ids, "attention_mask": torch.ones_like(anchor_ids)}}
    alignment = {}
    for name, backbone in model.backbones.items():
        if name == anchor.name:
            continue
        ids, index, tails = align_source(text, offsets, backbone.tokenizer, tails=True)
        ids = ids[: max(max(index) + 1, 1)]
        if model.config.head_spec.source_tails:
            packed = pack_tails(ids, index, tails)
            ids, index = packed["input_ids"], packed["align"]
            inputs[name] = {"tail_group": torch.tensor([packed["tail_group"]]), "tail_ctx": torch.tensor([packed["tail_ctx"]]),
                            "position_ids": torch.tensor([packed["position_ids"]])}
        else:
            inputs[name] = {"attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        inputs[name]["input_ids"] = torch.tensor([ids])
        alignment[name] = torch.tensor([index])
    with torch.no_grad():
        logits = model.lm_forward(inputs, alignment).logits
    return int(logits[0, -1].argmax())


@pytest.mark.parametrize("tails,predictions,residual_scale",
                         [(True, False, "none"), (False, False, "anchor_rms"), (True, True, "none")],
                         ids=["source_tails", "settled_only_rms_residual", "source_predictions"])
def test_greedy_equals_stepwise_argmax_of_the_full_fused_forward(standin_paths, lm_backbones, tails, predictions,
                                                                  residual_scale):
    model = fused_model(standin_paths, lm_backbones, scale=0.3, tails=tails, predictions=predictions,
                        residual_scale=residual_scale)
    out = generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[])
    assert out.sequences.shape == (len(PROMPTS), out.sequences.shape[1])
    for prompt, new_ids in zip(PROMPTS, out.new_tokens):
        assert len(new_ids) == 6
        for k in range(len(new_ids)):
            assert full_forward_argmax(model, prompt, new_ids[:k]) == new_ids[k], (prompt, k)
    # the sources matter here: the anchor alone would have generated something else
    plain = generate(fused_model(standin_paths, lm_backbones), PROMPTS, max_new_tokens=6, stop_tokens=[])
    assert plain.new_tokens != out.new_tokens
    assert out.timings["source_runs"] > 0 and out.timings["generated_tokens"] == 6 * len(PROMPTS)


@pytest.mark.parametrize("predictions", [False, True], ids=["hidden_states", "source_predictions"])
def test_untrained_head_generates_what_the_anchor_generates_alone(standin_paths, lm_backbones, predictions):
    from transformers import AutoModelForCausalLM

    from fusion_llm.backbones import quantization_config

    model = fused_model(standin_paths, lm_backbones, predictions=predictions)
    out = generate(model, PROMPTS, max_new_tokens=8)
    anchor = model.anchor
    reference = AutoModelForCausalLM.from_pretrained(anchor.spec.model, dtype=torch.float32,
                                                     quantization_config=quantization_config(anchor.spec))
    tokenizer = anchor.tokenizer
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        ref = reference.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
    width = enc["input_ids"].shape[1]
    for i, new_ids in enumerate(out.new_tokens):
        expected = ref[i, width:].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id) + 1]
        assert new_ids == expected
    assert torch.equal(out.sequences[:, :width], enc["input_ids"])


def test_sampling_is_seeded_and_top_k_1_is_greedy(standin_paths, lm_backbones):
    model = fused_model(standin_paths, lm_backbones, scale=0.3)
    greedy = generate(model, PROMPTS[:2], max_new_tokens=4, stop_tokens=[])
    top1 = generate(model, PROMPTS[:2], max_new_tokens=4, do_sample=True, top_k=1, seed=1, stop_tokens=[])
    assert top1.new_tokens == greedy.new_tokens
    a = generate(model, PROMPTS[:2], max_new_tokens=4, do_sample=True, temperature=1.5, seed=7, stop_tokens=[])
    b = generate(model, PROMPTS[:2], max_new_tokens=4, do_sample=True, temperature=1.5, seed=7, stop_tokens=[])
    c = generate(model, PROMPTS[:2], max_new_tokens=4, do_sample=True, temperature=1.5, seed=8, stop_tokens=[])
    assert a.new_tokens == b.new_tokens != c.new_tokens


def test_a_stop_token_ends_that_prompt_only(standin_paths, lm_backbones):
    model = fused_model(standin_paths, lm_backbones, scale=0.3)
    free = generate(model, PROMPTS, max_new_tokens=5, stop_tokens=[])
    stop = free.new_tokens[0][1]  # a token the first prompt generates second (or earlier)
    out = generate(model, PROMPTS, max_new_tokens=5, stop_tokens=[stop])
    for mine, theirs in zip(out.new_tokens, free.new_tokens):
        cut = theirs.index(stop) + 1 if stop in theirs else len(theirs)
        assert mine == theirs[:cut]
    assert len(out.new_tokens[0]) <= 2
    width = out.sequences.shape[1] - max(len(x) for x in out.new_tokens)
    first = out.new_tokens[0]
    assert out.sequences[0, width: width + len(first)].tolist() == first
    assert (out.sequences[0, width + len(first):] == model.anchor.tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="single token"):
        generate(model, PROMPTS, max_new_tokens=1, stop_tokens=["not one token at all"])
    assert model.generate(PROMPTS[0], max_new_tokens=3, stop_tokens=[]).new_tokens == [free.new_tokens[0][:3]]


def test_untrained_fused_model_scores_the_anchors_bits_per_byte(standin_paths, lm_backbones):
    from fusion_llm.scoring import backbone_logits_fn, score_causal_lm, score_fused

    texts = [p + " and then some more words." for p in PROMPTS]
    model = fused_model(standin_paths, lm_backbones)
    fused = score_fused(model, texts, batch_size=2)
    alone = score_causal_lm(backbone_logits_fn(model.anchor), model.anchor.tokenizer, texts, batch_size=2)
    assert (fused.tokens, fused.bytes) == (alone.tokens, alone.bytes)
    assert fused.bits_per_byte == pytest.approx(alone.bits_per_byte, rel=1e-5)
    trained = score_fused(fused_model(standin_paths, lm_backbones, scale=0.3), texts, batch_size=2)
    assert trained.bits_per_byte != pytest.approx(alone.bits_per_byte, rel=1e-3)


@pytest.mark.parametrize("tails", [True, False], ids=["source_tails", "settled_only"])
def test_source_kv_caches_give_the_features_of_a_full_run_past_the_sliding_window(standin_paths, lm_backbones, tails):
    """Each source's KV cache, cropped to the prefix its new token sequence shares with it, gives at every step the
    taps a run over its whole tokenization of the prefix gives; past Gemma-2's sliding window (128 tokens on the
    stand-in) too, while each step runs a few tokens only."""
    from fusion_llm.alignment import causal_char_ends, settled_split
    from fusion_llm.generation import _SourceFeatures

    model = fused_model(standin_paths, lm_backbones, tails=tails, predictions=True)
    text = " ".join(f"Verse {i}: the droghte of March hath perced to the roote, 12345 times." for i in range(11))
    anchor = model.anchor
    offsets = [tuple(o) for o in anchor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
    sources = _SourceFeatures(model, 1)
    checked = 0
    for t in range(1, len(offsets)):
        end = offsets[t][1]
        feats = sources.at_last_position([0], {0: text[:end]}, {0: offsets[: t + 1]})
        if t % 15 and t != len(offsets) - 1:
            continue
        for name, backbone in sources.sources.items():
            seq, settled = settled_split(text[: int(causal_char_ends(offsets[: t + 1], end)[-1])], backbone.tokenizer)
            seq = seq if tails else seq[:settled]
            taps, index = feats[name]
            assert int(index) == (0 if seq else -1)
            if not seq:
                continue
            want = backbone.taps(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long),
                                 layers=sources._layers(backbone))
            for got, ref in zip(taps, want):
                ref = ref[0, -1]
                # 4-bit kernels depend on the batch shape: ~1e-3 here, ~3e-3 with bitsandbytes' AVX512-BF16 kernel
                assert (got[0, 0] - ref).norm() <= 5e-3 * ref.norm() + 1e-4, (name, t)
            checked += 1
    assert len(sources.state["gemma"][0].ids) > 128  # the sliding window was passed
    assert checked > 20
    # a step costs at most one call per source, of a few tokens, whatever the length
    assert sources.runs <= len(sources.sources) * len(offsets)
    assert sources.tokens_run < 4 * len(sources.sources) * len(offsets)


def test_transformers_processors_give_what_the_anchors_own_generate_gives(standin_paths, lm_backbones):
    """An untrained fused model with a `GenerationConfig` (repetition penalty, a minimum of new tokens, stop
    strings) generates exactly what the anchor's own transformers ``generate`` does with the same config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from fusion_llm.backbones import quantization_config

    model = fused_model(standin_paths, lm_backbones)
    anchor = model.anchor
    reference = AutoModelForCausalLM.from_pretrained(anchor.spec.model, dtype=torch.float32,
                                                     quantization_config=quantization_config(anchor.spec))
    tokenizer = anchor.tokenizer
    free = generate(model, PROMPTS[0], max_new_tokens=8, stop_tokens=[]).texts[0]
    stop = free.strip()[:3]  # a stop string the free run writes
    for config in (GenerationConfig(max_new_tokens=8, repetition_penalty=1.5, min_new_tokens=4),
                   GenerationConfig(max_new_tokens=8, stop_strings=[stop])):
        out = model.generate(PROMPTS[0], generation_config=config)
        enc = tokenizer(PROMPTS[0], return_tensors="pt")
        with torch.no_grad():
            ref = reference.generate(**enc, generation_config=config, tokenizer=tokenizer, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert out.new_tokens[0] == ref[0, enc["input_ids"].shape[1]:].tolist()
    assert stop in out.texts[0] and len(out.new_tokens[0]) < 8
    # sampling goes through transformers' warpers: a tiny top-p leaves only the argmax
    assert generate(model, PROMPTS[:2], max_new_tokens=4, do_sample=True, top_p=1e-6, seed=3,
                    stop_tokens=[]).new_tokens == generate(model, PROMPTS[:2], max_new_tokens=4,
                                                           stop_tokens=[]).new_tokens
    with pytest.raises(TypeError, match="not_a_field"):
        generate(model, PROMPTS[0], not_a_field=1)


def test_a_streamer_receives_every_token_as_it_is_chosen(standin_paths, lm_backbones):
    from transformers import TextIteratorStreamer

    model = fused_model(standin_paths, lm_backbones, scale=0.3)
    streamer = TextIteratorStreamer(model.anchor.tokenizer, skip_prompt=True)
    out = generate(model, PROMPTS[1], max_new_tokens=6, stop_tokens=[], streamer=streamer)
    # the streamer ended (the iterator stops) and got every token: it decodes them as it does for transformers
    streamed = "".join(streamer)
    assert streamed == model.anchor.tokenizer.decode(out.new_tokens[0])
    assert streamed.strip() == out.texts[0].strip()
    with pytest.raises(ValueError, match="one prompt"):
        generate(model, PROMPTS, max_new_tokens=2, streamer=TextIteratorStreamer(model.anchor.tokenizer))
