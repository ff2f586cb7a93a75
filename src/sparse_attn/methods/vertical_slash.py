"""MInference's vertical-slash pattern: the strongest key columns and diagonals of the last queries'
attention, covered with blocks."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knob, Method, register_method
from .knobs import KnobSpec
from .primitives.line_scores import line_scores
from .selection import lines_to_blocks, select_top_k


@register_method
@dataclass
class VerticalSlash(Method):
    """MInference's vertical-slash pattern: the last ``last_q`` queries score all keys; keep the
    ``vertical_size`` strongest key columns and ``slash_size`` strongest diagonals per head, then
    cover them with blocks (block granularity: a kept column costs its whole key block)."""

    name = "vertical_slash"
    KNOBS = {
        "vertical_size": KnobSpec.integer(0, per_head=True),  # key columns (0: slashes only)
        "slash_size": KnobSpec.integer(0, per_head=True),  # diagonals (0: columns only)
        "last_q": KnobSpec.integer(1),  # scoring queries (capped at the query length)
    }
    vertical_size: Knob = 1000
    slash_size: Knob = 6096
    last_q: int = 64

    def select(self, q, k, grid, scale, kernel_options=None):
        v_scores, s_scores = line_scores(q, k, self.last_q, scale, causal=True,
                                         kernel_options=kernel_options)  # (B, H, Skv) each
        heads, kv_heads = q.shape[1], k.shape[1]
        vertical = self.head_values(self.vertical_size, heads, kv_heads, q.device).view(1, -1).long()
        slash = self.head_values(self.slash_size, heads, kv_heads, q.device).view(1, -1).long()
        v_keep = select_top_k(v_scores, vertical.expand(v_scores.shape[:-1]),
                              k_max=int(self.knob_max(self.vertical_size)))
        s_keep = select_top_k(s_scores, slash.expand(s_scores.shape[:-1]), k_max=int(self.knob_max(self.slash_size)))
        return lines_to_blocks(grid, v_keep, s_keep)
