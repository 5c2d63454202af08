"""Reload a saved head with FusionModel.from_pretrained and report its accuracy on the topics eval split.

    python scripts/check_head.py outputs/quickstart/head
"""

import sys

import torch

from fusion_llm.config import ConfigError
from fusion_llm.data.topics import topics_dataset
from fusion_llm.modeling import FusionModel


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/check_head.py HEAD_DIR", file=sys.stderr)
        return 2
    try:
        model = FusionModel.from_pretrained(argv[0])
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
