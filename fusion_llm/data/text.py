"""``python_docs``: a built-in language-modelling corpus that needs no download.

Python's own reference text (``pydoc_data.topics``: 79 topics, ~465k characters of technical
English written by the Python developers) ships with every interpreter. Topics are split into
train / validation by topic (seeded), then cut into chunks of about ``chunk_chars`` characters at
paragraph boundaries.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict


def _chunks(text: str, size: int) -> list[str]:
    out, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
        while len(current) > 2 * size:  # very long paragraphs (tables) are cut hard
            out.append(current[:size])
            current = current[size:]
    if current.strip():
        out.append(current)
    return [c for c in out if c.strip()]


def python_docs_dataset(seed: int = 0, chunk_chars: int = 600, validation_fraction: float = 0.1) -> DatasetDict:
    """The ``python_docs`` corpus as ``text`` columns, split by document (topic) with ``seed``."""
    import pydoc_data.topics

    names = sorted(pydoc_data.topics.topics)
    random.Random(seed).shuffle(names)
    n_val = max(1, int(len(names) * validation_fraction))
    splits = {"validation": names[:n_val], "train": names[n_val:]}
    return DatasetDict({
        split: Dataset.from_dict({"text": [c for name in topics for c in _chunks(pydoc_data.topics.topics[name],
                                                                                 chunk_chars)]})
        for split, topics in splits.items()
    })
