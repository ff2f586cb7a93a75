"""Static sparsity patterns: functions that return a :class:`~sparse_attn.BlockSparseLayout`."""

from .dense import dense_layout
from .mask_mod import layout_from_mask_mod
from .neighborhood import neighborhood_1d, neighborhood_layout, tile_tokens, untile_tokens
from .power import power_layout
from .random import random_layout
from .strided import strided_layout
from .window_sink import sliding_window_layout

__all__ = [
    "dense_layout", "sliding_window_layout", "strided_layout", "power_layout",
    "neighborhood_layout", "random_layout", "neighborhood_1d", "tile_tokens", "untile_tokens", "layout_from_mask_mod",
]
