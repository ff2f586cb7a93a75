"""Probe (session 16): per-step host cost of the Gluon backward at 8K, the autograd engine's own
cost, and GPU-only (CUDA-graph) times of each backward kernel, with eager timings of ours vs Flex.
Measured on f339979 (the step list mirrors that checkout's Gluon branch of ops.attention_backward):
`PYTHONPATH=src python docs/results/host_steps_probe_session16.py`; writes $OUT/steps16.json.
"""
import json
import os
import time

import torch
import triton

from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.flex import _compiled_flex
from sparse_attn.backends.triton import gluon_backward as gb, ops

OUT = os.environ.get("OUT", "/tmp")
pc = time.perf_counter
seq, heads, kv_heads, dim = 8192, 32, 8, 128
torch.manual_seed(0)
q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
scale = dim ** -0.5
bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3  # noqa: E731
res = {}


def graph_us(fn):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    return bench(g.replay)


def launch_parts(fn, grid, args, meta):
    key = ops._fast_key(fn.__name__, fn, args, meta)
    kernel, constexprs, _ = ops._COMPILED[key]
    return key, kernel, constexprs, grid


def steps(do, out, lse, layout, acc):
    t0 = pc()
    ops.gluon_skip_reason(q, k, v, layout, (out, do))
    t1 = pc()
    cnt, idx, cs, ids, _ = ops._block_lists(layout)
    tc, ti, tcs, tis, _ = ops._block_lists(layout, kv_major=True)
    t2 = pc()
    qd, kd, vd, dod = gb.row_descriptors(q, k, v, do)
    t3 = pc()
    dq = torch.empty_like(q)
    delta = torch.empty_like(lse)
    t4 = pc()
    args = (qd, dod, kd, vd, out, dq, lse, delta, cnt, idx, lse.stride(0), lse.stride(1), *cs, *ids,
            seq, seq, heads, scale * ops.LOG2E, scale)
    meta = dict(GROUP=4, LAYOUT_HDIV=1, HEAD_DIM=dim, Q_BLOCK=128, KV_BLOCK=128, BLOCK_M=64, BLOCK_N=64,
                CAUSAL=True, STAGES=2, num_warps=4)
    t5 = pc()
    key = ops._fast_key("_gluon_dq_kernel", gb._gluon_dq_kernel, args, meta)
    t6 = pc()
    kernel, constexprs, _ = ops._COMPILED[key]
    stream = triton.runtime.driver.active.get_current_stream(key[1])
    t7 = pc()
    kernel.run(layout.num_q_blocks * 2, heads, 1, stream, kernel.function, kernel.packed_metadata,
               None, None, None, *args, *constexprs)
    t8 = pc()
    for name, a, b in (("skip_reason", t0, t1), ("block_lists", t1, t2), ("4 descriptors", t2, t3),
                       ("2 empty_like", t3, t4), ("args+meta", t4, t5), ("fast_key", t5, t6),
                       ("entry+stream", t6, t7), ("kernel.run", t7, t8)):
        acc[name] = acc.get(name, 0.0) + (b - a)


for d in (0.02, 0.1, 0.05):
    layout = random_layout(seq, density=d, num_heads=heads, seed=1, device="cuda")
    bm = layout.to_flex_block_mask(num_heads=heads)
    flex = _compiled_flex()
    o = sparse_attention(q, k, v, layout, backend="triton")
    of = flex(q, k, v, block_mask=bm, enable_gqa=True)
    do = torch.randn_like(o)
    r = {}
    out, lse = ops.attention_forward(q.detach(), k.detach(), v.detach(), layout, scale)
    ops.attention_backward(do, q, k, v, out, lse, layout, scale)
    # each backward kernel alone (dQ also writes delta, which dK/dV then reads)
    cnt, idx, cs, ids, _ = ops._block_lists(layout)
    tc, ti, tcs, tis, _ = ops._block_lists(layout, kv_major=True)
    descs = gb.row_descriptors(q.detach(), k.detach(), v.detach(), do)
    dq, delta = gb.gluon_attention_dq(q, k, v, out, do, lse, layout, scale, scale * ops.LOG2E, cnt, idx, cs, ids,
                                      launch=ops._launch_gluon, descriptors=descs)
    r["graph_dq"] = graph_us(lambda: gb.gluon_attention_dq(q, k, v, out, do, lse, layout, scale, scale * ops.LOG2E,
                                                            cnt, idx, cs, ids, launch=ops._launch_gluon,
                                                            descriptors=descs))
    r["graph_dkdv"] = graph_us(lambda: gb.gluon_attention_dkdv(q, k, v, do, lse, delta, layout, scale,
                                                                scale * ops.LOG2E, tc, ti, tcs, tis,
                                                                launch=ops._launch_gluon, descriptors=descs))
    r["bench_ours_bwd"] = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    r["bench_flex_bwd"] = bench(lambda: torch.autograd.grad(of, (q, k, v), do, retain_graph=True))
    if d == 0.02:
        acc = {}
        n = 0
        for it in range(30):
            for _ in range(20):
                steps(do, out, lse, layout, acc)
                n += 1
            torch.cuda.synchronize()
        r["steps_us"] = {name: round(t / n * 1e6, 2) for name, t in acc.items()}
        key, kernel, constexprs, _ = None, None, None, None
    res[f"d={d}"] = r
    print(d, json.dumps(r), flush=True)


# the autograd engine's own cost: a custom Function whose backward launches nothing
class Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        return g


x = torch.randn(1000, device="cuda", requires_grad=True)
y = Identity.apply(x)
gy = torch.ones_like(y)
for _ in range(50):
    torch.autograd.grad(y, (x,), gy, retain_graph=True)
torch.cuda.synchronize()
t = pc()
for _ in range(1000):
    torch.autograd.grad(y, (x,), gy, retain_graph=True)
res["autograd_identity_us"] = (pc() - t) / 1000 * 1e6
# make_tensordesc_arg cost with the dq kernel's real metadata
try:
    from triton.backends.nvidia.driver import make_tensordesc_arg
    layout = random_layout(seq, density=0.02, num_heads=heads, seed=1, device="cuda")
    descs = gb.row_descriptors(q.detach(), k.detach(), v.detach(), do)
    fn = gb._gluon_dq_kernel
    entry = [e for kk, e in ops._COMPILED.items() if kk[0] == "_gluon_dq_kernel"][0]
    meta = entry[0].metadata.tensordesc_meta[0]
    for _ in range(100):
        make_tensordesc_arg(descs[0], meta)
    t = pc()
    for _ in range(2000):
        make_tensordesc_arg(descs[0], meta)
    res["make_tensordesc_arg_us"] = (pc() - t) / 2000 * 1e6
except Exception as exc:
    res["make_tensordesc_arg_us"] = repr(exc)
print(json.dumps({k_: v_ for k_, v_ in res.items() if not k_.startswith("d=")}))
json.dump(res, open(f"{OUT}/steps16.json", "w"), indent=1)
