"""How each family's package files become a folder that AutoTokenizer loads as a fast tokenizer.

One builder per family, in :data:`BUILDERS`: ``builder(row, files, stage)`` gets the family's row of
:data:`~fusion_llm.standins.tokenizer_sources.TOKENIZERS` and the bytes of the row's ``source.files`` in
that order (already checked against their SHA-256), and writes into ``stage`` what ``AutoTokenizer``
loads (``tokenizer.json`` or ``tokenizer.model``, and ``tokenizer_config.json``). Downloading, saving the
fast tokenizer, verifying and publishing are :mod:`fusion_llm.standins.real_tokenizers`'.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable
from pathlib import Path

from fusion_llm.errors import TokenizerFetchError
from fusion_llm.standins.tokenizer_sources import FamilyTokenizer

__all__ = ["BUILDERS", "TokenizerFetchError", "one_line", "write_json"]


def one_line(e: BaseException | str) -> str:
    """The last non-empty line of an error (or text), at most 300 characters."""
    text = str(e).strip()
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text)[:300]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_llama3(row: FamilyTokenizer, files: tuple[bytes, ...], stage: Path) -> None:
    tokenizer_json, tokenizer_config = files
    stage.mkdir(parents=True, exist_ok=True)
    tj = json.loads(tokenizer_json)
    cfg = json.loads(tokenizer_config)
    # transformers 5 ignores clean_up_tokenization_spaces=True for BPE (with a warning on every
    # load); False states what it does anyway.
    cfg["clean_up_tokenization_spaces"] = False
    bos = cfg["bos_token"]
    bos_id = next(a["id"] for a in tj["added_tokens"] if a["content"] == bos)
    post = tj.get("post_processor")
    steps = post["processors"] if post and post.get("type") == "Sequence" else ([post] if post else [])
    steps = [s for s in steps if s.get("type") != "TemplateProcessing"]
    # As in Meta-Llama-3-8B's current tokenizer.json: ByteLevel, then a BOS template.
    steps.append(
        {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    )
    tj["post_processor"] = {"type": "Sequence", "processors": steps}
    write_json(stage / "tokenizer.json", tj)
    write_json(stage / "tokenizer_config.json", cfg)


def _build_mistral(row: FamilyTokenizer, files: tuple[bytes, ...], stage: Path) -> None:
    (model,) = files
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as e:  # protobuf missing shows up here too
        raise TokenizerFetchError(
            f"mistral: converting the SentencePiece model needs the sentencepiece and protobuf packages ({one_line(e)})"
        ) from e
    stage.mkdir(parents=True, exist_ok=True)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model)
    if len(proto.pieces) != row.expected.length:
        raise TokenizerFetchError(
            f"mistral: expected {row.expected.length} SentencePiece pieces, found {len(proto.pieces)}"
        )
    # Names of the reserved control pieces as in mistralai/Mistral-7B-v0.3 on the hub.
    control = sp_pb2.ModelProto.SentencePiece.CONTROL
    for i in range(10, 771):
        proto.pieces[i].piece = f"[control_{i - 2}]"
        proto.pieces[i].type = control
    named = [p.piece for p in proto.pieces[3:771]]
    del proto.trainer_spec.control_symbols[:]
    del proto.trainer_spec.user_defined_symbols[:]
    proto.trainer_spec.control_symbols.extend(named)
    (stage / "tokenizer.model").write_bytes(proto.SerializeToString())
    write_json(stage / "tokenizer_config.json", row.tokenizer_config)


def _build_gemma2(row: FamilyTokenizer, files: tuple[bytes, ...], stage: Path) -> None:
    tokenizer_json, tokenizer_config = files
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "tokenizer.json").write_bytes(tokenizer_json)
    cfg = json.loads(tokenizer_config)
    cfg["eos_token"] = row.expected.eos[0]  # gemma-2-2b's eos is <eos> (1); <end_of_turn> (106) is the chat one
    cfg.pop("processor_class", None)  # Gemma3Processor is the multimodal processor, not ours
    write_json(stage / "tokenizer_config.json", cfg)


def _llama_vocab_and_merges(js: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Decode llama-tokenizer.js's embedded vocabulary and merges.

    The vocabulary is the token strings in id order, joined by newlines, UTF-8, base64; the
    merges are pairs of vocabulary ids as little-endian uint16, in priority order, base64
    (see the package's data-conversion.py).
    """
    vocab_b64 = re.search(r'^const llama_vocab_base64 = "([^"]*)"', js, re.MULTILINE)
    merges_b64 = re.search(r'^const llama_merges_binary = "([^"]*)"', js, re.MULTILINE)
    if not vocab_b64 or not merges_b64:
        raise TokenizerFetchError("phi3: llama-tokenizer.js has no llama_vocab_base64 / llama_merges_binary")
    vocab = base64.b64decode(vocab_b64.group(1)).decode("utf-8").split("\n")
    raw = base64.b64decode(merges_b64.group(1))
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]
    if len(vocab) != 32000 or len(set(vocab)) != 32000:
        raise TokenizerFetchError(f"phi3: expected 32000 distinct LLaMA tokens, found {len(vocab)}")
    return vocab, merges


def _build_phi3(row: FamilyTokenizer, files: tuple[bytes, ...], stage: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    (js,) = files
    stage.mkdir(parents=True, exist_ok=True)
    vocab, merges = _llama_vocab_and_merges(js.decode("utf-8"))
    # The layout of the Hugging Face Llama-2 / Phi-3 tokenizer.json.
    tk = Tokenizer(
        BPE(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=merges,
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Phi-3 adds no BOS (add_bos_token false). transformers 5 ignores add_bos_token in
    # tokenizer_config.json when a tokenizer.json is present and follows its post-processor,
    # so the "no BOS" lives here: a template without <s>.
    tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = row.special_tokens
    for i in sorted(specials):
        content, rstrip, special = specials[i]
        token = AddedToken(content, rstrip=rstrip, lstrip=False, single_word=False, normalized=False, special=special)
        if special:
            tk.add_special_tokens([token])
        else:
            tk.add_tokens([token])
        if tk.token_to_id(content) != i:
            raise TokenizerFetchError(f"phi3: {content} got id {tk.token_to_id(content)}, expected {i}")
    tk.save(str(stage / "tokenizer.json"))
    added_tokens_decoder = {
        str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": r, "single_word": False, "special": s}
        for i, (c, r, s) in sorted(specials.items())
    }
    # The model's tokenizer_config.json, keys in its (alphabetical) order.
    cfg = dict(sorted({**row.tokenizer_config, "added_tokens_decoder": added_tokens_decoder}.items()))
    write_json(stage / "tokenizer_config.json", cfg)


BUILDERS: dict[str, Callable[[FamilyTokenizer, tuple[bytes, ...], Path], None]] = {
    "llama3": _build_llama3,
    "mistral": _build_mistral,
    "gemma2": _build_gemma2,
    "phi3": _build_phi3,
}
