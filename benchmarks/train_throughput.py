#!/usr/bin/env python
"""Entry point of the training-throughput benchmark: `python benchmarks/train_throughput.py --threads 1` (the code: `benchmarks.throughput.train`)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.throughput.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
