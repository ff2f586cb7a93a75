"""Block-sparse attention dK/dV written in Gluon for Hopper GPUs.

Same contract as ``kernels._bwd_dkdv_kernel`` for padded batches
(contiguous ``(B, H, S, D)`` tensors, query and key blocks multiples of the 64-row tiles,
head dim 64/128, fp16/bf16): one program owns ``BLOCK_N`` keys of one KV head, keeps K and V in
shared memory, walks the kv-major query-block lists of the GROUP query heads that read that KV head
as one flat sequence of 64-row query tiles (so the next head's first tile is prefetched while the
last one of the head before is computed), and writes dK/dV once, without atomics.

What it does that the Triton kernel cannot express: Q and dO tiles arrive by TMA into a ring of
``STAGES`` buffers; the two score matmuls (S^T = K Q^T and dP^T = V dO^T) are issued together and
waited for one at a time, and the dV matmul runs while dS is computed. Triton 3.6 waits for every
non-accumulating dot before its next instruction (ncu: 18% of the Triton kernel's stall samples at
32K-128K).

Gluon kernels do not run in the CPU interpreter: the Triton dK/dV kernel stays the checked twin
there, GPU tests compare this one against the float64 golden, and CI compiles it for sm_90.
"""

from __future__ import annotations

import torch

from .gluon_forward import GLUON_IMPORT_ERROR, _launch_directly, launch_spec, row_descriptor, tensors_unsupported_reason

# dK/dV tiles: BLOCK_N keys per program, BLOCK_M query rows per step.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
STAGES = 2
# dQ tiles: DQ_BLOCK_M query rows per program, DQ_BLOCK_N keys per step.
DQ_BLOCK_M = 64
DQ_BLOCK_N = 64
DQ_NUM_WARPS = 4
# Both kernels read q, k, v and dO in tiles of this many rows, so one set of descriptors serves both.
TILE_ROWS = 64
assert BLOCK_M == BLOCK_N == DQ_BLOCK_M == DQ_BLOCK_N == TILE_ROWS

if GLUON_IMPORT_ERROR is None:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

    from .gluon_forward import _load_kv_tile, _tma_load

    @gluon.jit
    def _head_query_tiles(QT_CNT, QT_IDX, b, h, kb, n0, offset, q_len,
                          stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                          LAYOUT_HDIV: gl.constexpr, Q_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr,
                          CAUSAL: gl.constexpr):
        """Head ``h``'s kv-major query-block list for key block ``kb`` and the range ``[t_begin,
        t_end)`` of its ``BLOCK_M``-row tiles to walk: tiles wholly above the causal diagonal of
        key ``n0`` at the list's start, and tiles past the last query at its end, are skipped (as
        ``kernels._query_tile_range`` does for padded batches)."""
        SUB: gl.constexpr = Q_BLOCK // BLOCK_M
        hl = h // LAYOUT_HDIV
        n_q = gl.load(QT_CNT + b * stride_tcb + hl * stride_tch + kb)
        q_row = QT_IDX + b.to(gl.int64) * stride_tib + hl * stride_tih + kb.to(gl.int64) * stride_tik
        t_begin = n_q * 0
        t_end = n_q * 0
        if n_q > 0:
            if CAUSAL:
                r = n0 - offset - gl.load(q_row) * Q_BLOCK  # first row of the block that sees key n0
                if r > 0:
                    t_begin = gl.minimum(r // BLOCK_M, SUB)
            qb_last = gl.load(q_row + n_q - 1)
            t_end = (n_q - 1) * SUB + gl.minimum((q_len - qb_last * Q_BLOCK + BLOCK_M - 1) // BLOCK_M, SUB)
        return q_row, t_begin, t_end

    @gluon.jit
    def _settle(g, q_row, t, t_end, QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len,
                stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                GROUP: gl.constexpr, LAYOUT_HDIV: gl.constexpr, Q_BLOCK: gl.constexpr,
                BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
        """Move a ``(head g, tile t)`` cursor past exhausted heads to the next tile to walk."""
        while (t >= t_end) & (g < GROUP - 1):
            g += 1
            q_row, t, t_end = _head_query_tiles(QT_CNT, QT_IDX, b, kvh * GROUP + g, kb, n0, offset, q_len,
                                                stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                                                LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)
        return g, q_row, t, t_end

    @gluon.jit
    def _tile_row(q_row, t, Q_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr):
        """First query row of tile ``t`` of a kv-major list."""
        SUB: gl.constexpr = Q_BLOCK // BLOCK_M
        return gl.load(q_row + t // SUB) * Q_BLOCK + (t % SUB) * BLOCK_M

    @gluon.jit
    def _refill(q_desc, do_desc, q_smem, do_smem, bars, stage, g, q_row, t, t_end,
                QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len, H,
                stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                GROUP: gl.constexpr, LAYOUT_HDIV: gl.constexpr, Q_BLOCK: gl.constexpr,
                BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
        """Start the TMA loads of the Q and dO rows of the load cursor's tile into ``stage``;
        returns the cursor moved to the next tile."""
        row = (b * H + kvh * GROUP + g) * q_len + _tile_row(q_row, t, Q_BLOCK, BLOCK_M)
        mbarrier.expect(bars.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [row, 0], bars.index(stage), q_smem.index(stage))
        _tma_load(do_desc, [row, 0], bars.index(stage), do_smem.index(stage))
        return _settle(g, q_row, t + 1, t_end, QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len,
                       stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                       GROUP, LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)

    @gluon.jit
    def _gluon_dkdv_kernel(
        k_desc, v_desc, q_desc, do_desc, DK, DV, LSE, DELTA, QT_CNT, QT_IDX,
        stride_lb, stride_lh,
        stride_tcb, stride_tch,
        stride_tib, stride_tih, stride_tik,
        q_len, kv_len, KV_HEADS, scale_log2, scale,
        GROUP: gl.constexpr, LAYOUT_HDIV: gl.constexpr, HEAD_DIM: gl.constexpr,
        Q_BLOCK: gl.constexpr, KV_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """dK, dV for keys ``[n0, n0 + BLOCK_N)`` of one KV head. Scores are computed transposed
        (keys x queries) so dK/dV accumulate without transposing. Q/dO/K/V are 2-D ``(rows, D)``
        descriptors over the whole batch; rows a tile reads past its head's end are masked."""
        SUB_N: gl.constexpr = KV_BLOCK // BLOCK_N
        kb = gl.program_id(0) // SUB_N  # heaviest (first, under causal) key blocks first
        n0 = kb * KV_BLOCK + (gl.program_id(0) % SUB_N) * BLOCK_N
        pid_bh = gl.program_id(1)
        b = pid_bh // KV_HEADS
        kvh = pid_bh % KV_HEADS
        H = KV_HEADS * GROUP
        offset = kv_len - q_len if CAUSAL else 0

        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)
        key_layout: gl.constexpr = gl.SliceLayout(1, st_layout)

        k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES + 1):
            mbarrier.init(bars.index(i), count=1)

        kv_row0 = pid_bh * kv_len + n0
        mbarrier.expect(bars.index(STAGES), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row0, 0], bars.index(STAGES), k_smem)
        _tma_load(v_desc, [kv_row0, 0], bars.index(STAGES), v_smem)

        # How many query tiles all GROUP heads hold together, and a cursor on the first one.
        total = gl.program_id(0) * 0
        for g in range(0, GROUP):
            _, t_begin, t_end = _head_query_tiles(QT_CNT, QT_IDX, b, kvh * GROUP + g, kb, n0, offset, q_len,
                                                  stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                                                  LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)
            total += gl.maximum(t_end - t_begin, 0)
        g_use = gl.program_id(0) * 0
        row_use, t_use, end_use = _head_query_tiles(QT_CNT, QT_IDX, b, kvh * GROUP, kb, n0, offset, q_len,
                                                    stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                                                    LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)
        g_use, row_use, t_use, end_use = _settle(g_use, row_use, t_use, end_use, QT_CNT, QT_IDX, b, kvh, kb, n0,
                                                 offset, q_len, stride_tcb, stride_tch, stride_tib, stride_tih,
                                                 stride_tik, GROUP, LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)
        # The loads run STAGES - 1 tiles ahead of the compute, on their own cursor.
        g_load = g_use
        row_load = row_use
        t_load = t_use
        end_load = end_use
        for i in gl.static_range(STAGES - 1):
            if i < total:
                g_load, row_load, t_load, end_load = _refill(
                    q_desc, do_desc, q_smem, do_smem, bars, i, g_load, row_load, t_load, end_load,
                    QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len, H,
                    stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                    GROUP, LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)

        keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout)
        zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=st_layout)
        # LSE and delta are loaded one value per thread and spread over the score columns only when
        # used: held in the scores' layout they cost 32 registers, and the kernel spilled (260 bytes
        # per thread against 20; 1.02-1.18x slower at 32K-128K on an H100).
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        mbarrier.wait(bars.index(STAGES), 0)
        for it in range(0, total):
            # Refill the stage whose dK/dV matmuls were waited for at the end of the last step.
            if it + STAGES - 1 < total:
                g_load, row_load, t_load, end_load = _refill(
                    q_desc, do_desc, q_smem, do_smem, bars, (it + STAGES - 1) % STAGES,
                    g_load, row_load, t_load, end_load, QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len, H,
                    stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                    GROUP, LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)

            stage = it % STAGES
            m0 = _tile_row(row_use, t_use, Q_BLOCK, BLOCK_M)
            vec_base = b.to(gl.int64) * stride_lb + (kvh * GROUP + g_use).to(gl.int64) * stride_lh
            vec_rows = m0 + gl.arange(0, BLOCK_M, layout=vec_layout)
            lse_vec = gl.load(LSE + vec_base + vec_rows, mask=vec_rows < q_len, other=float("inf"))
            delta_vec = gl.load(DELTA + vec_base + vec_rows, mask=vec_rows < q_len, other=0.0)
            mbarrier.wait(bars.index(stage), (it // STAGES) & 1)

            # Both score matmuls in flight at once; each waited for only when its result is used.
            s_t = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), zero_st, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), zero_st, use_acc=False,
                                 is_async=True)
            lse = gl.convert_layout(lse_vec, col_layout)
            lse = gl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # log2(e); empty: p = 0
            s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t, ))
            p_t = gl.exp2(s_t * scale_log2 - lse[None, :])
            partial = (n0 + BLOCK_N > kv_len) | (m0 + BLOCK_M > q_len)
            if CAUSAL:
                partial = partial | (n0 + BLOCK_N - 1 > m0 + offset)
            if partial:
                cols = m0 + gl.arange(0, BLOCK_M, layout=col_layout)
                keep = (keys < kv_len)[:, None] & (cols < q_len)[None, :]
                if CAUSAL:
                    keep = keep & (keys[:, None] <= cols[None, :] + offset)
                p_t = gl.where(keep, p_t, 0.0)
            # dV's matmul runs while dS is computed.
            dv = warpgroup_mma(gl.convert_layout(p_t.to(q_desc.dtype), op_layout), do_smem.index(stage), dv,
                               is_async=True)
            delta = gl.convert_layout(delta_vec, col_layout)
            dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t, ))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = warpgroup_mma(gl.convert_layout(ds_t.to(q_desc.dtype), op_layout), q_smem.index(stage), dk,
                               is_async=True)
            # Waiting here, not after the next step's score matmuls, measured faster (the deferred
            # wait spilled more: 0.98-1.12x the time at 32K-128K on an H100).
            dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
            g_use, row_use, t_use, end_use = _settle(
                g_use, row_use, t_use + 1, end_use, QT_CNT, QT_IDX, b, kvh, kb, n0, offset, q_len,
                stride_tcb, stride_tch, stride_tib, stride_tih, stride_tik,
                GROUP, LAYOUT_HDIV, Q_BLOCK, BLOCK_M, CAUSAL)

        for i in gl.static_range(STAGES + 1):
            mbarrier.invalidate(bars.index(i))
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        offs = (pid_bh.to(gl.int64) * kv_len + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
        key_ok = (offs_n < kv_len)[:, None]
        gl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=key_ok)
        gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=key_ok)


    @gluon.jit
    def _gluon_dq_kernel(
        q_desc, do_desc, k_desc, v_desc, O, DQ, LSE, DELTA, DLSE, CNT, IDX,
        stride_lb, stride_lh,
        stride_cb, stride_ch,
        stride_ib, stride_ih, stride_iq,
        q_len, kv_len, H, scale_log2, scale,
        GROUP: gl.constexpr, LAYOUT_HDIV: gl.constexpr, HEAD_DIM: gl.constexpr,
        Q_BLOCK: gl.constexpr, KV_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, HAS_DLSE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """dQ for ``BLOCK_M`` query rows of one head, walking the forward's kept-block list in
        ``BLOCK_N``-key tiles. Also stores ``delta = rowsum(O * dO)`` for its rows (minus the LSE's
        gradient ``DLSE`` when ``HAS_DLSE``: ``d lse / d s = P``, so it enters as ``dS = P (dP - delta
        + dlse)``), which the dK/dV kernel (launched after) reads. Key tiles past the last key the tile's rows may see (the
        second half of the diagonal block for the first 64 rows of a 128-row block) are skipped."""
        SUB_M: gl.constexpr = Q_BLOCK // BLOCK_M
        SUB: gl.constexpr = KV_BLOCK // BLOCK_N
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (last) causal rows first
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        hl = h // LAYOUT_HDIV
        qb = pid_m // SUB_M
        m0 = pid_m * BLOCK_M
        offset = kv_len - q_len if CAUSAL else 0
        n_blocks = gl.load(CNT + b * stride_cb + hl * stride_ch + qb)
        idx_row = IDX + b.to(gl.int64) * stride_ib + hl * stride_ih + qb.to(gl.int64) * stride_iq
        n_tiles = n_blocks * SUB
        if n_blocks > 0:  # trim the last block's tiles past the last visible key
            last_key = kv_len - 1
            if CAUSAL:
                last_key = gl.minimum(last_key, gl.minimum(m0 + BLOCK_M, q_len) - 1 + offset)
            last_tiles = (last_key - gl.load(idx_row + n_blocks - 1) * KV_BLOCK) // BLOCK_N + 1
            n_tiles = (n_blocks - 1) * SUB + gl.maximum(gl.minimum(last_tiles, SUB), 0)

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        do_smem = gl.allocate_shared_memory(do_desc.dtype, do_desc.block_type.shape, do_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES + 1):
            mbarrier.init(bars.index(i), count=1)

        q_row0 = pid_bh * q_len + m0
        kv_row0 = (b * (H // GROUP) + kvh) * kv_len
        mbarrier.expect(bars.index(STAGES), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row0, 0], bars.index(STAGES), q_smem)
        _tma_load(do_desc, [q_row0, 0], bars.index(STAGES), do_smem)
        for t in gl.static_range(STAGES - 1):
            if t < n_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, bars, idx_row, t, kv_row0, 0,
                              SUB, KV_BLOCK, BLOCK_N, STAGES)

        # delta = rowsum(O * dO) while the first tiles arrive; dO is read back from shared memory.
        io_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
        io_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
        io_ok = io_rows < q_len
        o = gl.load(O + (pid_bh.to(gl.int64) * q_len + io_rows)[:, None] * HEAD_DIM + io_cols[None, :],
                    mask=io_ok[:, None], other=0.0)
        rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
        row_ok = rows < q_len
        lse_off = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
        lse = gl.load(LSE + lse_off + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634  # log2(e)
        lse = gl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
        mbarrier.wait(bars.index(STAGES), 0)
        delta_io = gl.sum(o.to(gl.float32) * do_smem.load(io_layout).to(gl.float32), axis=1)
        if HAS_DLSE:
            delta_io -= gl.load(DLSE + lse_off + io_rows, mask=io_ok, other=0.0)
        gl.store(DELTA + lse_off + io_rows, delta_io, mask=io_ok)
        delta = gl.convert_layout(delta_io, row_layout)

        dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=acc_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        for t in range(0, n_tiles):
            # The stage this refill writes held tile t - 1, whose dS x K was waited for below.
            if t + STAGES - 1 < n_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, bars, idx_row, t + STAGES - 1, kv_row0, 0,
                              SUB, KV_BLOCK, BLOCK_N, STAGES)
            stage = t % STAGES
            mbarrier.wait(bars.index(stage), (t // STAGES) & 1)
            n0 = gl.load(idx_row + t // SUB) * KV_BLOCK + (t % SUB) * BLOCK_N
            s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp = warpgroup_mma(do_smem, v_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            p = gl.exp2(s * scale_log2 - lse[:, None])
            partial = n0 + BLOCK_N > kv_len
            if CAUSAL:
                partial = partial | (n0 + BLOCK_N - 1 > m0 + offset)
            if partial:
                cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                keep = cols[None, :] < kv_len
                if CAUSAL:
                    keep = keep & (cols[None, :] <= rows[:, None] + offset)
                p = gl.where(keep, p, 0.0)
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
            ds = p * (dp - delta[:, None])
            dq = warpgroup_mma(gl.convert_layout(ds.to(q_desc.dtype), op_layout), k_smem.index(stage), dq,
                               is_async=True)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))

        for i in gl.static_range(STAGES + 1):
            mbarrier.invalidate(bars.index(i))
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
        ptrs = DQ + (pid_bh.to(gl.int64) * q_len + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
        gl.store(ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=(offs_m < q_len)[:, None])


def row_descriptors(q, k, v, do):
    """The descriptors of q, k, v and dO in ``TILE_ROWS``-row tiles, which both backward kernels
    read with their library tiles: built once per backward and passed to both (each one built costs the host
    ~10 us, and at 8K the backward is host-bound)."""
    return tuple(row_descriptor(t, TILE_ROWS) for t in (q, k, v, do))


def unsupported_reason(q, k, v, out, do, layout) -> str | None:
    """Why the Gluon backward kernels cannot run this padded-batch call (forward output ``out``,
    its gradient ``do``) on a Hopper GPU (None when they can); ``ops.gluon_skip_reason`` checks the
    device first."""
    blocks = None
    if layout.q_block % TILE_ROWS or layout.kv_block % TILE_ROWS:
        blocks = f"blocks {layout.q_block}x{layout.kv_block} (multiples of {TILE_ROWS} x {TILE_ROWS} only)"
    return tensors_unsupported_reason((("q", q), ("k", k), ("v", v), ("out", out), ("grad_output", do)), blocks)


def gluon_attention_dkdv(q, k, v, do, lse, delta, layout, scale, scale_log2, t_cnt, t_idx, t_strides, ti_strides,
                         block_n: int = BLOCK_N, num_warps: int = NUM_WARPS, stages: int = STAGES, launch=None,
                         descriptors=None):
    """Launch the Gluon dK/dV kernel on a padded batch; ``lse`` (natural log) and ``delta`` are the
    forward's LSE and ``rowsum(O * dO)`` (from the dQ kernel), ``(B, H, S)`` float32. ``t_cnt`` /
    ``t_idx`` are the layout's kv-major lists. Returns ``(dk, dv)``. ``block_n`` / ``num_warps``
    / ``stages`` are for benchmarks (128 keys need 8 warps: one 64-key warpgroup each); ``launch`` as
    in ``gluon_forward.gluon_attention_forward``; ``descriptors``: :func:`row_descriptors` of
    (q, k, v, do), for 64-key tiles."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if descriptors is None:
        q_desc, do_desc = row_descriptor(q, BLOCK_M), row_descriptor(do, BLOCK_M)
        k_desc, v_desc = row_descriptor(k, block_n), row_descriptor(v, block_n)
    else:
        q_desc, k_desc, v_desc, do_desc = descriptors
    ints = (lse.stride(0), lse.stride(1), *t_strides, *ti_strides, q_len, kv_len, kv_heads)
    grid = (layout.num_kv_blocks * (layout.kv_block // block_n), batch * kv_heads)
    (launch or _launch_directly)(
        _gluon_dkdv_kernel, grid,
        (k_desc, v_desc, q_desc, do_desc, dk, dv, lse, delta, t_cnt, t_idx, *ints, float(scale_log2), float(scale)),
        dict(
            GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads, HEAD_DIM=dim,
            Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
            CAUSAL=layout.causal, STAGES=stages, num_warps=num_warps,
        ),
        launch_spec((k_desc, v_desc, q_desc, do_desc), (lse, delta, t_cnt, t_idx), ints),
    )
    return dk, dv


def gluon_attention_dq(q, k, v, out, do, lse, layout, scale, scale_log2, cnt, idx, cnt_strides, idx_strides,
                       block_m: int = DQ_BLOCK_M, num_warps: int = DQ_NUM_WARPS, stages: int = STAGES, launch=None,
                       descriptors=None, dlse=None):
    """Launch the Gluon dQ kernel on a padded batch; returns ``(dq, delta)`` with ``delta =
    rowsum(O * dO) - dlse`` ``(B, H, S)`` float32 for the dK/dV kernel (``dlse``: the gradient of
    the forward's LSE, shaped and strided like ``lse``, or None). ``block_m`` / ``num_warps`` /
    ``stages`` are for benchmarks (128 rows need 8 warps); ``launch`` as in
    ``gluon_forward.gluon_attention_forward``; ``descriptors``: :func:`row_descriptors` of
    (q, k, v, do), for 64-row tiles."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    if descriptors is None:
        q_desc, do_desc = row_descriptor(q, block_m), row_descriptor(do, block_m)
        k_desc, v_desc = row_descriptor(k, DQ_BLOCK_N), row_descriptor(v, DQ_BLOCK_N)
    else:
        q_desc, k_desc, v_desc, do_desc = descriptors
    ints = (lse.stride(0), lse.stride(1), *cnt_strides, *idx_strides, q_len, kv_len, heads)
    grid = (layout.num_q_blocks * (layout.q_block // block_m), batch * heads)
    (launch or _launch_directly)(
        _gluon_dq_kernel, grid,
        (q_desc, do_desc, k_desc, v_desc, out, dq, lse, delta, lse if dlse is None else dlse, cnt, idx, *ints,
         float(scale_log2), float(scale)),
        dict(
            GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads, HEAD_DIM=dim,
            Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block, BLOCK_M=block_m, BLOCK_N=DQ_BLOCK_N,
            CAUSAL=layout.causal, HAS_DLSE=dlse is not None, STAGES=stages, num_warps=num_warps,
        ),
        launch_spec((q_desc, do_desc, k_desc, v_desc), (out, lse, cnt, idx), ints),
    )
    return dq, delta
