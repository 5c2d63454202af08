"""Metric scripts shipped with the package so `evaluate` works offline (it loads local scripts by path)."""

from pathlib import Path

import evaluate

_HERE = Path(__file__).resolve().parent


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``accuracy`` or ``perplexity`` from this package (no hub access)."""
    path = _HERE / name / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"unknown metric {name!r}; shipped: accuracy, perplexity")
    return evaluate.load(str(path))
