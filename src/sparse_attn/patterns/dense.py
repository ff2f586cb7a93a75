"""Dense layouts: every reachable block kept (the baseline every sparse method is compared to)."""

from __future__ import annotations

from ..layout import BlockSparseLayout
from .grid import layout_from_block_rule


def dense_layout(q_len: int, kv_len: int | None = None, *, block_size=64, causal: bool = True,
                 device=None) -> BlockSparseLayout:
    """All blocks a (causal) query can reach; one head shared by all heads."""
    kv_len = q_len if kv_len is None else kv_len
    return layout_from_block_rule(lambda h, g: g.reachable, 1, q_len, kv_len, block_size, causal,
                                  device)
