"""The four algorithmic tasks of the grokking setup, on one shared token vocabulary.

Tasks (the seed experiment's, same element orders and operations):

- ``x_plus_y``:    (x + y) mod 97,           x, y in 0..96   -> 9409 pairs
- ``x_minus_y``:   (x - y) mod 97,           x, y in 0..96   -> 9409 pairs
- ``x_div_y``:     x * y^(97-2) mod 97,      x in 0..96, y in 1..96 -> 9312 pairs
- ``permutation``: a ∘ b in S5, ``c[i] = a[b[i]]`` (b first, then a) -> 14400 pairs

Every example is the token sequence ``[x, op, y, =]`` and its answer. Pair ``k`` of a
task is ``(x, y) = (xs[k // len(ys)], ys[k % len(ys)])`` as in the seed.

The shared vocabulary puts the answer tokens first, so an answer's token id *is* its class
id over the shared answer space (217 classes: numbers then permutations)::

    0 .. 96     the numbers "0" .. "96"
    97 .. 216   the 120 permutations of S5 in lexicographic order, "[0 1 2 3 4]" ...
    217 .. 220  one operator per task: "+", "-", "/", "*"  (in `TASKS` order)
    221         "="

Splits: a fraction 0.5 of each task's pairs is training, the rest validation, chosen by a
seeded permutation (unlike the seed, whose shuffle was unseeded); a holdout for
hyper-parameter selection is carved out of *train*, never out of validation. The same
``seed`` always gives the same split, and each task draws from its own stream, so tasks
of equal size do not share a split pattern.
"""

from __future__ import annotations

import itertools
import json
import zlib
from dataclasses import dataclass
from functools import cache

import numpy as np

TASKS = ("x_plus_y", "x_minus_y", "x_div_y", "permutation")
MODULUS = 97
PERMUTATION_SIZE = 5
TRAIN_FRACTION = 0.5
DEFAULT_SPLIT_SEED = 0

OPERATOR_SYMBOLS = {"x_plus_y": "+", "x_minus_y": "-", "x_div_y": "/", "permutation": "*"}
EQUALS_SYMBOL = "="

# The permutations of S5 in lexicographic order (what itertools.permutations yields).
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(PERMUTATION_SIZE)))


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown grokking task {task!r}; known: {', '.join(TASKS)}")


def permutation_text(permutation: tuple[int, ...]) -> str:
    """A permutation in one-line notation, e.g. ``"[2 0 1 4 3]"``."""
    return "[" + " ".join(str(i) for i in permutation) + "]"


@dataclass(frozen=True)
class GrokkingVocabulary:
    """The shared token vocabulary of all four tasks.

    Answer tokens (numbers, then permutations) come first, so for every answer
    ``token id == class id`` over the first `num_answer_classes` ids.
    """

    tokens: tuple[str, ...]
    num_numbers: int
    num_permutations: int

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def num_answer_classes(self) -> int:
        """Size of the shared answer space (numbers + permutations = 217)."""
        return self.num_numbers + self.num_permutations

    @property
    def equals_id(self) -> int:
        return self.size - 1

    def operator_id(self, task: str) -> int:
        """The operator token of ``task`` (each task has its own)."""
        _check_task(task)
        return self.num_answer_classes + TASKS.index(task)

    def number_id(self, number: int) -> int:
        if not 0 <= number < self.num_numbers:
            raise ValueError(f"number {number} outside 0..{self.num_numbers - 1}")
        return number

    def permutation_id(self, permutation: tuple[int, ...]) -> int:
        return self.num_numbers + _PERMUTATION_INDEX[tuple(permutation)]

    def answer_token_ids(self, task: str) -> np.ndarray:
        """The token ids a task's answers (and operands) range over, in the seed's element order.

        Position ``k`` in this array is the seed's local class id of that element, so a
        per-task model maps shared ids to its own with it.
        """
        _check_task(task)
        if task == "permutation":
            return np.arange(self.num_numbers, self.num_answer_classes)
        return np.arange(self.num_numbers)

    def decode(self, token_ids) -> list[str]:
        return [self.tokens[int(i)] for i in token_ids]


_PERMUTATION_INDEX = {p: i for i, p in enumerate(PERMUTATIONS)}

VOCABULARY = GrokkingVocabulary(
    tokens=(
        tuple(str(n) for n in range(MODULUS))
        + tuple(permutation_text(p) for p in PERMUTATIONS)
        + tuple(OPERATOR_SYMBOLS[t] for t in TASKS)
        + (EQUALS_SYMBOL,)
    ),
    num_numbers=MODULUS,
    num_permutations=len(PERMUTATIONS),
)


def _operands(task: str) -> tuple[list, list]:
    """The seed's ordered x- and y-elements of a task."""
    if task == "permutation":
        return list(PERMUTATIONS), list(PERMUTATIONS)
    if task == "x_div_y":
        return list(range(MODULUS)), list(range(1, MODULUS))
    return list(range(MODULUS)), list(range(MODULUS))


def _answer(task: str, x, y):
    if task == "x_plus_y":
        return (x + y) % MODULUS
    if task == "x_minus_y":
        return (x - y) % MODULUS
    if task == "x_div_y":
        return (x * pow(y, MODULUS - 2, MODULUS)) % MODULUS
    return tuple(x[y[i]] for i in range(len(y)))


def _element_id(task: str, element) -> int:
    return VOCABULARY.permutation_id(element) if task == "permutation" else VOCABULARY.number_id(element)


def num_pairs(task: str) -> int:
    """How many (x, y) pairs a task has: 9409, 9409, 9312, 14400."""
    _check_task(task)
    xs, ys = _operands(task)
    return len(xs) * len(ys)


@cache
def _task_arrays(task: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = _operands(task)
    operator, equals = VOCABULARY.operator_id(task), VOCABULARY.equals_id
    input_ids = np.empty((len(xs) * len(ys), 4), dtype=np.int64)
    labels = np.empty(len(xs) * len(ys), dtype=np.int64)
    for k, (x, y) in enumerate(itertools.product(xs, ys)):  # x outer, y inner: the seed's pair order
        input_ids[k] = (_element_id(task, x), operator, _element_id(task, y), equals)
        labels[k] = _element_id(task, _answer(task, x, y))
    input_ids.flags.writeable = False
    labels.flags.writeable = False
    return input_ids, labels


def task_examples(task: str) -> tuple[np.ndarray, np.ndarray]:
    """All pairs of a task in the seed's order, on the shared vocabulary.

    Returns:
        ``(input_ids, labels)``: int64 arrays (num_pairs, 4) ``[x, op, y, =]`` and
        (num_pairs,) answer token ids (= class ids over the shared answer space).
        Read-only; copy before changing.
    """
    _check_task(task)
    return _task_arrays(task)


def _rng(seed: int, task: str, stream: int) -> np.random.Generator:
    # One independent stream per (seed, task, purpose); crc32 keeps it stable across runs.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), stream])


def split_indices(
    task: str,
    seed: int = DEFAULT_SPLIT_SEED,
    train_fraction: float = TRAIN_FRACTION,
    holdout_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
    """The seeded split of a task's pair indices.

    Args:
        task: one of `TASKS`.
        seed: the split seed; the same seed always gives the same split.
        train_fraction: share of all pairs that is training (``int(n * fraction)``, as the seed).
        holdout_fraction: share of the *training* pairs moved into a ``holdout`` split
            for hyper-parameter selection (0 = no holdout).

    Returns:
        ``{"train": ..., "validation": ...}`` (plus ``"holdout"`` when
        ``holdout_fraction > 0``): disjoint sorted int64 arrays of pair indices whose union
        is every pair.
    """
    _check_task(task)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n = num_pairs(task)
    order = _rng(seed, task, 0).permutation(n)
    num_train = int(n * train_fraction)
    train, validation = order[:num_train], order[num_train:]
    splits = {"validation": np.sort(validation)}
    if holdout_fraction > 0:
        train = _rng(seed, task, 1).permutation(train)
        num_holdout = int(len(train) * holdout_fraction)
        splits["holdout"] = np.sort(train[:num_holdout])
        train = train[num_holdout:]
    splits["train"] = np.sort(train)
    return {name: splits[name] for name in ("train", "holdout", "validation") if name in splits}


def example_text(token_ids) -> str:
    """The plain-string rendering of ``[x, op, y, =]``, e.g. ``"12 + 30 ="``."""
    return " ".join(VOCABULARY.decode(token_ids))


def _split_columns(task: str, indices: np.ndarray) -> dict[str, list]:
    input_ids, labels = task_examples(task)
    rows, answers = input_ids[indices], labels[indices]
    return {
        "input_ids": rows.tolist(),
        "label": answers.tolist(),
        "task": [task] * len(indices),
        "text": [example_text(r) for r in rows],
        "answer_text": VOCABULARY.decode(answers),
        "pair_index": indices.tolist(),
    }


def _features():
    from datasets import ClassLabel, Features, Sequence, Value

    return Features({
        "input_ids": Sequence(Value("int64"), length=4),
        "label": ClassLabel(names=list(VOCABULARY.tokens[: VOCABULARY.num_answer_classes])),
        "task": Value("string"),
        "text": Value("string"),
        "answer_text": Value("string"),
        "pair_index": Value("int64"),
    })


def _split_record(tasks, seed, train_fraction, holdout_fraction) -> str:
    return json.dumps({
        "tasks": list(tasks), "split_seed": seed, "train_fraction": train_fraction,
        "holdout_fraction": holdout_fraction, "modulus": MODULUS,
        "permutation_size": PERMUTATION_SIZE, "vocabulary_size": VOCABULARY.size,
    })


def build_grokking_dataset(
    tasks: str | tuple[str, ...] | list[str] = TASKS,
    seed: int = DEFAULT_SPLIT_SEED,
    train_fraction: float = TRAIN_FRACTION,
    holdout_fraction: float = 0.0,
):
    """A `datasets.DatasetDict` of one task or the union of several, on the shared vocabulary.

    Each task is split on its own (`split_indices`), then the tasks' splits are
    concatenated in the order given; every task keeps its own operator token.

    Args:
        tasks: a task name or a sequence of them (default: all four).
        seed: the split seed, recorded in each split's ``info.description`` (JSON).
        train_fraction: share of each task's pairs that is training.
        holdout_fraction: share of each task's *training* pairs moved to a ``holdout`` split.

    Returns:
        ``DatasetDict`` with ``train`` and ``validation`` (and ``holdout`` when
        ``holdout_fraction > 0``). Columns: ``input_ids`` (4 shared token ids
        ``[x, op, y, =]``), ``label`` (answer class id over the shared answer space, which
        equals the answer's token id; a ``ClassLabel`` of 217 names), ``task``, ``text``
        (``"12 + 30 ="``), ``answer_text`` (``"42"``) and ``pair_index`` (the pair's index
        in `task_examples`).
    """
    from datasets import Dataset, DatasetDict, DatasetInfo

    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks repeat a name: {tasks}")
    per_task = {t: split_indices(t, seed, train_fraction, holdout_fraction) for t in tasks}
    description = _split_record(tasks, seed, train_fraction, holdout_fraction)
    features = _features()
    splits = {}
    for split in per_task[tasks[0]]:
        columns: dict[str, list] = {}
        for task in tasks:
            for name, values in _split_columns(task, per_task[task][split]).items():
                columns.setdefault(name, []).extend(values)
        info = DatasetInfo(description=description, features=features)
        splits[split] = Dataset.from_dict(columns, features=features, info=info)
    return DatasetDict(splits)


def build_task_dataset(task: str, seed: int = DEFAULT_SPLIT_SEED, train_fraction: float = TRAIN_FRACTION,
                       holdout_fraction: float = 0.0):
    """One task's `DatasetDict` (see `build_grokking_dataset` for the columns)."""
    _check_task(task)
    return build_grokking_dataset((task,), seed, train_fraction, holdout_fraction)


def build_union_dataset(tasks: tuple[str, ...] | list[str] = TASKS, seed: int = DEFAULT_SPLIT_SEED,
                        train_fraction: float = TRAIN_FRACTION, holdout_fraction: float = 0.0):
    """The union of several tasks' `DatasetDict` for a multi-task model (see `build_grokking_dataset`)."""
    return build_grokking_dataset(tuple(tasks), seed, train_fraction, holdout_fraction)
