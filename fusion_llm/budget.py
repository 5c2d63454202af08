"""Budget plan: parameters, storage and memory of a fused model, computed on the meta device (no weights).

Storage per parameter:
- Linear weights inside decoder layers at nf4/fp4: 4 bits + double-quantized block scales
  (8-bit absmax per 64 weights + an fp32 scale per 256 blocks) = 4.127 bits;
  at int8: 8 bits + an fp32 scale per output row; at ``none``: the compute dtype.
- Embeddings, norms, biases and the LM head stay in the compute dtype (bitsandbytes does not
  quantize them).

"bf16-equivalent parameters" = stored bytes / 2: the number of bf16 parameters that would take the
same memory. The limit (``FusionConfig.budget_limit``, default 8e9) applies to the frozen backbones
as loaded (truncated to what `fusion_llm.backbones.load_backbone` keeps) plus every trainable parameter,
in the same unit (an fp32 trainable parameter counts 2). A hub-only backbone is planned from its config.json
(fetched alone when it is not cached). Where the backbones go to GPUs, `check_budget` also compares the
memory estimate with the GPUs' free memory before anything loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from fusion_llm.backbones import loaded_depth
from fusion_llm.config import BackboneSpec, FusionConfig
from fusion_llm.errors import BudgetError
from fusion_llm.heads import FusionHead

NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
TRAINABLE_BYTES = 4  # the head and member adapters train in fp32 (accelerate's mixed precision keeps fp32 weights)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class BackbonePlan:
    name: str
    model: str
    quantization: str
    total_params: int  # the full model as published
    run_params: int  # what is kept and run after truncation
    layers_run: int
    num_layers: int
    quantized_params: int
    stored_bytes: float

    @property
    def bf16_equivalent(self) -> float:
        return self.stored_bytes / 2


@dataclass
class Plan:
    backbones: list[BackbonePlan]
    trainable_params: int
    limit: float
    batch_size: int
    seq_len: int
    memory_bytes: float

    @property
    def trainable_bf16_equivalent(self) -> float:
        return self.trainable_params * TRAINABLE_BYTES / 2

    @property
    def total_bf16_equivalent(self) -> float:
        return sum(b.bf16_equivalent for b in self.backbones) + self.trainable_bf16_equivalent

    @property
    def within_budget(self) -> bool:
        return self.total_bf16_equivalent <= self.limit

    def table(self) -> str:
        rows = [
            "| backbone | quant | params (full) | params run | layers run | stored GB | bf16-equiv params |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for b in self.backbones:
            rows.append(f"| {b.name} ({b.model}) | {b.quantization} | {b.total_params / 1e9:.3f}B | "
                        f"{b.run_params / 1e9:.3f}B | {b.layers_run}/{b.num_layers} | {b.stored_bytes / 1e9:.2f} | "
                        f"{b.bf16_equivalent / 1e9:.3f}B |")
        rows.append(f"| trainable head | fp32 | | {self.trainable_params / 1e6:.2f}M | | "
                    f"{self.trainable_params * TRAINABLE_BYTES / 1e9:.3f} | {self.trainable_bf16_equivalent / 1e9:.4f}B |")
        total_full = sum(b.total_params for b in self.backbones)
        verdict = "within" if self.within_budget else "OVER"
        rows.append(f"| **total** | | {total_full / 1e9:.2f}B | | | | **{self.total_bf16_equivalent / 1e9:.3f}B** |")
        return "\n".join(rows) + (
            f"\n\nbudget: {self.total_bf16_equivalent / 1e9:.3f}B bf16-equivalent of {self.limit / 1e9:.1f}B limit: "
            f"{verdict} budget\nestimated device memory at batch {self.batch_size} x {self.seq_len} tokens: "
            f"{self.memory_bytes / 2**30:.2f} GiB"
        )


def _meta_model(spec: BackboneSpec, with_lm_head: bool, config=None) -> nn.Module:
    config = config or spec.load_model_config()
    spec.fill_from(config)
    loader = AutoModelForCausalLM if with_lm_head else AutoModel
    with torch.device("meta"):
        return loader.from_config(config)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder.layers


def plan_backbone(spec: BackboneSpec, with_lm_head: bool = False, config=None) -> BackbonePlan:
    """Parameters and storage of one backbone, from its config (default: read locally) on the meta device."""
    model = _meta_model(spec, with_lm_head, config)
    layers = _decoder_layers(model)
    depth = loaded_depth(spec, with_lm_head)
    dropped = {id(p) for layer in layers[depth:] for p in layer.parameters()}
    quantizable = {id(m.weight) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    dtype_bytes = DTYPE_BYTES[spec.compute_dtype]
    total = run = quantized = 0
    stored = 0.0
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            n = p.numel()
            total += n
            if id(p) in dropped:
                continue
            run += n
            if id(p) in quantizable and spec.quantization != "none":
                quantized += n
                if spec.quantization == "int8":
                    stored += n + 4 * p.shape[0]
                else:
                    stored += n * NF4_BITS / 8
            else:
                stored += n * dtype_bytes
    return BackbonePlan(spec.name, spec.model, spec.quantization, total, run, depth, spec.num_hidden_layers,
                        quantized, stored)


def trainable_parameters(config: FusionConfig) -> int:
    """Parameters of the head the config describes (built on the meta device)."""
    with torch.device("meta"):
        head = FusionHead(config)
    return sum(p.numel() for p in head.parameters())


def _activation_bytes(spec: BackboneSpec, batch: int, seq: int, config, depth: int) -> float:
    """Peak transient activation memory of one no-grad forward (documented upper estimate).

    Per layer the residual stream, the MLP's two intermediate tensors and the attention scores are
    alive at once; kept taps persist until the head runs.
    """
    text = config.get_text_config()
    inter = getattr(text, "intermediate_size", 4 * spec.hidden_size)
    heads = text.num_attention_heads
    dtype_bytes = DTYPE_BYTES[spec.compute_dtype]
    per_token = spec.hidden_size * (4 + len(spec.tap_layers)) + 2 * inter
    return dtype_bytes * batch * (seq * per_token + heads * seq * seq) if depth else 0.0


def plan(config: FusionConfig, batch_size: int = 8, seq_len: int = 512) -> Plan:
    """The budget plan of a fused model, without loading any weights.

    Args:
        config: the fusion config (every backbone's config must be readable locally).
        batch_size, seq_len: the shape for the memory estimate.

    Returns:
        A `Plan`; ``plan.table()`` renders it, ``plan.within_budget`` compares with the limit.
    """
    lm = config.head["kind"] == "lm"
    plans, memory = [], 0.0
    specs = config.backbone_specs
    predictions = lm and config.head.get("source_predictions", False)
    for spec in specs:
        model_config = spec.load_model_config(hub=True)  # a hub-only backbone: its config.json alone
        with_head = lm and (spec.anchor or predictions)  # source predictions need every source's LM head
        bp = plan_backbone(spec, with_lm_head=with_head, config=model_config)
        config.set_backbone_fields(spec.name, num_hidden_layers=spec.num_hidden_layers, hidden_size=spec.hidden_size,
                                   max_position_embeddings=spec.max_position_embeddings)
        plans.append(bp)
        memory += bp.stored_bytes + _activation_bytes(spec, batch_size, seq_len, model_config, bp.layers_run)
        vocab = model_config.get_text_config().vocab_size
        if lm and spec.anchor:
            memory += 3 * 4 * batch_size * seq_len * vocab  # fp32 logits, their softmax and gradient
        elif with_head:  # a source's fp32 logits (no gradient) before its top-k
            memory += 4 * batch_size * seq_len * vocab
    trainable = trainable_parameters(config)
    memory += trainable * (TRAINABLE_BYTES + 4 + 8)  # fp32 weights, gradients, AdamW moments
    return Plan(plans, trainable, float(config.budget_limit), batch_size, seq_len, memory)


def gpu_free_bytes(config: FusionConfig) -> float | None:
    """Free memory of the GPUs the backbones will be placed on (each backbone's ``device_map``; none given: this
    process's GPU, ``LOCAL_RANK`` under a launcher), or None when none goes to a GPU or none is present."""
    if not torch.cuda.is_available():
        return None
    current, devices = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())), set()
    for spec in config.backbone_specs:
        where = spec.device_map
        targets = where.values() if isinstance(where, dict) else [where]
        for target in targets:
            if target is None or target == "cuda":
                devices.add(current)
            elif target == "auto":
                devices.update(range(torch.cuda.device_count()))
            elif isinstance(target, int) or str(target).isdigit():
                devices.add(int(target))
            elif str(target).startswith("cuda:"):
                devices.add(int(str(target)[len("cuda:"):]))
    return float(sum(torch.cuda.mem_get_info(d)[0] for d in devices)) if devices else None


def check_budget(config: FusionConfig, batch_size: int = 1, seq_len: int = 1) -> Plan:
    """Raise `BudgetError` (with the table) when the config is over its parameter budget, or when its memory
    estimate at ``batch_size`` x ``seq_len`` tokens exceeds the free memory of the GPUs it goes to."""
    result = plan(config, batch_size, seq_len)
    if not result.within_budget:
        raise BudgetError(f"budget_limit: the plan needs {result.total_bf16_equivalent / 1e9:.3f}B bf16-equivalent "
                          f"parameters, over the limit of {result.limit / 1e9:.3f}B; tap shallower layers, quantize "
                          f"(quantization: nf4) or raise model.budget_limit", result.table())
    free = gpu_free_bytes(config)
    if free is not None and result.memory_bytes > free:
        raise BudgetError(
            f"device memory: the plan needs about {result.memory_bytes / 2**30:.1f} GiB at batch {batch_size} x "
            f"{seq_len} tokens and the GPU(s) it goes to have {free / 2**30:.1f} GiB free; lower train.batch_size or "
            f"data.max_length, quantize the backbones (quantization: nf4) or spread them over more GPUs "
            f"(backbones[].device_map)", result.table())
    return result
