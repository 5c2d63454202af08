"""``fusion_continuation``: a local multiple-choice task for lm-evaluation-harness, built from the held-out
(**test**) rows of the three text corpora (`fusion_llm.data.corpora`), no hub needed.

Each item is one test row of a domain cut after a word near its middle: the context is the text before the
cut, the four choices are the true continuation (the next ``words`` whitespace-separated words, with the
whitespace before them) and the continuations of three other items of the same domain. A model scores each
choice by its log-likelihood after the context (``acc``; ``acc_norm`` divides by the choice's length).
Every choice starts with whitespace and the context never ends with any, so no choice is favoured by where
a tokenizer puts spaces.

:func:`build_continuation_tasks` writes, deterministically (seeded; the same corpora give the same files)::

    <cache>/harness/fusion_continuation/<domain>.jsonl             rows: id, domain, doc, context, choices, label
    <cache>/harness/fusion_continuation/fusion_continuation_<domain>.yaml   one lm_eval task per domain
    <cache>/harness/fusion_continuation/fusion_continuation.yaml            the group of the three
    <cache>/harness/fusion_continuation/manifest.json                       n, seed, words, corpora, counts

and returns the folder, the ``include_path`` of lm_eval's ``TaskManager``. Command:
``python scripts/lm_harness.py --build-task``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from fusion_llm.data import corpora
from fusion_llm.paths import cache_dir, write_atomic, write_json_atomic

TASK = "fusion_continuation"
CHOICES = 4
_WORD = re.compile(r"\s+\S+")


def task_dir() -> Path:
    """Where the task files live: ``$FUSION_LLM_CACHE/harness/fusion_continuation``."""
    return cache_dir() / "harness" / TASK


def split_row(text: str, rng: random.Random, words: int, min_context_chars: int = 40) -> tuple[str, str] | None:
    """``(context, continuation)`` of one row, or None when it is too short: the cut is drawn among the word
    ends in the middle half of the row; the continuation is the next ``words`` words (whitespace first)."""
    text = text.lstrip()
    cuts = [m.start() for m in _WORD.finditer(text)]
    usable = [c for c in cuts if min_context_chars <= c and len(_WORD.findall(text, c)) >= words
              and len(text) // 4 <= c <= 3 * len(text) // 4]
    if not usable:
        return None
    cut = rng.choice(usable)
    continuation = "".join(m.group() for _, m in zip(range(words), _WORD.finditer(text, cut)))
    return text[:cut], continuation


def continuation_items(rows: list[dict], domain: str, n: int, seed: int, words: int = 8) -> list[dict]:
    """Up to ``n`` items from ``rows`` (a domain's test rows, in file order)."""
    rng = random.Random(f"{TASK}:{domain}:{seed}")
    pairs = []
    for row in rows:
        split = split_row(row["text"], rng, words)
        if split is not None:
            pairs.append((row, *split))
    if len(pairs) < CHOICES:
        raise ValueError(f"{domain}: only {len(pairs)} usable test rows; a {CHOICES}-way choice needs {CHOICES}")
    picked = sorted(rng.sample(range(len(pairs)), min(n, len(pairs))))
    items = []
    for k, i in enumerate(picked):
        row, context, true = pairs[i]
        others = [j for j in picked if pairs[j][2] != true]
        distractors: list[str] = []
        for j in rng.sample(others, len(others)):
            if pairs[j][2] not in distractors:
                distractors.append(pairs[j][2])
            if len(distractors) == CHOICES - 1:
                break
        if len(distractors) < CHOICES - 1:
            continue
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [true] + distractors[label:]
        items.append({"id": f"{domain}-{k}", "domain": domain, "doc": row.get("doc", ""), "context": context,
                      "choices": choices, "label": label})
    return items


def _task_yaml(name: str, data: Path) -> str:
    return "\n".join([
        "# Written by fusion_llm.data.continuation (python scripts/lm_harness.py --build-task); do not edit.",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: ""',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _group_yaml(tasks: list[str]) -> str:
    return "\n".join([
        "# Written by fusion_llm.data.continuation (python scripts/lm_harness.py --build-task); do not edit.",
        f"group: {TASK}",
        "task:", *[f"  - {t}" for t in tasks],
        "aggregate_metric_list:",
        "  - {metric: acc, aggregation: mean, weight_by_size: true}",
        "  - {metric: acc_norm, aggregation: mean, weight_by_size: true}",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def is_built(folder: str | Path, n: int, seed: int, words: int = 8, text_root: str | Path | None = None) -> bool:
    """Whether ``folder`` holds the task `build_continuation_tasks` would write for these arguments and corpora."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return False
    manifest, text = json.loads(path.read_text()), corpora.read_manifest(text_root)
    return (manifest.get("n"), manifest.get("seed"), manifest.get("words"), manifest.get("corpora")) == (
        n, seed, words, {"seed": text.get("seed"), "sizes": text.get("sizes")})


def build_continuation_tasks(n: int = 100, seed: int = 0, words: int = 8, out_dir: str | Path | None = None,
                             text_root: str | Path | None = None) -> Path:
    """Write the task's JSONL and YAML files (see the module docstring) and return their folder.

    Args:
        n: items per domain (fewer when a domain's test split has fewer usable rows).
        seed: draws the cuts, the items, the distractors and the answer's position.
        words: words in each choice.
        out_dir: default :func:`task_dir`.
        text_root: the prepared corpora (default ``$FUSION_LLM_CACHE/text``; ``python scripts/prepare_text_data.py``).

    Raises:
        FileNotFoundError: the corpora are not prepared (the message says how).
    """
    if n < CHOICES or words < 1:
        raise ValueError(f"n must be at least {CHOICES} (the choices of an item come from other items) and words "
                         f"positive, got n={n}, words={words}")
    out = Path(out_dir or task_dir())
    manifest = corpora.read_manifest(text_root)
    counts, tasks = {}, []
    for domain in corpora.DOMAINS:
        path = Path(corpora.corpus_files(domain, text_root)["test"])
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        items = continuation_items(rows, domain, n, seed, words)
        data = out / f"{domain}.jsonl"
        write_atomic(data, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        name = f"{TASK}_{domain}"
        write_atomic(out / f"{name}.yaml", _task_yaml(name, data.resolve()))
        counts[domain], tasks = len(items), [*tasks, name]
    write_atomic(out / f"{TASK}.yaml", _group_yaml(tasks))
    write_json_atomic(out / "manifest.json", {"n": n, "seed": seed, "words": words, "split": "test",
                                              "corpora": {"seed": manifest.get("seed"), "sizes": manifest.get("sizes")},
                                              "counts": counts})
    return out
