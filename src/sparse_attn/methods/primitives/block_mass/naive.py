"""Plain-PyTorch reference of :func:`sparse_attn.methods.primitives.block_mass.block_mass`."""

from __future__ import annotations

import torch
from torch import Tensor

from ...common import group_queries

CHUNK_ELEMENTS = 1 << 24  # score entries per chunk of query blocks (the default of chunk_elements)


def block_mass_reference(q: Tensor, k: Tensor, q_block: int, kv_block: int, scale: float,
                         causal: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """Exact softmax mass per (query block, key block), averaged over each query block's rows.

    ``q (B, H, Sq, D)``, ``k (B, Hkv, Skv, D)``; returns ``(B, H, NQ, NK)`` float32 whose rows sum to
    1 (0 for rows with no key). Works in chunks of query blocks: memory O(chunk x Skv), never Sq x Skv.
    Computes in float32, or in float64 (and returns float64) when given float64.
    """
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    offset = kv_len - q_len if causal else 0
    kf = k.to(work)
    out = torch.zeros(batch, heads, nq, nk, device=q.device, dtype=work)
    step = max(1, chunk_elements // max(batch * heads * q_block * kv_len, 1))
    key_pos = torch.arange(kv_len, device=q.device)
    pad_keys = nk * kv_block - kv_len
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        rows = torch.arange(start * q_block, min(stop * q_block, q_len), device=q.device)
        qg = group_queries(q[:, :, rows].to(work), kv_heads)
        scores = torch.einsum("bngqd,bnkd->bngqk", qg, kf) * scale
        if causal:
            scores = scores.masked_fill(key_pos[None, :] > rows[:, None] + offset, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).flatten(1, 2)  # (B, H, R, Skv)
        probs = torch.nn.functional.pad(probs, (0, pad_keys)).view(batch, heads, len(rows), nk, kv_block)
        per_row = probs.sum(-1)  # (B, H, R, NK)
        padded_rows = (stop - start) * q_block - len(rows)
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, padded_rows))
        per_block = per_row.view(batch, heads, stop - start, q_block, nk).sum(3)
        counts = torch.full((stop - start,), float(q_block), device=q.device, dtype=work)
        counts[-1] = len(rows) - (stop - start - 1) * q_block
        out[:, :, start:stop] = per_block / counts[:, None]
    return out
