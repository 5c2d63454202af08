"""Text generation with a fused language model (``FusionModel.generate``).

The anchor drives decoding: it runs once over the (left-padded) prompts and then one token per step
with its KV cache, and its tokens are the ones generated. Each source backbone sees the growing text
re-tokenized with its own tokenizer and re-aligned with the causal rule of `fusion_llm.alignment` at
every step, so the fused feature at anchor position ``t`` depends only on the text through anchor
token ``t`` - exactly as in `FusionModel.lm_forward`, which greedy decoding reproduces token for token.

Each source keeps a KV cache per prompt over the token sequence it ran last (settled tokens and, with
``head.source_tails``, the unsettled tail). At a step the cache is cropped back to the prefix the source's new
sequence shares with it - at least the settled tokens, which never change once settled - and only the rest runs:
a step's source cost is a token or two, not the whole prefix.
`GenerationOutput.timings` splits the time between the anchor, the sources (tokenization + alignment + forward)
and the head.

Text of a generated token: the continuation is what the anchor tokenizer decodes for the prompt's
ids followed by the generated ids, minus what it decodes for the prompt's ids alone; an incomplete
UTF-8 sequence at the end (byte-fallback / byte-level pieces of one character) is not text yet, so
such a token has zero width until the token completing the character arrives. `IncrementalText` gives that
text one token at a time from a decode of the last few tokens, not of the whole text.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from fusion_llm.alignment import causal_char_ends, prefix_tokens, settled_split
from fusion_llm.heads import add_residual, mixed_logits


@dataclass
class GenerationOutput:
    """What `generate` returns.

    Attributes:
        sequences: (B, P + N) anchor ids: the prompts left-padded to P, then the N generated steps
            (rows that stopped early are padded with the anchor's pad id).
        new_tokens: the generated ids of each prompt (a stop token, when hit, is the last one).
        texts: the generated continuation of each prompt, as text.
        timings: seconds spent in ``anchor``, ``sources``, ``head``, ``sampling`` and ``total``, plus
            ``source_runs`` (source forward passes) and ``generated_tokens``.
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    texts: list[str]
    timings: dict = field(default_factory=dict)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _added_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    base = _decode(tokenizer, prompt_ids)
    full = _decode(tokenizer, prompt_ids + new_ids)
    return full[len(base):] if full.startswith(base) else _decode(tokenizer, new_ids)


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text that ``new_ids`` add after ``prompt_ids`` (an incomplete trailing character left out)."""
    return _added_text(tokenizer, prompt_ids, new_ids).rstrip("\ufffd")  # bytes of a character not complete yet


class IncrementalText:
    """`continuation_text` one token at a time, without re-decoding the whole text at every step.

    Each step decodes a short window: the tokens after the last committed character boundary, behind a few tokens of
    context (text-generation-inference's prefix/read offsets). The new text is what the window's decode adds to the
    decode of its context; an incomplete character at the end is left out and its tokens stay in the window until it
    completes. Where the window's decode does not extend its context's (byte-fallback pieces that turn an earlier
    run of bytes invalid), it decodes everything instead. ``text`` equals ``continuation_text(tokenizer, prompt_ids,
    ids so far)`` after every step (tests check it on every fetched tokenizer, random ids included).
    """

    CONTEXT = 5  # non-special tokens of context before the uncommitted ones (decoders strip or merge at a start)

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.ids = list(prompt_ids)
        self.special = set(tokenizer.all_special_ids)
        self.read = len(self.ids)  # tokens whose text is committed
        self._window()
        self.committed = ""  # the continuation through ids[:read]: it ends on a whole character
        self.text = ""

    def _window(self) -> None:
        start, kept = self.read, 0
        while start > 0 and kept < self.CONTEXT:  # skipped special tokens are no context
            start -= 1
            kept += self.ids[start] not in self.special
        self.start, self.base = start, _decode(self.tokenizer, self.ids[start:self.read])

    def add(self, token: int) -> str:
        """Append one generated id; returns the whole continuation so far (``text``)."""
        self.ids.append(int(token))
        window = _decode(self.tokenizer, self.ids[self.start:])
        if window.startswith(self.base):
            added = self.committed + window[len(self.base):]
        else:  # this decoder's output depends on more than the window: decode it all
            added = _added_text(self.tokenizer, self.prompt_ids, self.ids[len(self.prompt_ids):])
        self.text = added.rstrip("\ufffd")
        if self.text == added:  # it ends on a whole character: commit
            self.committed, self.read = self.text, len(self.ids)
            self._window()
        return self.text


def text_and_offsets(tokenizer, prompt: str, prompt_offsets: list, prompt_ids: list[int],
                     new_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text after ``new_ids`` and the character span of every anchor token in it.

    Args:
        tokenizer: the anchor's fast tokenizer.
        prompt: the prompt text (what the sources read first).
        prompt_offsets: the anchor tokenizer's ``offset_mapping`` of the prompt (special tokens included).
        prompt_ids: the anchor ids of the prompt.
        new_ids: generated ids so far.

    Returns:
        ``(text, offsets)``: ``prompt`` + the decoded continuation, and ``(start, end)`` per anchor
        token (prompt tokens as the tokenizer gave them; generated token ``k`` spans from the end of
        the continuation after ``k`` tokens to its end after ``k + 1``).
    """
    offsets = [tuple(o) for o in prompt_offsets]
    end = len(prompt)
    text = IncrementalText(tokenizer, prompt_ids)
    for token in new_ids:
        new_end = len(prompt) + len(text.add(token))
        offsets.append((end, max(end, new_end)))
        end = max(end, new_end)
    return prompt + text.text, offsets


def _stop_ids(tokenizer, stop_tokens) -> set[int]:
    if stop_tokens is None:
        eos = tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    ids = set()
    for token in stop_tokens:
        if isinstance(token, int):
            ids.add(token)
            continue
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == tokenizer.unk_token_id:
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"stop token {token!r} is not a single token of the anchor's vocabulary")
            found = encoded[0]
        ids.add(int(found))
    return ids


def generation_parts(config, tokenizer, prompt_width: int, eos_ids: set[int], logits_processor=None,
                     stopping_criteria=None):
    """transformers' own logits processors and stopping criteria for a `GenerationConfig`, as ``generate`` of a
    transformers model builds them: repetition penalty and minimum new tokens always, temperature, top-k and
    top-p when sampling (unset fields are off); stop at ``eos_ids`` and at ``stop_strings``; then the caller's
    own lists."""
    from transformers import (EosTokenCriteria, LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, StoppingCriteriaList, StopStringCriteria,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.min_new_tokens and eos_ids:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_width, config.min_new_tokens, sorted(eos_ids)))
    if config.do_sample:
        if config.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(config.top_p))
    processors.extend(logits_processor or [])
    criteria = StoppingCriteriaList()
    if eos_ids:
        criteria.append(EosTokenCriteria(eos_token_id=sorted(eos_ids)))
    if config.stop_strings:
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
    criteria.extend(stopping_criteria or [])
    return processors, criteria


def _generation_config(generation_config, kwargs: dict):
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unexpected arguments {sorted(unknown)}")
    if config.max_new_tokens is None:
        config.max_new_tokens = 32
    if config.max_new_tokens < 0:
        raise ValueError("give at least one prompt and max_new_tokens >= 0")
    if (config.num_beams or 1) > 1:
        raise ValueError("beam search is not supported by fused generation: use num_beams=1")
    if config.do_sample and config.temperature is not None and config.temperature <= 0:
        raise ValueError(f"temperature must be positive, got {config.temperature}")
    return config


@dataclass
class _SourceState:
    """One prompt's view of one source: a KV cache over the token sequence it ran last, and the feature of that
    sequence's last token."""

    ids: list[int] = field(default_factory=list)  # the ids in ``cache``, the sequence of the last call ...
    cache: object = None
    feats: list | None = None  # ... and the taps at its last token


class _SourceFeatures:
    """Per prompt and source: the taps at the source's token for the last anchor position (the end of its
    tokenization of the anchor's prefix with ``source_tails``, else the last settled token).

    Each source keeps a KV cache per prompt over the token sequence it ran last. A step crops it back to the part
    the new sequence shares (never less than the settled tokens, which do not change: that is what settled means;
    usually all but the last token or two of the tail) and runs only the rest, so a step's cost does not grow with
    the text. The cache's layers are plain full-length ones (a sliding-window layer could not be cropped back past
    its window); the model's own masks keep the sliding windows."""

    def __init__(self, model, batch: int):
        anchor = model.anchor.name
        self.model = model
        self.sources = {n: b for n, b in model.backbones.items() if n != anchor}
        self.state = {n: [_SourceState() for _ in range(batch)] for n in self.sources}
        self.tails = model.config.head_spec.source_tails
        self.predictions = model.config.head_spec.source_predictions  # the last layer too, for the source's LM head
        self.runs = 0  # source forward passes
        self.tokens_run = 0  # source tokens those passes ran

    def _layers(self, backbone) -> list[int]:
        return backbone.spec.resolved_taps() + ([backbone.spec.num_hidden_layers] if self.predictions else [])

    def _advance(self, backbone, state: _SourceState, seq: list[int]) -> list | None:
        """The taps at the last token of ``seq``: the cache cropped to the prefix ``seq`` shares with what it holds,
        then one forward over the rest."""
        from transformers import DynamicCache

        shared = 0
        for a, b in zip(state.ids, seq):
            if a != b:
                break
            shared += 1
        shared = min(shared, len(seq) - 1)  # the last token runs again when nothing is new: its state is wanted
        if state.cache is None:
            state.cache = DynamicCache()
        state.cache.crop(shared - len(state.ids))
        new = seq[shared:]
        device = backbone.device
        layers = self._layers(backbone)
        out = backbone.model(input_ids=torch.tensor([new], device=device),
                             position_ids=torch.arange(shared, len(seq), device=device).unsqueeze(0),
                             cache=state.cache, use_cache=True, output_hidden_states=sorted(set(layers)))
        self.runs += 1
        self.tokens_run += len(new)
        state.ids = list(seq)
        return [out.hidden_states[layer][0, -1] for layer in layers]

    @torch.no_grad()
    def at_last_position(self, rows: list[int], texts: dict[int, str], offsets: dict[int, list]) -> dict:
        """name -> ([taps (len(rows), 1, H)], index (len(rows), 1)) for the last anchor token of each row (with
        ``head.source_predictions``, the source's last layer comes after its taps)."""
        out = {}
        for name, backbone in self.sources.items():
            layers = len(self._layers(backbone))
            taps, index = [], []
            for r in rows:
                prefix = texts[r][:int(causal_char_ends(offsets[r], len(texts[r]))[-1])]
                if self.tails:  # the source's own tokens of exactly the anchor's prefix (settled + tail)
                    seq = prefix_tokens(backbone.tokenizer, prefix)
                else:  # up to the last settled token
                    seq, settled = settled_split(prefix, backbone.tokenizer)
                    seq = seq[:settled]
                state = self.state[name][r]
                if seq and seq != state.ids:
                    state.feats = self._advance(backbone, state, seq)
                feats = state.feats if seq else None
                index.append(0 if feats is not None else -1)
                taps.append(feats if feats is not None else [torch.zeros(backbone.hidden_size)] * layers)
            out[name] = ([torch.stack([t[k] for t in taps]).unsqueeze(1) for k in range(layers)],  # (n, 1, H)
                         torch.tensor(index).unsqueeze(1))  # (n, 1)
        return out


@torch.no_grad()
def generate(model, prompts: list[str] | str, generation_config=None, *, streamer=None, logits_processor=None,
             stopping_criteria=None, stop_tokens=None, seed: int | None = None, **kwargs) -> GenerationOutput:
    """Continue each prompt with the fused LM (anchor's vocabulary), greedily or by sampling, the way
    ``generate`` of a transformers model does.

    Args:
        model: a `FusionModel` with an LM head (``head.kind: lm``).
        prompts: one prompt or a list (batched; left-padded for the anchor).
        generation_config: a transformers `GenerationConfig` (``max_new_tokens`` (default 32),
            ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
            ``stop_strings``, ``eos_token_id``); keyword arguments override its fields, as in transformers.
        streamer: a transformers streamer (``TextStreamer``, ``TextIteratorStreamer``): it receives the prompt's
            ids, then each new token as it is chosen (one prompt at a time, as in transformers).
        logits_processor, stopping_criteria: extra transformers ``LogitsProcessor`` / ``StoppingCriteria``,
            applied after the ones the config implies (`generation_parts`).
        stop_tokens: anchor token ids or token strings that end a prompt's generation (the stop token is
            kept); default the config's ``eos_token_id``, else the anchor's EOS; ``[]`` never stops early.
        seed: seeds the sampling generator (reproducible draws without touching the global RNG).

    Returns:
        A `GenerationOutput` (ids, per-prompt new tokens and texts, timings).
    """
    anchor = model.anchor
    if anchor is None or anchor.lm_head is None:
        raise ValueError("generate needs an LM fusion model (head.kind: lm, anchor loaded with its LM head)")
    if isinstance(prompts, str):
        prompts = [prompts]
    config = _generation_config(generation_config, kwargs)
    if not prompts:
        raise ValueError("give at least one prompt and max_new_tokens >= 0")
    if streamer is not None and len(prompts) > 1:
        raise ValueError("a streamer takes one prompt at a time (as in transformers): generate one prompt per call")
    max_new_tokens, do_sample = config.max_new_tokens, bool(config.do_sample)
    started = time.perf_counter()
    timings = dict.fromkeys(("anchor", "sources", "head", "sampling"), 0.0)
    tokenizer = anchor.tokenizer
    if stop_tokens is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        stop_tokens = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    stops = _stop_ids(tokenizer, stop_tokens)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    head = model.head_module
    head_was_training = head.training
    head.eval()

    enc = tokenizer(list(prompts), add_special_tokens=True, return_offsets_mapping=True)
    prompt_ids = [list(x) for x in enc["input_ids"]]
    if any(not ids for ids in prompt_ids):
        raise ValueError("a prompt is empty and the anchor tokenizer adds no BOS token to start from")
    prompt_offsets = [list(map(tuple, x)) for x in enc["offset_mapping"]]
    batch, width = len(prompts), max(len(x) for x in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((batch, width), pad, dtype=torch.long)  # left padding: every prompt ends at column -1
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, x in enumerate(prompt_ids):
        ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    processors, criteria = generation_parts(config, tokenizer, width, stops, logits_processor, stopping_criteria)
    if streamer is not None:
        streamer.put(ids[:, width - len(prompt_ids[0]):])

    anchor_taps = anchor.spec.resolved_taps()
    last_layer = anchor.spec.num_hidden_layers
    wanted = sorted(set(anchor_taps + [last_layer]))
    sources = _SourceFeatures(model, batch)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    texts = {i: prompts[i] for i in range(batch)}
    decoded = [IncrementalText(tokenizer, ids) for ids in prompt_ids]
    offsets = {i: list(prompt_offsets[i]) for i in range(batch)}
    active = list(range(batch))
    cache = None
    step_ids, step_mask = ids, mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as transformers' generate: left padding does not shift RoPE
    sequence = [ids]
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        out = anchor.model(input_ids=step_ids.to(anchor.device), attention_mask=step_mask.to(anchor.device),
                           position_ids=positions.to(anchor.device), cache=cache, use_cache=True,
                           output_hidden_states=wanted)
        cache = out.cache
        hidden = {layer: out.hidden_states[layer][:, -1:] for layer in wanted}  # (B, 1, H) at the last position
        t1 = time.perf_counter()
        source_feats = sources.at_last_position(active, texts, offsets)
        t2 = time.perf_counter()
        device = head.device
        rows = torch.tensor(active)
        features = {anchor.name: [hidden[layer][rows].to(device) for layer in anchor_taps]}
        source_last, alignment = {}, {}
        for name, (taps, index) in source_feats.items():
            if sources.predictions:
                *taps, source_last[name] = taps
            features[name], alignment[name] = [t.to(device) for t in taps], index.to(device)
        last = hidden[last_layer][rows]
        confidence = tops = None
        if sources.predictions:
            tops, confidence = model.source_predictions(source_last, alignment)
        head_out = head(features, confidence=confidence, alignment=alignment)
        residual = head_out.logits  # (n, 1, anchor hidden)
        hidden = add_residual(last, residual.to(last.device), model.config.head)
        logits = anchor.lm_logits(hidden)
        if sources.predictions:
            logits = mixed_logits(logits, head_out.mix, model.source_corrections(tops, logits))
        logits = logits[:, -1]  # (n, V)
        t3 = time.perf_counter()
        so_far = torch.cat(sequence, dim=1)
        scores = processors(so_far[rows], logits.float())
        if do_sample:
            chosen = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1).cpu()
        else:
            chosen = scores.argmax(-1).cpu()
        column = torch.full((batch,), pad, dtype=torch.long)
        column[rows] = chosen
        if streamer is not None:
            streamer.put(chosen)
        finished = criteria(torch.cat([so_far[rows], chosen.unsqueeze(1)], dim=1), scores)
        still = []
        for r, token, done in zip(active, chosen.tolist(), finished.tolist()):
            new_tokens[r].append(token)
            text = decoded[r].add(token)
            if done:
                continue
            still.append(r)
            # The same spans as text_and_offsets, one token at a time.
            end = offsets[r][-1][1] if len(offsets[r]) > len(prompt_offsets[r]) else len(prompts[r])
            texts[r] = prompts[r] + text
            offsets[r].append((end, max(end, len(texts[r]))))
        sequence.append(column.unsqueeze(1))
        timings["anchor"] += t1 - t0
        timings["sources"] += t2 - t1
        timings["head"] += t3 - t2
        timings["sampling"] += time.perf_counter() - t3
        active = still
        if not active:
            break
        # Next step: one new token per row (finished rows feed padding that nothing reads).
        step_ids = column.unsqueeze(1)
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        step_mask = mask
        positions = positions[:, -1:] + 1

    head.train(head_was_training)
    if streamer is not None:
        streamer.end()
    texts_out = [d.text for d in decoded]
    timings.update(total=time.perf_counter() - started, source_runs=sources.runs, source_tokens_run=sources.tokens_run,
                   generated_tokens=sum(len(x) for x in new_tokens))
    return GenerationOutput(torch.cat(sequence, dim=1), new_tokens, texts_out, timings)
