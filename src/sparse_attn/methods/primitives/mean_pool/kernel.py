"""Triton kernel of :func:`sparse_attn.methods.primitives.mean_pool.block_mean_pool`, imported only when
it runs."""

import triton
import triton.language as tl


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
