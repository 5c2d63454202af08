"""The next-token loss through a frozen output layer, a few rows at a time, never holding the (N, V) logits; and
its top-k log-probabilities (`top_k_log_probs`, a source's predictions) the same way.

Training an LM head over a 262k-token vocabulary (Gemma) spends most of a CPU step on the (N, V) tensors around
the output layer, not on the backbones: the logits, their mix with the sources' predictions, the log-softmax, its
gradient and the copies between them are each ~0.5 GB at 512 tokens, and every fresh one costs page faults and
memory traffic. `output_loss` computes the same loss and gradients one chunk of rows at a time (a chunk fits in
cache) and computes the gradients in the forward pass, as Liger-Kernel's fused linear cross-entropy does on GPUs:
the output layer is frozen, so the only gradients are with respect to its input and the mixing weights.

With ``mix`` and ``corrections`` (``head.source_predictions``) the logits are ``heads.mixed_logits``:
``(1 + sum(mix)) * z + sum_i mix_i * correction_i``, ``z`` the output layer's logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# corrections(row_start, row_end, z) -> per source (keys, values): keys index the chunk's flattened (rows, V) logits
Corrections = Callable[[int, int, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]


def logsumexp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.logsumexp`` over ``dim``, several times faster on an LM's wide logits on CPU: torch's ``exp`` takes a
    slow path for arguments below about -87 (results outside float32's normal range), which most of a 262k-token
    vocabulary is, relative to its largest logit. Such terms are below 1.8e-35 of the largest one, so clamping
    them there leaves every float32 sum as it was; a row of only ``-inf`` stays ``-inf``."""
    top = x.amax(dim, keepdim=True)
    safe = torch.where(top.isfinite(), top, torch.zeros_like(top))
    out = (x - safe).clamp_min_(-80.0).exp_().sum(dim).log_() + safe.squeeze(dim)
    return torch.where(top.squeeze(dim).isfinite(), out, top.squeeze(dim))


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    z = F.linear(x.to(weight.dtype), weight, bias).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def mixed_rows(z: torch.Tensor, mix: torch.Tensor | None, corrections: list) -> torch.Tensor:
    """`fusion_llm.heads.mixed_logits` on (R, V) rows (``corrections`` index the flattened rows), a new tensor."""
    if mix is None:
        return z.clone()
    mix = mix.to(z.device, z.dtype)
    out = z * (1 + mix.sum(-1, keepdim=True))
    flat, size = out.view(-1), out.shape[-1]
    for i, (keys, values) in enumerate(corrections):
        keys = keys.to(out.device)
        flat.index_add_(0, keys, mix[keys // size, 1 + i] * values.to(out.device, out.dtype))
    return out


class _OutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, normed, mix, weight, bias, softcap, labels, corrections, chunk):
        n_rows, size = normed.shape[0], weight.shape[0]
        need_grad = any(ctx.needs_input_grad[:2])  # False under no_grad (scoring): the loss alone
        valid = labels >= 0
        count = valid.sum().clamp_min(1).float()
        total = torch.zeros((), dtype=torch.float32, device=normed.device)
        grad_x = torch.zeros_like(normed, dtype=torch.float32)
        grad_mix = None if mix is None else torch.zeros_like(mix, dtype=torch.float32)
        for a in range(0, n_rows, chunk):
            b = min(a + chunk, n_rows)
            keep = valid[a:b]
            if not keep.any():
                continue
            z = _logits(normed[a:b], weight, bias, softcap)  # (R, V)
            m = None if mix is None else mix[a:b].float()
            corr = corrections(a, b, z) if corrections is not None and m is not None else []
            logits = mixed_rows(z, m, corr)
            y = labels[a:b].clamp_min(0).unsqueeze(1)
            lse = logsumexp(logits)
            total += ((lse - logits.gather(1, y).squeeze(1)) * keep).sum()
            if not need_grad:
                continue
            # d loss / d logits = (softmax - onehot) / count on the rows that count (the clamp: see logsumexp)
            g = logits.sub_(lse.unsqueeze(1)).clamp_min_(-80.0).exp_()
            g.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=g.dtype))
            g.mul_((keep.float() / count).unsqueeze(1))
            if m is not None:
                gz = (g * z).sum(-1)  # d loss / d mix_j through the (1 + sum(mix)) scale, for every j
                grad_mix[a:b] = gz.unsqueeze(1).expand(-1, m.shape[1])
                flat = g.view(-1)
                for i, (keys, values) in enumerate(corr):
                    grad_mix[a:b, 1 + i] += torch.zeros(b - a, device=g.device).index_add_(
                        0, keys // size, flat[keys] * values)
                g.mul_(1 + m.sum(-1, keepdim=True))
            if softcap:
                g.mul_(1 - (z / softcap).pow_(2))
            grad_x[a:b] = (g.to(weight.dtype) @ weight).float()
        ctx.save_for_backward(grad_x, grad_mix if grad_mix is not None else torch.empty(0))
        ctx.has_mix, ctx.x_dtype = mix is not None, normed.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_mix = ctx.saved_tensors
        gx = (grad_x * grad_out).to(ctx.x_dtype)
        gm = grad_mix * grad_out if ctx.has_mix else None
        return gx, gm, None, None, None, None, None, None


def output_loss(normed: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: torch.Tensor | None = None, softcap: float | None = None, mix: torch.Tensor | None = None,
                corrections: Corrections | None = None, chunk: int = 64) -> torch.Tensor:
    """Mean cross-entropy of ``labels`` under ``softmax(mixed(weight @ normed))``, chunk by chunk.

    Args:
        normed: (N, H) the output layer's input (after the final norm), with grad.
        weight, bias: the frozen output layer (V, H) and (V,) or None.
        labels: (N,) target ids, -100 where ignored.
        softcap: Gemma-2's final logit soft-capping, or None.
        mix: (N, 1 + S) the log-linear mixing weights (with grad), or None for the plain loss.
        corrections: per chunk of rows, each source's sparse correction (`FusionModel.source_corrections`).
        chunk: rows per chunk.

    Returns:
        The loss, equal to ``cross_entropy(mixed_logits(...), labels, ignore_index=-100)`` up to float rounding
        (terms below e^-80 of a row's total are taken at e^-80, as `logsumexp` does).
    """
    return _OutputLoss.apply(normed, mix, weight.detach(), None if bias is None else bias.detach(), softcap,
                             labels, corrections, chunk)


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's own training loss (``model(..., labels=labels).loss``: labels shifted inside, -100
    ignored), through `output_loss`, so a LoRA control pays for its output layer what a fused model pays.

    Args:
        model: a ``*ForCausalLM`` (peft adapters inside it are fine: pass ``peft_model.get_base_model()``).
    """
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a quantized or wrapped output layer: transformers' own path
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return output_loss(hidden[:, :-1].flatten(0, 1), head.weight, labels[:, 1:].flatten(), bias=head.bias,
                       softcap=softcap)


class _TopLogProbs(torch.autograd.Function):
    """``log_softmax(softcap(normed @ W.T + b))``'s ``k`` largest values and their ids, ``chunk`` rows at a time.

    The gradient of ``z_u - logsumexp(z)`` with respect to ``normed`` is ``s_u W_u - E_p[s W]`` (``s = 1 - (z /
    cap)^2`` with soft-capping, else 1): the forward keeps only the expectation ``E_p[s W]`` per row, so neither
    the (N, V) logits nor their gradient is ever held."""

    @staticmethod
    def forward(ctx, normed, weight, bias, softcap, k, chunk):
        need = ctx.needs_input_grad[0]
        tops, ids, scales = [], [], []
        expected = torch.zeros(normed.shape, dtype=torch.float32, device=normed.device) if need else None
        for a in range(0, normed.shape[0], chunk):
            z = _logits(normed[a:a + chunk], weight, bias, softcap)  # (R, V)
            top, idx = z.topk(k, dim=-1)
            lse = logsumexp(z).unsqueeze(-1)
            tops.append(top - lse)
            ids.append(idx)
            if need:
                scale = 1 - (z / softcap) ** 2 if softcap else None
                p = z.sub_(lse).clamp_min_(-80.0).exp_()  # the softmax (see logsumexp for the clamp)
                if scale is not None:
                    p.mul_(scale)
                    scales.append(1 - (top / softcap) ** 2)
                expected[a:a + chunk] = (p.to(weight.dtype) @ weight).float()
        ids = torch.cat(ids)
        ctx.mark_non_differentiable(ids)
        if need:
            ctx.save_for_backward(ids, expected, weight, torch.cat(scales) if scales else torch.empty(0))
            ctx.chunk, ctx.dtype = chunk, normed.dtype
        return torch.cat(tops), ids

    @staticmethod
    def backward(ctx, grad_top, _grad_ids):
        ids, expected, weight, scales = ctx.saved_tensors
        grad = grad_top.float() * scales if scales.numel() else grad_top.float()
        out = -grad_top.float().sum(-1, keepdim=True) * expected
        for a in range(0, ids.shape[0], ctx.chunk):
            rows = weight[ids[a:a + ctx.chunk]].float()  # (R, k, H)
            out[a:a + ctx.chunk] += torch.einsum("rk,rkh->rh", grad[a:a + ctx.chunk], rows)
        return out.to(ctx.dtype), None, None, None, None, None


def top_k_log_probs(normed: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
                    softcap: float | None = None, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest log-probabilities (N, k) of a frozen output layer over ``normed`` (N, H) and their ids,
    ``chunk`` rows at a time, with gradients to ``normed`` (`_TopLogProbs`)."""
    return _TopLogProbs.apply(normed, weight.detach(), None if bias is None else bias.detach(), softcap, k, chunk)
