"""Block mean pooling: the mean of every block of tokens, the pooled Q/K summaries behind pooled
block scores. Triton kernel in :mod:`.kernel`, reference in :mod:`.naive`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ....options import KernelOptions
from ...common import is_pow2
from ..dispatch import use_triton
from .naive import mean_pool

__all__ = ["block_mean_pool", "mean_pool", "MEAN_POOL_ROWS", "MEAN_POOL_WARPS"]

# Rows per step (a power of two) and warps of the kernel: benchmarks/tune_estimator_kernels.py on an
# H100 (128K tokens, 32 heads): mean pooling of q in 0.43 ms with 64 rows per step, 1.21 ms with 16.
MEAN_POOL_ROWS = 64
MEAN_POOL_WARPS = 4


def block_mean_pool(x: Tensor, block: int, *, kernel_options: Optional[KernelOptions] = None,
                    rows: int = MEAN_POOL_ROWS, num_warps: int = MEAN_POOL_WARPS) -> Tensor:
    """``(B, H, S, D)`` -> ``(B, H, ceil(S / block), D)`` float32 block means (tail: its real tokens).

    Triton or the reference (:func:`.naive.mean_pool`) as ``kernel_options`` says
    (:func:`..dispatch.use_triton`); the kernel needs a power-of-two head dim of at least 16.
    ``rows`` (a power of two) rows per step and ``num_warps`` warps in the kernel.
    """
    dim = x.shape[-1]
    if not use_triton(x, kernel_options, is_pow2(dim) and dim >= 16):
        return mean_pool(x, block)
    from .kernel import mean_pool_kernel

    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, heads, length, _ = x.shape
    nblocks = -(-length // block)
    out = torch.empty(batch, heads, nblocks, dim, device=x.device, dtype=torch.float32)
    mean_pool_kernel[(nblocks, batch * heads)](
        x, out, x.stride(0), x.stride(1), x.stride(2), length, H=heads, NBLOCKS=nblocks,
        BLOCK=block, DIM=dim, ROWS=math.gcd(block, rows), num_warps=num_warps,  # ROWS divides BLOCK
    )
    return out
