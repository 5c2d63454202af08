"""Member adapters: LoRA inside a frozen backbone, owned and saved by the fusion head (``backbones[].lora_rank``).

The late head adds a residual after the anchor's last layer; it cannot change what the anchor's layers compute,
and measured on real members that is where a short adaptation gains most (LoRA on the anchor alone beats a late
head of the same size). With ``lora_rank > 0`` a backbone gets LoRA (peft's layers, the same parametrisation as
the benchmarks' LoRA control: ``A`` Kaiming-uniform, ``B`` zero, scale ``lora_alpha / rank``) on every Linear of
its loaded decoder layers. The ``A`` / ``B`` weights are modules of the `FusionHead` (so the optimizer, accelerate's
checkpoints and ``save_pretrained`` see them like any other head weight) and are wired into the backbone's peft
layers when a `FusionModel` is built. ``B = 0`` at initialisation, so an untrained fused model is still the
anchor exactly; the backbone's own (4-bit) weights are never written.

A backbone object serves one `FusionModel` at a time: building another model on the same loaded backbone rewires
its adapters to the new head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fusion_llm.backbones import keep_4bit_differentiable, loaded_depth, truncated_config
from fusion_llm.config import BackboneSpec
from fusion_llm.errors import ConfigError


def decoder_linears(model: nn.Module) -> dict[str, list[int]]:
    """``{module path: [in, out]}`` of every Linear in a decoder (the LoRA control's ``all-linear`` set: the
    output layer is not part of the decoder)."""
    return {name: [m.in_features, m.out_features] for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name}


def lora_modules(spec: BackboneSpec, with_lm_head: bool) -> dict[str, list[int]]:
    """The Linears member adapters go on, from the backbone's config alone (a decoder built on the meta device)."""
    from transformers import AutoModel

    config = truncated_config(spec.load_model_config(), loaded_depth(spec, with_lm_head))
    with torch.device("meta"):
        decoder = AutoModel.from_config(config)
    decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder
    return decoder_linears(decoder)


def _key(path: str) -> str:
    return path.replace(".", "__")


class MemberLoRA(nn.Module):
    """The LoRA weights of one backbone: for each target Linear an ``A`` (rank x in) and ``B`` (out x rank)."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        if not spec.lora_modules:
            raise ConfigError(f"backbones[{spec.name!r}].lora_modules: unknown; load the backbones first "
                              "(or give a config readable locally)")
        self.rank = spec.lora_rank
        self.alpha = float(spec.lora_alpha or 2 * spec.lora_rank)
        self.paths = sorted(spec.lora_modules)
        self.lora_A = nn.ModuleDict({_key(p): nn.Linear(spec.lora_modules[p][0], self.rank, bias=False)
                                     for p in self.paths})
        self.lora_B = nn.ModuleDict({_key(p): nn.Linear(self.rank, spec.lora_modules[p][1], bias=False)
                                     for p in self.paths})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """peft's default LoRA initialisation: A Kaiming-uniform, B zero (the update starts at zero)."""
        for a in self.lora_A.values():
            if a.weight.device.type != "meta":
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in self.lora_B.values():
            if b.weight.device.type != "meta":
                nn.init.zeros_(b.weight)

    def attach(self, backbone) -> None:
        """Put peft LoRA layers on the backbone's target Linears (once) and make them use these weights."""
        from peft import LoraConfig, inject_adapter_in_model

        model = backbone.model
        if not getattr(model, "_fusion_member_lora", False):
            found = decoder_linears(model)
            missing = [p for p in self.paths if p not in found]
            shapes = {p: [self.lora_A[_key(p)].in_features, self.lora_B[_key(p)].out_features] for p in self.paths}
            if missing or any(found[p] != shapes[p] for p in self.paths):
                raise ConfigError(f"backbones[{backbone.name!r}]: the head's member adapters do not fit this "
                                  f"backbone's layers ({(missing or self.paths)[0]}); train a head for it")
            config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.paths, lora_dropout=0.0,
                                bias="none")
            inject_adapter_in_model(config, model)
            keep_4bit_differentiable(model)  # gradients flow through the frozen 4-bit layers from now on
            model._fusion_member_lora = True
            model.requires_grad_(False)  # peft's own fresh A / B are replaced below; the base stays frozen
        modules = dict(model.named_modules())
        for path in self.paths:
            layer = modules[path]
            layer.lora_A["default"] = self.lora_A[_key(path)]
            layer.lora_B["default"] = self.lora_B[_key(path)]
            layer.scaling["default"] = self.alpha / self.rank
            layer.enable_adapters(True)
        backbone.trainable = True


def detach(backbone) -> None:
    """Switch off member adapters an earlier head wired into this backbone (a head without them is built on it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(backbone.model, "_fusion_member_lora", False):
        for module in backbone.model.modules():
            if isinstance(module, BaseTunerLayer):
                params = [(p, p.requires_grad) for p in module.parameters()]
                module.enable_adapters(False)
                for p, flag in params:  # peft freezes the adapters it turns off: they belong to the other head
                    p.requires_grad_(flag)
    backbone.trainable = False
