"""Incremental detokenization (`fusion_llm.generation.IncrementalText`): after every generated token its text equals
`continuation_text` (decoding the prompt and every new id again) on each fetched tokenizer - the four families'
and, where provisioned, the real pair's - for random ids (byte pieces of split characters, special tokens and
whitespace runs included) and for the tokens of real text."""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_llm.generation import IncrementalText, continuation_text
from fusion_llm.paths import FAMILIES, tokenizer_dir
from fusion_llm.standins.real_members import REAL_MEMBERS, is_provisioned, member_dir

FOLDERS = {**{f: tokenizer_dir(f) for f in FAMILIES if (tokenizer_dir(f) / "tokenizer.json").is_file()},
           **{n: member_dir(n) for n in REAL_MEMBERS if is_provisioned(n)}}
pytestmark = pytest.mark.skipif(len(FOLDERS) < len(FAMILIES),
                                reason="tokenizers not fetched; run: python scripts/fetch_tokenizers.py")
TEXTS = ["Hello world", "def f(x):\n    return x ** 2", "naïve café, 日本語 😀 Straße", "  two  spaces\n\n\tand tab",
         "<s> a literal tag </s> and 12345.678"]


@functools.cache
def tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FOLDERS[name])


@functools.cache
def interesting_ids(name: str) -> list[int]:
    """Ids that stress a decoder: byte pieces, special tokens, whitespace, and the tokens of multi-byte text."""
    tok = tokenizer(name)
    vocab = tok.get_vocab()
    picked = {i for t, i in vocab.items() if t.startswith("<0x") or t.strip("▁ĠĊĉ") == ""}
    picked |= set(tok.all_special_ids)
    for text in TEXTS:
        picked |= set(tok.encode(text, add_special_tokens=False))
    return sorted(picked)


def _check(tok, prompt_ids: list[int], new_ids: list[int]) -> None:
    text = IncrementalText(tok, prompt_ids)
    for k, token in enumerate(new_ids):
        assert text.add(token) == continuation_text(tok, prompt_ids, new_ids[:k + 1]), (prompt_ids, new_ids[:k + 1])


@pytest.mark.parametrize("name", sorted(FOLDERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_incremental_text_equals_the_full_decode_after_every_token(name, data):
    tok = tokenizer(name)
    pool = interesting_ids(name)
    ids = st.one_of(st.sampled_from(pool), st.integers(0, len(tok) - 1))
    prompt = data.draw(st.sampled_from(["", "Hi", " x", "é"]))
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"] or [tok.eos_token_id]
    _check(tok, prompt_ids, data.draw(st.lists(ids, max_size=24)))


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_incremental_text_of_real_text_is_the_text(name):
    tok = tokenizer(name)
    for text in TEXTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        for cut in (1, 2, 5):
            _check(tok, ids[:cut], ids[cut:])
