#!/usr/bin/env python
"""Entry point of the LM track's probes: `python benchmarks/lm_probes.py --rows 12` (the code: `benchmarks.lm.probes`)."""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import `benchmarks` as a package from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.lm.probes import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
