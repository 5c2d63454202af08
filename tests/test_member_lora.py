"""Member adapters (``backbones[].lora_rank``, `fusion_llm.member_lora`): LoRA inside frozen backbones, owned and
saved by the fusion head. Untrained == the anchor exactly; gradients reach only the head; the backbones' weights
stay bit-identical; save -> load gives identical logits; causal; greedy generation == the full forward's argmax."""

import pytest
import torch

from fusion_llm.config import ConfigError, FusionConfig
from fusion_llm.modeling import FusionModel

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TEXTS = ["To be, or not to be, that is the question:", "def add(a, b):\n    return a + b\n"]


def config(paths, anchor_rank=2, source_rank=1, lm_loss=True, quantization="none"):
    backbones = [dict(name="mistral", model=paths["mistral"], tap_layers=[2, -1], anchor=True, lora_rank=anchor_rank),
                 dict(name="llama", model=paths["llama3"], tap_layers=[2], lora_rank=source_rank)]
    for b in backbones:
        b.update(compute_dtype="float32", quantization=quantization)
    return FusionConfig(backbones=backbones, shared_width=32, fusion={"method": "concat", "hidden": 64},
                        head={"kind": "lm", "source_predictions": True, "source_lm_loss": lm_loss,
                              "residual_scale": "anchor_rms"})


@pytest.fixture(scope="module")
def backbones(standin_paths):
    return FusionModel.load_backbones(config(standin_paths))


def randomise(model, scale=0.05):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * scale)


def forward(model, texts=TEXTS):
    from fusion_llm.alignment import align_batch
    from fusion_llm.data.pipeline import LMCollator

    sources = {n: b.tokenizer for n, b in model.backbones.items() if n != model.anchor.name}
    rows = align_batch(texts, model.anchor.tokenizer, sources, tails=True)
    collate = LMCollator(model.anchor.name, {n: b.tokenizer.pad_token_id or 0 for n, b in model.backbones.items()})
    batch = collate([{k: v[i] for k, v in rows.items()} for i in range(len(texts))])
    return model.lm_forward(batch["inputs"], batch["alignment"], batch["labels"]), batch


def test_head_owns_the_adapters_and_counts_them(standin_paths, backbones):
    from fusion_llm.budget import trainable_parameters

    cfg = config(standin_paths)
    model = FusionModel(cfg, backbones)
    lora = {n: sum(p.numel() for p in m.parameters()) for n, m in model.head.members.items()}
    for name, rank in (("mistral", 2), ("llama", 1)):
        linears = [m for m in backbones[name].model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
        assert linears, name
        assert lora[name] == rank * sum(m.in_features + m.out_features for m in linears)
    assert trainable_parameters(config(standin_paths)) == sum(p.numel() for p in model.head.parameters())


def test_untrained_adapters_leave_the_anchor_exactly(standin_paths, backbones):
    model = FusionModel(config(standin_paths), backbones)
    out, batch = forward(model)
    enc = batch["inputs"]["mistral"]
    with torch.no_grad():
        anchor = backbones["mistral"]
        hidden = anchor.taps(enc["input_ids"], enc["attention_mask"], layers=[anchor.spec.num_hidden_layers])[0]
        assert torch.equal(out.logits, anchor.lm_logits(hidden))
    assert out.member_loss is not None and torch.isfinite(out.member_loss)


def test_training_moves_only_the_head_and_the_backbones_stay_bit_identical(standin_paths, backbones):
    model = FusionModel(config(standin_paths), backbones)
    frozen = {n: [p.detach().clone() for p in b.model.parameters() if not p.requires_grad]
              for n, b in backbones.items()}
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out, _ = forward(model)
        loss = out.loss + out.member_loss
        opt.zero_grad()
        loss.backward()
        for name, member in model.head.members.items():  # both members' adapters get gradients
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in member.lora_B.parameters()), name
        for b in backbones.values():
            assert all(p.grad is None for p in b.model.parameters() if not p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, b in backbones.items():
        now = [p for p in b.model.parameters() if not p.requires_grad]
        assert len(now) == len(frozen[n]) and all(torch.equal(a, c) for a, c in zip(frozen[n], now)), n


def test_save_load_identical_logits_and_a_head_without_adapters_switches_them_off(standin_paths, backbones, tmp_path):
    model = FusionModel(config(standin_paths), backbones)
    randomise(model)
    before = forward(model)[0].logits
    model.save_pretrained(tmp_path / "head")
    loaded = FusionModel.from_pretrained(tmp_path / "head")  # fresh backbones from the saved config
    assert torch.equal(forward(loaded)[0].logits, before)
    assert loaded.config.backbones[0]["lora_modules"] == model.config.backbones[0]["lora_modules"]
    plain = FusionModel(config(standin_paths, anchor_rank=0, source_rank=0, lm_loss=False), backbones)
    anchor_only = FusionModel(config(standin_paths, anchor_rank=0, source_rank=0, lm_loss=False),
                              FusionModel.load_backbones(config(standin_paths, 0, 0, False)))
    assert torch.equal(forward(plain)[0].logits, forward(anchor_only)[0].logits)


def test_causal_adapted_logits_at_t_do_not_see_later_text(standin_paths, backbones):
    model = FusionModel(config(standin_paths), backbones)
    randomise(model)
    text = TEXTS[0]
    full = forward(model, [text])[0].logits[0]
    enc = backbones["mistral"].tokenizer(text, return_offsets_mapping=True)
    cut = len(enc["input_ids"]) // 2
    prefix = text[: enc["offset_mapping"][cut - 1][1]]
    short = forward(model, [prefix])[0].logits[0]
    n = min(len(short), cut)
    torch.testing.assert_close(short[:n - 1], full[:n - 1], atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_the_full_forward_argmax(standin_paths, backbones):
    from test_generation import full_forward_argmax  # the stepwise reference of the generation tests

    from fusion_llm.generation import generate

    model = FusionModel(config(standin_paths), backbones)
    randomise(model, 0.2)
    prompt = "Whan that Aprille with his shoures soote"
    new = generate(model, [prompt], max_new_tokens=4, stop_tokens=[]).new_tokens[0]
    assert len(new) == 4
    for k in range(len(new)):
        assert full_forward_argmax(model, prompt, new[:k]) == new[k], k


@pytest.mark.parametrize("change, field", [
    ({"lora_rank": -1}, "lora_rank"), ({"lora_rank": 1.5}, "lora_rank"), ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_lr": 0}, "lora_lr"), ({"lora_lr": "fast"}, "lora_lr"),
])
def test_bad_adapter_fields_name_the_field(standin_paths, change, field):
    cfg = config(standin_paths).to_dict()
    cfg["backbones"][0].update(change)
    with pytest.raises(ConfigError, match=field):
        FusionConfig(**{k: cfg[k] for k in ("backbones", "shared_width", "fusion", "head")})


def test_adapters_need_an_lm_head_and_the_source_loss_needs_an_adapted_source(standin_paths):
    cfg = config(standin_paths).to_dict()
    with pytest.raises(ConfigError, match="lora_rank"):
        FusionConfig(backbones=cfg["backbones"], head={"kind": "classification"})
    with pytest.raises(ConfigError, match="source_lm_loss"):
        config(standin_paths, source_rank=0)
    with pytest.raises(ConfigError, match="source_lm_loss"):
        FusionConfig(backbones=cfg["backbones"], head={"kind": "lm", "source_lm_loss": True})


def test_member_adapters_and_the_mixer_take_their_own_learning_rates(standin_paths, backbones):
    from fusion_llm.runconfig import TrainConfig
    from fusion_llm.training import _param_groups

    model = FusionModel(config(standin_paths), backbones)
    groups = _param_groups(model.head, TrainConfig(lr=1e-3, member_lr=2e-3, mixer_lr=1e-2))
    assert [g.get("lr") for g in groups] == [None, 2e-3, 2e-3, 1e-2]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.head.parameters())  # every parameter once
    members = model.head.members
    assert [{id(p) for p in g["params"]} for g in groups[1:3]] == [
        {id(p) for p in members[n].parameters()} for n in members]
    assert len(_param_groups(model.head, TrainConfig(lr=1e-3))) == 1
    with pytest.raises(ConfigError, match="train.mixer_lr"):
        TrainConfig(mixer_lr=0)

    # a backbone's own lora_lr wins over train.member_lr, for that backbone's adapters only
    cfg = config(standin_paths)
    cfg.set_backbone_fields("llama", lora_lr=5e-3)
    model = FusionModel(cfg, backbones)
    rates = {n: g["lr"] for n, g in zip(model.head.members, _param_groups(model.head, TrainConfig(member_lr=2e-3))[1:])}
    assert rates == {"mistral": 2e-3, "llama": 5e-3}


def _gradient_error(layer) -> float:
    """How far a 4-bit Linear's input gradient is from the dequantized weight's (inf: no gradient at all)."""
    import bitsandbytes as bnb

    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    if x.grad is None:
        return float("inf")
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return float((x.grad - torch.ones(2, 3, layer.out_features) @ weight).abs().max())


@pytest.mark.parametrize("adapters_at_load", [True, False], ids=["loaded_with_adapters", "adapters_added_later"])
def test_gradients_pass_through_the_frozen_4bit_layers(standin_paths, adapters_at_load):
    """bitsandbytes repacks a 4-bit weight for its inference kernel (no backward) on an eval forward without grad on
    CPUs with AVX512-BF16; a backbone with member adapters is kept out of (or taken back from) that layout."""
    from bitsandbytes.nn import Linear4bit

    cfg = config(standin_paths, quantization="nf4")
    plain = FusionConfig(**{**cfg.to_dict(), "backbones": [{**b, "lora_rank": 0} for b in cfg.backbones],
                            "head": {**cfg.head, "source_lm_loss": False}})
    loaded = FusionModel.load_backbones(cfg if adapters_at_load else plain)
    for layer in (m for b in loaded.values() for m in b.model.modules() if isinstance(m, Linear4bit)):
        layer.support_avx512bf16_for_cpu = True  # as on such a CPU: an eval forward without grad would repack
    model = FusionModel(cfg, loaded)
    layers = [m for b in model.backbones.values() for m in b.model.modules() if isinstance(m, Linear4bit)]
    assert layers
    with torch.no_grad():
        forward(model)  # eval-mode forwards without grad: what scoring does between training steps
    for layer in layers:
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert max(_gradient_error(layer) for layer in layers[:4]) < 1e-4
