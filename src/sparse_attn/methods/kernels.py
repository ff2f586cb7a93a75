"""Triton kernels for the heavy estimation steps, each with a reference beside it:

* :func:`block_mass`: softmax mass per (query block, key block) (reference:
  :func:`.naive.block_mass_reference`). With the plain inputs it is the oracle; on XAttention's
  antidiagonally reshaped inputs it is XAttention's block score.
* :func:`top_p_mask`: per row, the fewest largest entries reaching a share ``p`` of the row total
  (reference: :func:`.scoring.select_top_p`).
* :func:`block_mean_pool`: mean of every block of tokens, the pooled Q/K summaries behind pooled
  block scores (reference: :func:`.scoring.mean_pool`).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .naive import block_mass_reference
from .scoring import mean_pool, select_top_p

LOG2E = 1.4426950408889634


# Automatic choice on CUDA tensors. benchmarks/bench_estimators.py times both paths (it flips this
# flag per row): on an H100 (2026-11-23) the Triton steps chose the same blocks as the references in
# every row and were faster (XAttention 5x, oracle 25x; docs/benchmarks.md). Set False to force the
# PyTorch references.
TRITON_ON_CUDA = True

# block_mass in one pass over the scores (partial block sums with the running row max, then a small
# rescaling kernel) instead of two (row max and normalizer, then block sums): half the matmul work
# for one float per (query row, key block) of scratch, at most BLOCK_MASS_BUFFER_FLOATS per launch
# ((batch, head) pairs are chunked; a single head that needs more uses two passes). False: always two.
BLOCK_MASS_ONE_PASS = True
BLOCK_MASS_BUFFER_FLOATS = 1 << 29  # 2 GiB of float32: the oracle's one head at 128K needs 1.0 GiB


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _triton_usable(t: Tensor) -> bool:
    """Automatic choice: Triton on CUDA once enabled (the CPU interpreter is exact but slow; tests
    ask for it explicitly with ``use_triton=True``)."""
    if not t.is_cuda or not TRITON_ON_CUDA:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _require_triton(t: Tensor) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("use_triton=True on a CPU tensor needs TRITON_INTERPRET=1")


def block_mass(q: Tensor, k: Tensor, q_block: int, kv_block: int, scale: float,
               causal: bool = True, use_triton: bool | None = None) -> Tensor:
    """``(B, H, NQ, NK)`` float32 mean softmax mass per block pair; Triton when usable, else reference."""
    use_triton = _triton_usable(q) if use_triton is None else use_triton
    if not use_triton:
        return block_mass_reference(q, k, q_block, kv_block, scale, causal)
    _require_triton(q)
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if not (_pow2(q_block) and _pow2(kv_block) and _pow2(dim)) or dim < 16 or max(q_block, kv_block) > 128:
        return block_mass_reference(q, k, q_block, kv_block, scale, causal)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    block_m, block_n = max(64, q_block), max(64, kv_block)  # several blocks per tile when blocks are small
    out = torch.zeros(batch, heads, nq, nk, device=q.device, dtype=torch.float32)
    from ..backends.triton.ops import _upcast  # the interpreter's bf16-dot workaround, one rule for all kernels

    common = dict(H=heads, GROUP=heads // kv_heads, NK=nk, HEAD_DIM=dim, BLOCK_D=min(dim, 64), KV_BLOCK=kv_block,
                  BLOCK_M=block_m, CAUSAL=causal, UPCAST=_upcast(q))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    # One pass uses 128-key tiles: on an H100 (2026-11-23, XAttention stride 16 at 128K) 64 x 128
    # tiles with 8 warps took 18.8 ms against 34.7-36.3 ms for 64 x 64 and 128 x 64.
    block_n_one = max(128, kv_block)
    n_tiles = -(-kv_len // block_n_one)
    per_head = q_len * (nk + n_tiles + 2)  # floats of the one-pass buffers for one (batch, head)
    if not BLOCK_MASS_ONE_PASS or per_head > BLOCK_MASS_BUFFER_FLOATS:
        from ._triton_kernels import block_mass_kernel

        block_mass_kernel[(-(-q_len // block_m), batch * heads)](
            q, k, out, *strides, q_len, kv_len, kv_len - q_len if causal else 0, scale * LOG2E,
            NQ=nq, Q_BLOCK=q_block, BLOCK_N=block_n, num_warps=4 if block_m * block_n <= 4096 else 8, **common)
        return out
    from ._triton_kernels import block_mass_finish_kernel, block_mass_partial_kernel

    chunk = max(1, min(batch * heads, BLOCK_MASS_BUFFER_FLOATS // per_head))  # (batch, head) pairs per launch
    part = torch.empty(chunk, q_len, nk, device=q.device, dtype=torch.float32)
    tile_max = torch.empty(chunk, q_len, n_tiles, device=q.device, dtype=torch.float32)
    row_max = torch.empty(chunk, q_len, device=q.device, dtype=torch.float32)
    row_sum = torch.empty(chunk, q_len, device=q.device, dtype=torch.float32)
    for start in range(0, batch * heads, chunk):
        count = min(chunk, batch * heads - start)
        part.zero_()  # blocks past a row's causal end are never written
        block_mass_partial_kernel[(-(-q_len // block_m), count)](
            q, k, part, tile_max, row_max, row_sum, start, *strides, q_len, kv_len,
            kv_len - q_len if causal else 0, scale * LOG2E, N_TILES=n_tiles, BLOCK_N=block_n_one, num_warps=8,
            num_stages=3, **common)
        block_mass_finish_kernel[(nq, count)](
            part, tile_max, row_max, row_sum, out, start, q_len, NQ=nq, NK=nk, N_TILES=n_tiles,
            Q_BLOCK=q_block, NB=block_n_one // kv_block, BLOCK_K=min(128, max(16, 1 << math.ceil(math.log2(nk)))))
    return out


def top_p_mask(scores: Tensor, p, min_keep: int = 1, use_triton: bool | None = None) -> Tensor:
    """Bool mask of the fewest largest entries per row reaching share ``p`` (per-row ``p`` allowed)."""
    use_triton = _triton_usable(scores) if use_triton is None else use_triton
    p_rows = torch.as_tensor(p, dtype=torch.float32, device=scores.device).expand(scores.shape[:-1])
    n_cols = scores.shape[-1]
    if not use_triton or n_cols > 16384:
        return select_top_p(scores.float().clamp_min(0), p_rows[..., None], min_keep)
    _require_triton(scores)
    flat = scores.reshape(-1, n_cols).float().contiguous()
    out = torch.empty(flat.shape, dtype=torch.int8, device=scores.device)
    from ._triton_kernels import top_p_kernel

    top_p_kernel[(flat.shape[0],)](flat, out, p_rows.reshape(-1).contiguous(), n_cols, min_keep,
                                   BLOCK=max(16, 1 << math.ceil(math.log2(n_cols))))
    return out.view(scores.shape).bool()


def block_mean_pool(x: Tensor, block: int, use_triton: bool | None = None) -> Tensor:
    """``(B, H, S, D)`` -> ``(B, H, ceil(S / block), D)`` float32 block means (tail: its real tokens)."""
    use_triton = _triton_usable(x) if use_triton is None else use_triton
    dim = x.shape[-1]
    if not use_triton or dim & (dim - 1) or dim < 16:
        return mean_pool(x, block)
    _require_triton(x)
    from . import _triton_kernels

    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, heads, length, _ = x.shape
    nblocks = -(-length // block)
    out = torch.empty(batch, heads, nblocks, dim, device=x.device, dtype=torch.float32)
    _triton_kernels.mean_pool_kernel[(nblocks, batch * heads)](
        x, out, x.stride(0), x.stride(1), x.stride(2), length, H=heads, NBLOCKS=nblocks,
        BLOCK=block, DIM=dim, ROWS=min(block, 16),
    )
    return out
