"""FlexPrefill: per head, a query-aware pattern (pooled block scores) or a vertical-slash pattern
(lines from the last query block's attention), chosen by how well the pooled estimate matches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Knob, Method, register_method
from .knobs import KnobSpec
from .pooled import pooled_block_probs
from .primitives.line_scores import KV_GROUPS_PER_CHUNK, diagonal_sums, last_rows_attention, line_scores
from .primitives.top_p import select_top_p, top_p_mask
from .selection import lines_keep_every_block, lines_to_blocks, top_k_keeps_every_block

MAX_PATTERN_DISTANCE = math.sqrt(math.log(2))  # the largest sqrt(JS divergence), natural log


def jensen_shannon(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Jensen-Shannon divergence (natural log) between distributions along the last dim."""
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    q = q / q.sum(-1, keepdim=True).clamp_min(eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps)))).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def lines_covering(attn: Tensor, gamma: Tensor, min_lines: int):
    """Fewest vertical + slash lines (strongest first, from one merged ranking) whose union covers a
    ``gamma`` share of ``attn (B, H, R, Skv)`` (the last rows' attention).

    A column's score and a diagonal's score are both sums of the same attention, so they rank on
    one scale; coverage counts a point on a kept column and a kept diagonal once. The prefix length
    is found by binary search per (batch, head). Returns bool ``(vertical, slash)``, each
    ``(B, H, Skv)``.
    """
    b, h, rows, kv_len = attn.shape
    merged = torch.cat([attn.sum(-2), diagonal_sums(attn)], -1)  # (B, H, 2*Skv)
    rank = torch.empty_like(merged, dtype=torch.long)
    rank.scatter_(-1, torch.argsort(merged, -1, descending=True),
                  torch.arange(2 * kv_len, device=attn.device).expand(b, h, -1).contiguous())
    q_pos = torch.arange(kv_len - rows, kv_len, device=attn.device)
    distance = (q_pos[:, None] - torch.arange(kv_len, device=attn.device)[None, :]).clamp(min=0)
    total = attn.sum((-1, -2)).clamp_min(1e-30)

    def coverage(n):  # n: (B, H) lines kept
        keep = rank < n[..., None]
        vertical, slash = keep[..., :kv_len], keep[..., kv_len:]
        on_slash = torch.gather(slash, -1, distance.reshape(1, 1, -1).expand(b, h, -1)).view(b, h, rows, kv_len)
        covered = vertical[:, :, None, :] | on_slash
        return (attn * covered).sum((-1, -2)) / total

    lo = torch.zeros(b, h, dtype=torch.long, device=attn.device)  # coverage(lo) < gamma
    hi = torch.full((b, h), 2 * kv_len, dtype=torch.long, device=attn.device)  # coverage(hi) >= gamma
    gamma = gamma.expand(b, h)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        ok = coverage(mid) >= gamma
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    keep = rank < hi.clamp(min=min_lines)[..., None]
    return keep[..., :kv_len], keep[..., kv_len:]


@register_method
@dataclass
class FlexPrefill(Method):
    """FlexPrefill: per head, compare the pooled block estimate of the last query block with its
    exact block distribution (sqrt of Jensen-Shannon divergence). Below ``tau`` the head is
    query-aware (pooled block scores, cumulative mass ``gamma`` per row, at least ``min_budget``
    tokens of blocks); otherwise it takes the vertical-slash pattern from the last block's attention:

    * ``line_search="separate"`` (the paper's rule, default): the fewest columns whose mass reaches
      ``gamma`` and, on their own, the fewest diagonals whose mass reaches ``gamma``. Two sorts.
    * ``line_search="union"``: the fewest lines from one merged ranking whose *union* covers ``gamma``
      (see :func:`lines_covering`): fewer blocks for the same coverage, but a bisection that reduces
      the last block's attention ~2·log2(Skv) times (0.55x dense time at 128K on an H100).

    ``kv_groups_per_chunk``: KV groups whose last-block attention is formed at once, by the union
    search and by the PyTorch line scores (memory only; the layout does not depend on it). The report
    of :meth:`estimate` holds ``details["query_aware"]``, ``(B, H)`` True where a head took the
    query-aware pattern.
    """

    name = "flexprefill"
    KNOBS = {
        "gamma": KnobSpec.fraction(),  # the share of mass (blocks or lines) to cover
        # sqrt(JS divergence), natural log, lies in [0, sqrt(ln 2) ~ 0.83]: tau 0 makes every head
        # vertical-slash, tau 1 every head query-aware.
        "tau": KnobSpec.real(0.0, 1.0),
        "min_budget": KnobSpec.count(0),  # tokens (or a share of the key length); 0 still keeps one block / one line
        "line_search": KnobSpec.choice("separate", "union"),
        "kv_groups_per_chunk": KnobSpec.integer(1),
    }
    gamma: Knob = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    line_search: str = "separate"
    kv_groups_per_chunk: int = KV_GROUPS_PER_CHUNK

    def select(self, q, k, grid, scale, kernel_options=None):
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        pooled = pooled_block_probs(q, k, grid, scale, kernel_options)  # (B, H, NQ, NK)
        min_blocks, min_lines = self.minimums(grid)
        # Query-aware heads: cumulative mass on pooled block scores, at least min_blocks.
        qa = top_p_mask(pooled, self.row_values(self.gamma, pooled, kv_heads), min_keep=min_blocks,
                        kernel_options=kernel_options) & grid.reachable
        gamma = self.head_values(self.gamma, heads, kv_heads, q.device)
        nk = grid.reachable.shape[1]
        # Vertical-slash heads: the fewest lines covering a gamma share of the last block's attention,
        # at least min_budget tokens' worth of lines.
        if self.line_search == "separate":  # line sums only (line_scores bounds its own memory)
            v_scores, s_scores = line_scores(q, k, grid.q_block, scale, causal=True, kernel_options=kernel_options,
                                             kv_groups_per_chunk=self.kv_groups_per_chunk)
            share = gamma.view(1, -1, 1)
            vs = lines_to_blocks(grid, select_top_p(v_scores, share, min_lines),
                                 select_top_p(s_scores, share, min_lines))
        else:  # the union search needs the last block's attention itself: a few KV groups at a time
            v_parts, vs_parts = [], []
            step = self.kv_groups_per_chunk
            for first in range(0, kv_heads, step):
                last = min(kv_heads, first + step)
                rows = slice(first * group, last * group)
                attn = last_rows_attention(q[:, rows], k[:, first:last], grid.q_block, scale, causal=True)
                v_parts.append(attn.sum(-2))
                vs_parts.append(lines_to_blocks(grid, *lines_covering(attn, gamma[rows].view(1, -1), min_lines)))
            v_scores, vs = torch.cat(v_parts, 1), torch.cat(vs_parts, 1)
        # Pattern choice: the last query block's true block distribution (column sums pooled per key
        # block) against the pooled estimate's last row.
        padded = torch.nn.functional.pad(v_scores, (0, nk * grid.kv_block - v_scores.shape[-1]))
        truth = padded.view(*v_scores.shape[:2], nk, grid.kv_block).sum(-1)  # (B, H, NK), unnormalized
        query_aware = jensen_shannon(truth, pooled[:, :, -1]).clamp_min(0).sqrt() < self.tau  # (B, H)
        return torch.where(query_aware[..., None, None], qa, vs), {"query_aware": query_aware}

    def minimums(self, grid) -> tuple:
        """``min_budget`` at this call's length as (key blocks per row of a query-aware head, lines of
        a vertical-slash head)."""
        budget = self.count(self.min_budget, grid.kv_len)
        return max(1, -(-budget // grid.kv_block)), max(1, budget // grid.q_block)

    def dense_knobs(self, grid, forced):
        min_blocks, min_lines = self.minimums(grid)
        query_aware = self.tau <= 0 or top_k_keeps_every_block(grid, min_blocks)  # tau 0: no head is query-aware
        lines = self.tau > MAX_PATTERN_DISTANCE or lines_keep_every_block(grid, min_lines, min_lines, forced)
        return ("min_budget",) if query_aware and lines else ()
