"""Accuracy metrics for layouts: attention recall and output error (density: ``layout.density_per_head()``).

None of them builds a ``q_len x kv_len`` matrix: recall works on sampled query rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .layout import BlockSparseLayout
from .methods.common import group_queries


def sample_rows(q_len: int, num_rows: int = 64, device=None) -> Tensor:
    """``num_rows`` query rows spread evenly over the sequence (always including the last one)."""
    num_rows = min(num_rows, q_len)
    return torch.linspace(0, q_len - 1, num_rows, device=device).round().long().unique()


def attention_recall(q: Tensor, k: Tensor, layout: BlockSparseLayout, rows: Optional[Tensor] = None,
                     num_rows: int = 64, scale: Optional[float] = None) -> Tensor:
    """Share of the true softmax mass that the layout keeps, per (batch, query head): ``(B, H)``.

    Exact on the sampled query ``rows`` (default: ``num_rows`` evenly spaced rows); keys are never
    repeated for GQA. A row whose layout keeps nothing has recall 0.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rows = sample_rows(q_len, num_rows, q.device) if rows is None else rows.to(q.device).long()
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qg = group_queries(q[:, :, rows].float(), kv_heads)
    scores = torch.einsum("bngrd,bnkd->bngrk", qg, k.float()) * scale
    key_pos = torch.arange(kv_len, device=q.device)
    allowed_causal = key_pos[None, :] <= rows[:, None] + (kv_len - q_len if layout.causal else kv_len)
    probs = torch.softmax(scores.masked_fill(~allowed_causal, float("-inf")), -1).flatten(1, 2)
    dense = layout.expand(batch=batch, heads=heads).to_dense()  # (B, H, NQ, NK): block level
    kept_rows = dense[:, :, rows // layout.q_block]  # (B, H, R, NK)
    kept = kept_rows.repeat_interleave(layout.kv_block, dim=-1)[..., :kv_len] & allowed_causal
    return (probs * kept).sum(-1).mean(-1)


def output_relative_error(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout,
                          backend: str = "auto") -> Tensor:
    """``||sparse - dense|| / ||dense||`` per (batch, query head), dense = full causal attention."""
    from .attention import sparse_attention
    from .patterns import dense_layout

    dense = dense_layout(q.shape[2], k.shape[2], block_size=(layout.q_block, layout.kv_block),
                         causal=layout.causal, device=q.device)
    sparse_out = sparse_attention(q, k, v, layout, backend=backend).float()
    dense_out = sparse_attention(q, k, v, dense, backend=backend).float()
    return (sparse_out - dense_out).norm(dim=(-1, -2)) / dense_out.norm(dim=(-1, -2)).clamp_min(1e-12)

