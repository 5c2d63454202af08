"""Reload a saved head with FusionModel.from_pretrained and report its accuracy on the topics eval split.

    python scripts/check_head.py outputs/quickstart/head [--unverified-weights]

A damaged head or backbones it was not trained on: one line on stderr, exit 2.
"""

import sys

import torch

from fusion_llm.config import ConfigError
from fusion_llm.data.topics import topics_dataset
from fusion_llm.modeling import FusionModel


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    unverified = "--unverified-weights" in argv
    argv = [a for a in argv if a != "--unverified-weights"]
    if len(argv) != 1:
        print("usage: python scripts/check_head.py HEAD_DIR [--unverified-weights]", file=sys.stderr)
        return 2
    try:
        # --unverified-weights: load even where a backbone's weights cannot be fingerprinted (not recommended)
        model = FusionModel.from_pretrained(argv[0], verify_weights=not unverified)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.eval()
    ds = topics_dataset()["validation"].select(range(128))
    with torch.no_grad():
        logits = model(texts=list(ds["text"])).logits
    accuracy = (logits.argmax(-1) == torch.tensor(list(ds["label"]))).float().mean().item()
    trainable = sum(p.numel() for p in model.parameters())
    print(f"reloaded {argv[0]}: {trainable} trainable parameters, topics eval accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
