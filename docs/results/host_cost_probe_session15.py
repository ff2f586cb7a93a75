"""Probe: host (CPU) cost per call of the backward and forward at 8K d=0.02, Gluon vs Triton kernels,
and a cProfile of the Gluon backward's host path.
Archived (session 15): `PYTHONPATH=src python docs/results/host_cost_probe_session15.py` on an H100 gave
Gluon backward 175 us host / 230 us wall per call, Triton 149 / 298; autograd.grad 421 vs 354 us.
"""
import cProfile
import pstats
import time

import torch

from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n * 1e6
    return host, wall


seq, heads, kv_heads, dim = 8192, 32, 8, 128
q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
layout = random_layout(seq, density=0.02, num_heads=heads, seed=1, device="cuda")
scale = dim ** -0.5
for gluon in (None, False):
    ops.GLUON_FORWARD = ops.GLUON_BACKWARD = gluon
    out, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), layout, scale)
    do = torch.randn_like(out)
    name = "gluon" if gluon is None else "triton"
    print(name, "attention_backward host/wall us", host_us(lambda: ops.attention_backward(do, q, k, v, out, lse, layout, scale)))
    print(name, "attention_forward host/wall us", host_us(lambda: ops.attention_forward(q.detach(), k.detach(), v.detach(), layout, scale)))
    o = sparse_attention(q, k, v, layout, backend="triton")
    print(name, "autograd.grad host/wall us", host_us(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)))
ops.GLUON_FORWARD = ops.GLUON_BACKWARD = None
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    ops.attention_backward(do, q, k, v, out, lse, layout, scale)
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
