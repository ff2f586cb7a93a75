"""Triton kernel of :func:`sparse_attn.methods.primitives.top_p.top_p_mask`, imported only when
it runs."""

import triton
import triton.language as tl


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
