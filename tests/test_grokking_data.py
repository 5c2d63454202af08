"""The grokking tasks: sizes, answers checked by independent arithmetic, seeded splits, datasets."""

import itertools

import numpy as np
import pytest

from fusion_llm.data.grokking import (
    TASKS,
    VOCABULARY,
    build_task_dataset,
    build_union_dataset,
    num_pairs,
    split_indices,
    task_examples,
)

P = 97
EXPECTED_PAIRS = {"x_plus_y": 9409, "x_minus_y": 9409, "x_div_y": 9312, "permutation": 14400}


@pytest.fixture(scope="module")
def union():
    return build_union_dataset(seed=3, holdout_fraction=0.1)


def _decode_element(token: str):
    """Independent reading of a token string: "42" -> 42, "[2 0 1 4 3]" -> (2, 0, 1, 4, 3)."""
    if token.startswith("["):
        return tuple(int(i) for i in token[1:-1].split())
    return int(token)


def _expected(task, x, y):
    if task == "x_plus_y":
        return (x + y) % P
    if task == "x_minus_y":
        return (x - y) % P
    if task == "x_div_y":
        return (x * pow(y, P - 2, P)) % P
    return tuple(x[y[i]] for i in range(5))  # the seed's composition: apply y, then x


@pytest.mark.parametrize("task", TASKS)
def test_sizes(task):
    input_ids, labels = task_examples(task)
    assert num_pairs(task) == EXPECTED_PAIRS[task]
    assert input_ids.shape == (EXPECTED_PAIRS[task], 4) and labels.shape == (EXPECTED_PAIRS[task],)
    # every (x, y) pair exactly once
    assert len({(int(r[0]), int(r[2])) for r in input_ids}) == EXPECTED_PAIRS[task]


@pytest.mark.parametrize("task", TASKS)
def test_every_answer_matches_independent_arithmetic(task):
    input_ids, labels = task_examples(task)
    tokens = VOCABULARY.tokens
    for row, label in zip(input_ids, labels):
        x, y = _decode_element(tokens[row[0]]), _decode_element(tokens[row[2]])
        assert row[1] == VOCABULARY.operator_id(task) and tokens[row[3]] == "="
        assert _decode_element(tokens[label]) == _expected(task, x, y)


def test_spot_checks():
    vocab = VOCABULARY
    _, y_plus = task_examples("x_plus_y")
    assert y_plus[(12 * 97 + 30)] == vocab.number_id(42)
    assert y_plus[(90 * 97 + 10)] == vocab.number_id(3)
    _, y_minus = task_examples("x_minus_y")
    assert y_minus[(5 * 97 + 9)] == vocab.number_id(93)
    _, y_div = task_examples("x_div_y")
    # y runs over 1..96, so pair (x, y) sits at x * 96 + (y - 1); 7 / 3 = 7 * 65 mod 97 = 67 (3 * 65 = 195 = 2 * 97 + 1)
    assert y_div[7 * 96 + (3 - 1)] == vocab.number_id(67) and (67 * 3) % 97 == 7
    assert all((int(y_div[x * 96 + y - 1]) * y) % P == x for x in range(P) for y in range(1, P))
    perms = list(itertools.permutations(range(5)))
    inputs_perm, y_perm = task_examples("permutation")
    a, b = (1, 2, 0, 3, 4), (0, 1, 2, 4, 3)
    k = perms.index(a) * 120 + perms.index(b)
    assert y_perm[k] == vocab.permutation_id((1, 2, 0, 4, 3))  # c[i] = a[b[i]]
    assert vocab.decode(inputs_perm[k]) == ["[1 2 0 3 4]", "*", "[0 1 2 4 3]", "="]


def test_vocabulary_is_shared_and_labels_are_answer_token_ids():
    vocab = VOCABULARY
    assert vocab.size == 97 + 120 + 4 + 1 == len(set(vocab.tokens))
    assert vocab.num_answer_classes == 217
    assert len({vocab.operator_id(t) for t in TASKS}) == 4
    assert all(vocab.operator_id(t) >= vocab.num_answer_classes for t in TASKS)
    assert vocab.equals_id == vocab.size - 1
    for task in TASKS:
        _, labels = task_examples(task)
        assert set(labels.tolist()) <= set(vocab.answer_token_ids(task).tolist())
    with pytest.raises(ValueError, match="known: x_plus_y"):
        vocab.operator_id("x_times_y")


@pytest.mark.parametrize("task", TASKS)
def test_split_is_disjoint_complete_and_half(task):
    splits = split_indices(task, seed=5)
    train, validation = splits["train"], splits["validation"]
    assert len(train) == int(EXPECTED_PAIRS[task] * 0.5)
    assert not set(train.tolist()) & set(validation.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, validation])), np.arange(EXPECTED_PAIRS[task]))


@pytest.mark.parametrize("task", TASKS)
def test_split_is_reproducible_and_seeded(task):
    first, again, other = split_indices(task, seed=5), split_indices(task, seed=5), split_indices(task, seed=6)
    assert all(np.array_equal(first[s], again[s]) for s in first)
    assert not np.array_equal(first["train"], other["train"])


def test_tasks_of_equal_size_get_different_splits():
    assert not np.array_equal(split_indices("x_plus_y", 0)["train"], split_indices("x_minus_y", 0)["train"])


@pytest.mark.parametrize("task", TASKS)
def test_holdout_is_carved_from_train(task):
    plain = split_indices(task, seed=5)
    carved = split_indices(task, seed=5, holdout_fraction=0.1)
    assert np.array_equal(carved["validation"], plain["validation"])  # validation untouched
    assert np.array_equal(np.sort(np.concatenate([carved["train"], carved["holdout"]])), plain["train"])
    assert not set(carved["train"].tolist()) & set(carved["holdout"].tolist())
    assert len(carved["holdout"]) == int(len(plain["train"]) * 0.1)
    assert np.array_equal(carved["holdout"], split_indices(task, seed=5, holdout_fraction=0.1)["holdout"])


def test_union_dataset_columns_and_splits(union):
    assert list(union) == ["train", "holdout", "validation"]
    assert union["train"].column_names == ["input_ids", "label", "task", "text", "answer_text", "pair_index"]
    assert union["train"].features["label"].num_classes == VOCABULARY.num_answer_classes
    total = sum(len(union[s]) for s in union)
    assert total == sum(EXPECTED_PAIRS.values())
    for split in union:
        assert '"split_seed": 3' in union[split].info.description
    columns = {s: union[s].select_columns(["task", "pair_index"]).to_pandas() for s in union}
    for task in TASKS:
        assert all(set(c.task) == set(TASKS) for c in columns.values())
        pairs = [set(c.pair_index[c.task == task]) for c in columns.values()]
        assert sum(map(len, pairs)) == EXPECTED_PAIRS[task] and set().union(*pairs) == set(range(EXPECTED_PAIRS[task]))


def test_rows_agree_with_text_rendering(union):
    rows = union["validation"].shuffle(seed=0).select(range(300))
    for row in rows:
        tokens = VOCABULARY.decode(row["input_ids"])
        assert row["text"] == " ".join(tokens) and row["text"].endswith(" =")
        assert tokens[1] == VOCABULARY.tokens[VOCABULARY.operator_id(row["task"])]
        assert row["answer_text"] == VOCABULARY.tokens[row["label"]]
        x, y = _decode_element(tokens[0]), _decode_element(tokens[2])
        assert _decode_element(row["answer_text"]) == _expected(row["task"], x, y)


def test_single_task_dataset_is_that_tasks_union_slice():
    single = build_task_dataset("x_div_y", seed=3)
    assert list(single) == ["train", "validation"]
    assert set(single["train"]["task"]) == {"x_div_y"}
    assert sorted(single["train"]["pair_index"]) == split_indices("x_div_y", seed=3)["train"].tolist()
    assert len(single["train"]) + len(single["validation"]) == 9312
