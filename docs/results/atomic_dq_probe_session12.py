# Session-12 scratch probe kept for the record (not a maintained benchmark). Measured the rejected
# atomic-dQ backward: run from the repo root with atomic_dq_rejected_session12.diff applied to the
# session-11 code (commit 5db334b), on an H100:
#   PYTHONPATH=src TRITON_INTERPRET=0 python3 docs/results/atomic_dq_probe_session12.py
# Output: atomic_dq_rejected_h100_2026-11-24_session12.json.
"""Atomic-dQ backward vs dQ-kernel backward vs Flex, same inputs: bwd-only and fwd+bwd ms, errors, regs."""
import sys, json, os, time
import torch, triton
sys.path.insert(0, "src")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops
from sparse_attn.backends.flex import _compiled_flex
OUT = os.environ.get("OUT", ".")
flex = _compiled_flex()
plan = [(32768, [0.2, 0.1, 0.02]), (8192, [0.2, 0.05]), (131072, [0.1])]
if len(sys.argv) > 1:
    plan = json.loads(sys.argv[1])
variants = [("kernel", False, "tma"), ("atomic_tma", True, "tma"), ("atomic_elem", True, "elements")]
results = []
def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=50, rep=rep)
for S, dens in plan:
    torch.manual_seed(0)
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(q)
    for d in dens:
        layout = random_layout(S, density=d, num_heads=32, block_size=128, seed=1, device="cuda")
        bm = layout.to_flex_block_mask(num_heads=32)
        with torch.no_grad():
            out, lse = ops.attention_forward(q, k, v, layout, 128 ** -0.5, batch=1)
        row = {"S": S, "d": d}
        ref = None
        for name, atomic, writes in variants:
            ops.ATOMIC_DQ, ops.ATOMIC_DQ_WRITES = atomic, writes
            fn = lambda: ops.attention_backward(g, q, k, v, out, lse, layout, 128 ** -0.5, batch=1)
            try:
                got = fn(); torch.cuda.synchronize()
                if ref is None:
                    ref = [t.float() for t in got]
                err = [float((a.float() - b).norm() / b.norm()) for a, b in zip(got, ref)]
                row[name + "_bwd_ms"] = bench(fn)
                def step():
                    sparse_attention(q, k, v, layout, backend="triton").backward(g)
                row[name + "_fwdbwd_ms"] = triton.testing.do_bench(step, warmup=50, rep=200, grad_to_none=[q, k, v])
                row[name + "_err_vs_kernel"] = err
                chosen = [(kk[8:10], vv[1]) for kk, vv in ops._CHOSEN.items() if kk[0] == "dkdv"]
                comp = [(e[0].n_regs, e[0].n_spills) for kk, e in ops._COMPILED.items() if kk[0] == "dkdv"]
                row[name + "_dkdv"] = str(chosen[-1:]) + str(comp[-3:])
            except Exception as exc:
                row[name + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(row[name + "_error"], flush=True)
        ops.ATOMIC_DQ = False
        def fstep():
            flex(q, k, v, block_mask=bm, enable_gqa=True).backward(g)
        def ffwd():
            with torch.no_grad():
                flex(q, k, v, block_mask=bm, enable_gqa=True)
        row["flex_fwdbwd_ms"] = triton.testing.do_bench(fstep, warmup=50, rep=200, grad_to_none=[q, k, v])
        row["flex_fwd_ms"] = bench(ffwd)
        def ofwd():
            with torch.no_grad():
                sparse_attention(q, k, v, layout, backend="triton")
        row["ours_fwd_ms"] = bench(ofwd)
        results.append(row)
        print(json.dumps(row), flush=True)
        json.dump(results, open(os.path.join(OUT, "atomic_probe.json"), "w"), indent=1)
    del q, k, v, g
    torch.cuda.empty_cache()
