"""Helpers shared by the tests: random layouts, error measures, per-dtype tolerances."""

from __future__ import annotations

import torch

from sparse_attn import BlockSparseLayout

# Relative-error bounds (||out - ref|| / ||ref|| against a float64 reference), per input dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out).any(), "output has NaN"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_layout(batch, heads, q_len, kv_len, block=16, causal=True, density=0.5, empty_rows=True,
                  kv_block=None) -> BlockSparseLayout:
    """Random per-(batch, head) block layout; some rows left empty to test the no-key case."""
    kv_block = block if kv_block is None else kv_block
    nq, nk = -(-q_len // block), -(-kv_len // kv_block)
    dense = torch.rand(batch, heads, nq, nk) < density
    if empty_rows and nq > 1:
        dense[..., nq // 2, :] = False
    return BlockSparseLayout.from_dense(dense, q_len, kv_len, (block, kv_block), causal=causal)


def make_qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float64, requires_grad=False):
    q = torch.randn(batch, heads, q_len, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v
