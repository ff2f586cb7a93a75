"""PowerAttention: power-of-2 dilated blocks, so d stacked layers reach 2^d blocks back."""

from __future__ import annotations

import torch

from ..layout import BlockSparseLayout
from .grid import layout_from_block_rule


def power_layout(q_len: int, kv_len: int | None = None, *, local_blocks: int = 1, sink: int = 0,
                 num_heads: int = 1, block_size=64, causal: bool = True,
                 device=None) -> BlockSparseLayout:
    """Each query block keeps the key blocks at block distance 0, 1, 2, 4, 8, ... behind its own
    diagonal block, its ``local_blocks`` most recent blocks and ``sink`` tokens.

    Any block distance is a sum of distinct powers of two, so information travels from any block
    to any later one within ``log2(blocks)`` layers while each row keeps O(log n) blocks.
    """
    kv_len = q_len if kv_len is None else kv_len

    def rule(h, grid):
        diag = torch.clamp(grid.q_last, 0, grid.kv_len - 1) // grid.kv_block
        distance = diag[:, None] - grid.kb
        is_power = (distance > 0) & ((distance & (distance - 1)) == 0)
        local = grid.recent_blocks(local_blocks)
        return is_power | local | grid.sink_blocks(sink)

    return layout_from_block_rule(rule, num_heads, q_len, kv_len, block_size, causal, device)
