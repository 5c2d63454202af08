"""A fused LM inside EleutherAI's lm-evaluation-harness (``lm_eval``): the model ``fusion_llm``.

    import lm_eval, fusion_llm.harness                 # importing registers the model name "fusion_llm"
    lm_eval.simple_evaluate(model="fusion_llm", model_args="head=outputs/standins_lm/head", tasks=["hellaswag"])
    lm_eval.simple_evaluate(model=FusedLM(fusion_model), tasks=[...])   # an in-memory FusionModel

`FusedLM` answers the harness's three request types with a `FusionModel` that has an LM head:

- ``loglikelihood``: context + continuation is one text, tokenized by the anchor (with its BOS) and aligned
  for every source exactly as in training and `fusion_llm.scoring.score_fused` (``align_source``, packed
  tails, `LMCollator`, `FusionModel.lm_forward`); the continuation's tokens are those after the context's
  own tokenization, and trailing whitespace of the context moves onto the continuation (as the harness's
  ``HFLM`` does). The fused forward is causal, so the continuation's score only sees text up to each token.
- ``loglikelihood_rolling``: the whole document, every token after BOS predicted once.
- ``generate_until``: `FusionModel.generate`, greedy unless the request samples, cut at the ``until`` strings.

A text longer than the anchor's positions is scored in windows (each holds the most context that fits, as
the harness's rolling windows do): a window is a slice of the whole text's anchor tokens, and the sources
read the slice of text those tokens cover, aligned onto them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fusion_llm.alignment import TAIL_COLUMNS, align_source, pack_tails
from fusion_llm.data.pipeline import LMCollator
from fusion_llm.errors import ConfigError

log = logging.getLogger(__name__)


def alone_model(backbone, shared_width: int = 64):
    """A `FusionModel` over one backbone (loaded with its LM head) alone, under a fresh LM head: the residual starts
    at zero, so its logits are the backbone's own exactly (the baseline beside a trained head; any member scored
    through the same adapter). Member adapters are left out (``lora_rank: 0``)."""
    import dataclasses

    from fusion_llm.config import FusionConfig
    from fusion_llm.modeling import FusionModel

    spec = {**dataclasses.asdict(backbone.spec), "anchor": True, "lora_rank": 0, "lora_modules": None}
    fresh = FusionConfig(backbones=[spec], shared_width=shared_width, head={"kind": "lm"})
    torch.manual_seed(0)
    return FusionModel(fresh, {backbone.name: backbone})


def continuation_accuracy(lm, n: int = 100, seed: int = 0, folder: str | Path | None = None) -> dict:
    """``acc`` and ``acc_norm`` of an ``lm_eval`` model on the local task ``fusion_continuation``, per domain and over
    all items (``lm_eval.simple_evaluate``): ``{"acc": {domain: value, ..., "all": value}, "acc_norm": {...},
    "items": {domain: count}}``. The task is built (``n`` items per domain, ``seed``) into ``folder`` (default the
    cache's task folder)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fusion_llm.data.continuation import TASK, build_continuation_tasks, is_built, task_dir

    built = Path(folder or task_dir())
    if not is_built(built, n, seed):  # built once: workers scoring side by side read the same files
        built = build_continuation_tasks(n=n, seed=seed, out_dir=built)
    manager = TaskManager(include_path=str(built), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager, log_samples=False)
    rows = {name.removeprefix(f"{TASK}_"): values for name, values in results["results"].items() if name != TASK}
    out = {"items": {d: results["n-samples"][f"{TASK}_{d}"]["effective"] for d in rows}}
    for metric in ("acc", "acc_norm"):
        out[metric] = {d: values[f"{metric},none"] for d, values in rows.items()}
        total = sum(out["items"].values())
        out[metric]["all"] = sum(out[metric][d] * out["items"][d] for d in rows) / max(total, 1)
    return out


def load_fused(head: str | Path, *, anchor_only: bool = False, device: str | None = None):
    """A saved LM head (``FusionModel.from_pretrained``) with its backbones; with ``anchor_only`` only the anchor
    loads, under a fresh head (`alone_model`). A folder without a saved head is a `ConfigError`."""
    from fusion_llm.backbones import load_backbone
    from fusion_llm.modeling import FusionModel, saved_config

    path = Path(head)
    device_map = device if device and device != "cpu" else None
    config = saved_config(path)
    if config.head_spec.kind != "lm":
        raise ConfigError(f"{path}: a {config.head_spec.kind} head; the harness needs an LM head (head.kind: lm)")
    if not anchor_only:
        return FusionModel.from_pretrained(path, device_map=device_map)
    spec = next(s for s in config.backbone_specs if s.anchor)
    anchor = load_backbone(spec, with_lm_head=True, device_map=device_map)
    FusionModel._check_fingerprint(config, anchor)  # the same identity check as a fused load
    return alone_model(anchor, config.shared_width)


def plan_windows(length: int, first: int, max_length: int) -> list[tuple[int, int, int]]:
    """Windows that predict tokens ``first .. length - 1`` of a sequence, each token once.

    Returns ``(start, end, n_pred)`` per window: the model reads tokens ``start .. end - 1`` (at most
    ``max_length``) and the last ``n_pred`` of them are scored; every window holds as much context as fits,
    as the harness's rolling windows do.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    out, p = [], max(first, 1)
    while p < length:
        q = min(p + max_length - 1, length)
        out.append((max(0, q - max_length), q, q - p))
        p = q
    return out


@register_model("fusion_llm")
class FusedLM(LM):
    """A fused LM (`FusionModel`, ``head.kind: lm``) as an ``lm_eval`` model.

    Args:
        model: an in-memory `FusionModel` with an LM head (else ``head`` is loaded).
        head: a saved head folder (``model_args="head=PATH"``).
        anchor_only: evaluate the anchor alone (`alone_model`) - the baseline.
        batch_size: windows per fused forward / prompts per ``generate`` call ("auto" is 8).
        max_length: anchor positions per window (default the anchor's ``max_length``).
        max_gen_toks: tokens generated when a request does not say (``max_gen_toks``).
        device: where a loaded head's backbones go (``cuda``, ``cuda:0``; default where transformers puts them).
        seed: seeds sampled generation.
    """

    def __init__(self, model=None, head: str | None = None, anchor_only: bool = False, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, device: str | None = None,
                 seed: int | None = 1234, **kwargs):
        super().__init__()
        if kwargs.get("max_batch_size") is not None or set(kwargs) - {"max_batch_size"}:
            log.warning("fusion_llm: ignoring model arguments %s", sorted(kwargs))
        if model is None:
            if head is None:
                raise ConfigError("fusion_llm: give a FusionModel or model_args='head=PATH' (a saved LM head)")
            model = load_fused(head, anchor_only=_flag(anchor_only), device=device)
        elif _flag(anchor_only):
            model = alone_model(model.anchor, model.config.shared_width)
        if model.anchor is None or model.anchor.lm_head is None or model.config.head_spec.kind != "lm":
            raise ConfigError("fusion_llm: the harness needs an LM fusion model (head.kind: lm)")
        anchor_device = model.anchor.device
        if model.head_module.device != anchor_device:
            model.head.to(anchor_device)
        self.model = model
        self.tokenizer = model.anchor.tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else model.anchor.max_length
        self.max_gen_toks = int(max_gen_toks)
        self.seed = None if seed is None else int(seed)
        self._device = anchor_device
        names = model.backbones
        self._sources = {n: b.tokenizer for n, b in names.items() if n != model.anchor.name}
        self._collate = LMCollator(model.anchor.name, {n: _pad_id(b.tokenizer) for n, b in names.items()})

    # ---- tokens -------------------------------------------------------------------------------------
    def _encode(self, text: str) -> tuple[list[int], list[list[int]]]:
        """The anchor's ids and offsets of ``text`` as training sees them (special tokens included), less a
        zero-width special token the tokenizer appends (an EOS is not part of the text)."""
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [list(o) for o in enc["offset_mapping"]]
        special = set(self.tokenizer.all_special_ids)
        while len(ids) > 1 and ids[-1] in special and offsets[-1][0] == offsets[-1][1] == len(text):
            if ids[-1] == self.tokenizer.bos_token_id:
                break
            ids.pop(), offsets.pop()
        return ids, offsets

    def _starts_with_bos(self, ids: list[int]) -> bool:
        bos = self.tokenizer.bos_token_id
        return bos is not None and ids[:1] == [bos]

    def _row(self, text: str, ids: list[int], offsets: list[list[int]], start: int, end: int) -> dict:
        """The `align_batch` row of anchor tokens ``start .. end - 1`` of ``text`` (those very tokens, not a
        re-tokenization): each source reads the text they cover and is aligned onto them (`align_source`)."""
        a = offsets[start][0] if start > 0 else 0
        b = len(text) if end == len(ids) else max(o[1] for o in offsets[start:end])
        piece = text[a:b]
        local = [[max(s - a, 0), max(e - a, 0)] for s, e in offsets[start:end]]
        row = {"input_ids": ids[start:end]}
        tails = self.model.config.head_spec.source_tails
        for name, tok in self._sources.items():
            aligned = align_source(piece, local, tok, tails=tails)
            src, index = aligned[:2]
            src = src[: max(max(index, default=-1) + 1, min(1, len(src)))]  # as align_batch's trim_sources
            if tails:
                packed = pack_tails(src, index, aligned[2])
                src, index = packed["input_ids"], packed["align"]
                row.update({f"{name}_{c}": packed[c] for c in TAIL_COLUMNS})
            row[f"{name}_input_ids"], row[f"{name}_align"] = src, index
        return row

    @torch.no_grad()
    def token_logprobs(self, items: list[tuple[str, list[int], list[list[int]], int]]
                       ) -> list[tuple[list[float], list[bool]]]:
        """Per item ``(text, ids, offsets, first)``: the log-probability of each anchor token ``first ..`` of
        ``ids`` given the text before it, and whether it is the fused model's argmax there."""
        windows = [(i, *w) for i, (_, ids, _, first) in enumerate(items)
                   for w in plan_windows(len(ids), first, self.max_length)]
        windows.sort(key=lambda w: w[2] - w[1], reverse=True)  # longest first: memory trouble shows at once
        results: dict[tuple[int, int], tuple[list[float], list[bool]]] = {}
        head = self.model.head_module
        was_training = head.training
        head.eval()
        try:
            for k in range(0, len(windows), self.batch_size):
                chunk = windows[k:k + self.batch_size]
                rows = [self._row(items[i][0], items[i][1], items[i][2], s, e) for i, s, e, _ in chunk]
                batch = self._collate(rows)
                logits = self.model.lm_forward(batch["inputs"], batch["alignment"]).logits
                for j, (i, s, e, n) in enumerate(chunk):
                    width = e - s
                    scores = torch.log_softmax(logits[j, width - n - 1:width - 1].float(), dim=-1)
                    target = torch.tensor(items[i][1][e - n:e], device=scores.device)
                    picked = scores.gather(-1, target[:, None])[:, 0]
                    results[i, s] = (picked.tolist(), (scores.argmax(-1) == target).tolist())
        finally:
            head.train(was_training)
        out = []
        for i, (_, ids, _, first) in enumerate(items):
            lp, greedy = [], []
            for s, _, _ in plan_windows(len(ids), first, self.max_length):
                lp += results[i, s][0]
                greedy += results[i, s][1]
            out.append((lp, greedy))
        return out

    # ---- the harness's requests ---------------------------------------------------------------------
    def _pair(self, context: str, continuation: str) -> tuple[str, list[int], list[list[int]], int]:
        """``(text, ids, offsets, first)``: the whole text's anchor tokens; the continuation's start at ``first``
        (the length of the context's own tokenization, after its trailing whitespace moves to the continuation)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        text = context + continuation
        ids, offsets = self._encode(text)
        if context:
            first = len(self._encode(context)[0])
        elif self._starts_with_bos(ids):
            first = 1
        else:
            raise ValueError("an empty context needs an anchor tokenizer that starts every text with BOS")
        return text, ids, offsets, first

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        items = [self._pair(*req.args) for req in requests]
        out = []
        for req, (lp, greedy) in zip(requests, self.token_logprobs(items)):
            answer = (float(sum(lp)), bool(all(greedy)))
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items = []
        for req in requests:
            (text,) = req.args
            ids, offsets = self._encode(text)
            if not self._starts_with_bos(ids):
                raise ValueError("rolling log-likelihood needs an anchor tokenizer that starts every text with BOS")
            items.append((text, ids, offsets, 1))
        out = []
        for req, (lp, _) in zip(requests, self.token_logprobs(items)):
            total = float(sum(lp))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        settings = [_gen_settings(req.args[1], self.max_gen_toks) for req in requests]
        for i, s in enumerate(settings):
            groups[repr(s)].append(i)
        out: list[str | None] = [None] * len(requests)
        for members in groups.values():
            until, max_new, sample = settings[members[0]]
            for k in range(0, len(members), self.batch_size):
                chunk = members[k:k + self.batch_size]
                prompts = [self._fit_prompt(requests[i].args[0], max_new) for i in chunk]
                texts = self._generate(prompts, until, max_new, sample)
                for i, text in zip(chunk, texts):
                    out[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _fit_prompt(self, context: str, max_new: int) -> str:
        """``context`` less its oldest text where its tokens and ``max_new`` new ones exceed the anchor's
        positions (the harness left-truncates likewise), cut at an anchor token's start."""
        ids, offsets = self._encode(context)
        room = self.max_length - max_new - int(self._starts_with_bos(ids))
        body = len(ids) - int(self._starts_with_bos(ids))
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length} positions")
        if body <= room:
            return context
        return context[offsets[len(ids) - room][0]:]

    def _generate(self, prompts: list[str], until: list[str], max_new: int, sample: dict) -> list[str]:
        """Generated texts. Decoding stops early at the ``until`` strings (``stop_strings``, where `generate` takes
        them) and at an ``until`` string that is one anchor token; the text is cut at the strings anyway, so the
        result is the one of decoding ``max_new`` tokens. A row that stopped early with none of the strings in
        its text is decoded again in full."""
        stops = _stop_ids(self.tokenizer)
        early = {ids[0] for u in until if len(ids := self.tokenizer.encode(u, add_special_tokens=False)) == 1}
        kw = dict(max_new_tokens=max_new, seed=self.seed, **sample)
        try:
            result = self.model.generate(prompts, stop_tokens=sorted(stops | early), **kw,
                                         **({"stop_strings": list(until)} if until else {}))
        except TypeError as err:  # a generate() without stop strings
            if "stop_strings" not in str(err):
                raise
            result = self.model.generate(prompts, stop_tokens=sorted(stops | early), **kw)
        texts = list(result.texts)
        redo = [i for i, new in enumerate(result.new_tokens) if len(new) < max_new
                and not (new and new[-1] in stops) and not any(u in texts[i] for u in until)]
        if redo:
            again = self.model.generate([prompts[i] for i in redo], stop_tokens=sorted(stops), **kw)
            for i, text in zip(redo, again.texts):
                texts[i] = text
        return texts

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "fusion_llm")).replace("/", "__")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _stop_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def _gen_settings(gen_kwargs: dict, default_max: int) -> tuple[list[str], int, dict]:
    """``(until, max_new_tokens, sampling kwargs)`` of a request's ``gen_kwargs``."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    max_new = int(kwargs.pop("max_gen_toks", default_max))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
    sample = {"do_sample": do_sample}
    if do_sample:
        sample["temperature"] = temperature
        if kwargs.get("top_k"):
            sample["top_k"] = int(kwargs.pop("top_k"))
    kwargs.pop("top_k", None)
    if kwargs:
        log.warning("fusion_llm: generation ignores %s", sorted(kwargs))
    return until, max_new, sample


def _cut(text: str, until: list[str]) -> str:
    for u in until:
        text = text.split(u)[0]
    return text
