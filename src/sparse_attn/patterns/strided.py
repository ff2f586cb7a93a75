"""Strided per-head shards (S2-Attention: heterogeneous context sharding across heads)."""

from __future__ import annotations

from ..layout import BlockSparseLayout
from .grid import PerHead, layout_from_block_rule, per_head


def strided_layout(q_len: int, kv_len: int | None = None, *, stride: int = 4, num_heads: int = 4,
                   local_blocks: int = 1, sink: int = 0, offsets: PerHead | None = None,
                   block_size=64, causal: bool = True, device=None) -> BlockSparseLayout:
    """Head ``h`` keeps key blocks ``kb`` with ``kb % stride == offsets[h]`` (default ``h % stride``),
    plus its ``local_blocks`` most recent blocks and ``sink`` tokens.

    Heads see disjoint shards of the distant context; with ``num_heads >= stride`` (default offsets)
    their union covers every reachable block, so the layer as a whole reads the whole context.
    """
    kv_len = q_len if kv_len is None else kv_len
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    shard = per_head(list(range(num_heads)) if offsets is None else offsets, num_heads, "offsets")

    def rule(h, grid):
        local = grid.recent_blocks(local_blocks)
        return (grid.kb % stride == shard[h] % stride) | local | grid.sink_blocks(sink)

    return layout_from_block_rule(rule, num_heads, q_len, kv_len, block_size, causal, device)
