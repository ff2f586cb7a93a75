"""Triton kernels of :mod:`.kernels` (imported lazily, so CPU installs without Triton still work)."""

import triton
import triton.language as tl


@triton.jit
def _chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Query rows times key rows over head dims ``d0 : d0 + BLOCK_D`` (fp32 accumulator)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    qt = tl.load(q_rows + dd[None, :], mask=row_ok[:, None], other=0.0)
    kt = tl.load(k_rows + dd[None, :], mask=cols[:, None] < kv_len, other=0.0)
    if UPCAST:
        qt, kt = qt.to(tl.float32), kt.to(tl.float32)
    return tl.dot(qt, tl.trans(kt))


@triton.jit
def _tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 scores of a BLOCK_M-row query tile against key tile ``t`` (fp32, -inf where masked).
    Operands stay in their own dtype (bf16/fp16 tensor cores, fp32 accumulation) unless UPCAST
    (the CPU interpreter's bf16 dot is wrong)."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = row_ok[:, None] & (cols[None, :] < kv_len)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + offset)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_rows = k_base + cols[:, None].to(tl.int64) * stride_ks
    if HEAD_DIM <= 128:  # unrolled: the whole row stays in registers / shared memory
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            s += _chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D, UPCAST)
    else:  # XAttention's reshaped rows (stride x head dim): a rolled loop, or the unrolled loads of
        # all chunks, multi-buffered by the pipeliner, overflow shared memory (786 KB at D = 1024)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            s += _chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D, UPCAST)
    return tl.where(keep, s * scale_log2, float("-inf"))


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
        s = _tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
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
        s = _tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
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
        s = _tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
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


@triton.jit
def mean_pool_kernel(X, OUT, stride_xb, stride_xh, stride_xs, length, H: tl.constexpr,
                     NBLOCKS: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr):
    """Mean of each BLOCK-token block of one (batch, head), in fp32, reading x once."""
    blk = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    dims = tl.arange(0, DIM)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([DIM], dtype=tl.float32)
    for r0 in range(0, BLOCK, ROWS):
        rows = blk * BLOCK + r0 + tl.arange(0, ROWS)
        x = tl.load(base + rows[:, None].to(tl.int64) * stride_xs + dims[None, :],
                    mask=rows[:, None] < length, other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(length - blk * BLOCK, BLOCK).to(tl.float32)
    tl.store(OUT + tl.program_id(1).to(tl.int64) * NBLOCKS * DIM + blk * DIM + dims, acc / count)


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
    s = _tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, kv_len - rows_n, scale_log2,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, UPCAST)
    return rows, row_ok, s


@triton.jit
def line_stats_kernel(Q, K, TILE_MAX, TILE_SUM, bh_start, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                      stride_ks, rows_n, kv_len, scale_log2, n_tiles, H: tl.constexpr, GROUP: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 1 of :func:`.kernels.line_scores`: per key tile, each last row's max score and sum of
    ``exp2(s - max)`` (``TILE_MAX``/``TILE_SUM (bh, n_tiles, BLOCK_M)``; -inf / 0 for a fully
    masked tile). One program per (key tile, batch x head), so every SM has work at any length."""
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
