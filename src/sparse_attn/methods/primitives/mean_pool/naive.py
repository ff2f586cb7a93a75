"""Plain-PyTorch reference of :func:`sparse_attn.methods.primitives.mean_pool.block_mean_pool`."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_pool(x: Tensor, block: int) -> Tensor:
    """Mean over each block of ``block`` tokens along dim -2, in float32 (the tail block averages
    its real tokens). Sums without an fp32 copy of ``x``."""
    *lead, length, dim = x.shape
    full = length // block
    parts = []
    if full:
        parts.append(x[..., :full * block, :].reshape(*lead, full, block, dim).sum(-2, dtype=torch.float32) / block)
    if length % block:
        parts.append(x[..., full * block:, :].mean(-2, dtype=torch.float32, keepdim=True))
    return torch.cat(parts, dim=-2)
