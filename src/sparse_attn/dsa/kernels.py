"""Triton kernels for token-sparse attention: each query token attends its own list of key tokens.

Layout: ``q (B, H, Sq, D)`` are the last ``Sq`` of ``S`` positions; ``k, v (B, Hkv, S, D)``;
``indices (B, Sq, K)`` int32 lists the key positions each query token reads, shared by every
head (-1: an unused slot; a position after the query's own is skipped, so the list may be a
causal-agnostic top-k).

* :func:`_forward_kernel`, grid ``(Sq, B * Hkv)``: a program serves one query token and one KV head;
  its query tile holds the ``GROUP`` query heads of the KV group (padded to ``ROWS >= 16``), so each
  gathered key row serves the whole group. It walks the token's list ``BLOCK_N`` entries at a
  time, gathering key and value rows, with an fp32 online softmax (base 2, as the prefill kernels);
  writes the output and the natural-log LSE (``-inf`` and output 0 for a query that reads nothing).
* :func:`_backward_kernel`, the same grid: recomputes the probabilities from the LSE, writes
  ``dq`` for its rows and adds each gathered key's ``dk``/``dv`` share (summed over the group's
  heads) into float32 buffers with atomic adds, since many query tokens read the same keys.

Memory safety does not depend on the index values: entries outside ``[0, position]`` are masked
and never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.kernels import LN2, dot
from ..backends.triton.runtime import cdiv, fp32_dot_operands, interpreting, next_power_of_2

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_N = 64  # list entries per tile
MAX_GROUP = 128  # query heads per KV head one program holds
MAX_GRID_Y = 65535


@triton.jit
def _program_rows(seq_len, q_len, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """This program's query index ``i`` (at position ``pos``), sequence ``b``, KV head ``hkv``, and its
    ``ROWS`` query heads (int64) with which of them exist (the group padded to ``ROWS``)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // KV_HEADS
    hkv = bh % KV_HEADS
    offs_r = tl.arange(0, ROWS)
    return i, b, hkv, seq_len - q_len + i, (hkv * GROUP + offs_r).to(tl.int64), offs_r < GROUP


@triton.jit
def _gather(IND, K, V, ind_row, kv_off_k, kv_off_v, n0, pos, list_len, stride_ks, stride_vs, offs_n, offs_d):
    """Key and value rows ``[BLOCK_N, D]`` of list entries ``n0 ..``, which entries are valid (listed,
    at or before the query's position ``pos``) and their positions (0 where invalid, never read)."""
    n = n0 + offs_n
    idx = tl.load(IND + ind_row + n, mask=n < list_len, other=-1)
    valid = (idx >= 0) & (idx <= pos)
    safe = tl.where(valid, idx, 0).to(tl.int64)
    k = tl.load(K + kv_off_k + safe[:, None] * stride_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(V + kv_off_v + safe[:, None] * stride_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
    return k, v, valid, safe


@triton.jit
def _forward_kernel(
    Q, K, V, IND, O, LSE,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ib, stride_is, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_o_split, stride_l_split,
    seq_len, q_len, list_len, entries_per_split, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program ``(i, b * Hkv + hkv, split)`` attends list entries ``[split * entries_per_split, ...)``
    of query token ``i``; with several splits ``O``/``LSE`` are float32 partial buffers, one slice per
    split (``stride_*_split`` apart), merged by :func:`triton_forward`."""
    i, b, hkv, pos, heads, row_ok = _program_rows(seq_len, q_len, KV_HEADS, GROUP, ROWS)
    split = tl.program_id(2)
    first = split * entries_per_split
    end = tl.minimum(list_len, first + entries_per_split)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + i.to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None], other=0.0)
    kv_off_k = b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    kv_off_v = b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    ind_row = b.to(tl.int64) * stride_ib + i.to(tl.int64) * stride_is
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for n0 in range(first, end, BLOCK_N):
        k, v, valid, _ = _gather(IND, K, V, ind_row, kv_off_k, kv_off_v, n0, pos, end, stride_ks, stride_vs,
                                 offs_n, offs_d)
        s = dot(q, tl.trans(k), UPCAST) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = dot(p.to(v.dtype), v, UPCAST, acc)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    o_ptr = O + split.to(tl.int64) * stride_o_split + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh \
        + i.to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + split.to(tl.int64) * stride_l_split + b.to(tl.int64) * stride_lb + heads * stride_lh + i, lse,
             mask=row_ok)


@triton.jit
def _backward_kernel(
    Q, K, V, IND, DO, LSE, DELTA, DQ, DK, DV,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ib, stride_is, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    stride_gkb, stride_gkh, stride_gks,
    seq_len, q_len, list_len, scale_log2, scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """``DO``/``DQ`` share q's strides (contiguous copies), ``LSE``/``DELTA`` the LSE's; ``DK``/``DV``
    are float32 ``(B, Hkv, S, D)`` buffers (strides ``stride_gk*``) accumulated atomically."""
    i, b, hkv, pos, heads, row_ok = _program_rows(seq_len, q_len, KV_HEADS, GROUP, ROWS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_off = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + i.to(tl.int64) * stride_qs + offs_d[None, :]
    q = tl.load(Q + row_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + row_off, mask=row_ok[:, None], other=0.0)
    lse_off = b.to(tl.int64) * stride_lb + heads * stride_lh + i
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("-inf")) * 1.4426950408889634  # to base 2
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that read nothing get p = 0
    kv_off_k = b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    kv_off_v = b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    g_off = b.to(tl.int64) * stride_gkb + hkv.to(tl.int64) * stride_gkh
    ind_row = b.to(tl.int64) * stride_ib + i.to(tl.int64) * stride_is
    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for n0 in range(0, list_len, BLOCK_N):
        k, v, valid, safe = _gather(IND, K, V, ind_row, kv_off_k, kv_off_v, n0, pos, list_len, stride_ks, stride_vs,
                                    offs_n, offs_d)
        s = dot(q, tl.trans(k), UPCAST) * scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(valid[None, :] & row_ok[:, None], p, 0.0)
        dp = dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, UPCAST, dq)
        dk = dot(tl.trans(ds.to(q.dtype)), q, UPCAST) * scale  # [BLOCK_N, D], summed over the group
        dv = dot(tl.trans(p.to(do.dtype)), do, UPCAST)
        g_ptr = g_off + safe[:, None] * stride_gks + offs_d[None, :]
        tl.atomic_add(DK + g_ptr, dk, mask=valid[:, None])
        tl.atomic_add(DV + g_ptr, dv, mask=valid[:, None])
    tl.store(DQ + row_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def unsupported_reason(q: Tensor, k: Tensor) -> str | None:
    """Why the Triton token-sparse kernels cannot run this (checked) call; None when they can."""
    if not q.is_cuda and not interpreting():
        return "q is not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton token-sparse kernels; use float16 or bfloat16"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported; supported: {SUPPORTED_HEAD_DIMS}"
    if q.shape[1] // k.shape[1] > MAX_GROUP:
        return f"{q.shape[1] // k.shape[1]} query heads per KV head is over the kernels' {MAX_GROUP}"
    if q.shape[0] * k.shape[1] > MAX_GRID_Y:
        return f"batch * kv_heads = {q.shape[0] * k.shape[1]} is over {MAX_GRID_Y}: split the batch"
    return None


def _rows(group: int) -> int:
    return max(16, next_power_of_2(group))


def _num_warps(rows: int, dim: int) -> int:
    return 8 if rows * dim >= 128 * 128 else 4


def choose_num_splits(programs: int, list_len: int, device: torch.device) -> int:
    """Splits of each token's list: one when the (token, sequence, KV head) programs fill the device,
    else enough for about two programs per SM, each of at least 256 entries."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    if programs >= sms:
        return 1
    return max(1, min(cdiv(list_len, 256), cdiv(2 * sms, programs)))


def triton_forward(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float, num_splits: int | None = None):
    """``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32 natural log)``; inputs checked by
    :func:`~sparse_attn.dsa.attention.token_sparse_attention` (last dims contiguous). With fewer
    programs than the device has SMs (a decode step), each token's list is split over several
    programs (``num_splits``, default :func:`choose_num_splits`) whose partial results merge by LSE."""
    batch, heads, q_len, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    list_len = indices.shape[-1]
    group = heads // kv_heads
    rows = _rows(group)
    if num_splits is None:
        num_splits = choose_num_splits(q_len * batch * kv_heads, list_len, q.device)
    per_split = cdiv(cdiv(list_len, num_splits), BLOCK_N) * BLOCK_N
    num_splits = cdiv(list_len, per_split)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    if num_splits > 1:
        o_dest = torch.empty(num_splits, batch, heads, q_len, dim, device=q.device, dtype=torch.float32)
        l_dest = torch.empty(num_splits, batch, heads, q_len, device=q.device, dtype=torch.float32)
        o_strides, l_strides = o_dest.stride(), l_dest.stride()
    else:
        o_dest, l_dest = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, *lse.stride())
    _forward_kernel[(q_len, batch * kv_heads, num_splits)](
        q, k, v, indices, o_dest, l_dest,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *indices.stride()[:2],
        *o_strides[1:4], l_strides[1], l_strides[2], o_strides[0], l_strides[0],
        seq, q_len, list_len, per_split, scale * LOG2E,
        KV_HEADS=kv_heads, GROUP=group, ROWS=rows, HEAD_DIM=dim, BLOCK_N=BLOCK_N,
        UPCAST=fp32_dot_operands(q.dtype), num_warps=_num_warps(rows, dim),
    )
    if num_splits > 1:  # merge the splits' partial outputs by their LSE
        total = torch.logsumexp(l_dest, 0)
        weights = torch.exp(l_dest - torch.where(torch.isfinite(total), total, 0.0)).nan_to_num_(0.0)
        out.copy_((weights[..., None] * o_dest).sum(0))
        lse.copy_(total)
    return out, lse


def triton_backward(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                    scale: float):
    """``(dq, dk, dv)`` in the inputs' dtypes."""
    batch, heads, q_len, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = _rows(group)
    q, grad_out = q.contiguous(), grad_out.contiguous()
    delta = (out.float() * grad_out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(batch, kv_heads, seq, dim, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    if q_len > 0:
        _backward_kernel[(q_len, batch * kv_heads)](
            q, k, v, indices, grad_out, lse, delta, dq, dk, dv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *indices.stride()[:2],
            *q.stride()[:3], lse.stride(0), lse.stride(1), *dk.stride()[:3],
            seq, q_len, indices.shape[-1], scale * LOG2E, scale,
            KV_HEADS=kv_heads, GROUP=group, ROWS=rows, HEAD_DIM=dim, BLOCK_N=BLOCK_N,
            UPCAST=fp32_dot_operands(q.dtype), num_warps=_num_warps(rows, dim),
        )
    else:
        dq.zero_()
    return dq, dk.to(k.dtype), dv.to(v.dtype)
