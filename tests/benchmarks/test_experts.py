"""benchmarks.grokking.experts: the grokking tokenizer reproduces the dataset's ids; experts load like any backbone."""

import pytest
import torch
from transformers import LlamaForCausalLM

from fusion_llm.backbones import load_backbone
from fusion_llm.config import BackboneSpec
from fusion_llm.data.grokking import TASKS, VOCABULARY, example_text, task_examples
from benchmarks.grokking.experts import NUM_CLASSES, answer_logits, expert_config, grokking_tokenizer, save_expert


@pytest.mark.parametrize("task", TASKS)
def test_tokenizer_reproduces_input_ids(task):
    tokenizer = grokking_tokenizer()
    input_ids, _ = task_examples(task)
    rows = input_ids[:: max(len(input_ids) // 50, 1)]
    encoded = tokenizer([example_text(r) for r in rows], return_offsets_mapping=True)
    assert encoded["input_ids"] == rows.tolist()
    text = example_text(rows[0])
    starts = [a for a, _ in encoded["offset_mapping"][0]]
    assert [text[a:b] for a, b in encoded["offset_mapping"][0]] == VOCABULARY.decode(rows[0]) and starts[0] == 0


def test_vocab_is_padded_for_4bit_and_answers_are_the_first_ids():
    config = expert_config()
    assert config.vocab_size % 64 == 0 and config.vocab_size >= VOCABULARY.size + 2
    assert NUM_CLASSES == 217
    model = LlamaForCausalLM(expert_config(hidden_size=64, num_layers=1))
    assert answer_logits(model, torch.tensor([[1, 217, 2, 221]])).shape == (1, NUM_CLASSES)


def test_expert_loads_through_load_backbone(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(expert_config(hidden_size=64, num_layers=2)).eval()
    folder = save_expert(model, grokking_tokenizer(), tmp_path / "expert")
    backbone = load_backbone(BackboneSpec(name="x_plus_y", model=str(folder), tap_layers=[-1], quantization="none",
                                          compute_dtype="float32"))
    enc = backbone.tokenize(["12 + 30 =", "[0 1 2 3 4] * [4 3 2 1 0] ="])
    assert enc["input_ids"].tolist() == [[12, 217, 30, 221], [97, 220, 216, 221]]
    (tap,) = backbone.taps(enc["input_ids"], enc["attention_mask"])
    captured = []
    hook = model.model.layers[-1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(input_ids=enc["input_ids"])
    hook.remove()
    last_layer = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    torch.testing.assert_close(tap, last_layer)  # the last layer's output, before the final norm
