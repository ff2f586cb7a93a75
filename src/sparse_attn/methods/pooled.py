"""Pooled block scores: mean-pooled Q and K block summaries (what SeerAttention's gate learns from),
softmax over the reachable key blocks; keep the top-p or the top-k blocks per query block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..options import KernelOptions
from ..patterns.grid import BlockGrid
from .base import Knob, Method, register_method
from .common import group_queries
from .knobs import KnobSpec
from .primitives.mean_pool import block_mean_pool
from .primitives.top_p import top_p_mask
from .selection import select_top_k, top_k_dense


def pooled_block_probs(q: Tensor, k: Tensor, grid: BlockGrid, scale: float,
                       kernel_options: Optional[KernelOptions] = None) -> Tensor:
    """Softmax over reachable key blocks of mean-pooled query/key block scores.

    Returns ``(B, H, NQ, NK)`` float32 (per query head; 0 on unreachable blocks). ``kernel_options``
    goes to the pooling (:func:`.primitives.mean_pool.block_mean_pool`).
    """
    kv_heads = k.shape[1]
    qp = block_mean_pool(q, grid.q_block, kernel_options=kernel_options)
    qp = group_queries(qp, kv_heads)  # (B, Hkv, G, NQ, D)
    kp = block_mean_pool(k, grid.kv_block, kernel_options=kernel_options)  # (B, Hkv, NK, D)
    scores = torch.einsum("bngqd,bnkd->bngqk", qp, kp) * scale
    scores = scores.masked_fill(~grid.reachable, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs.flatten(1, 2)


@register_method
@dataclass
class PooledTopP(Method):
    """Mean-pooled Q and K block summaries (what SeerAttention's gate learns from); per query block
    keep the fewest key blocks whose softmax share reaches ``top_p``."""

    name = "pooled_topp"
    KNOBS = {"top_p": KnobSpec.fraction()}
    top_p: Knob = 0.9

    def select(self, q, k, grid, scale, kernel_options=None):
        probs = pooled_block_probs(q, k, grid, scale, kernel_options)
        return top_p_mask(probs, self.row_values(self.top_p, probs, k.shape[1]), kernel_options=kernel_options)


@register_method
@dataclass
class PooledTopK(Method):
    """Mean-pooled block scores; keep the ``top_k`` best key blocks per query block (a count, or a
    share of the key blocks)."""

    name = "pooled_topk"
    KNOBS = {"top_k": KnobSpec.count(1, share_of="the key blocks", per_head=True)}  # key blocks per query block
    top_k: Knob = 8

    def select(self, q, k, grid, scale, kernel_options=None):
        probs = pooled_block_probs(q, k, grid, scale, kernel_options)
        top_k = self.count(self.top_k, grid.reachable.shape[1])
        return select_top_k(probs, self.row_values(top_k, probs, k.shape[1]).long(),
                            valid=grid.reachable, k_max=int(self.knob_max(top_k)))

    def dense_knobs(self, grid, forced):
        return top_k_dense(self.top_k, grid)

