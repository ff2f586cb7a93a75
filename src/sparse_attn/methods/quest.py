"""Quest: query-aware page selection from per-page key bounds (decode and short chunks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Knob, Method, register_method
from .common import group_queries
from .knobs import KnobSpec
from .selection import select_top_k, top_k_dense


@register_method
@dataclass
class Quest(Method):
    """Quest's query-aware page selection (for decode and short chunks): each key block (page)
    keeps the elementwise min and max of its keys; ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` bounds
    every score in the page from above, and the ``top_k`` pages (a count, or a share of the key
    blocks) with the largest bound are kept (max of the bound over the query block's rows). Min/max
    are recomputed per call (no per-page cache)."""

    name = "quest"
    KNOBS = {"top_k": KnobSpec.count(1, share_of="the key blocks", per_head=True)}  # pages (key blocks) per query block
    top_k: Knob = 16

    def select(self, q, k, grid, scale, kernel_options=None):
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
        top_k = self.count(self.top_k, nk)
        kk = self.row_values(top_k, bound, kv_heads).long()
        return select_top_k(bound, kk, valid=grid.reachable, k_max=int(self.knob_max(top_k)))

    def dense_knobs(self, grid, forced):
        return top_k_dense(self.top_k, grid)
