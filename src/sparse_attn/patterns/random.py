"""Random block layouts: benchmark workloads and BigBird-style random blocks."""

from __future__ import annotations

import torch

from ..layout import BlockSparseLayout
from .grid import BlockGrid


def random_layout(q_len: int, kv_len: int | None = None, *, density: float = 0.1,
                  num_heads: int = 1, batch: int = 1, block_size=128, causal: bool = True,
                  keep_diagonal: bool = True, seed: int = 0, device=None) -> BlockSparseLayout:
    """Independent random blocks per (batch, head) with expected ``density`` over reachable blocks.

    The diagonal block of every row is kept (so no row is empty) unless ``keep_diagonal=False``;
    the remaining probability is spread uniformly over the other reachable blocks.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    kv_len = q_len if kv_len is None else kv_len
    grid = BlockGrid(q_len, kv_len, block_size, causal, device)
    diagonal = grid.diagonal_blocks() & grid.reachable if keep_diagonal else torch.zeros_like(grid.reachable)
    reachable, n_diag = int(grid.reachable.sum()), int(diagonal.sum())
    p = (density * reachable - n_diag) / max(reachable - n_diag, 1)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    shape = (batch, num_heads, *grid.reachable.shape)
    dense = torch.rand(shape, generator=gen, device=device) < max(0.0, min(1.0, p))
    dense = (dense | diagonal) & grid.reachable
    return BlockSparseLayout.from_dense(dense, q_len, kv_len, block_size, causal=causal)
