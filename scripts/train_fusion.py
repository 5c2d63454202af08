"""Train a fusion head: ``accelerate launch scripts/train_fusion.py [--config configs/x.yaml] [--train.lr 3e-4]``.

With no --config it runs configs/standins_4llm.yaml (the four stand-ins on the built-in topics task).
Exit code 2 with one line on a bad config, missing data or a non-finite loss.
"""

import sys

from fusion_llm.training import main

if __name__ == "__main__":
    sys.exit(main())
