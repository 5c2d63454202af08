"""End-to-end leakage check of the fused LM: on text whose next character is unpredictable, no causal
model can score below the source's entropy; a fused model that saw future text through a source would.

Text: digits drawn uniformly and independently from ``0123``, so the entropy is exactly 2 bits per
byte. Digits make the tokenizations differ where it matters: the Mistral anchor, Gemma-2 and Phi-3
split every digit, Llama-3 groups them by three (a group is settled only when complete).

The anchor is a tiny Mistral stand-in pre-trained briefly on such text, so that its frozen output
layer can express the 4-way distribution and it starts near the entropy; the Llama-3, Gemma-2 and
Phi-3 stand-ins are the sources, fed their settled tokens plus the unsettled tail of each prefix (the
default ``head.source_tails``). The fused LM trains through `fusion_llm.training.train` and is
scored in bits/byte on held-out text (`fusion_llm.scoring.score_fused`). The positive control reads
each source two tokens past the causal alignment (for the digit-splitting sources, the next digit):
the same training then falls far below the entropy, which shows that the check has teeth.
"""

import json
import math
import random

import pytest

from fusion_llm.alignment import align_batch

ALPHABET = "0123"
ENTROPY = math.log2(len(ALPHABET))  # bits per character = bits per byte (ASCII)
TOLERANCE = 0.05
TEXT_CHARS = 48
STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def random_texts(n: int, chars: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(chars)) for _ in range(n)]


@pytest.fixture(scope="module")
def leakage_setup(standin_paths, tmp_path_factory):
    from benchmarks.lm.pretraining import PretrainRecipe, train_standin

    root = tmp_path_factory.mktemp("leakage")
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 64,
                 "num_hidden_layers": 2}
    recipe = PretrainRecipe("mistral", "random_digits", sizes=sizes, steps=120, batch_size=16, seq_len=TEXT_CHARS + 4,
                            lr=1e-2, min_lr=1e-3, warmup_steps=10)
    anchor = train_standin(recipe, random_texts(1000, TEXT_CHARS, 0), random_texts(16, TEXT_CHARS, 9),
                           root / "mistral_digits", log=lambda *_: None)
    files = {}
    for split, (n, seed) in {"train": (8 * STEPS, 1), "validation": (16, 2)}.items():
        files[split] = str(root / f"{split}.jsonl")
        with open(files[split], "w") as fh:
            fh.writelines(json.dumps({"text": text}) + "\n" for text in random_texts(n, TEXT_CHARS, seed))
    setup = {"anchor": str(anchor), "files": files, "root": root, "paths": standin_paths}
    from fusion_llm.modeling import FusionModel

    # every source with its LM head, so the same backbones serve head.source_predictions
    setup["backbones"] = FusionModel.load_backbones(run_config(setup, root / "unused", True).fusion_config())
    return setup


def run_config(setup, output_dir, predictions=False, steps=STEPS):
    from fusion_llm.runconfig import build_run_config

    backbones = [{"name": "mistral", "model": setup["anchor"], "tap_layers": [2], "compute_dtype": "float32",
                  "anchor": True}]
    for family, name in (("llama3", "llama"), ("gemma2", "gemma"), ("phi3", "phi")):
        backbones.append({"name": name, "model": setup["paths"][family], "tap_layers": [1],
                          "compute_dtype": "float32"})
    return build_run_config({
        "model": {"backbones": backbones, "shared_width": 64, "fusion": {"method": "concat", "hidden": 128},
                  "head": {"kind": "lm", "source_predictions": predictions}},
        "data": {"files": setup["files"], "max_length": 64, "max_eval_examples": 4},  # eval is not what is tested
        "train": {"lr": 3e-3, "batch_size": 8, "max_steps": steps, "warmup_steps": 10, "eval_every": steps,
                  "checkpoint_every": 10 * steps, "seed": 0},
        "output_dir": str(output_dir), "tracker": "none",
    })


def leaky_align_batch(texts, anchor_tokenizer, source_tokenizers, **kwargs):
    """The causal alignment moved two source tokens into the future (what the check must catch); settled tokens
    only, so the index points into the full-text tokens."""
    out = align_batch(texts, anchor_tokenizer, source_tokenizers, **{**kwargs, "trim_sources": False, "tails": False})
    for name in source_tokenizers:
        ids, index = out[f"{name}_input_ids"], out[f"{name}_align"]
        out[f"{name}_align"] = [[min(j + 2, len(x) - 1) for j in idx] for x, idx in zip(ids, index)]
    return out


def train_and_score(setup, output_dir, predictions=False, steps=STEPS, texts=64) -> float:
    from fusion_llm.scoring import score_fused
    from fusion_llm.modeling import FusionModel
    from fusion_llm.training import train

    summary = train(run_config(setup, output_dir, predictions, steps), log=lambda *_: None)
    model = FusionModel.from_pretrained(summary["output"], backbones=setup["backbones"])
    return score_fused(model, random_texts(texts, TEXT_CHARS, seed=3), batch_size=16).bits_per_byte


# The source-predictions head costs more per step and per scored text (the sources' LM heads over 32k-262k
# vocabularies): fewer steps, and 32 scored texts (1,536 digits) instead of 64.
@pytest.mark.parametrize("predictions,steps,texts", [(False, STEPS, 64), (True, 15, 32)],
                         ids=["hidden_states", "source_predictions"])
def test_fused_lm_does_not_beat_the_entropy_of_random_text(leakage_setup, tmp_path, predictions, steps, texts):
    bits = train_and_score(leakage_setup, tmp_path / "causal", predictions, steps, texts)
    print(f"causal fused LM: {bits:.4f} bits/byte (entropy {ENTROPY:.4f})")
    assert bits >= ENTROPY - TOLERANCE, f"fused LM scored {bits:.3f} bits/byte on text of entropy {ENTROPY:.3f}"
    assert bits <= ENTROPY + 0.25, f"fused LM scored {bits:.3f} bits/byte: too far from the entropy for the check to bite"


def test_a_leaky_alignment_is_caught(leakage_setup, tmp_path, monkeypatch):
    import fusion_llm.alignment
    import fusion_llm.scoring

    def leaky_make_align_fn(anchor_tokenizer, source_tokenizers, *, text_column="text", **kwargs):
        return lambda batch: leaky_align_batch(batch[text_column], anchor_tokenizer, source_tokenizers, **kwargs)

    monkeypatch.setattr(fusion_llm.alignment, "make_align_fn", leaky_make_align_fn)
    monkeypatch.setattr(fusion_llm.scoring, "align_batch", leaky_align_batch)
    bits = train_and_score(leakage_setup, tmp_path / "leaky")
    print(f"leaky fused LM: {bits:.4f} bits/byte (entropy {ENTROPY:.4f})")
    assert bits < ENTROPY - 0.2, f"the leaky alignment scored {bits:.3f} bits/byte, entropy {ENTROPY:.3f}: no power"
