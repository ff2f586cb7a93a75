"""MInference's vertical-slash pattern: the strongest key columns and diagonals of the last queries'
attention, covered with blocks."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knob, Method, register_method
from .knobs import KnobSpec, min_count
from .primitives.line_scores import line_scores
from .selection import lines_keep_every_block, lines_to_blocks, select_top_k

# MInference's defaults, 1000 columns and 6096 diagonals, are for 128K-token prompts; as shares of the
# key length they keep exactly those counts at 128K and the same share at every other length.
MINFERENCE_LENGTH = 131072


@register_method
@dataclass
class VerticalSlash(Method):
    """MInference's vertical-slash pattern: the last ``last_q`` queries score all keys; keep the
    ``vertical_size`` strongest key columns and ``slash_size`` strongest diagonals per head, then
    cover them with blocks (block granularity: a kept column costs its whole key block).
    ``vertical_size`` and ``slash_size`` are counts (ints) or shares of the key length (floats in
    (0, 1)); the defaults are MInference's 1000 columns and 6096 diagonals as shares of 128K."""

    name = "vertical_slash"
    KNOBS = {
        "vertical_size": KnobSpec.count(0, per_head=True),  # key columns (0: slashes only)
        "slash_size": KnobSpec.count(0, per_head=True),  # diagonals (0: columns only)
        "last_q": KnobSpec.integer(1),  # scoring queries (capped at the query length)
    }
    vertical_size: Knob = 1000 / MINFERENCE_LENGTH  # ~0.0076
    slash_size: Knob = 6096 / MINFERENCE_LENGTH  # ~0.0465
    last_q: int = 64

    def select(self, q, k, grid, scale, kernel_options=None):
        v_scores, s_scores = line_scores(q, k, self.last_q, scale, causal=True,
                                         kernel_options=kernel_options)  # (B, H, Skv) each
        heads, kv_heads = q.shape[1], k.shape[1]
        sizes = self.count(self.vertical_size, grid.kv_len), self.count(self.slash_size, grid.kv_len)
        vertical, slash = (self.head_values(n, heads, kv_heads, q.device).view(1, -1).long() for n in sizes)
        v_keep = select_top_k(v_scores, vertical.expand(v_scores.shape[:-1]), k_max=int(self.knob_max(sizes[0])))
        s_keep = select_top_k(s_scores, slash.expand(s_scores.shape[:-1]), k_max=int(self.knob_max(sizes[1])))
        return lines_to_blocks(grid, v_keep, s_keep)

    def dense_knobs(self, grid, forced):
        columns, diagonals = (min_count(self.count(n, grid.kv_len)) for n in (self.vertical_size, self.slash_size))
        return tuple(name for name, lines in (("vertical_size", (columns, 0)), ("slash_size", (0, diagonals)))
                     if lines_keep_every_block(grid, *lines, forced))
