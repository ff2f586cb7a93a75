# Session-12 scratch probe kept for the record (not a maintained benchmark; benchmarks/profile_attention.py
# now gives the same three rows). Host time per 8K training step, GPU kept busy, on an H100:
#   PYTHONPATH=src TRITON_INTERPRET=0 python3 docs/results/host_floor_probe_session12.py
"""Host microseconds per 8K training step, GPU kept busy: ours, Flex, and a bare autograd.Function
floor (same saved tensors, outputs from empty_like, no kernels)."""
import sys, time
import torch
sys.path.insert(0, "src")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops
from sparse_attn.backends.flex import _compiled_flex
S = 8192
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(q)
layout = random_layout(S, density=0.05, num_heads=32, block_size=128, seed=1, device="cuda")
bm = layout.to_flex_block_mask(num_heads=32)
flex = _compiled_flex()
class Bare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q); lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse); ctx.mark_non_differentiable(lse); ctx.set_materialize_grads(False)
        return out, lse
    @staticmethod
    def backward(ctx, do, _):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
def reset():
    q.grad = k.grad = v.grad = None
steps = {
    "ours": lambda: (sparse_attention(q, k, v, layout, backend="triton").backward(g), reset()),
    "ours_fwd_nograd": lambda: sparse_attention(q.detach(), k.detach(), v.detach(), layout, backend="triton"),
    "flex": lambda: (flex(q, k, v, block_mask=bm, enable_gqa=True).backward(g), reset()),
    "flex_fwd_nograd": lambda: flex(q.detach(), k.detach(), v.detach(), block_mask=bm, enable_gqa=True),
    "bare_function": lambda: (Bare.apply(q, k, v)[0].backward(g), reset()),
}
for name, fn in steps.items():
    for _ in range(5): fn()
    torch.cuda.synchronize()
res = {name: [] for name in steps}
for rnd in range(3):
    for name, fn in steps.items():
        torch.cuda._sleep(1_000_000_000)
        ts = []
        for _ in range(150):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        ts.sort(); res[name].append(ts[75] * 1e6)
for name, r in res.items():
    print(f"HOST {name:18s} median us per round: " + " ".join(f"{x:.0f}" for x in r))
