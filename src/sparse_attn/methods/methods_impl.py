"""The estimators: pooled top-k / top-p, oracle, XAttention, vertical-slash (MInference), FlexPrefill,
and Quest (decode-time page selection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .base import Method, register_method
from . import scoring
from .kernels import block_mass, line_scores, top_p_mask
from .scoring import (
    diagonal_sums,
    group_queries,
    jensen_shannon,
    last_rows_attention,
    lines_to_blocks,
    pooled_block_probs,
    select_top_k,
    select_top_p,
)

Knob = Union[float, Sequence[float]]


@register_method
@dataclass
class PooledTopP(Method):
    """Mean-pooled Q and K block summaries (what SeerAttention's gate learns from); per query block
    keep the fewest key blocks whose softmax share reaches ``top_p``."""

    name = "pooled_topp"
    top_p: Knob = 0.9

    def select(self, q, k, grid, scale):
        probs = pooled_block_probs(q, k, grid, scale)
        return top_p_mask(probs, self.row_values(self.top_p, probs, k.shape[1]))


@register_method
@dataclass
class PooledTopK(Method):
    """Mean-pooled block scores; keep the ``top_k`` best key blocks per query block."""

    name = "pooled_topk"
    top_k: Knob = 8

    def select(self, q, k, grid, scale):
        probs = pooled_block_probs(q, k, grid, scale)
        return select_top_k(probs, self.row_values(self.top_k, probs, k.shape[1]).long(),
                            valid=grid.reachable, k_max=int(self.knob_max(self.top_k)))


@register_method
@dataclass
class Oracle(Method):
    """Exact block attention mass (computed blockwise), top-p of it: the upper bound for estimators."""

    name = "oracle"
    top_p: Knob = 0.95

    def select(self, q, k, grid, scale):
        mass = block_mass(q, k, grid.q_block, grid.kv_block, scale, causal=True)
        return top_p_mask(mass, self.row_values(self.top_p, mass, k.shape[1]))


def antidiagonal_reshape(q: Tensor, k: Tensor, stride: int):
    """XAttention's reshaping, so one dot product sums an antidiagonal of an ``s x s`` tile: row ``a``
    of ``q_r`` concatenates ``q[a*s + i]`` and row ``b`` of ``k_r`` concatenates ``k[b*s + s-1-i]``
    over ``i`` (the paper reverses the queries instead; the sums are the same). Reversing the keys
    leaves ``q_r`` a view of ``q`` when the length is a stride multiple: only K, 1/G of Q's size under
    GQA, is copied (the copies of both were ~12% of XAttention's time at 128K on an H100)."""
    def pad(x):
        extra = (-x.shape[2]) % stride
        return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x

    q, k = pad(q), pad(k)
    dim = q.shape[-1]
    q_r = q.reshape(*q.shape[:2], q.shape[2] // stride, stride * dim)
    k_r = k.reshape(*k.shape[:2], k.shape[2] // stride, stride, dim).flip(3).flatten(3)
    return q_r, k_r


@register_method
@dataclass
class XAttention(Method):
    """XAttention: antidiagonal scores with stride ``stride`` inside each block pair, softmax over
    the row, then per query block the fewest key blocks whose mass reaches ``threshold``."""

    name = "xattention"
    threshold: Knob = 0.9
    stride: int = 8

    def select(self, q, k, grid, scale):
        if grid.q_block % self.stride or grid.kv_block % self.stride:
            raise ValueError(f"xattention: block_size {grid.q_block} must be a multiple of stride {self.stride}")
        q_r, k_r = antidiagonal_reshape(q, k, self.stride)
        mass = block_mass(q_r, k_r, grid.q_block // self.stride, grid.kv_block // self.stride,
                          scale / self.stride, causal=True)
        nq, nk = grid.reachable.shape
        mass = mass[..., :nq, :nk]
        return top_p_mask(mass, self.row_values(self.threshold, mass, k.shape[1]))


@register_method
@dataclass
class VerticalSlash(Method):
    """MInference's vertical-slash pattern: the last ``last_q`` queries score all keys; keep the
    ``vertical_size`` strongest key columns and ``slash_size`` strongest diagonals per head, then
    cover them with blocks (block granularity: a kept column costs its whole key block)."""

    name = "vertical_slash"
    vertical_size: Knob = 1000
    slash_size: Knob = 6096
    last_q: int = 64

    def select(self, q, k, grid, scale):
        v_scores, s_scores = line_scores(q, k, self.last_q, scale, causal=True)  # (B, H, Skv) each
        heads, kv_heads = q.shape[1], k.shape[1]
        vertical = self.head_values(self.vertical_size, heads, kv_heads, q.device).view(1, -1).long()
        slash = self.head_values(self.slash_size, heads, kv_heads, q.device).view(1, -1).long()
        v_keep = select_top_k(v_scores, vertical.expand(v_scores.shape[:-1]),
                              k_max=int(self.knob_max(self.vertical_size)))
        s_keep = select_top_k(s_scores, slash.expand(s_scores.shape[:-1]), k_max=int(self.knob_max(self.slash_size)))
        return lines_to_blocks(grid, v_keep, s_keep)


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
    """

    name = "flexprefill"
    gamma: Knob = 0.9
    tau: float = 0.1
    min_budget: int = 1024
    line_search: str = "separate"

    def __post_init__(self):
        super().__post_init__()
        if self.line_search not in ("separate", "union"):
            raise ValueError(f"flexprefill: line_search must be 'separate' or 'union', got {self.line_search!r}")

    def select(self, q, k, grid, scale):
        heads, kv_heads = q.shape[1], k.shape[1]
        group = heads // kv_heads
        pooled = pooled_block_probs(q, k, grid, scale)  # (B, H, NQ, NK)
        min_blocks = max(1, -(-self.min_budget // grid.kv_block))
        # Query-aware heads: cumulative mass on pooled block scores, at least min_blocks.
        qa = top_p_mask(pooled, self.row_values(self.gamma, pooled, kv_heads),
                        min_keep=min_blocks) & grid.reachable
        gamma = self.head_values(self.gamma, heads, kv_heads, q.device)
        nk = grid.reachable.shape[1]
        # Vertical-slash heads: the fewest lines covering a gamma share of the last block's attention,
        # at least min_budget tokens' worth of lines.
        min_lines = max(1, self.min_budget // grid.q_block)
        if self.line_search == "separate":  # line sums only (line_scores bounds its own memory)
            v_scores, s_scores = line_scores(q, k, grid.q_block, scale, causal=True)
            share = gamma.view(1, -1, 1)
            vs = lines_to_blocks(grid, select_top_p(v_scores, share, min_lines),
                                 select_top_p(s_scores, share, min_lines))
        else:  # the union search needs the last block's attention itself: a few KV groups at a time
            v_parts, vs_parts = [], []
            step = scoring.KV_GROUPS_PER_CHUNK
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
        self.last_pattern = query_aware  # (B, H) True where the query-aware pattern was used
        return torch.where(query_aware[..., None, None], qa, vs)


@register_method
@dataclass
class Quest(Method):
    """Quest's query-aware page selection (for decode and short chunks): each key block (page)
    keeps the elementwise min and max of its keys; ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` bounds
    every score in the page from above, and the ``top_k`` pages with the largest bound are kept
    (max of the bound over the query block's rows). Min/max are recomputed per call here; a cache
    that keeps them per page is the next step for long decodes."""

    name = "quest"
    top_k: Knob = 16

    def select(self, q, k, grid, scale):
        nq, nk = grid.reachable.shape
        batch, kv_heads, kv_len, dim = k.shape
        pad = nk * grid.kv_block - kv_len
        kf = k.float()
        kmax = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(
            batch, kv_heads, nk, grid.kv_block, dim).amax(3)
        kmin = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(
            batch, kv_heads, nk, grid.kv_block, dim).amin(3)
        qg = group_queries(q, kv_heads).float()  # (B, Hkv, G, Sq, D)
        bound = torch.einsum("bngsd,bnkd->bngsk", qg.clamp(min=0), kmax) + \
            torch.einsum("bngsd,bnkd->bngsk", qg.clamp(max=0), kmin)
        rows = q.shape[2]
        pad_rows = nq * grid.q_block - rows
        bound = torch.nn.functional.pad(bound, (0, 0, 0, pad_rows), value=float("-inf"))
        bound = bound.view(*bound.shape[:3], nq, grid.q_block, nk).amax(4).flatten(1, 2)  # (B, H, NQ, NK)
        kk = self.row_values(self.top_k, bound, kv_heads).long()
        return select_top_k(bound, kk, valid=grid.reachable, k_max=int(self.knob_max(self.top_k)))
