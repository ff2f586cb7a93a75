# Archived scratch kernel (session 13): the forward reshaped for Triton 3.6's Hopper automatic warp
# specialization. Rejected: wrong results for 128-row tiles, 2x slower for 64-row tiles (docs/benchmarks.md).
"""Probe: forward kernel shaped for Triton 3.6's Hopper automatic warp specialization (one loop,
descriptors for Q/K/V/O, no early return, no scf.if feeding the loop bounds, branchless mask)."""
import triton
import triton.language as tl
from sparse_attn.backends.triton.kernels import _sequence_bounds, _dot, LN2


@triton.jit
def _key_tile_range_flat(IDX_ROW, n_blocks, q_first_abs, q_last_abs, seqlen_k,
                         KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SCAN: tl.constexpr):
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    full_limit = seqlen_k // KV_BLOCK
    last_key = seqlen_k - 1
    if CAUSAL:
        full_limit = tl.minimum(full_limit, tl.where(q_first_abs >= 0, (q_first_abs + 1) // KV_BLOCK, 0))
        last_key = tl.minimum(last_key, q_last_abs)
    reach_limit = tl.where(last_key >= 0, last_key // KV_BLOCK, -1)
    n_full = tl.zeros([], dtype=tl.int32)
    n_reach = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_blocks, SCAN):
        offs = start + tl.arange(0, SCAN)
        idx = tl.load(IDX_ROW + offs, mask=offs < n_blocks, other=2147483647)
        n_full += tl.sum((idx < full_limit).to(tl.int32), axis=0)
        n_reach += tl.sum((idx <= reach_limit).to(tl.int32), axis=0)
    kb_last = tl.load(IDX_ROW + tl.maximum(n_reach - 1, 0))
    n_tiles = tl.where(n_reach > 0,
                       (n_reach - 1) * SUBN + tl.minimum((last_key - kb_last * KV_BLOCK) // BLOCK_N + 1, SUBN), 0)
    return n_full * SUBN, n_tiles


@triton.jit(do_not_specialize=["tune_width"])
def _fwd_ws_kernel(
    Q, K, V, O, LSE, KV_CNT, KV_IDX, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    q_len, kv_len, scale_log2, tune_width,
    H: tl.constexpr, GROUP: tl.constexpr, LAYOUT_HDIV: tl.constexpr,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    b = pid_bh // H
    h = pid_bh % H
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, q_len, kv_len, VARLEN)
    kvh = h // GROUP
    qb = (pid_m * BLOCK_M) // Q_BLOCK
    hl = h // LAYOUT_HDIV
    n_blocks = tl.load(KV_CNT + b * stride_cb + hl * stride_ch + qb)
    n_blocks = tl.where(pid_m * BLOCK_M < seqlen_q, n_blocks, 0)
    idx_row = KV_IDX + b.to(tl.int64) * stride_ib + hl * stride_ih + qb.to(tl.int64) * stride_iq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offset = seqlen_k - seqlen_q if CAUSAL else 0
    q_pos = offs_m + offset
    q_src = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qs,
                                      shape=[seqlen_q, HEAD_DIM], strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_src = tl.make_tensor_descriptor(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start * stride_ks,
                                      shape=[seqlen_k, HEAD_DIM], strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_src = tl.make_tensor_descriptor(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start * stride_vs,
                                      shape=[seqlen_k, HEAD_DIM], strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
    q = q_src.load([pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
    n_unmasked, n_tiles = _key_tile_range_flat(idx_row, n_blocks, pid_m * BLOCK_M + offset, q_last + offset, seqlen_k,
                                               KV_BLOCK, BLOCK_N, CAUSAL, 128)
    for j in tl.range(0, n_tiles, warp_specialize=True):
        kb = tl.load(idx_row + j // SUBN).to(tl.int32)
        first = kb * KV_BLOCK + (j % SUBN) * BLOCK_N
        cols = first + offs_n
        k = k_src.load([first, 0])
        s = _dot(q, tl.trans(k), UPCAST)
        keep = (cols < seqlen_k)[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        keep = keep | (j < n_unmasked)
        s = tl.where(keep, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_src.load([first, 0])
        acc = _dot(p.to(v.dtype), v, UPCAST, acc * alpha[:, None])
        m_i = m_new
    has_keys = l_i > 0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    o_dst = tl.make_tensor_descriptor(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start * stride_os,
                                      shape=[seqlen_q, HEAD_DIM], strides=[stride_os, 1], block_shape=[BLOCK_M, HEAD_DIM])
    o_dst.store([pid_m * BLOCK_M, 0], acc.to(O.dtype.element_ty))
    lse_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)
