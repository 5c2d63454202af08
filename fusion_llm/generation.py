"""Text generation with a fused language model (``FusionModel.generate``).

The anchor drives decoding: it runs once over the (left-padded) prompts and then one token per step
with its KV cache, and its tokens are the ones generated. Each source backbone sees the growing text
re-tokenized with its own tokenizer and re-aligned with the causal rule of `fusion_llm.alignment` at
every step, so the fused feature at anchor position ``t`` depends only on the text through anchor
token ``t`` - exactly as in `FusionModel.lm_forward`, which greedy decoding reproduces token for token.

Sources are recomputed, not cached: with ``head.source_tails`` (the default) a source runs over its own
tokenization of the anchor's prefix at every step where that changed; without, over its settled tokens
whenever a new one settles (a settled token never changes, so otherwise its previous feature is reused). `GenerationOutput.timings` splits the time between the anchor, the
sources (tokenization + alignment + forward) and the head.

Text of a generated token: the continuation is what the anchor tokenizer decodes for the prompt's
ids followed by the generated ids, minus what it decodes for the prompt's ids alone; an incomplete
UTF-8 sequence at the end (byte-fallback / byte-level pieces of one character) is not text yet, so
such a token has zero width until the token completing the character arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fusion_llm.alignment import align_source, causal_char_ends, prefix_tokens
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


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text that ``new_ids`` add after ``prompt_ids`` (an incomplete trailing character left out)."""
    base = _decode(tokenizer, prompt_ids)
    full = _decode(tokenizer, prompt_ids + new_ids)
    text = full[len(base):] if full.startswith(base) else _decode(tokenizer, new_ids)
    return text.rstrip("\ufffd")  # bytes of a character that is not complete yet


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
    for k in range(len(new_ids)):
        new_end = len(prompt) + len(continuation_text(tokenizer, prompt_ids, new_ids[: k + 1]))
        offsets.append((end, max(end, new_end)))
        end = max(end, new_end)
    return prompt + continuation_text(tokenizer, prompt_ids, new_ids), offsets


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


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids: argmax, or a draw from softmax(logits / temperature) over the top k."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


class _SourceFeatures:
    """Per prompt and source: the taps at the source's token for the last anchor position (the end of its
    tokenization of the anchor's prefix with ``source_tails``, else the last settled token), recomputed only
    when that token sequence changes."""

    def __init__(self, model, batch: int):
        anchor = model.anchor.name
        self.model = model
        self.sources = {n: b for n, b in model.backbones.items() if n != anchor}
        self.cached = {n: [None] * batch for n in self.sources}  # (key, [tap (H,) per layer]) or None
        self.tails = model.config.head_spec.source_tails
        self.predictions = model.config.head_spec.source_predictions  # the last layer too, for the source's LM head
        self.runs = 0

    @torch.no_grad()
    def at_last_position(self, rows: list[int], texts: dict[int, str], offsets: dict[int, list]) -> dict:
        """name -> ([taps (len(rows), 1, H)], index (len(rows), 1)) for the last anchor token of each row (with
        ``head.source_predictions``, the source's last layer comes after its taps)."""
        out = {}
        for name, backbone in self.sources.items():
            todo = {}
            for r in rows:
                if self.tails:  # the source's own tokens of exactly the anchor's prefix (settled + tail)
                    end = int(causal_char_ends(offsets[r], len(texts[r]))[-1])
                    seq = prefix_tokens(backbone.tokenizer, texts[r][:end])
                    key, j = tuple(seq), len(seq) - 1
                else:  # the last settled token
                    ids, index = align_source(texts[r], offsets[r], backbone.tokenizer)
                    j = index[-1]
                    seq, key = ids[: j + 1], j
                cached = self.cached[name][r]
                if j >= 0 and (cached is None or cached[0] != key):
                    todo[r] = (seq, j, key)
                elif j < 0:
                    self.cached[name][r] = (key, None)
            if todo:  # one right-padded batch of every prompt whose settled source prefix grew
                order = list(todo)
                length = max(len(todo[r][0]) for r in order)
                pad = backbone.tokenizer.pad_token_id or 0
                ids = torch.full((len(order), length), pad, dtype=torch.long)
                mask = torch.zeros((len(order), length), dtype=torch.long)
                for i, r in enumerate(order):
                    ids[i, : len(todo[r][0])] = torch.tensor(todo[r][0])
                    mask[i, : len(todo[r][0])] = 1
                layers = backbone.spec.resolved_taps() + ([backbone.spec.num_hidden_layers] if self.predictions else [])
                taps = backbone.taps(ids, mask, layers=layers)  # [(n, S, H)] per tap layer (and the last layer)
                self.runs += 1
                for i, r in enumerate(order):
                    _, j, key = todo[r]
                    self.cached[name][r] = (key, [t[i, j] for t in taps])
            hidden = backbone.hidden_size
            layers = len(backbone.spec.tap_layers) + int(self.predictions)
            taps, index = [], []
            for r in rows:
                j, feats = self.cached[name][r]
                index.append(0 if feats is not None else -1)
                taps.append(feats if feats is not None else [torch.zeros(hidden)] * layers)
            out[name] = ([torch.stack([t[k] for t in taps]).unsqueeze(1) for k in range(layers)],  # (n, 1, H)
                         torch.tensor(index).unsqueeze(1))  # (n, 1)
        return out


@torch.no_grad()
def generate(model, prompts: list[str] | str, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, stop_tokens=None,
             seed: int | None = None) -> GenerationOutput:
    """Continue each prompt with the fused LM (anchor's vocabulary), greedily or by sampling.

    Args:
        model: a `FusionModel` with an LM head (``head.kind: lm``).
        prompts: one prompt or a list (batched; left-padded for the anchor).
        max_new_tokens: most tokens generated per prompt.
        do_sample: sample from the fused distribution instead of taking the argmax.
        temperature: divides the logits before sampling (> 0).
        top_k: sample among the k most likely tokens only.
        stop_tokens: anchor token ids or token strings that end a prompt's generation (the stop token is
            kept); default the anchor's EOS; ``[]`` never stops early.
        seed: seeds the sampling generator (reproducible draws without touching the global RNG).

    Returns:
        A `GenerationOutput` (ids, per-prompt new tokens and texts, timings).
    """
    anchor = model.anchor
    if anchor is None or anchor.lm_head is None:
        raise ValueError("generate needs an LM fusion model (head.kind: lm, anchor loaded with its LM head)")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or max_new_tokens < 0:
        raise ValueError("give at least one prompt and max_new_tokens >= 0")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    started = time.perf_counter()
    timings = dict.fromkeys(("anchor", "sources", "head", "sampling"), 0.0)
    tokenizer = anchor.tokenizer
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

    anchor_taps = anchor.spec.resolved_taps()
    last_layer = anchor.spec.num_hidden_layers
    wanted = sorted(set(anchor_taps + [last_layer]))
    sources = _SourceFeatures(model, batch)
    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    texts = {i: prompts[i] for i in range(batch)}
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
        confidence = corrections = None
        if sources.predictions:
            corrections, confidence = model.source_predictions(source_last, alignment, *anchor.lm_log_probs(last))
        head_out = head(features, confidence=confidence, alignment=alignment)
        residual = head_out.logits  # (n, 1, anchor hidden)
        hidden = add_residual(last, residual.to(last.device), model.config.head)
        if sources.predictions:
            logits = mixed_logits(anchor, hidden, head_out.mix, corrections)
        else:
            logits = anchor.lm_logits(hidden)
        logits = logits[:, -1]  # (n, V)
        t3 = time.perf_counter()
        chosen = _next_tokens(logits, do_sample, temperature, top_k, generator).cpu()
        column = torch.full((batch,), pad, dtype=torch.long)
        column[rows] = chosen
        still = []
        for r, token in zip(active, chosen.tolist()):
            new_tokens[r].append(token)
            if token in stops:
                continue
            still.append(r)
            # The same spans as text_and_offsets, one token at a time.
            end = offsets[r][-1][1] if len(offsets[r]) > len(prompt_offsets[r]) else len(prompts[r])
            texts[r] = prompts[r] + continuation_text(tokenizer, prompt_ids[r], new_tokens[r])
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
    texts_out = [continuation_text(tokenizer, prompt_ids[i], new_tokens[i]) for i in range(batch)]
    timings.update(total=time.perf_counter() - started, source_runs=sources.runs,
                   generated_tokens=sum(len(x) for x in new_tokens))
    return GenerationOutput(torch.cat(sequence, dim=1), new_tokens, texts_out, timings)
