"""Sliding window + attention sinks (StreamingLLM; MInference's "A-shape")."""

from __future__ import annotations

from ..layout import BlockSparseLayout
from .grid import PerHead, layout_from_block_rule, per_head


def sliding_window_layout(q_len: int, kv_len: int | None = None, *, window: PerHead = 1024,
                          sink: PerHead = 64, num_heads: int = 1, block_size=64,
                          causal: bool = True, device=None) -> BlockSparseLayout:
    """Keep key blocks overlapping the last ``window`` tokens before each query block and the first
    ``sink`` tokens. ``window``/``sink`` are token counts, per head if given as lists; block
    granularity rounds them up to whole blocks. The diagonal block is always kept.
    """
    kv_len = q_len if kv_len is None else kv_len
    windows = per_head(window, num_heads, "window")
    sinks = per_head(sink, num_heads, "sink")

    def rule(h, grid):
        return grid.window_blocks(max(windows[h], 1)) | grid.sink_blocks(sinks[h]) | grid.diagonal_blocks()

    return layout_from_block_rule(rule, num_heads, q_len, kv_len, block_size, causal, device)
