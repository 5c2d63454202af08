#!/usr/bin/env python
"""Entry point of the real-members track: `python benchmarks/real_track.py --preset quick` (the code: `benchmarks.lm.real`)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.lm.real import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
