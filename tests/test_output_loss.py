"""The chunked next-token loss (`fusion_llm.output_loss`): the same loss and gradients as cross-entropy on the full
(mixed) logits, in training (`lm_forward(return_logits=False)`) and for a transformers LM (the LoRA controls)."""

import pytest
import torch

from fusion_llm.heads import mixed_logits
from fusion_llm.output_loss import causal_lm_loss, output_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _sparse(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.unique(torch.randint(0, n * v, (n * 7,), generator=g))
    return keys, torch.rand(keys.shape[0], generator=g) * 3


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_mix", [False, True])
def test_chunked_loss_and_gradients_equal_the_full_logits(softcap, with_mix):
    torch.manual_seed(0)
    n, h, v = 11, 16, 300
    x = torch.randn(n, h, requires_grad=True)
    weight, bias = torch.randn(v, h), torch.randn(v)
    labels = torch.randint(0, v, (n,))
    labels[[0, 4, 5, 6, 7]] = -100  # rows 4-7: a whole chunk of 4 with nothing to predict
    mix = (torch.randn(n, 3) * 0.3).requires_grad_()
    sources = [_sparse(n, v, 1), _sparse(n, v, 2)]

    def corrections(a, b, z):  # the sources' corrections re-based onto rows a:b
        out = []
        for keys, values in sources:
            inside = (keys >= a * v) & (keys < b * v)
            out.append((keys[inside] - a * v, values[inside]))
        return out

    logits = torch.nn.functional.linear(x, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if with_mix:
        logits = mixed_logits(logits.unsqueeze(0), mix.unsqueeze(0), sources)[0]
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    expected.backward()
    want_x, want_mix = x.grad.clone(), mix.grad.clone() if with_mix else None
    x.grad = mix.grad = None
    got = output_loss(x, weight, labels, bias=bias, softcap=softcap, mix=mix if with_mix else None,
                      corrections=corrections if with_mix else None, chunk=4)
    (got * 2).backward()  # the incoming gradient scales both
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(x.grad, 2 * want_x)
    if with_mix:
        torch.testing.assert_close(mix.grad, 2 * want_mix)
    assert weight.grad is None
    with torch.no_grad():  # scoring: the loss alone, the same value
        scored = output_loss(x, weight, labels, bias=bias, softcap=softcap, mix=mix if with_mix else None,
                             corrections=corrections if with_mix else None, chunk=4)
    assert scored.item() == got.item()


def test_no_label_gives_zero_loss_and_zero_gradients():
    x = torch.randn(3, 8, requires_grad=True)
    loss = output_loss(x, torch.randn(20, 8), torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_causal_lm_loss_equals_transformers_own(standin_paths):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(standin_paths["gemma2"], dtype=torch.float32)  # soft-capped
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    for p in peft_model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(5, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected.backward()
    want = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    peft_model.zero_grad()
    got = causal_lm_loss(peft_model.get_base_model(), ids, mask, labels)
    got.backward()
    torch.testing.assert_close(got, expected)
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-7)
