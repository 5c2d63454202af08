"""Grokking experts: small transformers models that answer one grokking task, saved like any backbone.

Two kinds, both ``from_pretrained`` folders that `fusion_llm.backbones.load_backbone` loads:

- **homogeneous experts** (`expert_config`): a `LlamaForCausalLM` over the grokking vocabulary with a
  real fast tokenizer (`grokking_tokenizer`: WordLevel, one token per vocabulary entry, token id ==
  the grokking vocabulary id). The answer is the next token after ``=``; its logits over the first
  217 ids are the shared answer classes, so every expert, the shared base and any merge of them
  answer through the same LM head (`answer_logits`).
- **family experts** (`FamilyExpert`): a stand-in of one family (Llama-3, Mistral, Gemma-2, Phi-3
  classes, `fusion_llm.standins`) with its own real tokenizer, plus a linear classifier over the last
  token's final hidden state. Their vocabularies are 32k-262k entries, so the token embeddings stay
  frozen while the decoder layers and the classifier train. The classifier is stored beside the
  model as ``expert_classifier.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from fusion_llm.data.grokking import VOCABULARY
from fusion_llm.paths import atomic_dir

NUM_CLASSES = VOCABULARY.num_answer_classes  # 217: numbers 0..96, then the 120 permutations of S5
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"
VOCAB_MULTIPLE = 64  # bitsandbytes 4-bit runs on CPU when every Linear dimension is a multiple of 64
CLASSIFIER_FILE = "expert_classifier.safetensors"


def padded_vocab_size(size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-size // multiple) * multiple


def grokking_tokenizer() -> PreTrainedTokenizerFast:
    """A fast WordLevel tokenizer over the grokking vocabulary (ids 0..221, then ``<pad>``, ``<unk>``).

    Pre-tokenization keeps a bracketed permutation ``"[0 1 2 3 4]"`` as one piece and splits the rest
    on whitespace, so ``"12 + 30 ="`` -> ``[12, 217, 30, 221]``: the ``input_ids`` column of the
    dataset, with character offsets.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(VOCABULARY.tokens)}
    vocab[PAD_TOKEN] = len(vocab)
    vocab[UNK_TOKEN] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # invert=True: the pattern describes the pieces kept; whatever lies between them is dropped.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\[[^\]]*\]|\S+"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   model_max_length=8)


def expert_config(hidden_size: int = 128, num_layers: int = 2, intermediate_size: int | None = None,
                  head_dim: int = 32) -> LlamaConfig:
    """The `LlamaConfig` shared by the shared base, every homogeneous expert and their merges.

    Args:
        hidden_size: model width (a multiple of ``head_dim``).
        num_layers: decoder layers.
        intermediate_size: MLP width (default 4 x hidden).
        head_dim: attention head width; heads = hidden_size / head_dim.
    """
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
    heads = hidden_size // head_dim
    pad_id = VOCABULARY.size  # "<pad>"
    return LlamaConfig(
        vocab_size=padded_vocab_size(VOCABULARY.size + 2), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim, max_position_embeddings=8,
        tie_word_embeddings=False, pad_token_id=pad_id, bos_token_id=None, eos_token_id=None,
    )


def answer_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's answer: logits of the token after ``=`` over the shared answer classes.

    Args:
        model: a ``*ForCausalLM`` over the grokking vocabulary.
        input_ids: (B, 4) ``[x, op, y, =]``.

    Returns:
        (B, 217)
    """
    logits = model(input_ids=input_ids, logits_to_keep=1, use_cache=False).logits  # (B, 1, vocab)
    return logits[:, -1, :NUM_CLASSES]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def save_atomic(out_dir: Path, write) -> Path:
    """Call ``write(tmp_dir)`` inside `fusion_llm.paths.atomic_dir` (a reader sees all of it or none)."""
    with atomic_dir(out_dir) as tmp:
        write(tmp)
    return Path(out_dir)


def save_expert(model: nn.Module, tokenizer, out_dir: Path, info: dict | None = None) -> Path:
    """``save_pretrained`` of a model and its tokenizer (plus ``expert.json``), atomically."""

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / "expert.json").write_text(json.dumps(info, indent=1, default=float))

    return save_atomic(out_dir, write)


def load_causal_lm(path: str | Path) -> nn.Module:
    """A saved expert / base / merge, in float32 and eval mode."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


class FamilyExpert(nn.Module):
    """A stand-in decoder and a linear classifier over its last real token's final hidden state.

    The token embeddings are frozen (large real vocabularies); the decoder layers, the final norm and
    the classifier train.
    """

    def __init__(self, causal_lm: nn.Module, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.causal_lm = causal_lm
        self.decoder = causal_lm.get_decoder()
        self.decoder.get_input_embeddings().requires_grad_(False)
        causal_lm.get_output_embeddings().requires_grad_(False)  # tied to the embeddings, unused here
        self.classifier = nn.Linear(causal_lm.config.get_text_config().hidden_size, num_classes)

    @classmethod
    def from_standin(cls, path: str | Path) -> "FamilyExpert":
        return cls(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))

    @classmethod
    def load(cls, path: str | Path) -> "FamilyExpert":
        expert = cls.from_standin(path)
        expert.classifier.load_state_dict(load_file(str(Path(path) / CLASSIFIER_FILE)))
        return expert.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded ids -> (B, num_classes) logits."""
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1  # right padding: the last real token
        return self.classifier(hidden[torch.arange(len(last)), last])  # (B, H) -> (B, classes)

    def save(self, tokenizer, out_dir: Path, info: dict | None = None) -> Path:
        def write(tmp: Path):
            self.causal_lm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in self.classifier.state_dict().items()}, str(tmp / CLASSIFIER_FILE))
            if info is not None:
                (tmp / "expert.json").write_text(json.dumps(info, indent=1, default=float))

        return save_atomic(out_dir, write)


def family_tokenizer(path: str | Path):
    """A stand-in's own fast tokenizer, right padding (the pad token falls back to eos / unk)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer
