"""Line scores: column and diagonal sums of the last rows' attention, vertical-slash's and
FlexPrefill's line scores. Triton kernels in :mod:`.kernel`, reference in :mod:`.naive`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ....options import KernelOptions
from ...common import LOG2E, is_pow2
from ..dispatch import use_triton
from .naive import KV_GROUPS_PER_CHUNK, diagonal_sums, last_rows_attention, last_rows_line_scores

__all__ = ["line_scores", "last_rows_line_scores", "last_rows_attention", "diagonal_sums", "KV_GROUPS_PER_CHUNK",
           "LINE_SCORES_BUFFER_FLOATS", "LINE_SCORES_BLOCK_N", "LINE_SCORES_WARPS"]

# The kernels' skewed copy of the last rows' probabilities: rows x (Skv + rows) floats per (batch,
# head), (batch, head) pairs chunked to at most this many floats per launch (32 MiB per head at 128K,
# 64 rows).
LINE_SCORES_BUFFER_FLOATS = 1 << 29
# Key tile and warps of the kernels: benchmarks/tune_estimator_kernels.py on an H100 (128K, 32 heads):
# 3.18 ms for 128 rows with 128-key tiles and 4 warps (3.77 with 8; 3.59 with 64-key tiles), 1.62 ms
# for 64 rows.
LINE_SCORES_BLOCK_N = 128
LINE_SCORES_WARPS = 4


def line_scores(q: Tensor, k: Tensor, rows: int, scale: float, causal: bool = True, *,
                kernel_options: Optional[KernelOptions] = None, buffer_floats: int = LINE_SCORES_BUFFER_FLOATS,
                block_n: int = LINE_SCORES_BLOCK_N, num_warps: int = LINE_SCORES_WARPS,
                kv_groups_per_chunk: int = KV_GROUPS_PER_CHUNK):
    """``(vertical, slash)``, each ``(B, H, Skv)`` float32: per key, the last ``rows`` queries'
    attention summed over those rows; per distance ``query - key``, summed along the diagonal.

    Triton or the reference (:func:`.naive.last_rows_line_scores`, ``kv_groups_per_chunk`` KV groups
    at a time) as ``kernel_options`` says (:func:`..dispatch.use_triton`). The Triton path never
    forms the scores in PyTorch: pass 1 takes each row's max and normalizer per key tile
    (``block_n`` keys, ``num_warps`` warps), pass 2 recomputes the scores, sums columns in registers
    and stores the probabilities skewed (at most ``buffer_floats`` per launch) so a column sum gives
    the diagonals. The kernels are causal only and need a power-of-two head dim in [16, 256] and at
    most 128 rows; other calls run the reference. Queries are bottom-right aligned against the keys
    (chunked prefill). bf16/fp16 scores use the tensor cores with fp32 accumulation; fp32 inputs are
    multiplied in TF32 on a GPU (Triton's default).
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    rows = min(rows, q_len)
    supported = causal and is_pow2(dim) and 16 <= dim <= 256 and rows <= 128
    if not use_triton(q, kernel_options, supported):
        return last_rows_line_scores(q, k, rows, scale, causal, kv_groups_per_chunk)
    from ....backends.triton.runtime import fp32_dot_operands
    from .kernel import line_stats_kernel, line_sums_kernel

    q_last = q[:, :, q_len - rows:]
    q_last = q_last if q_last.stride(-1) == 1 else q_last.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    block_m = max(16, 1 << math.ceil(math.log2(rows)))
    n_tiles = -(-kv_len // block_n)
    width = kv_len + rows
    chunk = max(1, min(batch * heads, buffer_floats // (rows * width)))
    vertical = torch.empty(batch * heads, kv_len, device=q.device, dtype=torch.float32)
    slash = torch.empty(batch * heads, kv_len, device=q.device, dtype=torch.float32)
    tile_max = torch.empty(chunk, n_tiles, block_m, device=q.device, dtype=torch.float32)
    tile_sum = torch.empty_like(tile_max)
    skew = torch.empty(chunk, rows, width, device=q.device, dtype=torch.float32)
    strides = (q_last.stride(0), q_last.stride(1), q_last.stride(2), k.stride(0), k.stride(1), k.stride(2))
    common = dict(H=heads, GROUP=heads // kv_heads, HEAD_DIM=dim, BLOCK_D=min(dim, 64),
                  BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=fp32_dot_operands(q.dtype), num_warps=num_warps)
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
