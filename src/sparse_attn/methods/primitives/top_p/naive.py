"""Plain-PyTorch reference of :func:`sparse_attn.methods.primitives.top_p.top_p_mask`."""

from __future__ import annotations

import torch
from torch import Tensor


def select_top_p(scores: Tensor, p, min_keep=1, valid: Tensor | None = None) -> Tensor:
    """Per row, the fewest entries (largest first) whose share of the row total reaches ``p``.

    ``scores (..., N)`` non-negative; ``p`` a float or a tensor broadcastable to ``scores[..., :1]``;
    ``min_keep`` entries are always kept (if valid). Returns a bool mask.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, 0.0)
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    total = sorted_scores.sum(-1, keepdim=True).clamp_min(1e-30)
    before = (torch.cumsum(sorted_scores, -1) - sorted_scores) / total  # mass of strictly larger ones
    p = torch.as_tensor(p, device=scores.device, dtype=scores.dtype)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = (before < p) | (rank < min_keep)
    keep_sorted &= sorted_scores > 0 if valid is None else torch.ones_like(keep_sorted)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return mask if valid is None else mask & valid
