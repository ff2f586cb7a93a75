"""Triton helpers shared by the block-mass and line-score kernels: a query tile's scores against a
key tile. Imported only by those ``kernel`` modules (it imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Query rows times key rows over head dims ``d0 : d0 + BLOCK_D`` (fp32 accumulator)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    qt = tl.load(q_rows + dd[None, :], mask=row_ok[:, None], other=0.0)
    kt = tl.load(k_rows + dd[None, :], mask=cols[:, None] < kv_len, other=0.0)
    if UPCAST:
        qt, kt = qt.to(tl.float32), kt.to(tl.float32)
    return tl.dot(qt, tl.trans(kt))


@triton.jit
def tile_scores(q_rows, k_base, t, rows, row_ok, stride_ks, kv_len, offset, scale_log2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 scores of a BLOCK_M-row query tile against key tile ``t`` (fp32, -inf where masked).
    Operands stay in their own dtype (bf16/fp16 tensor cores, fp32 accumulation) unless UPCAST
    (:func:`sparse_attn.backends.triton.runtime.fp32_dot_operands`)."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = row_ok[:, None] & (cols[None, :] < kv_len)
    if CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + offset)
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_rows = k_base + cols[:, None].to(tl.int64) * stride_ks
    if HEAD_DIM <= 128:  # unrolled: the whole row stays in registers / shared memory
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            s += chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D, UPCAST)
    else:  # XAttention's reshaped rows (stride x head dim): a rolled loop, or the unrolled loads of
        # all chunks, multi-buffered by the pipeliner, overflow shared memory (786 KB at D = 1024)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            s += chunk_dot(q_rows, k_rows, d0, row_ok, cols, kv_len, BLOCK_D, UPCAST)
    return tl.where(keep, s * scale_log2, float("-inf"))
