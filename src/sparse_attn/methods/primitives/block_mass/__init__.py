"""Softmax mass per (query block, key block): the oracle's score, and XAttention's block score on its
antidiagonally reshaped inputs. Triton kernels in :mod:`.kernel`, reference in :mod:`.naive`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ....options import KernelOptions
from ...common import LOG2E, is_pow2
from ..dispatch import use_triton
from .naive import block_mass_reference

__all__ = ["block_mass", "block_mass_reference", "BlockMassTile", "BLOCK_MASS_TILE", "BLOCK_MASS_TILE_WIDE",
           "BLOCK_MASS_BUFFER_FLOATS"]


@dataclass(frozen=True)
class BlockMassTile:
    """Tile of the one-pass kernel: at least ``block_m`` query rows x ``block_n`` keys, head dims
    ``block_d`` at a time, with ``num_warps`` warps and ``num_stages`` pipeline stages."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# The one-pass kernel's default tiles: one for head dims <= 128 (whole rows in shared memory; the
# oracle) and one for XAttention's wide reshaped rows (head dim x stride, a rolled loop over block_d
# chunks). benchmarks/tune_estimator_kernels.py on an H100 (XAttention stride 16, 128K): 128 x 256
# 11.5 ms, 64 x 256 14.4, 128 x 128 18.0-19.2, 64 x 128 18.8; the 128 x 256 tile needs 289 KB of
# shared memory with 128-wide unrolled rows, more than an H100 has, hence the smaller narrow tile.
BLOCK_MASS_TILE = BlockMassTile(block_m=64, block_n=128, block_d=64, num_warps=8, num_stages=3)
BLOCK_MASS_TILE_WIDE = BlockMassTile(block_m=128, block_n=256, block_d=64, num_warps=8, num_stages=3)
# The one-pass scratch: one float per (query row, key block) plus per-tile and per-row statistics, at
# most this many floats per launch ((batch, head) pairs are chunked; a single head that needs more
# runs in two passes). 2 GiB of float32: the oracle's one head at 128K needs 1.0 GiB.
BLOCK_MASS_BUFFER_FLOATS = 1 << 29


def block_mass(q: Tensor, k: Tensor, q_block: int, kv_block: int, scale: float, causal: bool = True, *,
               kernel_options: Optional[KernelOptions] = None, one_pass: bool = True,
               buffer_floats: int = BLOCK_MASS_BUFFER_FLOATS, tile: Optional[BlockMassTile] = None) -> Tensor:
    """``(B, H, NQ, NK)`` float32 mean softmax mass per block pair of ``q (B, H, Sq, D)`` against
    ``k (B, Hkv, Skv, D)`` (queries bottom-right aligned when causal).

    Triton or the reference (:func:`.naive.block_mass_reference`) as ``kernel_options`` says
    (:func:`..dispatch.use_triton`); the kernels need power-of-two blocks of at most 128 and a
    power-of-two head dim of at least 16, other shapes run the reference.

    ``one_pass``: the scores are computed once (partial block sums with the running row max, then a
    small rescaling kernel) instead of twice (row max and normalizer, then block sums): half the
    matmul work for one float per (query row, key block) of scratch, at most ``buffer_floats`` per
    launch. ``tile``: the one-pass tile (default: :data:`BLOCK_MASS_TILE` for head dims <= 128,
    :data:`BLOCK_MASS_TILE_WIDE` above).
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    supported = is_pow2(q_block) and is_pow2(kv_block) and is_pow2(dim) and dim >= 16 and max(q_block, kv_block) <= 128
    if not use_triton(q, kernel_options, supported):
        return block_mass_reference(q, k, q_block, kv_block, scale, causal)
    from ....backends.triton.runtime import fp32_dot_operands

    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    block_m, block_n = max(64, q_block), max(64, kv_block)  # several blocks per tile when blocks are small
    out = torch.zeros(batch, heads, nq, nk, device=q.device, dtype=torch.float32)
    common = dict(H=heads, GROUP=heads // kv_heads, NK=nk, HEAD_DIM=dim, BLOCK_D=min(dim, 64), KV_BLOCK=kv_block,
                  BLOCK_M=block_m, CAUSAL=causal, UPCAST=fp32_dot_operands(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    if tile is None:
        tile = BLOCK_MASS_TILE_WIDE if dim > 128 else BLOCK_MASS_TILE
    block_n_one = max(tile.block_n, kv_block)
    n_tiles = -(-kv_len // block_n_one)
    per_head = q_len * (nk + n_tiles + 2)  # floats of the one-pass buffers for one (batch, head)
    if not one_pass or per_head > buffer_floats:
        from .kernel import block_mass_kernel

        block_mass_kernel[(-(-q_len // block_m), batch * heads)](
            q, k, out, *strides, q_len, kv_len, kv_len - q_len if causal else 0, scale * LOG2E,
            NQ=nq, Q_BLOCK=q_block, BLOCK_N=block_n, num_warps=4 if block_m * block_n <= 4096 else 8, **common)
        return out
    from .kernel import block_mass_finish_kernel, block_mass_partial_kernel

    block_m_one = max(tile.block_m, q_block)
    one_pass_args = {**common, "BLOCK_M": block_m_one, "BLOCK_D": min(dim, tile.block_d)}
    chunk = max(1, min(batch * heads, buffer_floats // per_head))  # (batch, head) pairs per launch
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
            num_warps=tile.num_warps, num_stages=tile.num_stages, **one_pass_args)
        block_mass_finish_kernel[(nq, count)](
            part, tile_max, row_max, row_sum, out, start, q_len, NQ=nq, NK=nk, N_TILES=n_tiles,
            Q_BLOCK=q_block, NB=block_n_one // kv_block, BLOCK_K=min(128, max(16, 1 << math.ceil(math.log2(nk)))))
    return out
