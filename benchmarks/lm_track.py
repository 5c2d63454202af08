#!/usr/bin/env python
"""Entry point of the language-modelling track: `python benchmarks/lm_track.py --preset quick` (the code: `benchmarks.lm.track`)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.lm.track import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
