"""Block-sparse attention forward written in Gluon (Triton's lower-level dialect) for Hopper GPUs.

Same contract as ``kernels._fwd_kernel`` (output and natural-log LSE, empty rows give O = 0 and
LSE = -inf, causal rows bottom-right aligned, GQA inside the kernel) for the common case: padded
batches of contiguous ``(B, H, S, D)`` tensors or packed ones ``(T, H, D)`` with ``cu_seqlens``,
128- or 64-row query blocks, key blocks of 64 or 128, head dim 64 or 128, fp16/bf16. Its tiles are one
query block x 64 keys, 16 rows per warp (8 warps, two warpgroups, for 128 rows), K/V through TMA into
a two-stage ring, scores and P x V through asynchronous ``warpgroup_mma``. At 125 registers and 96 KB
of shared memory two 128-row programs share each SM, which the Triton kernel's 255-register tiles do
not allow: on an H100 it ran 1.09-1.20x faster than the Triton forward and 1.27-1.41x faster than
FlexAttention on random layouts at 32K-128K; on 64-row blocks it is
level with the Triton forward or up to 1.06x faster, on packed batches 0.93-1.26x.

Gluon kernels do not run in the CPU interpreter: the Triton forward stays the checked twin there,
tests compare this one against the float64 golden on a GPU, and CI compiles it for sm_90.
"""

from __future__ import annotations

import functools

import torch

BLOCK_N = 64
STAGES = 2
# Query blocks the kernel takes: one program per layout row, 16 rows per warp (a 64-row warpgroup
# per wgmma), so 128-row blocks run on 8 warps and 64-row blocks on 4.
Q_BLOCKS = (64, 128)
ROWS_PER_WARP = 16

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # Triton renamed the TMA load after 3.6 (async_copy_global_to_shared -> async_load).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    GLUON_IMPORT_ERROR = None
except Exception as exc:  # an older Triton, or a build without Gluon: the Triton forward runs instead
    GLUON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _load_kv_tile(k_desc, v_desc, k_smem, v_smem, bars, idx_row, t, kv_row0, kv_col,
                      SUB: gl.constexpr, KV_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """Start the TMA loads of key/value tile ``t`` of the block list into stage ``t % STAGES``
        (rows from ``kv_row0``, columns from ``kv_col``: the KV head's in a packed tensor)."""
        kb = gl.load(idx_row + t // SUB)
        row = kv_row0 + kb * KV_BLOCK + (t % SUB) * BLOCK_N
        stage = t % STAGES
        mbarrier.expect(bars.index(stage), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [row, kv_col], bars.index(stage), k_smem.index(stage))
        _tma_load(v_desc, [row, kv_col], bars.index(stage), v_smem.index(stage))

    @gluon.jit
    def _gluon_fwd_kernel(
        q_desc, k_desc, v_desc, OUT, LSE, CNT, IDX, CU_Q, CU_K,
        stride_lb, stride_lh,
        stride_cb, stride_ch,
        stride_ib, stride_ih, stride_iq,
        q_len, kv_len, H, scale_log2,
        GROUP: gl.constexpr, LAYOUT_HDIV: gl.constexpr, HEAD_DIM: gl.constexpr,
        KV_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr, VARLEN: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """One query block (``BLOCK_M`` rows) of one head: walks the block's kept key blocks in 64-key tiles
        (online softmax in fp32, exp2 with log2(e) folded into the scale), masking only tiles that
        cross the causal diagonal or the key tail. Padded: Q/K/V are 2-D ``(B*H*S, D)`` descriptors.
        VARLEN: packed ``(T, H*D)`` descriptors, sequence ``b`` is rows ``CU_Q[b]:CU_Q[b+1]`` (keys
        ``CU_K``) and head ``h`` its columns ``h*D:(h+1)*D``. Rows a tile reads past its head's or
        sequence's end are never used (keys masked, query rows not stored)."""
        SUB: gl.constexpr = KV_BLOCK // BLOCK_N
        qb = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (last) causal rows first
        pid_bh = gl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        hl = h // LAYOUT_HDIV
        m0 = qb * BLOCK_M
        n_tiles = gl.load(CNT + b * stride_cb + hl * stride_ch + qb) * SUB
        idx_row = IDX + b.to(gl.int64) * stride_ib + hl * stride_ih + qb.to(gl.int64) * stride_iq
        if VARLEN:
            q_start = gl.load(CU_Q + b)
            k_start = gl.load(CU_K + b)
            q_len = gl.load(CU_Q + b + 1) - q_start
            kv_len = gl.load(CU_K + b + 1) - k_start
            n_tiles = gl.where(m0 < q_len, n_tiles, 0)  # blocks past this sequence's end: no work
            q_row0 = q_start + m0
            kv_row0 = k_start
            q_col = h * HEAD_DIM
            kv_col = kvh * HEAD_DIM
            out_base = OUT + q_start.to(gl.int64) * (H * HEAD_DIM) + h * HEAD_DIM
            out_stride = H * HEAD_DIM
            lse_base = LSE + h.to(gl.int64) * stride_lh + q_start
        else:
            q_row0 = pid_bh * q_len + m0
            kv_row0 = (b * (H // GROUP) + kvh) * kv_len
            q_col = 0
            kv_col = 0
            out_base = OUT + pid_bh.to(gl.int64) * q_len * HEAD_DIM
            out_stride = HEAD_DIM
            lse_base = LSE + b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh
        offset = kv_len - q_len if CAUSAL else 0

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES + 1):
            mbarrier.init(bars.index(i), count=1)

        mbarrier.expect(bars.index(STAGES), q_desc.block_type.nbytes)
        _tma_load(q_desc, [q_row0, q_col], bars.index(STAGES), q_smem)
        for t in gl.static_range(STAGES - 1):
            if t < n_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, bars, idx_row, t, kv_row0, kv_col,
                              SUB, KV_BLOCK, BLOCK_N, STAGES)
        mbarrier.wait(bars.index(STAGES), 0)

        rows = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        for t in range(0, n_tiles):
            # The stage this refill writes held tile t - 1, whose P x V was waited for below.
            if t + STAGES - 1 < n_tiles:
                _load_kv_tile(k_desc, v_desc, k_smem, v_smem, bars, idx_row, t + STAGES - 1, kv_row0, kv_col,
                              SUB, KV_BLOCK, BLOCK_N, STAGES)
            stage = t % STAGES
            mbarrier.wait(bars.index(stage), (t // STAGES) & 1)
            n0 = gl.load(idx_row + t // SUB) * KV_BLOCK + (t % SUB) * BLOCK_N
            s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            partial = n0 + BLOCK_N > kv_len
            if CAUSAL:
                partial = partial | (n0 + BLOCK_N - 1 > m0 + offset)
            if partial:
                cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
                keep = cols[None, :] < kv_len
                if CAUSAL:
                    keep = keep & (cols[None, :] <= rows[:, None] + offset)
                s = gl.where(keep, s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * scale_log2)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: p = 0, not NaN
            p = gl.exp2(s * scale_log2 - m_use[:, None])
            alpha = gl.exp2(m_i - m_use)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(q_desc.dtype), p_layout), v_smem.index(stage), acc,
                                is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

        for i in gl.static_range(STAGES + 1):
            mbarrier.invalidate(bars.index(i))
        empty = l_i == 0.0
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
        row_ok = rows < q_len
        gl.store(lse_base + rows, lse, mask=row_ok)
        out = acc / gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)[:, None]
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = out_base + offs_m.to(gl.int64)[:, None] * out_stride + offs_d[None, :]
        gl.store(ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m < q_len)[:, None])


@functools.lru_cache(maxsize=None)
def _shared_layout(rows: int, dim: int, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for([rows, dim], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def row_descriptor(t, rows: int):
    """A TMA descriptor over contiguous ``(..., S, D)`` ``t`` as ``(rows of every head, D)``, loading
    ``rows`` rows at a time. For tensors :func:`tensors_unsupported_reason` accepted: built without
    ``TensorDescriptor``'s own validation (which re-derives what that check already established)
    and over ``t`` itself rather than a 2-D view (the launch reads only the base's address and
    dtype): ~2 us instead of ~9 on an H100 host, where the 8K backward waits on four of them."""
    dim = t.shape[-1]
    return _descriptor(t, [t.numel() // dim, dim], rows)


def packed_descriptor(t, rows: int):
    """A TMA descriptor over a contiguous packed ``(T, H, D)`` ``t`` as ``(T, H*D)``, loading ``rows``
    tokens of one head (``D`` columns from the head's first) at a time; built like
    :func:`row_descriptor`."""
    return _descriptor(t, [t.shape[0], t.shape[1] * t.shape[2]], rows)


def _descriptor(t, shape, rows: int):
    """A descriptor over contiguous ``t`` seen as the 2-D ``shape`` with ``(rows, D)`` tiles."""
    dim = t.shape[-1]
    desc = object.__new__(TensorDescriptor)  # no __init__: its checks re-derive the callers' (see row_descriptor)
    desc.base = t
    desc.shape = shape
    desc.strides = [shape[1], 1]
    desc.block_shape = [rows, dim]
    desc.layout = _shared_layout(rows, dim, t.dtype)
    return desc



def tensors_unsupported_reason(named, blocks_reason: str | None = None) -> str | None:
    """Why a Gluon kernel cannot run on these ``(name, tensor)`` pairs (None when it can): Gluon
    missing, dtypes other than one fp16/bf16, head dims other than 64/128, the kernel's own
    ``blocks_reason`` (layout blocks its tiles do not divide), tensors that are not contiguous and
    16-byte aligned, or too many rows for 32-bit TMA coordinates; checked in that order. The
    first tensor's head dim stands for all (the callers checked that they share it)."""
    if GLUON_IMPORT_ERROR is not None:
        return f"Gluon unavailable ({GLUON_IMPORT_ERROR})"
    first = named[0][1]
    dtype = first.dtype
    if (dtype is not torch.float16 and dtype is not torch.bfloat16) or any(t.dtype is not dtype for _, t in named):
        return f"dtype {first.dtype} (fp16/bf16 only, the same for {', '.join(name for name, _ in named)})"
    dim = first.shape[-1]
    if dim != 64 and dim != 128:
        return f"head dim {dim} (64 or 128 only)"
    if blocks_reason is not None:
        return blocks_reason
    for name, t in named:
        if not t.is_contiguous() or t.data_ptr() & 15:
            return f"{name} is not a contiguous, 16-byte aligned tensor"
        if t.numel() >= dim << 31:
            return f"{name} has 2**31 rows or more (TMA coordinates are 32-bit)"
    return None


def unsupported_reason(q, k, v, layout) -> str | None:
    """Why the Gluon forward cannot run this padded-batch call on a Hopper GPU (None when it can);
    ``ops.gluon_skip_reason`` checks the device first."""
    blocks = None
    if layout.q_block not in Q_BLOCKS or layout.kv_block % BLOCK_N:
        blocks = f"blocks {layout.q_block}x{layout.kv_block} (64 or 128 x multiple of 64 only)"
    return tensors_unsupported_reason((("q", q), ("k", k), ("v", v)), blocks)


def launch_spec(descriptors, tensors, ints) -> tuple:
    """What a Gluon launch's compiled kernel depends on besides its constexpr ``meta``, read from
    what the callers know instead of argument by argument (``ops._specialization``'s generic walk
    cost ~8 us per launch on an H100 host): the descriptors' dtype (one for all) and tile rows
    (their shared layout follows from those and HEAD_DIM), each passed-in tensor's dtype and
    16-byte alignment (outputs the launcher allocates itself are always aligned), and the int
    arguments' exact values (finer than Triton's residues mod 16). Float arguments are floats."""
    spec = [descriptors[0].base.dtype, *[d.block_shape[0] for d in descriptors]]
    for t in tensors:
        spec += (t.dtype, t.data_ptr() & 15)
    return (*spec, ints)


def _launch_directly(kernel, grid, args, meta, spec=None):
    """Launch through Gluon's own JIT path (``ops`` passes a launcher that caches the compiled kernel)."""
    kernel[grid](*args, **meta)


def gluon_attention_forward(q, k, v, layout, scale_log2, cnt, idx, cnt_strides, idx_strides, launch=None,
                            block_n: int = BLOCK_N, stages: int = STAGES, cu_q=None, cu_k=None, batch=None):
    """Launch the Gluon forward (``scale_log2``: the softmax scale times log2(e)) on a padded batch
    ``(B, H, S, D)``, or with ``cu_q`` / ``cu_k`` (int32 offsets of ``batch`` sequences) on a packed
    ``(T, H, D)`` one; returns ``(out, lse)`` like ``ops.attention_forward`` (``lse`` ``(B, H, S)``
    or, packed, ``(H, T)``). ``launch(kernel, grid, args, meta, spec)`` replaces the plain
    ``kernel[grid](*args, **meta)``; ``spec`` is :func:`launch_spec` of the call. One program per
    layout row (``layout.q_block`` rows, 16 per warp); ``block_n`` / ``stages`` are for benchmarks."""
    varlen = cu_q is not None
    block_m = layout.q_block
    out = torch.empty_like(q)
    if varlen:
        total, heads, dim = q.shape
        kv_heads, q_len, kv_len = k.shape[1], layout.q_len, layout.kv_len  # lengths per sequence: cu_q, cu_k
        lse = torch.empty(1, heads, total, device=q.device, dtype=torch.float32)
        descriptors = (packed_descriptor(q, block_m), packed_descriptor(k, block_n), packed_descriptor(v, block_n))
        cu = (cu_q, cu_k)
    else:
        batch, heads, q_len, dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
        descriptors = (row_descriptor(q, block_m), row_descriptor(k, block_n), row_descriptor(v, block_n))
        cu = (cnt, cnt)  # placeholders of the offsets' type; never read
    ints = (0 if varlen else lse.stride(0), lse.stride(1), *cnt_strides, *idx_strides, q_len, kv_len, heads)
    grid = (layout.num_q_blocks, batch * heads)
    (launch or _launch_directly)(
        _gluon_fwd_kernel, grid,
        (*descriptors, out, lse, cnt, idx, *cu, *ints, float(scale_log2)),
        dict(
            GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads, HEAD_DIM=dim,
            KV_BLOCK=layout.kv_block, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=layout.causal, VARLEN=varlen,
            STAGES=stages, num_warps=block_m // ROWS_PER_WARP,
        ),
        launch_spec(descriptors, (cnt, idx, *cu), ints),
    )
    return out, (lse[0] if varlen else lse)
