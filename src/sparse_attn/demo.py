"""A quick tour (``sparse-attn demo``): every static pattern against dense attention on random inputs."""

from __future__ import annotations

import time

import torch

from . import (
    dense_layout,
    power_layout,
    sliding_window_layout,
    sparse_attention,
    strided_layout,
    which_backend,
)


def run_demo(seq_len: int, heads: int, kv_heads: int, dim: int, device: str, show: bool) -> list:
    """Run each static pattern on random inputs; report density, error vs dense and time."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(1, heads, seq_len, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, seq_len, dim, device=device, dtype=dtype)
    v = torch.randn(1, kv_heads, seq_len, dim, device=device, dtype=dtype)
    patterns = {
        "dense": dense_layout(seq_len, block_size=64, device=device),
        "window+sink": sliding_window_layout(seq_len, window=512, sink=64, num_heads=kv_heads,
                                             block_size=64, device=device),
        "strided(S2)": strided_layout(seq_len, stride=4, num_heads=heads, local_blocks=4,
                                      block_size=64, device=device),
        "power": power_layout(seq_len, local_blocks=2, sink=64, block_size=64, device=device),
    }
    dense_out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1),
        is_causal=True)
    rows = []
    for name, layout in patterns.items():
        backend = which_backend(q, k, v, layout).backend
        start = time.perf_counter()
        out = sparse_attention(q, k, v, layout)
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        err = float((out.float() - dense_out.float()).norm() / dense_out.float().norm())
        rows.append((name, layout.density(), err, backend, elapsed * 1e3))
        if show:
            print(layout.to_string(heads=[0], max_cells=32))
    return rows
