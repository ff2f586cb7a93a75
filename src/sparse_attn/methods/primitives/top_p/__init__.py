"""Top-p selection: per row, the fewest largest entries reaching a share ``p`` of the row total.
Triton kernel in :mod:`.kernel`, reference in :mod:`.naive`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ....options import KernelOptions
from ..dispatch import use_triton
from .naive import select_top_p

__all__ = ["top_p_mask", "select_top_p", "TOP_P_MAX_COLUMNS"]

TOP_P_MAX_COLUMNS = 16384  # the kernel sorts a whole row in one program: longer rows run the reference


def top_p_mask(scores: Tensor, p, min_keep: int = 1, *, kernel_options: Optional[KernelOptions] = None) -> Tensor:
    """Bool mask of the fewest largest entries per row of ``scores (..., N)`` (negative entries count
    as 0) reaching share ``p`` (a float or one per row), at least ``min_keep`` nonzero entries.
    Triton or the reference (:func:`.naive.select_top_p`) as ``kernel_options`` says
    (:func:`..dispatch.use_triton`)."""
    p_rows = torch.as_tensor(p, dtype=torch.float32, device=scores.device).expand(scores.shape[:-1])
    n_cols = scores.shape[-1]
    if not use_triton(scores, kernel_options, n_cols <= TOP_P_MAX_COLUMNS):
        return select_top_p(scores.float().clamp_min(0), p_rows[..., None], min_keep)
    from .kernel import top_p_kernel

    flat = scores.reshape(-1, n_cols).float().contiguous()
    out = torch.empty(flat.shape, dtype=torch.int8, device=scores.device)
    top_p_kernel[(flat.shape[0],)](flat, out, p_rows.reshape(-1).contiguous(), n_cols, min_keep,
                                   BLOCK=max(16, 1 << math.ceil(math.log2(n_cols))))
    return out.view(scores.shape).bool()
