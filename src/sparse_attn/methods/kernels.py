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


def _get_kernels():
    from . import _triton_kernels

    return _triton_kernels.block_mass_kernel, _triton_kernels.top_p_kernel


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
    block_mass_kernel, _ = _get_kernels()
    from ..backends.triton.ops import _upcast  # the interpreter's bf16-dot workaround, one rule for all kernels

    block_mass_kernel[(-(-q_len // block_m), batch * heads)](
        q, k, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_len, kv_len, kv_len - q_len if causal else 0, scale * LOG2E,
        H=heads, GROUP=heads // kv_heads, NQ=nq, NK=nk, HEAD_DIM=dim, BLOCK_D=min(dim, 64),
        Q_BLOCK=q_block, KV_BLOCK=kv_block, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        UPCAST=_upcast(q), num_warps=4 if block_m * block_n <= 4096 else 8,
    )
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
    _, top_p_kernel = _get_kernels()
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
