"""Probe (session 16): host cost per call at 8K d=0.02 of the Gluon forward and backward paths
(ops.attention_forward / attention_backward, no autograd), this checkout vs another checkout's src,
five interleaved rounds of 400 calls.
Run from the repository root on a GPU:
`PYTHONPATH=src python docs/results/host_cost_ab_probe_session16.py <other checkout>/src`
(imports benchmarks/bench_attention.py for load_baseline; writes $OUT/hostab16.json).
"""
import importlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import bench_attention as BA  # noqa: E402
from sparse_attn import random_layout  # noqa: E402
from sparse_attn.backends.triton import ops  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
base = BA.load_baseline(sys.argv[1])
base_ops = importlib.import_module("sparse_attn_baseline.backends.triton.ops")


def host_us(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


seq, heads, kv_heads, dim = 8192, 32, 8, 128
torch.manual_seed(0)
q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
scale = dim ** -0.5
layout = random_layout(seq, density=0.02, num_heads=heads, seed=1, device="cuda")
blayout = BA.as_baseline_layout(base, layout)
res = {"ours": {"fwd": [], "bwd": []}, "base": {"fwd": [], "bwd": []}}
calls = {}
for name, mod, lay in (("ours", ops, layout), ("base", base_ops, blayout)):
    out, lse = mod.attention_forward(q, k, v, lay, scale)
    do = torch.randn_like(out)
    calls[name] = (lambda mod=mod, lay=lay: mod.attention_forward(q, k, v, lay, scale),
                   lambda mod=mod, lay=lay, out=out, lse=lse, do=do: mod.attention_backward(do, q, k, v, out, lse, lay, scale))
for _ in range(5):
    for name, (fwd, bwd) in calls.items():
        res[name]["fwd"].append(round(host_us(fwd), 1))
        res[name]["bwd"].append(round(host_us(bwd), 1))
print(json.dumps(res))
json.dump(res, open(f"{OUT}/hostab16.json", "w"), indent=1)
