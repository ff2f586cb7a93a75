"""Triton kernels of :func:`sparse_attn.methods.primitives.block_mass.block_mass`, imported only when
they run."""

import triton
import triton.language as tl

from ..score_tiles import tile_scores


@triton.jit
def _query_tile(Q, K, b, h, tile, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, q_len, kv_len, offset,
                GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Rows, their validity, their query pointers, the head's key base and how many key tiles the
    tile may see (causal: up to its last row's diagonal) for query tile ``tile`` of (b, h)."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_rows = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs
    k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    key_end = kv_len
    if CAUSAL:
        key_end = tl.minimum(kv_len, tl.minimum(q_len, (tile + 1) * BLOCK_M) + offset)
    return rows, row_ok, q_rows, k_base, tl.cdiv(tl.maximum(key_end, 0), BLOCK_N)


@triton.jit
def block_mass_kernel(Q, K, OUT, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                      stride_ks, q_len, kv_len, offset, scale_log2,
                      H: tl.constexpr, GROUP: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_BLOCK: tl.constexpr,
                      KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """Mean softmax mass per (query block, key block) for BLOCK_M query rows (BLOCK_M / Q_BLOCK
    query blocks) of one (batch, head): pass 1 finds each row's max and normalizer over the keys it
    may see, pass 2 sums normalized probabilities per block pair by reshaping each BLOCK_M x BLOCK_N
    tile into (query block, row, key block, key) and reducing. Key tiles past the tile's last
    allowed key are skipped (causal), so the work is about half of the full rectangle."""
    tile = tl.program_id(0)
    rows, row_ok, q_rows, k_base, n_tiles = _query_tile(
        Q, K, tl.program_id(1) // H, tl.program_id(1) % H, tile, stride_qb, stride_qh, stride_qs, stride_kb,
        stride_kh, q_len, kv_len, offset, GROUP, BLOCK_M, BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(0, n_tiles):  # pass 1: row max and normalizer
        s = tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    # Mean over each query block's real rows.
    MB: tl.constexpr = BLOCK_M // Q_BLOCK
    NB: tl.constexpr = BLOCK_N // KV_BLOCK
    q_blocks = tile * MB + tl.arange(0, MB)
    n_rows = tl.minimum(q_len - q_blocks * Q_BLOCK, Q_BLOCK).to(tl.float32)
    inv_rows = tl.where(n_rows > 0, 1.0 / tl.maximum(n_rows, 1.0), 0.0)
    out_base = OUT + tl.program_id(1).to(tl.int64) * (NQ * NK)
    for t in range(0, n_tiles):  # pass 2: block sums of normalized probabilities
        s = tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, UPCAST)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
        sums = tl.sum(tl.sum(tl.reshape(p, [MB, Q_BLOCK, NB, KV_BLOCK]), 3), 1)  # (MB, NB)
        k_blocks = t * NB + tl.arange(0, NB)
        ptrs = out_base + q_blocks[:, None] * NK + k_blocks[None, :]
        ok = (q_blocks[:, None] < NQ) & (k_blocks[None, :] < NK)
        tl.store(ptrs, sums * inv_rows[:, None], mask=ok)


@triton.jit
def block_mass_partial_kernel(Q, K, PART, TILE_MAX, ROW_MAX, ROW_SUM, bh_start, stride_qb, stride_qh,
                              stride_qs, stride_kb, stride_kh, stride_ks, q_len, kv_len, offset,
                              scale_log2, H: tl.constexpr, GROUP: tl.constexpr, NK: tl.constexpr,
                              N_TILES: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                              KV_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """One pass of :func:`block_mass_kernel`'s work: for BLOCK_M query rows of (batch x head)
    ``bh_start + program_id(1)``, each key tile's per-key-block sums of ``exp2(s - m)`` with the
    row's running max ``m`` at that tile (``PART (bh, row, NK)``, ``TILE_MAX (bh, row, N_TILES)``),
    and the row's final max and normalizer (``ROW_MAX``, ``ROW_SUM``). :func:`block_mass_finish_kernel`
    rescales and averages; the scores are computed once instead of twice."""
    tile = tl.program_id(0)
    bh = bh_start + tl.program_id(1)
    local = tl.program_id(1).to(tl.int64)  # index into this launch's buffers
    rows, row_ok, q_rows, k_base, n_tiles = _query_tile(
        Q, K, bh // H, bh % H, tile, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, q_len, kv_len,
        offset, GROUP, BLOCK_M, BLOCK_N, CAUSAL)
    NB: tl.constexpr = BLOCK_N // KV_BLOCK
    part_rows = PART + local * q_len * NK + rows.to(tl.int64) * NK
    max_rows = TILE_MAX + local * q_len * N_TILES + rows.to(tl.int64) * N_TILES
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(0, n_tiles):
        s = tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                         HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, 1)
        m_i = m_new
        sums = tl.sum(tl.reshape(p, [BLOCK_M, NB, KV_BLOCK]), 2)  # (BLOCK_M, NB)
        k_blocks = t * NB + tl.arange(0, NB)
        tl.store(part_rows[:, None] + k_blocks[None, :], sums, mask=row_ok[:, None] & (k_blocks[None, :] < NK))
        tl.store(max_rows + t, m_safe, mask=row_ok)
    stats = local * q_len + rows
    tl.store(ROW_MAX + stats, tl.where(m_i == float("-inf"), 0.0, m_i), mask=row_ok)
    tl.store(ROW_SUM + stats, l_i, mask=row_ok)


@triton.jit
def block_mass_finish_kernel(PART, TILE_MAX, ROW_MAX, ROW_SUM, OUT, bh_start, q_len,
                             NQ: tl.constexpr, NK: tl.constexpr, N_TILES: tl.constexpr,
                             Q_BLOCK: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean over query block ``program_id(0)``'s rows of ``PART * exp2(TILE_MAX - ROW_MAX) / ROW_SUM``
    (key blocks a row never reached hold 0), written to ``OUT (B*H, NQ, NK)``."""
    qb = tl.program_id(0)
    local = tl.program_id(1).to(tl.int64)
    rows = qb * Q_BLOCK + tl.arange(0, Q_BLOCK)
    row_ok = rows < q_len
    stats = local * q_len + rows
    row_max = tl.load(ROW_MAX + stats, mask=row_ok, other=0.0)
    row_sum = tl.load(ROW_SUM + stats, mask=row_ok, other=0.0)
    inv = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
    n_rows = tl.minimum(q_len - qb * Q_BLOCK, Q_BLOCK).to(tl.float32)
    out_row = OUT + (bh_start + tl.program_id(1)).to(tl.int64) * (NQ * NK) + qb * NK
    for k0 in range(0, NK, BLOCK_K):
        k_blocks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (k_blocks[None, :] < NK)
        part = tl.load(PART + local * q_len * NK + rows[:, None].to(tl.int64) * NK + k_blocks[None, :],
                       mask=ok, other=0.0)
        tile_max = tl.load(TILE_MAX + local * q_len * N_TILES + rows[:, None].to(tl.int64) * N_TILES
                           + k_blocks[None, :] // NB, mask=ok, other=0.0)
        # Unreached blocks hold 0 and an unset max: their exponent is -inf, so no stale max leaks in.
        exponent = tl.where(part > 0, tile_max - row_max[:, None], float("-inf"))
        mass = part * tl.exp2(exponent) * inv[:, None]
        tl.store(out_row + k_blocks, tl.sum(mass, 0) / n_rows, mask=k_blocks < NK)
