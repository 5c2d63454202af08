"""Bits per byte of a saved fused LM head, beside its anchor alone, on your own text.

    python scripts/score.py outputs/real_pair_lm/head notes.txt data/eval.jsonl
    python scripts/score.py HEAD FILE --text-column body --max-rows 200

A ``.txt`` file is one text; a ``.json`` / ``.jsonl`` file holds one text per row (``--text-column``, default
``text``). Every byte of every text is paid for once, whatever the tokenizer (`fusion_llm.scoring`), so the
fused model and its anchor are scored on one scale. Prints one line per file and a total; exit 2 with one line
on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusion_llm.errors import ConfigError
from fusion_llm.modeling import FusionModel
from fusion_llm.scoring import LMScore, backbone_logits_fn, score_causal_lm, score_fused


def read_texts(path: Path, text_column: str, max_rows: int | None) -> list[str]:
    """The texts of one file (see the module docstring)."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif path.suffix in (".json", ".jsonl"):
        import datasets

        datasets.disable_progress_bars()  # one line on stderr for a bad file, not a progress bar before it
        try:
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a malformed file
            raise ConfigError(f"{path}: not readable as JSON lines ({str(err).splitlines()[0]})") from None
        if text_column not in rows.column_names:
            raise ConfigError(f"{path}: no column {text_column!r} (columns: {rows.column_names}); set --text-column")
        texts = list(rows[text_column])
    else:
        raise ConfigError(f"{path}: give a .txt, .json or .jsonl file")
    texts = [t for t in texts if isinstance(t, str) and t.strip()][:max_rows]
    if not texts:
        raise ConfigError(f"{path}: no text to score")
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("head", help="a saved head folder (save_pretrained / train's output_dir/head)")
    parser.add_argument("files", nargs="+", type=Path, help=".txt, .json or .jsonl files")
    parser.add_argument("--text-column", default="text", help="column of the texts in JSON files (default text)")
    parser.add_argument("--max-rows", type=int, default=None, help="score at most this many texts per file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unverified-weights", action="store_true",
                        help="load even where a backbone's weights cannot be fingerprinted (not recommended)")
    args = parser.parse_args(argv)
    try:
        texts = {path: read_texts(path, args.text_column, args.max_rows) for path in args.files}
        model = FusionModel.from_pretrained(args.head, verify_weights=not args.unverified_weights)
        if model.config.head_spec.kind != "lm":
            raise ConfigError(f"{args.head}: a {model.config.head_spec.kind} head; bits per byte needs an LM head")
        anchor = model.anchor
        total_fused, total_anchor = LMScore(), LMScore()
        print(f"{'file':40s} {'texts':>6s} {'bytes':>9s} {'fused':>8s} {'anchor':>8s}  (bits per byte)")
        for path, rows in texts.items():
            fused = score_fused(model, rows, batch_size=args.batch_size)
            alone = score_causal_lm(backbone_logits_fn(anchor), anchor.tokenizer, rows, batch_size=args.batch_size)
            total_fused, total_anchor = total_fused + fused, total_anchor + alone
            print(f"{str(path):40s} {len(rows):6d} {fused.bytes:9d} {fused.bits_per_byte:8.4f} "
                  f"{alone.bits_per_byte:8.4f}")
        print(f"{'total':40s} {sum(map(len, texts.values())):6d} {total_fused.bytes:9d} "
              f"{total_fused.bits_per_byte:8.4f} {total_anchor.bits_per_byte:8.4f}")
    except (ConfigError, ValueError) as err:
        print(f"score: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
