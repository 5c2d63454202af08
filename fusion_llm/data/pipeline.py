"""From a `DataConfig` to tokenized `datasets` splits and padded batches, one tokenization per backbone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from datasets import DatasetDict, load_dataset

from fusion_llm import alignment
from fusion_llm.data import grokking
from fusion_llm.data.text import python_docs_dataset
from fusion_llm.data.topics import topics_dataset
from fusion_llm.errors import ConfigError
from fusion_llm.runconfig import DataConfig

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_raw(data: DataConfig, need_labels: bool = True) -> DatasetDict:
    """The raw train / eval splits named by a data config (built-in task, local files or a HF dataset).

    ``need_labels=False`` for language modelling (text only)."""
    if data.task:
        ds = _builtin_task(data)
    elif data.files:
        ds = _local_files(data)
    else:
        try:
            ds = load_dataset(data.dataset, data.dataset_config)
        except Exception as err:  # datasets raises many types for a missing / unreachable dataset
            raise ConfigError(f"data.dataset: cannot load {data.dataset!r} ({str(err).splitlines()[0]})") from None
    for key, split in (("train_split", data.train_split), ("eval_split", data.eval_split)):
        if split not in ds:
            raise ConfigError(f"data.{key}: no split {split!r}; available: {sorted(ds)}")
    out = DatasetDict(train=ds[data.train_split], validation=ds[data.eval_split])
    for split, cap in (("train", data.max_train_examples), ("validation", data.max_eval_examples)):
        if cap is not None and len(out[split]) > cap:
            out[split] = out[split].select(range(cap))
        if len(out[split]) == 0:
            raise ConfigError(f"data: the {split} split is empty; point data at a non-empty dataset")
        for column in (data.text_column, data.label_column) if need_labels else (data.text_column,):
            if column not in out[split].column_names:
                raise ConfigError(f"data: column {column!r} missing in {split}; columns: {out[split].column_names} "
                                  f"(set data.text_column / data.label_column)")
    return out


def _builtin_tasks() -> dict:
    """Task name -> a function of the seed building its `DatasetDict`."""
    tasks = {"topics": topics_dataset, "python_docs": python_docs_dataset,
             "grokking_all": lambda seed: grokking.build_union_dataset(seed=seed)}
    tasks.update({t: (lambda seed, t=t: grokking.build_task_dataset(t, seed=seed)) for t in grokking.TASKS})
    return tasks


def _builtin_task(data: DataConfig) -> DatasetDict:
    tasks = _builtin_tasks()
    if data.task not in tasks:
        raise ConfigError(f"data.task: unknown task {data.task!r}; known: {', '.join(tasks)}")
    return tasks[data.task](seed=data.seed)


def _local_files(data: DataConfig) -> DatasetDict:
    if not isinstance(data.files, dict) or not data.files:
        raise ConfigError("data.files: give a mapping split -> path, e.g. {train: data/train.jsonl}")
    suffixes = set()
    for split, path in data.files.items():
        if not Path(path).is_file():
            raise ConfigError(f"data.files.{split}: {path} does not exist")
        if Path(path).stat().st_size == 0:
            raise ConfigError(f"data.files.{split}: {path} is empty; give a file with examples")
        suffixes.add(Path(path).suffix.lower())
    if len(suffixes) != 1 or next(iter(suffixes)) not in _FILE_BUILDERS:
        raise ConfigError(f"data.files: use one file type of {sorted(_FILE_BUILDERS)}, got {sorted(suffixes)}")
    builder, splits = _FILE_BUILDERS[suffixes.pop()], {}
    for split, path in data.files.items():  # one at a time: an error names its file
        try:
            splits[split] = load_dataset(builder, data_files={split: str(path)})[split]
        except Exception as err:  # datasets wraps the parser's error; its cause says what is wrong
            cause = str(err.__cause__ or err).splitlines() or [type(err).__name__]
            raise ConfigError(f"data.files.{split}: cannot read {path} as {builder} ({cause[0]})") from None
    columns = {split: sorted(d.column_names) for split, d in splits.items()}
    if len({tuple(c) for c in columns.values()}) > 1:
        raise ConfigError("data.files: the splits have different columns ("
                          + "; ".join(f"{split}: {c}" for split, c in columns.items())
                          + "); give every split the same columns")
    return DatasetDict(splits)


def _map_key(tokenizers: list, *settings, code: tuple[Path, ...] = ()) -> str:
    """Name of a ``Dataset.map`` result by what determines it: the tokenizers, settings and code.

    datasets would otherwise fingerprint the map function by pickling the tokenizers it holds (about a
    minute for Gemma's 262k vocabulary, on every call)."""
    files = (Path(__file__), *code)
    return hashlib.sha256(repr(([hashlib.sha256(t.backend_tokenizer.to_str().encode()).hexdigest() for t in tokenizers],
                                settings, [hashlib.sha256(p.read_bytes()).hexdigest() for p in files])).encode()
                          ).hexdigest()


def check_labels(ds: DatasetDict, label_column: str, num_labels: int) -> None:
    """Refuse labels outside 0..num_labels-1 (with the offending value)."""
    for split in ds:
        labels = ds[split][label_column]
        bad = [x for x in labels if not isinstance(x, int) or not 0 <= x < num_labels]
        if bad:
            raise ConfigError(f"data.{label_column}: label {bad[0]!r} in {split} is outside 0..{num_labels - 1}; "
                              f"set model.head.num_labels or fix the labels")


def tokenize_splits(ds: DatasetDict, tokenizers: dict, text_column: str, label_column: str,
                    max_lengths: dict[str, int]) -> DatasetDict:
    """Tokenize every split with every backbone's own tokenizer (``Dataset.map``, cached by datasets).

    Columns: ``{name}_input_ids`` per backbone and ``labels``.
    """
    truncated = {}

    def encode(batch):
        out = {"labels": batch[label_column]}
        for name, tok in tokenizers.items():
            ids = tok(batch[text_column], add_special_tokens=True)["input_ids"]
            limit = max_lengths[name]
            truncated[name] = truncated.get(name, 0) + sum(len(x) > limit for x in ids)
            out[f"{name}_input_ids"] = [x[:limit] for x in ids]
        return out

    key = _map_key([tokenizers[n] for n in sorted(tokenizers)], sorted(tokenizers), text_column, label_column,
                   sorted(max_lengths.items()))
    result = DatasetDict({
        split: d.map(encode, batched=True, remove_columns=d.column_names, desc="tokenizing",
                     new_fingerprint=hashlib.sha256(f"{d._fingerprint}:{key}".encode()).hexdigest()[:16])
        for split, d in ds.items()
    })
    for name, count in truncated.items():
        if count:
            import warnings

            warnings.warn(f"backbone {name!r}: {count} examples longer than {max_lengths[name]} tokens were truncated",
                          stacklevel=2)
    return result


def pad_right(seqs: list, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad integer sequences: (ids (B, L) filled with ``value``, mask (B, L) with 1 on real entries)."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return out, mask


class Collator:
    """Pads each backbone's ids on the right with its own pad id; returns the `FusionModel` input dict."""

    def __init__(self, pad_ids: dict[str, int]):
        self.pad_ids = pad_ids

    def __call__(self, rows: list[dict]) -> dict:
        batch = {"labels": torch.tensor([r["labels"] for r in rows])}
        inputs = {}
        for name, pad in self.pad_ids.items():
            ids, mask = pad_right([r[f"{name}_input_ids"] for r in rows], pad)
            inputs[name] = {"input_ids": ids, "attention_mask": mask}
        batch["inputs"] = inputs
        if "index" in rows[0]:
            batch["index"] = torch.tensor([r["index"] for r in rows])
        return batch



def align_splits(ds: DatasetDict, anchor_tokenizer, source_tokenizers: dict, text_column: str,
                 max_length: int, tails: bool = True) -> DatasetDict:
    """Tokenize every split with the anchor and each source and compute the causal alignment once
    per example (``Dataset.map``; stored with the example, never recomputed in the training step).
    ``tails``: pack each source's unsettled tails (``fusion_llm.alignment.align_batch(tails=True)``). Each row
    also holds ``f"{source}_fallbacks"``, the alignment safety nets it took (`alignment_fallbacks` sums them)."""
    fn = alignment.make_align_fn(anchor_tokenizer, source_tokenizers, text_column=text_column,
                                 max_length=max_length, tails=tails, count_fallbacks=True)
    tokenizers = [anchor_tokenizer, *[source_tokenizers[n] for n in sorted(source_tokenizers)]]
    key = _map_key(tokenizers, sorted(source_tokenizers), text_column, max_length, tails, fn.__qualname__,
                   code=tuple(sorted(Path(alignment.__file__).parent.glob("*.py"))))
    out = DatasetDict({
        split: d.map(fn, batched=True, remove_columns=d.column_names, desc="aligning",
                     new_fingerprint=hashlib.sha256(f"{d._fingerprint}:{key}".encode()).hexdigest()[:16])
        for split, d in ds.items()
    })
    return out.remove_columns(["offset_mapping"])


def alignment_fallbacks(ds) -> dict[str, int]:
    """Per source: the alignment safety-net fallbacks over an aligned split (0 is what the alignment promises)."""
    return {c.removesuffix("_fallbacks"): int(sum(ds[c])) for c in ds.column_names if c.endswith("_fallbacks")}


class LMCollator:
    """Pads the anchor ids (labels = next anchor token, -100 on padding), each source's ids and alignment (-1),
    and a source's packed-tail columns when the rows have them (`fusion_llm.alignment.pack_tails`: then its
    input dict also holds ``tail_group`` (padding -2), ``tail_ctx`` and ``position_ids``)."""

    def __init__(self, anchor: str, pad_ids: dict[str, int]):
        self.anchor = anchor
        self.pad_ids = pad_ids

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.pad_ids[self.anchor])
        labels = torch.cat([ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), torch.full_like(ids[:, :1], -100)], 1)
        inputs = {self.anchor: {"input_ids": ids, "attention_mask": mask}}
        alignment = {}
        for name, pad in self.pad_ids.items():
            if name == self.anchor:
                continue
            src, src_mask = pad_right([r[f"{name}_input_ids"] for r in rows], pad)
            inputs[name] = {"input_ids": src, "attention_mask": src_mask}
            if f"{name}_tail_group" in rows[0]:  # packed tails (`fusion_llm.alignment.TAIL_COLUMNS`)
                for column, pad in (("tail_group", -2), ("tail_ctx", 0), ("position_ids", 0)):
                    inputs[name][column], _ = pad_right([r[f"{name}_{column}"] for r in rows], pad)
            alignment[name], _ = pad_right([r[f"{name}_align"] for r in rows], -1)
        return {"inputs": inputs, "alignment": alignment, "labels": labels}
