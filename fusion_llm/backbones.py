"""Frozen backbones: loaded quantized through ``from_pretrained``, truncated to the deepest tap, run without grad."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from transformers.utils import logging as hf_logging

from fusion_llm.config import BackboneSpec, ConfigError
from fusion_llm.output_loss import mixed_rows, output_loss
from fusion_llm.paths import cache_dir, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

# Config keys that describe how a model was loaded or saved, not what it is.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype", "quantization_config",
    "use_cache", "output_hidden_states", "return_dict", "tie_last_hidden_states", "architectures",
    "_attn_implementation_autoset", "output_attentions", "pad_token_id",
}


def config_fingerprint(config: PreTrainedConfig) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend.pop("padding", None), backend.pop("truncation", None)  # runtime settings, not the tokenizer
    return hashlib.sha256(json.dumps(backend, sort_keys=True).encode()).hexdigest()[:16]


WEIGHTS_FINGERPRINT = "sha256:"  # the scheme prefix of a full-content weights fingerprint
_BLOB = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's whole content.

    A file of a Hugging Face hub snapshot links to a blob named by that sha256 (the hub records it for every LFS
    file): the name is taken, nothing is read. Any other file is hashed once; the result is memoised in
    ``$FUSION_LLM_CACHE/weights_sha256.json`` by (path, size, mtime), so a changed file is hashed again.
    """
    path = Path(path)
    real = path.resolve()
    if path.is_symlink() and real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_path = cache_dir() / "weights_sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(real)
        try:
            write_json_atomic(memo_path, memo)
        except OSError:  # a read-only cache: hash again next time
            pass
    return memo[key]


def _weight_files(model: str, revision: str | None) -> list[Path]:
    folder = Path(model)
    if not folder.is_dir():  # a hub id: its snapshot in the local hub cache, if there
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.bin"]))
        except Exception:  # not in the cache (or not a hub id): no fingerprint
            return []
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def weights_fingerprint(model: str, revision: str | None = None) -> str | None:
    """``sha256:`` + a hash over every weights file's name and full-content sha256 (`file_sha256`: the hub's own
    record for hub snapshots, hashed once and memoised for local folders); None where no weights file is found.

    Two fine-tunes of one base share config and tokenizer; this tells them apart, whichever bytes differ.
    """
    files = _weight_files(model, revision)
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return WEIGHTS_FINGERPRINT + digest.hexdigest()[:32]


def quantization_config(spec: BackboneSpec) -> BitsAndBytesConfig | None:
    """The `BitsAndBytesConfig` for a spec's quantization (None for ``none``)."""
    dtype = getattr(torch, spec.compute_dtype)
    if spec.quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def truncated_config(config: PreTrainedConfig, num_layers: int) -> PreTrainedConfig:
    """A copy of ``config`` with only the first ``num_layers`` decoder layers (per-layer lists cut too)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    full = text.num_hidden_layers
    text.num_hidden_layers = num_layers
    for key in ("layer_types",):  # Gemma-2 alternates sliding / full attention per layer
        value = getattr(text, key, None)
        if isinstance(value, list) and len(value) == full:
            setattr(text, key, value[:num_layers])
    # hidden_states[-1] stays the last layer's output, not the final norm's: a tap means the same at any depth.
    text.tie_last_hidden_states = False
    return config


@dataclass
class FrozenBackbone:
    """One loaded, frozen backbone with its own tokenizer.

    Attributes:
        spec: the `BackboneSpec` it was loaded from (with resolved layer count and width).
        model: the decoder (``AutoModel``), truncated to ``spec.deepest_tap`` layers.
        tokenizer: the backbone's own fast tokenizer (right padding).
        fingerprint: ``{"config", "tokenizer", "weights"}`` hashes, compared when a head is loaded.
        final_norm, lm_head: the frozen final norm and output layer, only for an LM anchor.
    """

    spec: BackboneSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: dict
    final_norm: torch.nn.Module | None = None
    lm_head: torch.nn.Module | None = None
    logit_softcap: float | None = None
    trainable: bool = False  # member adapters (fusion_llm.member_lora) are wired into its layers
    _warned_truncation: bool = field(default=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def max_length(self) -> int:
        limits = [x for x in (self.spec.max_length, self.spec.max_position_embeddings) if x]
        return min(limits) if limits else 2048

    def tokenize(self, texts: list[str], max_length: int | None = None, **kwargs):
        """Tokenize with this backbone's tokenizer, padded on the right, as PyTorch tensors."""
        max_length = min(max_length or self.max_length, self.max_length)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt", **kwargs)
        if not self._warned_truncation and any(
            len(ids) > max_length for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        ):
            warnings.warn(f"backbone {self.name!r}: inputs longer than {max_length} tokens were truncated", stacklevel=2)
            self._warned_truncation = True
        return enc

    def taps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             layers: list[int] | None = None, position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run the (truncated) backbone and return its tapped hidden states.

        Args:
            input_ids: (B, L) token ids in this backbone's vocabulary.
            attention_mask: (B, L), 1 for real tokens; or a (B, 1, L, L) boolean mask (True = attend) for
                packed sequences, converted here to what the model's attention implementation takes.
            layers: absolute layer indices to return instead of ``spec.tap_layers``.
            position_ids: (B, L) positions (packed sequences); default 0..L-1.

        Returns:
            One tensor (B, L, hidden_size) per requested layer (default: ``spec.tap_layers``), in order.
            Without grad, unless the backbone carries member adapters and grad is enabled.
        """
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._taps(input_ids, attention_mask, layers, position_ids)

    def _taps(self, input_ids, attention_mask, layers, position_ids) -> list[torch.Tensor]:
        taps = self.spec.resolved_taps() if layers is None else list(layers)
        device = self.device
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._packed_masks(attention_mask.to(device), position_ids)
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask if attention_mask is None or isinstance(attention_mask, dict)
            else attention_mask.to(device),
            position_ids=None if position_ids is None else position_ids.to(device),
            output_hidden_states=sorted(set(taps)),
            use_cache=False,
        )
        return [out.hidden_states[t] for t in taps]

    def _packed_masks(self, allowed: torch.Tensor, position_ids: torch.Tensor | None):
        """The mask(s) of a packed sequence (``allowed``: (B, 1, L, L), True = attend) as the model takes them.

        A model with sliding-window attention gets the window too: a query keeps only the keys less than
        ``sliding_window`` positions behind it, counted in the tokens' own positions (``position_ids``), as
        transformers' sliding masks do. Where only some layers slide (Gemma-2, Gemma-3: ``config.layer_types``) the
        model gets one mask per layer type, the form its forward takes as-is."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return self._custom_mask(allowed)
        length = allowed.shape[-1]
        pos = (position_ids if position_ids is not None else torch.arange(length).unsqueeze(0)).to(allowed.device)
        sliding = self._custom_mask(allowed & ((pos[:, :, None] - pos[:, None, :]) < window).unsqueeze(1))
        types = set(getattr(config, "layer_types", None) or ["sliding_attention"])
        if types == {"sliding_attention"}:
            return sliding
        if not types <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"backbone {self.name!r}: packed source tails do not know the layer types "
                             f"{sorted(types)}; set head.source_tails: false")
        return {"full_attention": self._custom_mask(allowed), "sliding_attention": sliding}

    def _custom_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, L, L) mask in the form the model's attention takes as-is (transformers passes a 4D
        mask through): boolean for sdpa, additive float (0 / dtype minimum) for eager."""
        kind = self.model.config._attn_implementation
        if kind == "sdpa":
            return allowed
        if kind == "eager":
            dtype = getattr(torch, self.spec.compute_dtype)
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        raise ValueError(f"backbone {self.name!r}: packed source tails need attention 'sdpa' or 'eager', "
                         f"not {kind!r}; set head.source_tails: false")

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The anchor's own output: final norm, LM head and (Gemma-2) logit soft-capping, on a pre-norm state.

        Not under no_grad: the weights are frozen, but gradients flow through them to the fused residual.

        Args:
            hidden: (..., H) pre-norm hidden states.
        """
        if self.lm_head is None:
            raise ValueError(f"backbone {self.name!r} was loaded without its LM head (load it with_lm_head=True)")
        logits = self.lm_head(self.final_norm(hidden))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor, mix: torch.Tensor | None = None,
                corrections=None) -> torch.Tensor:
        """Mean next-token cross-entropy of ``labels`` under `lm_logits` (or their log-linear mix with the sources'
        predictions, `fusion_llm.heads.mixed_logits`), computed a few rows at a time without the (N, V) logits
        (`fusion_llm.output_loss`); the same value and gradients as the loss on the full logits.

        Args:
            hidden: (N, H) pre-norm hidden states; labels: (N,) ids, -100 where ignored.
            mix, corrections: see `fusion_llm.output_loss.output_loss`.
        """
        head = self.lm_head
        if type(head) is not torch.nn.Linear:  # a quantized or wrapped output layer: the plain path
            logits = self.lm_logits(hidden).float()
            if mix is not None:
                logits = mixed_rows(logits, mix.float(),
                                    corrections(0, hidden.shape[0], logits.detach()) if corrections else [])
            return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
        return output_loss(self.final_norm(hidden), head.weight, labels, bias=head.bias, softcap=self.logit_softcap,
                           mix=mix, corrections=corrections)


def loaded_depth(spec: BackboneSpec, with_lm_head: bool) -> int:
    """How many decoder layers `load_backbone` keeps: full depth with the LM head, else up to the deepest tap."""
    return max(spec.num_hidden_layers if with_lm_head else spec.deepest_tap, 1)


@contextlib.contextmanager
def _quiet_loading():
    """Truncation leaves the upper layers' weights unused on purpose: no load report, no progress bar."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_loading_info(spec: BackboneSpec, info: dict, depth: int) -> None:
    """Refuse a load that left weights newly initialised (missing or of the wrong shape) or found weights the
    model has no place for, besides what truncation leaves out on purpose (layers from ``depth`` on, the output
    layer of a decoder loaded without it). The loading report itself is silenced, so this is where a partly
    random frozen backbone would otherwise go unseen."""
    missing = [k if isinstance(k, str) else k[0] for k in
               list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])]
    unexpected = []
    for key in info.get("unexpected_keys") or []:
        layer = _LAYER_KEY.search(key)
        if not ((layer and int(layer.group(1)) >= depth) or key.split(".")[0] == "lm_head"):
            unexpected.append(key)
    problems = [f"{len(v)} {what} (e.g. {sorted(v)[0]})" for what, v in
                (("weights missing or of another shape, so newly initialised", missing),
                 ("weights the model has no place for", unexpected)) if v]
    if problems:
        raise ConfigError(f"backbones[{spec.name!r}]: {spec.model} does not match its config: "
                          + "; ".join(problems) + "; check the model folder (or revision) and its config.json")


def _settle_quantized_layout(model: PreTrainedModel, spec: BackboneSpec) -> None:
    """Run one token through a quantized CPU model right away.

    bitsandbytes' CPU backend repacks 4-bit weights into its kernel's layout on the first forward
    (``quant_state.packing_format_for_cpu``): a one-time change of representation, not of values.
    Doing it at load time means the frozen state is final from here on (bit-identical through training).
    """
    if spec.quantization in ("nf4", "fp4") and model.device.type == "cpu":
        if spec.lora_rank:  # member adapters: gradients will flow through the frozen 4-bit layers
            keep_4bit_differentiable(model)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False)


def keep_4bit_differentiable(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit Linears in the layout whose matmul has a backward pass.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its inference kernel on the first
    forward in eval mode without grad, and from then on calls that kernel (``gemv_4bit``), which has no autograd
    formula: gradients through the frozen layer are silently dropped (torch only warns). A backbone that member
    adapters train through (`fusion_llm.member_lora`) must not be repacked, and is unpacked if it already was.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing is 4-bit
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)


def _freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def load_backbone(
    spec: BackboneSpec,
    *,
    with_lm_head: bool = False,
    device_map: dict | str | None = None,
) -> FrozenBackbone:
    """Load one backbone frozen, quantized as its spec says, truncated to its deepest tap.

    Args:
        spec: which model, taps and quantization.
        with_lm_head: load through ``AutoModelForCausalLM`` and keep the final norm and LM head
            (an LM anchor); the model is then kept at full depth.
        device_map: passed to ``from_pretrained`` (e.g. ``{"": local_process_index}`` under DDP).

    Returns:
        A `FrozenBackbone`; ``spec`` gets its ``num_hidden_layers`` and ``hidden_size`` filled in.
    """
    spec = copy.deepcopy(spec)
    try:
        full_config = (
            spec.load_model_config()
            if spec.model_config_source() and Path(spec.model).is_dir()
            else AutoConfig.from_pretrained(spec.model, revision=spec.revision)
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.model, revision=spec.revision)
    except OSError as err:
        raise ConfigError(
            f"backbones[{spec.name!r}].model: cannot load {spec.model!r} ({str(err).splitlines()[0]})"
        ) from None
    if not tokenizer.is_fast:
        raise ConfigError(f"backbones[{spec.name!r}].tokenizer: {type(tokenizer).__name__} is not a fast tokenizer")
    spec.fill_from(full_config)
    fingerprint = {
        "config": config_fingerprint(full_config),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "weights": weights_fingerprint(spec.model, spec.revision),
    }
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"

    config = truncated_config(full_config, loaded_depth(spec, with_lm_head))
    dtype = getattr(torch, spec.compute_dtype)
    loader = AutoModelForCausalLM if with_lm_head else AutoModel
    with _quiet_loading():
        model, info = loader.from_pretrained(
            spec.model,
            config=config,
            revision=spec.revision,
            dtype=dtype,
            quantization_config=quantization_config(spec),
            device_map=device_map,
            output_loading_info=True,
        )
    check_loading_info(spec, info, config.get_text_config().num_hidden_layers)
    final_norm = lm_head = softcap = None
    if with_lm_head:
        lm_head = model.get_output_embeddings()
        decoder = model.get_decoder()
        final_norm = decoder.norm
        softcap = getattr(config.get_text_config(), "final_logit_softcapping", None)
        model = decoder
    _freeze(model)
    if lm_head is not None:
        _freeze(lm_head)
    _settle_quantized_layout(model, spec)
    if spec.deepest_tap == 0 and not with_lm_head:
        logger.info("backbone %s is tapped at the embeddings only; one layer is kept so the model can run", spec.name)
    return FrozenBackbone(spec, model, tokenizer, fingerprint, final_norm, lm_head, softcap)
