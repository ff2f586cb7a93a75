"""Probe (session 16): per-chunk host time of the 8K d=0.02 backward, ours vs Flex, through
autograd and (ours) directly; is the round-to-round spread host-side, and whose?
Run from the repository root on a GPU: `PYTHONPATH=src python docs/results/host_jitter_probe_session16.py`
(writes $OUT/jitter16.json).
"""
import gc
import json
import os
import statistics
import time

import torch
import triton

from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.flex import _compiled_flex
from sparse_attn.backends.triton import ops

OUT = os.environ.get("OUT", "/tmp")
seq, heads, kv_heads, dim = 8192, 32, 8, 128
torch.manual_seed(0)
q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
scale = dim ** -0.5
layout = random_layout(seq, density=0.02, num_heads=heads, seed=1, device="cuda")
bm = layout.to_flex_block_mask(num_heads=heads)
flex = _compiled_flex()
o = sparse_attention(q, k, v, layout, backend="triton")
of = flex(q, k, v, block_mask=bm, enable_gqa=True)
do = torch.randn_like(o)
out, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), layout, scale)
fns = {
    "ours_grad": lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
    "flex_grad": lambda: torch.autograd.grad(of, (q, k, v), do, retain_graph=True),
    "ours_direct": lambda: ops.attention_backward(do, q, k, v, out, lse, layout, scale),
}


def chunk_host_us(fn, chunks=12, n=50):
    """Host microseconds per call in each chunk of n calls (synchronized between chunks)."""
    res = []
    for _ in range(chunks):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        res.append(round((time.perf_counter() - t) / n * 1e6, 1))
    torch.cuda.synchronize()
    return res


res = {}
for fn in fns.values():
    for _ in range(30):
        fn()
for rnd in range(3):
    for name, fn in fns.items():
        res.setdefault(name, []).append(chunk_host_us(fn))
    for name in ("ours_grad", "flex_grad"):
        res.setdefault(name + "_bench_ms", []).append(
            round(float(triton.testing.do_bench(fns[name], warmup=25, rep=200, return_mode="median")), 3))
gc.disable()
for name in ("ours_grad", "flex_grad"):
    res[name + "_gc_off_bench_ms"] = [round(float(triton.testing.do_bench(fns[name], warmup=25, rep=200,
                                                                          return_mode="median")), 3) for _ in range(3)]
gc.enable()
for name, v_ in res.items():
    flat = [x for r in v_ for x in (r if isinstance(r, list) else [r])]
    print(name, "median", statistics.median(flat), "min", min(flat), "max", max(flat), v_ if "bench" in name else "")
json.dump(res, open(f"{OUT}/jitter16.json", "w"), indent=1)
