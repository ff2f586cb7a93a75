"""Triton kernels for the heavy estimation steps, each with a reference beside it:

* :func:`block_mass`: softmax mass per (query block, key block) (reference:
  :func:`.naive.block_mass_reference`). With the plain inputs it is the oracle; on XAttention's
  antidiagonally reshaped inputs it is XAttention's block score.
* :func:`top_p_mask`: per row, the fewest largest entries reaching a share ``p`` of the row total
  (reference: :func:`.scoring.select_top_p`).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .naive import block_mass_reference
from .scoring import select_top_p

LOG2E = 1.4426950408889634


def _triton_usable(t: Tensor) -> bool:
    """Automatic choice: Triton on CUDA only (the CPU interpreter is exact but slow; tests ask for it
    explicitly with ``use_triton=True``)."""
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require_triton(t: Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def block_mass_kernel(Q, K, OUT, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                          stride_ks, q_len, kv_len, offset, scale_log2,
                          H: tl.constexpr, GROUP: tl.constexpr, NK: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_BLOCK: tl.constexpr,
                          KV_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
        qb = tl.program_id(0)
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        rows = qb * Q_BLOCK + tl.arange(0, Q_BLOCK)
        row_ok = rows < q_len
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs
        k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
        last = tl.minimum(q_len, (qb + 1) * Q_BLOCK) - 1 + offset
        n_reach = tl.cdiv(kv_len, KV_BLOCK)
        if CAUSAL:
            n_reach = tl.minimum(n_reach, tl.maximum(last, -1) // KV_BLOCK + 1)
        m_i = tl.full([Q_BLOCK], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([Q_BLOCK], dtype=tl.float32)
        for kb in range(0, n_reach):  # pass 1: row max and normalizer
            cols = kb * KV_BLOCK + tl.arange(0, KV_BLOCK)
            s = tl.zeros([Q_BLOCK, KV_BLOCK], dtype=tl.float32)
            for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                qt = tl.load(q_base + dd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
                kt = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dd[None, :],
                             mask=cols[:, None] < kv_len, other=0.0).to(tl.float32)
                s += tl.dot(qt, tl.trans(kt))
            s = s * scale_log2
            keep = cols[None, :] < kv_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + offset)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
        inv_l = tl.where(row_ok, inv_l, 0.0)
        n_rows = tl.minimum(q_len - qb * Q_BLOCK, Q_BLOCK).to(tl.float32)
        out_row = OUT + tl.program_id(1).to(tl.int64) * (tl.num_programs(0) * NK) + qb * NK
        for kb in range(0, n_reach):  # pass 2: block sums of normalized probabilities
            cols = kb * KV_BLOCK + tl.arange(0, KV_BLOCK)
            s = tl.zeros([Q_BLOCK, KV_BLOCK], dtype=tl.float32)
            for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                qt = tl.load(q_base + dd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
                kt = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dd[None, :],
                             mask=cols[:, None] < kv_len, other=0.0).to(tl.float32)
                s += tl.dot(qt, tl.trans(kt))
            s = s * scale_log2
            keep = cols[None, :] < kv_len
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + offset)
            p = tl.where(keep, tl.exp2(s - m_safe[:, None]), 0.0) * inv_l[:, None]
            tl.store(out_row + kb, tl.sum(tl.sum(p, 1), 0) / n_rows)

    @triton.jit
    def top_p_kernel(S, OUT, P, n_cols, min_keep, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < n_cols
        x = tl.load(S + row * n_cols + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.maximum(x, 0.0)
        p = tl.load(P + row)
        ordered = tl.sort(x, descending=True)
        total = tl.maximum(tl.sum(ordered, 0), 1e-30)
        before = (tl.cumsum(ordered, 0) - ordered) / total
        count = tl.sum(((before < p) & (ordered > 0)).to(tl.int32), 0)
        count = tl.maximum(count, tl.minimum(min_keep, tl.sum((ordered > 0).to(tl.int32), 0)))
        rank = tl.arange(0, BLOCK)
        threshold = tl.max(tl.where(rank == count - 1, ordered, float("-inf")), 0)
        keep = (x >= threshold) & (x > 0) & ok & (count > 0)
        tl.store(OUT + row * n_cols + offs, keep.to(tl.int8), mask=ok)

    return block_mass_kernel, top_p_kernel


_KERNELS = None


def _get_kernels():
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernels()
    return _KERNELS


def block_mass(q: Tensor, k: Tensor, q_block: int, kv_block: int, scale: float,
               causal: bool = True, use_triton: bool | None = None) -> Tensor:
    """``(B, H, NQ, NK)`` float32 mean softmax mass per block pair; Triton when usable, else reference."""
    use_triton = _triton_usable(q) if use_triton is None else use_triton
    if not use_triton:
        return block_mass_reference(q, k, q_block, kv_block, scale, causal)
    _require_triton(q)
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_block < 16 or kv_block < 16 or dim < 16 or dim & (dim - 1):
        return block_mass_reference(q, k, q_block, kv_block, scale, causal)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    out = torch.zeros(batch, heads, nq, nk, device=q.device, dtype=torch.float32)
    block_mass_kernel, _ = _get_kernels()
    block_mass_kernel[(nq, batch * heads)](
        q, k, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_len, kv_len, kv_len - q_len if causal else 0, scale * LOG2E,
        H=heads, GROUP=heads // kv_heads, NK=nk, HEAD_DIM=dim, BLOCK_D=min(dim, 64),
        Q_BLOCK=q_block, KV_BLOCK=kv_block, CAUSAL=causal,
    )
    return out


def top_p_mask(scores: Tensor, p, min_keep: int = 1, use_triton: bool | None = None) -> Tensor:
    """Bool mask of the fewest largest entries per row reaching share ``p`` (per-row ``p`` allowed)."""
    use_triton = _triton_usable(scores) if use_triton is None else use_triton
    p_rows = torch.as_tensor(p, dtype=torch.float32, device=scores.device).expand(scores.shape[:-1])
    n_cols = scores.shape[-1]
    if not use_triton or n_cols > 16384:
        return select_top_p(scores.float().clamp_min(0), p_rows[..., None], min_keep)
    _require_triton(scores)
    flat = scores.reshape(-1, n_cols).float().contiguous()
    out = torch.empty(flat.shape, dtype=torch.int8, device=scores.device)
    _, top_p_kernel = _get_kernels()
    top_p_kernel[(flat.shape[0],)](flat, out, p_rows.reshape(-1).contiguous(), n_cols, min_keep,
                                   BLOCK=max(16, 1 << math.ceil(math.log2(n_cols))))
    return out.view(scores.shape).bool()
