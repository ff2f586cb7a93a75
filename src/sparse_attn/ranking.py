"""Top-k along the last dimension with ties going to the earlier index, as a stable descending sort
ranks, without sorting whole rows."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["top_k_ties_to_earlier"]


def top_k_ties_to_earlier(scores: Tensor, k: int):
    """``(values, indices)`` of the ``k`` largest ``scores`` along the last dimension, in descending
    order, equal scores ordered by index (what ``torch.sort(scores, descending=True, stable=True)``
    gives in its first ``k`` columns). float64 rows are sorted; other dtypes go through one
    ``torch.topk`` on unique int64 keys: the score's order-preserving float32 bit pattern above the
    reversed index (``-0.0`` counts as ``+0.0``; ``+-inf`` are ordered; no NaN)."""
    if scores.dtype == torch.float64:
        values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], order[..., :k]
    width = scores.shape[-1]
    as_float = scores.float() + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = as_float.view(torch.int32).to(torch.int64)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order of the float values
    reversed_index = width - 1 - torch.arange(width, device=scores.device)
    _, order = torch.topk(ordered * (1 << 32) + reversed_index, k, dim=-1)
    return scores.gather(-1, order), order
