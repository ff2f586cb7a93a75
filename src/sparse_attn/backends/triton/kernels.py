"""Triton kernels for block-sparse FlashAttention-2: forward, and backward (dK/dV, dQ).

Conventions shared by all kernels:
* Scores are computed in base 2: ``s = q.k * scale * log2(e)``, so softmax uses ``exp2``. The
  forward stores the LSE in natural log (what callers get); the backward kernels read it back
  into base 2.
* One program handles ``BLOCK_M`` query rows (a slice of one layout query block, so
  ``Q_BLOCK % BLOCK_M == 0``); each kept key block of ``KV_BLOCK`` keys is walked in tiles of
  ``BLOCK_N`` keys (``KV_BLOCK % BLOCK_N == 0``). Tile sizes are autotuned; layout blocks are not.
* GQA: query head ``h`` reads KV head ``h // GROUP``; its layout row is head ``h // LAYOUT_HDIV``
  (``LAYOUT_HDIV = H // layout_heads``). Layout batch stride 0 broadcasts one layout over the batch.
* Variable length (``VARLEN``): batch ``b`` is the packed slice ``CU_Q[b]:CU_Q[b+1]`` (and
  ``CU_K``); its causal offset is ``len_k - len_q``.
* Offsets are int64 so long sequences do not overflow.
* ``tune_width`` is not read by the kernels: it is the bit length of the layout's widest row, part
  of the autotuning key so sparse and dense layouts get their own tiles (not specialized, so every
  width class shares the compiled binaries).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def dot(a, b, UPCAST: tl.constexpr, acc=None):
    """``tl.dot`` with fp32 accumulation (into ``acc`` when given, so the tensor cores add in
    place). ``UPCAST`` feeds fp32 operands: Triton's CPU interpreter computes bf16 dots wrongly
    (seen with triton 3.9), so interpreter runs set it for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, q_len, kv_len, VARLEN: tl.constexpr):
    """Start row and length of batch ``b``'s queries and keys."""
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
        seqlen_q = q_len
        seqlen_k = kv_len
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _key_tile_range(IDX_ROW, n_blocks, q_first_abs, q_last_abs, seqlen_k,
                    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SCAN: tl.constexpr):
    """Which of a query tile's key tiles to walk: ``(n_unmasked, n_tiles)``. Tiles
    ``[0, n_unmasked)`` need no mask (wholly visible to every row, no key tail); tiles
    ``[n_unmasked, n_tiles)`` are masked; later tiles start past the last key any row of the tile
    may see (above the causal diagonal or past the sequence end) and are skipped. With tiles
    smaller than the layout block, half the diagonal block of a tile's first rows is such a tile:
    at 2% density that was one tile in five.

    Indices are sorted, so each group is a contiguous run; counted by scanning the row in SCAN
    chunks. ``q_first_abs`` / ``q_last_abs``: causal positions of the tile's first and last valid
    rows (may be negative when q_len > kv_len).
    """
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    full_limit = seqlen_k // KV_BLOCK  # blocks below this index hold no key tail
    last_key = seqlen_k - 1
    if CAUSAL:
        # The tile's first row (the most restricted) must see the block's last key.
        full_limit = tl.minimum(full_limit, tl.where(q_first_abs >= 0, (q_first_abs + 1) // KV_BLOCK, 0))
        last_key = tl.minimum(last_key, q_last_abs)
    reach_limit = tl.where(last_key >= 0, last_key // KV_BLOCK, -1)  # last block holding a visible key
    n_full = tl.zeros([], dtype=tl.int32)
    n_reach = tl.zeros([], dtype=tl.int32)
    for start in range(0, n_blocks, SCAN):
        offs = start + tl.arange(0, SCAN)
        idx = tl.load(IDX_ROW + offs, mask=offs < n_blocks, other=2147483647)
        n_full += tl.sum((idx < full_limit).to(tl.int32), axis=0)
        n_reach += tl.sum((idx <= reach_limit).to(tl.int32), axis=0)
    n_tiles = tl.zeros([], dtype=tl.int32)
    if n_reach > 0:
        kb_last = tl.load(IDX_ROW + n_reach - 1)
        n_tiles = (n_reach - 1) * SUBN + tl.minimum((last_key - kb_last * KV_BLOCK) // BLOCK_N + 1, SUBN)
    return n_full * SUBN, n_tiles


@triton.jit
def _query_tile_range(Q_ROW, n_q, n0, offset, seqlen_q, Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                      CAUSAL: tl.constexpr, VARLEN: tl.constexpr, SCAN: tl.constexpr):
    """Which query tiles of a key tile's kv-major list ``Q_ROW`` (``n_q`` sorted query blocks, each
    walked in ``Q_BLOCK // BLOCK_M`` tiles) to walk: ``[t_begin, t_end)``. Skipped: the first
    block's leading tiles whose last row is above the causal diagonal for key ``n0`` (the tile's
    first key), and trailing tiles that start past the sequence's last query.

    Only the list's ends are read (with a per-head scan here, a 32K backward at d = 0.05-0.2 ran
    3-4% slower than before the trim in an A/B run):
    causal layouts from the library hold no block above the diagonal, and other blocks wholly
    above it are still walked and masked. Padded batches can only overhang in the last block;
    packed (VARLEN) sequences shorter than the layout can have whole blocks past their end, so
    those are counted by scanning the list.
    """
    SUB: tl.constexpr = Q_BLOCK // BLOCK_M
    t_begin = tl.zeros([], dtype=tl.int32)
    t_end = tl.zeros([], dtype=tl.int32)
    if n_q > 0:
        if CAUSAL:
            r = n0 - offset - tl.load(Q_ROW) * Q_BLOCK  # first row of the block that sees key n0
            t_begin = tl.where(r > 0, tl.minimum(r // BLOCK_M, SUB), 0)
        n_in = n_q
        if VARLEN:
            in_limit = (seqlen_q + Q_BLOCK - 1) // Q_BLOCK  # blocks holding a valid query
            n_in = tl.zeros([], dtype=tl.int32)
            for start in range(0, n_q, SCAN):
                offs = start + tl.arange(0, SCAN)
                idx = tl.load(Q_ROW + offs, mask=offs < n_q, other=2147483647)
                n_in += tl.sum((idx < in_limit).to(tl.int32), axis=0)
        if n_in > 0:
            qb_last = tl.load(Q_ROW + n_in - 1)
            t_end = (n_in - 1) * SUB + tl.minimum((seqlen_q - qb_last * Q_BLOCK + BLOCK_M - 1) // BLOCK_M, SUB)
    return t_begin, t_end


@triton.jit
def _rows_source(base, stride, seqlen, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Where a kernel reads one head's rows from: the base pointer, or with TMA a tensor descriptor
    over the sequence's ``(seqlen, HEAD_DIM)`` rows in tiles of ``BLOCK`` (rows past the end read as
    0, as the masked pointer loads give)."""
    if TMA:
        src = tl.make_tensor_descriptor(base, shape=[seqlen, HEAD_DIM], strides=[stride, 1],
                                        block_shape=[BLOCK, HEAD_DIM])
    else:
        src = base
    return src


@triton.jit
def _load_rows(src, first, rows, stride, offs_d, seqlen, MASKED: tl.constexpr, TMA: tl.constexpr):
    """The (len(rows), D) tile of rows ``rows`` (= ``first`` + arange) from a :func:`_rows_source`;
    rows past ``seqlen`` read as 0 (descriptors always, pointer loads when MASKED)."""
    if TMA:
        tile = src.load([first.to(tl.int32), 0])
    elif MASKED:
        tile = tl.load(src + rows[:, None] * stride + offs_d[None, :], mask=(rows < seqlen)[:, None], other=0.0)
    else:
        tile = tl.load(src + rows[:, None] * stride + offs_d[None, :])
    return tile


@triton.jit
def _kept_keys(cols, q_pos, seqlen_k, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the keys a partial tile may attend: in range and, if causal, not
    after the query."""
    keep = (cols < seqlen_k)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= q_pos[:, None])
    return keep


@triton.jit
def _fwd_step(m_i, l_i, acc, q, k_src, v_src, idx_row, j, q_pos, seqlen_k,
              stride_ks, stride_vs, scale_log2, offs_n, offs_d,
              SUBN: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update with one key tile; only partial blocks pay for masking. ``k_src`` /
    ``v_src`` come from :func:`_rows_source`. Needs ``scale_log2 >= 0`` (the host negates q for a
    negative scale): the unmasked step scales the row max instead of every score."""
    kb = tl.load(idx_row + j // SUBN).to(tl.int64)
    first = kb * KV_BLOCK + (j % SUBN) * BLOCK_N
    cols = first + offs_n
    k = _load_rows(k_src, first, cols, stride_ks, offs_d, seqlen_k, MASKED, TMA)
    s = dot(q, tl.trans(k), UPCAST)
    if MASKED:
        s = tl.where(_kept_keys(cols, q_pos, seqlen_k, CAUSAL), s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
    else:
        # Every key is visible, so the new max is finite; scale and shift fuse into one FMA.
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = m_new
        p = tl.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_src, first, cols, stride_vs, offs_d, seqlen_k, MASKED, TMA)
    acc = dot(p.to(v.dtype), v, UPCAST, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["tune_width"])
def _fwd_kernel(
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
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) causal rows first
    pid_bh = tl.program_id(1)
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    b = pid_bh // H
    h = pid_bh % H
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, q_len, kv_len, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    kvh = h // GROUP
    qb = (pid_m * BLOCK_M) // Q_BLOCK
    hl = h // LAYOUT_HDIV
    n_blocks = tl.load(KV_CNT + b * stride_cb + hl * stride_ch + qb)
    idx_row = KV_IDX + b.to(tl.int64) * stride_ib + hl * stride_ih + qb.to(tl.int64) * stride_iq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offset = seqlen_k - seqlen_q if CAUSAL else 0
    q_pos = offs_m + offset

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + (q_start + offs_m[:, None]) * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < seqlen_q, other=0.0)
    k_src = _rows_source(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start * stride_ks,
                         stride_ks, seqlen_k, BLOCK_N, HEAD_DIM, TMA)
    v_src = _rows_source(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start * stride_vs,
                         stride_vs, seqlen_k, BLOCK_N, HEAD_DIM, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    q_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
    n_unmasked, n_tiles = _key_tile_range(idx_row, n_blocks, pid_m * BLOCK_M + offset, q_last + offset, seqlen_k,
                                          KV_BLOCK, BLOCK_N, CAUSAL, 128)
    # Each kept block is walked in SUBN tiles of BLOCK_N keys: first the tiles wholly visible to
    # every row of the tile (no mask), then those crossing the diagonal or holding the key tail.
    for j in range(0, n_unmasked):
        m_i, l_i, acc = _fwd_step(m_i, l_i, acc, q, k_src, v_src, idx_row, j, q_pos, seqlen_k,
                                  stride_ks, stride_vs, scale_log2, offs_n, offs_d,
                                  SUBN, KV_BLOCK, BLOCK_N, False, CAUSAL, UPCAST, TMA)
    for j in range(n_unmasked, n_tiles):
        m_i, l_i, acc = _fwd_step(m_i, l_i, acc, q, k_src, v_src, idx_row, j, q_pos, seqlen_k,
                                  stride_ks, stride_vs, scale_log2, offs_n, offs_d,
                                  SUBN, KV_BLOCK, BLOCK_N, True, CAUSAL, UPCAST, TMA)

    has_keys = l_i > 0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    row_ok = offs_m < seqlen_q
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_src, v_src, idx_row, j, q_pos, seqlen_k,
             stride_ks, stride_vs, scale_log2, offs_n, offs_d,
             SUBN: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Accumulate one key tile's contribution to dQ (masked only on partial blocks)."""
    kb = tl.load(idx_row + j // SUBN).to(tl.int64)
    first = kb * KV_BLOCK + (j % SUBN) * BLOCK_N
    cols = first + offs_n
    k = _load_rows(k_src, first, cols, stride_ks, offs_d, seqlen_k, MASKED, TMA)
    v = _load_rows(v_src, first, cols, stride_vs, offs_d, seqlen_k, MASKED, TMA)
    p = tl.exp2(dot(q, tl.trans(k), UPCAST) * scale_log2 - lse[:, None])
    if MASKED:
        p = tl.where(_kept_keys(cols, q_pos, seqlen_k, CAUSAL), p, 0.0)
    dp = dot(do, tl.trans(v), UPCAST)
    ds = p * (dp - delta[:, None])
    return dot(ds.to(k.dtype), k, UPCAST, dq)


@triton.jit(do_not_specialize=["tune_width"])
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, DLSE, KV_CNT, KV_IDX, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    q_len, kv_len, scale_log2, scale, tune_width,
    H: tl.constexpr, GROUP: tl.constexpr, LAYOUT_HDIV: tl.constexpr,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """dQ for one tile of query rows, walking the same kept-block list as the forward. Also computes
    and stores ``delta = rowsum(O * dO)`` for its rows, which the dK/dV kernel (launched after)
    reads: no separate pass over O and dO. With ``HAS_DLSE`` the LSE's gradient ``DLSE`` (strided
    like ``LSE``) is subtracted from delta: ``d lse / d s = P``, so ``dS = P (dP - delta + dlse)``."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) causal rows first
    pid_bh = tl.program_id(1)
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    b = pid_bh // H
    h = pid_bh % H
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, q_len, kv_len, VARLEN)
    if pid_m * BLOCK_M >= seqlen_q:
        return
    kvh = h // GROUP
    qb = (pid_m * BLOCK_M) // Q_BLOCK
    hl = h // LAYOUT_HDIV
    n_blocks = tl.load(KV_CNT + b * stride_cb + hl * stride_ch + qb)
    idx_row = KV_IDX + b.to(tl.int64) * stride_ib + hl * stride_ih + qb.to(tl.int64) * stride_iq

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offset = seqlen_k - seqlen_q if CAUSAL else 0
    q_pos = offs_m + offset
    row_ok = offs_m < seqlen_q

    bh_q = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q + bh_q + (q_start + offs_m[:, None]) * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + (q_start + offs_m[:, None]) * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=row_ok)
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("inf")) * LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
    k_src = _rows_source(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start * stride_ks,
                         stride_ks, seqlen_k, BLOCK_N, HEAD_DIM, TMA)
    v_src = _rows_source(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start * stride_vs,
                         stride_vs, seqlen_k, BLOCK_N, HEAD_DIM, TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    q_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
    n_unmasked, n_tiles = _key_tile_range(idx_row, n_blocks, pid_m * BLOCK_M + offset, q_last + offset, seqlen_k,
                                          KV_BLOCK, BLOCK_N, CAUSAL, 128)
    for j in range(0, n_unmasked):
        dq = _dq_step(dq, q, do, lse, delta, k_src, v_src, idx_row, j, q_pos, seqlen_k,
                      stride_ks, stride_vs, scale_log2, offs_n, offs_d,
                      SUBN, KV_BLOCK, BLOCK_N, False, CAUSAL, UPCAST, TMA)
    for j in range(n_unmasked, n_tiles):
        dq = _dq_step(dq, q, do, lse, delta, k_src, v_src, idx_row, j, q_pos, seqlen_k,
                      stride_ks, stride_vs, scale_log2, offs_n, offs_d,
                      SUBN, KV_BLOCK, BLOCK_N, True, CAUSAL, UPCAST, TMA)
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + (q_start + offs_m[:, None]) * stride_dqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["tune_width"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QT_CNT, QT_IDX, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh,
    stride_tcb, stride_tch,
    stride_tib, stride_tih, stride_tik,
    q_len, kv_len, scale_log2, scale, tune_width,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, LAYOUT_HDIV: tl.constexpr,
    HEAD_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    """dK, dV for one key block of one KV head: keeps K/V in registers, walks the GROUP query heads
    and, for each, the kv-major list of query blocks that use this key block. Written once, no
    atomics."""
    SUBN: tl.constexpr = KV_BLOCK // BLOCK_N
    kb = tl.program_id(0) // SUBN  # this program owns keys [n0, n0 + BLOCK_N) of key block kb
    n0 = kb * KV_BLOCK + (tl.program_id(0) % SUBN) * BLOCK_N
    pid_bh = tl.program_id(1)
    b = pid_bh // KV_HEADS
    kvh = pid_bh % KV_HEADS
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, q_len, kv_len, VARLEN)
    if n0 >= seqlen_k:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen_k
    offset = seqlen_k - seqlen_q if CAUSAL else 0

    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                + (k_start + offs_n[:, None]) * stride_ks + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                + (k_start + offs_n[:, None]) * stride_vs + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    SUB: tl.constexpr = Q_BLOCK // BLOCK_M

    for g in range(0, GROUP):
        h = kvh * GROUP + g
        hl = h // LAYOUT_HDIV
        n_q = tl.load(QT_CNT + b * stride_tcb + hl * stride_tch + kb)
        q_row = QT_IDX + b.to(tl.int64) * stride_tib + hl * stride_tih + kb.to(tl.int64) * stride_tik
        q_src = _rows_source(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start * stride_qs,
                             stride_qs, seqlen_q, BLOCK_M, HEAD_DIM, TMA)
        do_src = _rows_source(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                              + q_start * stride_dos, stride_dos, seqlen_q, BLOCK_M, HEAD_DIM, TMA)
        lse_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        t_begin, t_end = _query_tile_range(q_row, n_q, n0, offset, seqlen_q, Q_BLOCK, BLOCK_M, CAUSAL, VARLEN, 128)
        for t in range(t_begin, t_end):
            qb = tl.load(q_row + t // SUB)
            m0 = qb * Q_BLOCK + (t % SUB) * BLOCK_M
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seqlen_q
            q = _load_rows(q_src, m0, offs_m, stride_qs, offs_d, seqlen_q, True, TMA)
            do = _load_rows(do_src, m0, offs_m, stride_dos, offs_d, seqlen_q, True, TMA)
            lse = tl.load(LSE + lse_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + lse_base + offs_m, mask=row_ok, other=0.0)
            # Transposed scores (keys x queries) so dK/dV accumulate without transposing outputs.
            p_t = tl.exp2(dot(k, tl.trans(q), UPCAST) * scale_log2 - lse[None, :])
            partial = (n0 + BLOCK_N > seqlen_k) | (m0 + BLOCK_M > seqlen_q)
            if CAUSAL:
                partial = partial | (n0 + BLOCK_N - 1 > m0 + offset)
            if partial:
                keep = col_ok[:, None] & row_ok[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[:, None] <= offs_m[None, :] + offset)
                p_t = tl.where(keep, p_t, 0.0)
            dv = dot(p_t.to(do.dtype), do, UPCAST, dv)
            dp_t = dot(v, tl.trans(do), UPCAST)
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dot(ds_t.to(q.dtype), q, UPCAST, dk)

    tl.store(DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
             + (k_start + offs_n[:, None]) * stride_dks + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
             + (k_start + offs_n[:, None]) * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
