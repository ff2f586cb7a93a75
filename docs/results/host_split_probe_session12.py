# Session-12 scratch probe kept for the record (not a maintained benchmark). Timed the host pieces
# of an 8K training step on the session-11 code (commit 5db334b; it wraps ops._transposed, which
# commit 558710a replaced with ops._block_lists), on an H100, GPU kept busy:
#   PYTHONPATH=src TRITON_INTERPRET=0 python3 docs/results/host_split_probe_session12.py
"""Where an 8K step's host time goes: forward under autograd, our backward inside autograd's thread
vs called directly, each launch; GPU kept busy."""
import sys, time, threading, statistics
import torch
sys.path.insert(0, "src")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops
S = 8192
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(q)
layout = random_layout(S, density=0.05, num_heads=32, block_size=128, seed=1, device="cuda")
rec = {}
def timed(name, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter(); r = fn(*a, **kw); rec.setdefault(name + ("@main" if threading.current_thread() is threading.main_thread() else "@worker"), []).append(time.perf_counter() - t); return r
    return wrapper
ops.attention_backward = timed("attention_backward", ops.attention_backward)
ops.attention_forward = timed("attention_forward", ops.attention_forward)
ops._launch = timed("_launch", ops._launch)
ops._use_tma = timed("_use_tma", ops._use_tma)
ops._transposed = timed("_transposed", ops._transposed)
orig_empty_like = torch.empty_like
def reset():
    q.grad = k.grad = v.grad = None
out0, lse0 = ops.attention_forward(q.detach(), k.detach(), v.detach(), layout, 128 ** -0.5, batch=1)
phases = {}
def step():
    t0 = time.perf_counter()
    out = sparse_attention(q, k, v, layout, backend="triton")
    t1 = time.perf_counter()
    out.backward(g)
    t2 = time.perf_counter()
    reset()
    phases.setdefault("fwd_with_grad", []).append(t1 - t0); phases.setdefault("backward_call", []).append(t2 - t1)
def direct():
    ops.attention_backward(g, q, k, v, out0, lse0, layout, 128 ** -0.5, batch=1)
for _ in range(10): step(); direct()
torch.cuda.synchronize()
rec.clear(); phases.clear()
for fn in (step, direct):
    torch.cuda._sleep(1_000_000_000)
    for _ in range(150): fn()
    torch.cuda.synchronize()
for name, ts in list(phases.items()) + list(rec.items()):
    ts = sorted(ts); print(f"SPLIT {name:32s} n={len(ts):4d} median {statistics.median(ts) * 1e6:7.1f} us  p90 {ts[int(len(ts) * .9)] * 1e6:7.1f}")
