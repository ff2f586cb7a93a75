"""Synthetic q/k with planted attention structure, for estimator tests.

Each structure returns ``(q, k, planted)`` where ``planted (q_len, kv_len)`` marks the planted
(query, key) pairs; queries score those keys ``gain`` logits (after the 1/sqrt(D) scale) above
the rest, so their softmax mass concentrates there. Small shapes only: ``planted`` is a token mask.
"""

from __future__ import annotations

import math

import torch


def _orthogonal_codes(n, dim, gen):
    """``n <= dim`` orthogonal vectors of squared norm ``dim``."""
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    return basis[:, :n].T * math.sqrt(dim)


def planted(kind: str, batch=1, heads=4, kv_heads=2, q_len=1024, kv_len=None, dim=64, gain=16.0,
            seed=0):
    """``kind``: 'vertical' (a few key columns), 'slash' (a fixed query-key distance, RoPE-like),
    'band' (queries attend within their 64-token window) or 'needle' (one 64-token block)."""
    kv_len = q_len if kv_len is None else kv_len
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen) * 0.3
    q = torch.randn(batch, heads, q_len, dim, generator=gen) * 0.3
    q_pos = torch.arange(q_len) + kv_len - q_len
    key_pos = torch.arange(kv_len)
    a = gain / math.sqrt(dim)  # query amplitude giving `gain` logits on a code of norm^2 = dim
    if kind in ("vertical", "needle"):
        code = _orthogonal_codes(1, dim, gen)[0]
        if kind == "vertical":
            cols = torch.tensor([3, 200, 517, 900]) % kv_len
        else:
            cols = torch.arange(kv_len // 3, kv_len // 3 + 64)
        k[:, :, cols] += code
        q += a * code
        planted_mask = torch.zeros(q_len, kv_len, dtype=torch.bool)
        planted_mask[:, cols] = True
    elif kind == "band":
        window = 64
        codes = _orthogonal_codes(-(-kv_len // window), dim, gen)
        k += codes[key_pos // window]
        q += a * codes[q_pos // window]
        planted_mask = (q_pos[:, None] // window) == (key_pos[None, :] // window)
    elif kind == "slash":
        distance, freqs = 300, dim // 2
        omega = torch.rand(freqs, generator=gen) * math.pi

        def rotary(pos):  # (n, dim) unit-frequency features; dot products depend on pos difference
            angles = pos[:, None].double() * omega[None, :].double()
            return torch.cat([angles.cos(), angles.sin()], -1).float() * math.sqrt(2)

        k += rotary(key_pos)
        q += a * rotary(q_pos - distance)
        planted_mask = key_pos[None, :] == (q_pos[:, None] - distance)
    else:
        raise ValueError(kind)
    planted_mask &= key_pos[None, :] <= q_pos[:, None]
    return q, k, planted_mask


def planted_recall(q, k, layout, planted_mask) -> float:
    """Share of the softmax mass on planted pairs that ``layout`` keeps (all rows, small shapes)."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(group, 1)) / math.sqrt(q.shape[-1])
    q_len, kv_len = q.shape[2], k.shape[2]
    causal = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + kv_len - q_len
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    kept = layout.expand(batch=q.shape[0], heads=q.shape[1]).to_token_mask()
    on_planted = probs * planted_mask
    return float((on_planted * kept).sum() / on_planted.sum())


def needed_density(layout, planted_mask) -> float:
    """Density of the smallest layout on ``layout``'s grid holding every planted pair and the
    diagonal blocks: what the structure needs."""
    from sparse_attn import BlockSparseLayout

    nq, nk = layout.num_q_blocks, layout.num_kv_blocks
    padded = torch.nn.functional.pad(planted_mask, (0, nk * layout.kv_block - layout.kv_len,
                                                    0, nq * layout.q_block - layout.q_len))
    cover = padded.view(nq, layout.q_block, nk, layout.kv_block).any(3).any(1)
    reach = layout.causal_block_mask()
    diag = torch.zeros_like(reach)
    diag[torch.arange(nq), reach.long().cumsum(1).argmax(1)] = True
    cover = (cover | diag) & reach
    return BlockSparseLayout.from_dense(cover, layout.q_len, layout.kv_len,
                                        (layout.q_block, layout.kv_block)).density()
