"""Triton kernels of :mod:`.kernels` (imported lazily, so CPU installs without Triton still work)."""

import triton
import triton.language as tl


@triton.jit
def _tile_scores(q_base, k_base, kb, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, Q_BLOCK: tl.constexpr,
           KV_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Base-2 scores of the query tile against key block ``kb``; masked entries are -inf."""
    cols = kb * KV_BLOCK + tl.arange(0, KV_BLOCK)
    s = tl.zeros([Q_BLOCK, KV_BLOCK], dtype=tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        qt = tl.load(q_base + dd[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        kt = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dd[None, :],
                     mask=cols[:, None] < kv_len, other=0.0).to(tl.float32)
        s += tl.dot(qt, tl.trans(kt))
    keep = cols[None, :] < kv_len
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + offset)
    return tl.where(keep, s * scale_log2, float("-inf"))


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
        s = _tile_scores(q_base, k_base, kb, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                   HEAD_DIM, BLOCK_D, Q_BLOCK, KV_BLOCK, CAUSAL)
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
        s = _tile_scores(q_base, k_base, kb, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                   HEAD_DIM, BLOCK_D, Q_BLOCK, KV_BLOCK, CAUSAL)
        p = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
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
