"""Triton kernels of :func:`sparse_attn.methods.primitives.line_scores.line_scores`, imported only when
they run."""

import triton
import triton.language as tl

from ..score_tiles import tile_scores


@triton.jit
def _last_rows_tile(Q, K, bh, t, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, rows_n, kv_len,
                    scale_log2, H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 causal scores of the last ``rows_n`` queries (``Q`` points at the first of them) against
    key tile ``t`` of (batch x head) ``bh``: rows, their validity and the (BLOCK_M, BLOCK_N) tile."""
    b, h = bh // H, bh % H
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < rows_n
    q_rows = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    s = tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, kv_len - rows_n, scale_log2,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, UPCAST)
    return rows, row_ok, s


@triton.jit
def line_stats_kernel(Q, K, TILE_MAX, TILE_SUM, bh_start, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                      stride_ks, rows_n, kv_len, scale_log2, n_tiles, H: tl.constexpr, GROUP: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 1 of :func:`sparse_attn.methods.primitives.line_scores.line_scores`: per key tile, each
    last row's max score and sum of ``exp2(s - max)`` (``TILE_MAX``/``TILE_SUM (bh, n_tiles,
    BLOCK_M)``; -inf / 0 for a fully masked tile). One program per (key tile, batch x head), so
    every SM has work at any length."""
    t = tl.program_id(0)
    local = tl.program_id(1).to(tl.int64)
    rows, row_ok, s = _last_rows_tile(Q, K, bh_start + tl.program_id(1), t, stride_qb, stride_qh, stride_qs,
                                      stride_kb, stride_kh, stride_ks, rows_n, kv_len, scale_log2, H, GROUP,
                                      HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST)
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(tl.exp2(s - m_safe[:, None]), 1)
    at = local * n_tiles * BLOCK_M + t * BLOCK_M + rows
    tl.store(TILE_MAX + at, m)
    tl.store(TILE_SUM + at, l_sum)


@triton.jit
def line_sums_kernel(Q, K, LSE2, VERTICAL, SKEW, bh_start, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                     stride_ks, rows_n, kv_len, scale_log2, n_tiles, H: tl.constexpr, GROUP: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 2: the normalized probabilities ``p = exp2(s - LSE2)`` of key tile ``program_id(0)``.
    Column sums go to ``VERTICAL (B*H, kv_len)``; ``p`` itself is stored skewed, row ``r`` shifted
    right by ``rows_n - r`` in ``SKEW (bh, rows_n, kv_len + rows_n)``, so each diagonal lands in one
    column and a column sum gives the diagonal sums. The first and last tiles also write the zeros
    that the shift leaves at each row's two ends, so SKEW needs no zero fill."""
    t = tl.program_id(0)
    local = tl.program_id(1).to(tl.int64)
    bh = bh_start + tl.program_id(1)
    rows, row_ok, s = _last_rows_tile(Q, K, bh, t, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                                      stride_ks, rows_n, kv_len, scale_log2, H, GROUP, HEAD_DIM, BLOCK_D,
                                      BLOCK_M, BLOCK_N, UPCAST)
    lse2 = tl.load(LSE2 + local * BLOCK_M + rows, mask=row_ok, other=0.0)
    p = tl.exp2(s - lse2[:, None])  # masked scores are -inf: 0
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < kv_len
    tl.store(VERTICAL + bh.to(tl.int64) * kv_len + cols, tl.sum(p, 0), mask=col_ok)
    width = kv_len + rows_n
    skew_rows = SKEW + local * rows_n * width + rows[:, None].to(tl.int64) * width
    tl.store(skew_rows + (cols[None, :] - rows[:, None] + rows_n), p, mask=row_ok[:, None] & col_ok[None, :])
    ends = tl.arange(0, BLOCK_M)[None, :]
    zeros = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    if t == 0:  # columns [0, rows_n - r) of row r
        tl.store(skew_rows + ends, zeros, mask=row_ok[:, None] & (ends < rows_n - rows[:, None]))
    if t == n_tiles - 1:  # columns [kv_len + rows_n - r, kv_len + rows_n) of row r
        tl.store(skew_rows + (width - rows[:, None]) + ends, zeros, mask=row_ok[:, None] & (ends < rows[:, None]))
