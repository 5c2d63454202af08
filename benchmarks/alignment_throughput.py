#!/usr/bin/env python
"""Entry point of the alignment-throughput benchmark: `python benchmarks/alignment_throughput.py` (the code: `benchmarks.throughput.alignment`)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.throughput.alignment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
