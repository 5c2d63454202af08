"""The model-side lookup: each anchor position's settled source feature, or the learned "nothing yet" vector
(:func:`gather_aligned`; torch is imported when it is called)."""

from __future__ import annotations


def gather_aligned(source_hidden, index, nothing_vector):
    """Pick each anchor position's settled source feature, or the "nothing yet" vector.

    Args:
        source_hidden: ``(B, S, H)`` source features (e.g. an adapted tap).
        index: ``(B, T)`` integer tensor from :func:`align_batch` (padded with ``-1``);
            ``-1`` means no settled source token.
        nothing_vector: ``(H,)`` learned vector used where ``index < 0``; gradients reach it.

    Returns:
        ``(B, T, H)`` tensor in ``source_hidden``'s dtype.

    Raises:
        IndexError: when an index points past ``S`` (source ids were cut shorter than the
            alignment assumes).
    """
    import torch

    if source_hidden.dim() != 3 or index.dim() != 2 or index.shape[0] != source_hidden.shape[0]:
        raise ValueError(f"expected source_hidden (B, S, H) and index (B, T), got {tuple(source_hidden.shape)} "
                         f"and {tuple(index.shape)}")
    b, s, h = source_hidden.shape
    t = index.shape[1]
    index = index.to(device=source_hidden.device, dtype=torch.long)
    nothing = nothing_vector.to(device=source_hidden.device, dtype=source_hidden.dtype).expand(b, t, h)
    if s == 0 or index.numel() == 0:
        if index.numel() and bool((index >= 0).any()):
            raise IndexError("alignment index points into an empty source sequence")
        return nothing.clone()
    if int(index.max()) >= s:
        raise IndexError(f"alignment index {int(index.max())} is out of range for {s} source positions")
    picked = torch.gather(source_hidden, 1, index.clamp(min=0).unsqueeze(-1).expand(b, t, h))
    return torch.where((index < 0).unsqueeze(-1), nothing, picked)
