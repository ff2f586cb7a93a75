"""Sparse decode attention over selected pages in plain PyTorch: the reference the decode kernel is
tested against.

Gathers only the selected pages of each (sequence, KV head), from a contiguous ``(B, Hkv, S_max, D)``
cache or a paged ``(num_blocks, page_size, Hkv, D)`` cache through its block table. Any floating
dtype, CPU or GPU; softmax in float32 (float64 for float64 inputs). Inputs are assumed checked by
:func:`sparse_attn.decode.attention.decode_attention`. No autograd support is promised.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends.reference import masked_softmax


def reference_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, page_counts: Tensor,
                               cache_lens: Tensor, page_size: int, scale: float,
                               block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns ``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32, natural log)``.

    Query ``i`` of sequence ``b`` sits at position ``cache_lens[b] - Sq + i`` and sees the keys of
    the selected pages at positions up to its own. Padding slots (past ``page_counts``) and cache
    rows at or past ``cache_lens`` are never used, whatever they hold (NaN included): their gathered
    values are replaced by zeros. A query with no key gets output 0 and LSE ``-inf``.
    """
    batch, heads, q_len, dim = q.shape
    paged = block_table is not None
    kv_heads = k_cache.shape[2] if paged else k_cache.shape[1]
    group = heads // kv_heads
    width = pages.shape[-1]
    device = q.device
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    slot = torch.arange(width, device=device)
    kept = slot < page_counts.long()[..., None]  # (B, Hkv, W)
    page = torch.where(kept, pages.long(), 0)  # padding slots read page 0, then masked
    token = torch.arange(page_size, device=device)
    kpos = (page[..., None] * page_size + token).flatten(-2)  # (B, Hkv, W * page_size)
    lens = cache_lens.long().view(batch, 1, 1)
    kvalid = kept.repeat_interleave(page_size, dim=-1) & (kpos < lens)

    head = torch.arange(kv_heads, device=device).view(1, kv_heads, 1)
    if paged:
        max_blocks = block_table.shape[1]
        logical = (kpos // page_size).clamp(max=max_blocks - 1)
        physical = torch.gather(block_table.long()[:, None, :].expand(batch, kv_heads, max_blocks), 2, logical)
        physical = torch.where(kvalid, physical, 0)
        flat = ((physical * page_size + kpos % page_size) * kv_heads + head)  # rows of (blocks*page, Hkv)
        k_rows, v_rows = k_cache.reshape(-1, dim), v_cache.reshape(-1, v_cache.shape[-1])
    else:
        s_max = k_cache.shape[2]
        bidx = torch.arange(batch, device=device).view(batch, 1, 1)
        flat = (bidx * kv_heads + head) * s_max + torch.where(kvalid, kpos, 0)
        k_rows, v_rows = k_cache.reshape(-1, dim), v_cache.reshape(-1, v_cache.shape[-1])
    k_sel = k_rows.index_select(0, flat.reshape(-1)).view(*flat.shape, dim).to(compute_dtype)
    v_sel = v_rows.index_select(0, flat.reshape(-1)).view(*flat.shape, v_cache.shape[-1]).to(compute_dtype)
    k_sel = k_sel.masked_fill(~kvalid[..., None], 0)
    v_sel = v_sel.masked_fill(~kvalid[..., None], 0)

    # Rows of a KV group: (query head within the group, query index), head-major.
    qg = q.to(compute_dtype).reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.einsum("bgrd,bgkd->bgrk", qg, k_sel) * scale
    qpos = cache_lens.long().view(batch, 1) - q_len + torch.arange(q_len, device=device)  # (B, Sq)
    qpos = qpos.repeat(1, group).view(batch, 1, group * q_len, 1)
    allowed = kvalid[:, :, None, :] & (kpos[:, :, None, :] <= qpos)
    probs, norm, lse = masked_softmax(scores.masked_fill(~allowed, float("-inf")))
    out = torch.einsum("bgrk,bgkd->bgrd", probs, v_sel) / norm
    out = out.reshape(batch, heads, q_len, v_cache.shape[-1]).to(q.dtype)
    return out, lse.reshape(batch, heads, q_len).float()
