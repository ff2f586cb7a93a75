"""``python -m sparse_attn``: a quick tour that runs every static pattern against dense attention."""

from __future__ import annotations

import argparse
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


def demo(seq_len: int, heads: int, kv_heads: int, dim: int, device: str, show: bool) -> list:
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
        backend, _ = which_backend(q, k, v, layout)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_attn", description=__doc__)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--show", action="store_true", help="draw each layout")
    args = parser.parse_args(argv)
    rows = demo(args.seq_len, args.heads, args.kv_heads, args.dim, args.device, args.show)
    print(f"\nseq_len={args.seq_len} heads={args.heads}/{args.kv_heads} dim={args.dim} on {args.device}")
    print(f"{'pattern':<14}{'density':>9}{'rel.err vs dense':>18}{'backend':>11}{'ms':>10}")
    for name, density, err, backend, ms in rows:
        print(f"{name:<14}{density:>9.3f}{err:>18.3e}{backend:>11}{ms:>10.1f}")


if __name__ == "__main__":
    main()
