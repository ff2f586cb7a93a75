"""MoBA (Mixture of Block Attention): a parameter-free gate over blocks of keys.

MoBA splits the keys into blocks of ``moba_block`` tokens. A query token scores every block that
ends before its own block by ``q . mean(K_block)``, keeps the ``top_k`` best, and attends to those
blocks plus its own block (causally inside it). Selection is per query head.

* :class:`MoBA` (method ``"moba"``) builds a block-sparse layout for the library's kernels
  (forward and backward): the selection is made per query *block* of ``block_size`` rows, from the
  block's mean query, and every key block of the chosen MoBA blocks is kept. Rows of one query
  block then share their blocks, where exact MoBA lets each row choose; :func:`moba_selection_agreement`
  measures how much of the exact per-token selection the layout covers.
* :func:`moba_reference` is exact MoBA, per query token, in PyTorch (a dense ``S x S`` mask: for
  tests and short inputs), with :func:`moba_token_blocks` the per-token choice behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..patterns.grid import BlockGrid
from .base import Method, register_method
from .common import group_queries
from .knobs import KnobSpec
from .primitives.mean_pool import block_mean_pool
from .primitives.mean_pool.naive import mean_pool

__all__ = ["MoBA", "moba_reference", "moba_token_blocks", "moba_selection_agreement"]


def moba_token_blocks(q: Tensor, k: Tensor, moba_block: int, top_k: int, scale: Optional[float] = None) -> Tensor:
    """Exact MoBA's choice: ``(B, H, Sq, NM)`` bool, the MoBA blocks each query token reads (its
    ``top_k`` best earlier blocks by ``q . mean(K_block)`` and its own block). Queries are the last
    ``Sq`` positions of the ``S`` keys; query head ``h`` reads KV head ``h // (H / Hkv)``."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    means = mean_pool(k.float(), moba_block)  # (B, Hkv, NM, D)
    nm = means.shape[2]
    scores = torch.einsum("bngsd,bnmd->bngsm", group_queries(q.float(), kv_heads), means).flatten(1, 2) * scale
    pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    own = (pos // moba_block)[:, None]  # (Sq, 1)
    blocks = torch.arange(nm, device=q.device)[None, :]
    earlier = blocks < own  # (Sq, NM): candidates of the gate
    scores = scores.masked_fill(~earlier, float("-inf"))
    take = min(top_k, nm)
    top = scores.topk(take, dim=-1)
    chosen = torch.zeros(batch, heads, q_len, nm, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, top.indices, top.values > float("-inf"))
    return chosen | (blocks == own)


def moba_reference(q: Tensor, k: Tensor, v: Tensor, moba_block: int, top_k: int,
                   scale: Optional[float] = None) -> Tensor:
    """Exact MoBA attention in PyTorch (per query token; causal; GQA), computed in ``q``'s dtype
    with a dense ``(Sq, S)`` mask per head: ``(B, H, Sq, D)``."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    chosen = moba_token_blocks(q, k, moba_block, top_k, scale)  # (B, H, Sq, NM)
    key_block = torch.arange(kv_len, device=q.device) // moba_block
    mask = chosen[..., key_block]  # (B, H, Sq, S)
    pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    mask = mask & (torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None])
    group = heads // kv_heads
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = torch.matmul(q, kk.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, vv)


def moba_selection_agreement(q: Tensor, k: Tensor, method: "MoBA", scale: Optional[float] = None) -> float:
    """The share of exact MoBA's (query token, MoBA block) choices that ``method``'s block layout
    also keeps (1.0: the layout covers every block exact MoBA reads)."""
    exact = moba_token_blocks(q, k, method.moba_block, method.top_k, scale)  # (B, H, Sq, NM)
    layout = method.estimate(q, k, scale=scale)
    kept = layout.to_dense()  # (B, H or 1, NQ, NK)
    kept = kept.expand(q.shape[0], q.shape[1], -1, -1)
    q_block, kv_block = layout.q_block, layout.kv_block
    rows = torch.arange(q.shape[2], device=q.device) // q_block
    per_token = kept[:, :, rows]  # (B, H, Sq, NK)
    nm = exact.shape[-1]
    first_kb = torch.arange(nm, device=q.device) * method.moba_block // kv_block
    covered = per_token[..., first_kb]  # a MoBA block is kept whole or not at all
    return float((covered & exact).sum()) / max(int(exact.sum()), 1)


@register_method
@dataclass
class MoBA(Method):
    """MoBA with a block-granular query: per query block of ``block_size`` rows and query head,
    the ``top_k`` MoBA blocks (of ``moba_block`` tokens, a multiple of ``block_size``) before the
    block's own MoBA block with the best ``mean(q) . mean(K_block)``, plus the MoBA blocks holding
    the query block's rows (causal inside). Per-head layouts by default (``granularity="head"``),
    no sink tokens."""

    name = "moba"
    KNOBS = {"top_k": KnobSpec.integer(1), "moba_block": KnobSpec.integer(16)}
    top_k: int = 3
    moba_block: int = 512
    granularity: str = "head"
    sink: int = 0

    def check_knobs(self) -> None:
        if self.moba_block % self.block_size:
            raise self.knob_error("moba_block", self.moba_block,
                                  f"is not a multiple of block_size={self.block_size} (a MoBA block is whole kernel "
                                  "blocks)")

    def select(self, q, k, grid: BlockGrid, scale, kernel_options=None):
        kv_heads = k.shape[1]
        qp = block_mean_pool(q, grid.q_block, kernel_options=kernel_options)  # (B, H, NQ, D)
        means = block_mean_pool(k, self.moba_block, kernel_options=kernel_options)  # (B, Hkv, NM, D)
        nm = means.shape[2]
        scores = torch.einsum("bngqd,bnmd->bngqm", group_queries(qp, kv_heads), means).flatten(1, 2) * scale
        blocks = torch.arange(nm, device=q.device)[None, :]
        own_first = (grid.q_first // self.moba_block)[:, None]  # (NQ, 1)
        own_last = (torch.clamp(grid.q_last, max=grid.kv_len - 1) // self.moba_block)[:, None]
        scores = scores.masked_fill(~(blocks < own_first), float("-inf"))
        take = min(self.top_k, nm)
        top = scores.topk(take, dim=-1)
        chosen = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, top.indices, top.values > float("-inf"))
        chosen = chosen | ((blocks >= own_first) & (blocks <= own_last))  # (B, H, NQ, NM)
        moba_of_kb = (grid.k_first // self.moba_block).clamp(max=nm - 1)  # (NK,)
        return chosen[..., moba_of_kb] & grid.reachable
