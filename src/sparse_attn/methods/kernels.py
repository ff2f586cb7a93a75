"""Triton kernels for the heavy estimation steps, each with a reference beside it:

* :func:`block_mass`: softmax mass per (query block, key block) (reference:
  :func:`.naive.block_mass_reference`). With the plain inputs it is the oracle; on XAttention's
  antidiagonally reshaped inputs it is XAttention's block score.
* :func:`top_p_mask`: per row, the fewest largest entries reaching a share ``p`` of the row total
  (reference: :func:`.scoring.select_top_p`).
* :func:`block_mean_pool`: mean of every block of tokens, the pooled Q/K summaries behind pooled
  block scores (reference: :func:`.scoring.mean_pool`).
* :func:`line_scores`: column and diagonal sums of the last rows' attention, vertical-slash's and
  FlexPrefill's line scores (reference: :func:`.scoring.last_rows_line_scores`).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .naive import block_mass_reference
from .scoring import last_rows_line_scores, mean_pool, select_top_p

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
# The one-pass kernel's tile (at least BLOCK_M query rows x BLOCK_N keys, head dims BLOCK_D at a
# time), warps and pipeline stages: one for head dims <= 128 (whole rows in shared memory; the
# oracle) and one for XAttention's wide reshaped rows (head dim x stride, a rolled loop over BLOCK_D
# chunks). benchmarks/tune_estimator_kernels.py on an H100 (2026-11-24, XAttention stride 16, 128K):
# 128 x 256 11.5 ms, 64 x 256 14.4, 128 x 128 18.0-19.2, 64 x 128 18.8 (the earlier default); the
# 128 x 256 tile needs 289 KB of shared memory with 128-wide unrolled rows, more than an H100 has.
BLOCK_MASS_TILE = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
BLOCK_MASS_TILE_WIDE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_D=64, num_warps=8, num_stages=3)
# line_scores' skewed copy of the last rows' probabilities: rows x (Skv + rows) floats per (batch,
# head), (batch, head) pairs chunked to at most this many floats per launch (32 MiB per head at 128K, 64 rows).
LINE_SCORES_BUFFER_FLOATS = 1 << 29
# Tile and warps of the line_scores kernels, and rows per step / warps of mean_pool_kernel, from
# benchmarks/tune_estimator_kernels.py on an H100 (2026-11-24, 128K, 32 heads): line_scores 3.18 ms
# for 128 rows with 128-key tiles and 4 warps (3.77 with 8; 3.59 with 64-key tiles), 1.62 ms for 64
# rows; mean pooling of q 0.43 ms with 64 rows per step (1.21 with 16).
LINE_SCORES_BLOCK_N = 128
LINE_SCORES_WARPS = 4
MEAN_POOL_ROWS = 64  # a power of two
MEAN_POOL_WARPS = 4


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
    from ..backends.triton.runtime import fp32_dot_operands

    common = dict(H=heads, GROUP=heads // kv_heads, NK=nk, HEAD_DIM=dim, BLOCK_D=min(dim, 64), KV_BLOCK=kv_block,
                  BLOCK_M=block_m, CAUSAL=causal, UPCAST=fp32_dot_operands(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    tile = BLOCK_MASS_TILE_WIDE if dim > 128 else BLOCK_MASS_TILE
    block_n_one = max(tile["BLOCK_N"], kv_block)
    n_tiles = -(-kv_len // block_n_one)
    per_head = q_len * (nk + n_tiles + 2)  # floats of the one-pass buffers for one (batch, head)
    if not BLOCK_MASS_ONE_PASS or per_head > BLOCK_MASS_BUFFER_FLOATS:
        from ._triton_kernels import block_mass_kernel

        block_mass_kernel[(-(-q_len // block_m), batch * heads)](
            q, k, out, *strides, q_len, kv_len, kv_len - q_len if causal else 0, scale * LOG2E,
            NQ=nq, Q_BLOCK=q_block, BLOCK_N=block_n, num_warps=4 if block_m * block_n <= 4096 else 8, **common)
        return out
    from ._triton_kernels import block_mass_finish_kernel, block_mass_partial_kernel

    block_m_one = max(tile["BLOCK_M"], q_block)
    one_pass = {**common, "BLOCK_M": block_m_one, "BLOCK_D": min(dim, tile["BLOCK_D"])}
    chunk = max(1, min(batch * heads, BLOCK_MASS_BUFFER_FLOATS // per_head))  # (batch, head) pairs per launch
    part = torch.empty(chunk, q_len, nk, device=q.device, dtype=torch.float32)
    tile_max = torch.empty(chunk, q_len, n_tiles, device=q.device, dtype=torch.float32)
    row_max = torch.empty(chunk, q_len, device=q.device, dtype=torch.float32)
    row_sum = torch.empty(chunk, q_len, device=q.device, dtype=torch.float32)
    for start in range(0, batch * heads, chunk):
        count = min(chunk, batch * heads - start)
        part.zero_()  # blocks past a row's causal end are never written
        block_mass_partial_kernel[(-(-q_len // block_m_one), count)](
            q, k, part, tile_max, row_max, row_sum, start, *strides, q_len, kv_len,
            kv_len - q_len if causal else 0, scale * LOG2E, N_TILES=n_tiles, BLOCK_N=block_n_one,
            num_warps=tile["num_warps"], num_stages=tile["num_stages"], **one_pass)
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
        BLOCK=block, DIM=dim, ROWS=math.gcd(block, MEAN_POOL_ROWS), num_warps=MEAN_POOL_WARPS,  # divides BLOCK
    )
    return out


def line_scores(q: Tensor, k: Tensor, rows: int, scale: float, causal: bool = True,
                use_triton: bool | None = None):
    """``(vertical, slash)``, each ``(B, H, Skv)`` float32: per key, the last ``rows`` queries'
    attention summed over those rows; per distance ``query - key``, summed along the diagonal.

    The Triton path never forms the scores in PyTorch: pass 1 takes each row's max and normalizer per
    key tile, pass 2 recomputes the scores, sums columns in registers and stores the probabilities
    skewed so a column sum gives the diagonals. Causal only (the reference handles both); queries
    are bottom-right aligned against the keys (chunked prefill). bf16/fp16 scores use the tensor
    cores with fp32 accumulation; fp32 inputs are multiplied in TF32 on a GPU (Triton's default).
    """
    use_triton = _triton_usable(q) if use_triton is None else use_triton
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rows = min(rows, q_len)
    if not use_triton or not causal or not _pow2(dim) or dim < 16 or dim > 256 or rows > 128:
        return last_rows_line_scores(q, k, rows, scale, causal)
    _require_triton(q)
    from ..backends.triton.runtime import fp32_dot_operands
    from ._triton_kernels import line_stats_kernel, line_sums_kernel

    q_last = q[:, :, q_len - rows:]
    q_last = q_last if q_last.stride(-1) == 1 else q_last.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    block_m, block_n = max(16, 1 << math.ceil(math.log2(rows))), LINE_SCORES_BLOCK_N
    n_tiles = -(-kv_len // block_n)
    width = kv_len + rows
    chunk = max(1, min(batch * heads, LINE_SCORES_BUFFER_FLOATS // (rows * width)))
    vertical = torch.empty(batch * heads, kv_len, device=q.device, dtype=torch.float32)
    slash = torch.empty(batch * heads, kv_len, device=q.device, dtype=torch.float32)
    tile_max = torch.empty(chunk, n_tiles, block_m, device=q.device, dtype=torch.float32)
    tile_sum = torch.empty_like(tile_max)
    skew = torch.empty(chunk, rows, width, device=q.device, dtype=torch.float32)
    strides = (q_last.stride(0), q_last.stride(1), q_last.stride(2), k.stride(0), k.stride(1), k.stride(2))
    common = dict(H=heads, GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=min(dim, 64),
                  BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=fp32_dot_operands(q.dtype),
                  num_warps=LINE_SCORES_WARPS)
    scale_log2 = scale * LOG2E
    for start in range(0, batch * heads, chunk):
        count = min(chunk, batch * heads - start)
        line_stats_kernel[(n_tiles, count)](q_last, k, tile_max, tile_sum, start, *strides, rows, kv_len,
                                            scale_log2, n_tiles, **common)
        top = tile_max[:count].amax(1, keepdim=True)  # (count, 1, BLOCK_M): finite for real rows
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        total = (tile_sum[:count] * torch.exp2(tile_max[:count] - top)).sum(1)
        lse2 = (top[:, 0] + torch.log2(total.clamp_min(1e-30))).contiguous()  # (count, BLOCK_M)
        line_sums_kernel[(n_tiles, count)](q_last, k, lse2, vertical, skew, start, *strides, rows, kv_len,
                                           scale_log2, n_tiles, **common)
        diagonals = skew[:count].sum(1)  # column t holds distance kv_len - t
        slash[start:start + count] = diagonals[:, 1:kv_len + 1].flip(-1)
    return vertical.view(batch, heads, kv_len), slash.view(batch, heads, kv_len)
