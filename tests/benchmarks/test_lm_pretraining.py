"""Pre-training over the active vocabulary is the full-vocabulary objective of the saved model, exactly."""

import json
import math

import pytest
import torch

from benchmarks.lm.pretraining import PretrainRecipe, active_lm_loss, check_linear_dims, train_standin

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
            "num_hidden_layers": 1}


def test_active_loss_equals_full_cross_entropy_with_zero_logits_elsewhere():
    torch.manual_seed(0)
    vocab, active = 50, torch.tensor([1, 4, 7, 9, 30])
    compact = torch.randn(2, 3, len(active))
    full = torch.zeros(2, 3, vocab)
    full[..., active] = compact
    labels = torch.tensor([[0, 2, -100], [4, 1, 3]])
    full_labels = torch.where(labels >= 0, active[labels.clamp(min=0)], labels)
    expected = torch.nn.functional.cross_entropy(full.flatten(0, 1), full_labels.flatten(), ignore_index=-100)
    assert active_lm_loss(compact, labels, vocab - len(active)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sizes_off_the_64_grid_are_refused():
    from fusion_llm.standins import standin_config

    with pytest.raises(ValueError, match="multiples of 64"):
        check_linear_dims(standin_config("llama3", hidden_size=96, intermediate_size=192, num_attention_heads=1,
                                         num_key_value_heads=1, head_dim=96))


def test_saved_model_scores_as_trained_and_only_seen_tokens_have_weights(standin_paths, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["to be or not to be, that is the question"] * 8
    recipe = PretrainRecipe("mistral", "toy", sizes=TINY, steps=3, batch_size=4, seq_len=16, warmup_steps=1)
    out = train_standin(recipe, texts, texts[:2], tmp_path / "m", log=lambda *_: None)
    stamp = json.loads((out / "pretrain.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == 32768 and len(tokenizer) == 32768  # the real vocabulary and tokenizer
    rows = model.get_input_embeddings().weight.abs().sum(1) > 0
    seen = set(tokenizer(texts[0])["input_ids"])
    assert seen <= set(torch.nonzero(rows).flatten().tolist())
    assert int(rows.sum()) == stamp["active_vocab"] < 40  # every other row is exactly zero
    ids = torch.tensor([tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss == pytest.approx(stamp["validation_loss"], rel=1e-4)
    assert stamp["validation_loss"] < math.log(32768)  # three steps already beat the uniform guess
