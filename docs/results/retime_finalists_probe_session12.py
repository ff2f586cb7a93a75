# Session-12 scratch probe kept for the record (not a maintained benchmark). Measured the rejected
# finalist re-timing: run with retime_finalists_rejected_session12.diff applied (recreated against
# the later ops.py; the measured version added the same code to the session-11 _launch), on an H100:
#   PYTHONPATH=src TRITON_INTERPRET=0 python3 docs/results/retime_finalists_probe_session12.py 32768 0.5,0.2,0.05 3
# Output: retime_finalists_rejected_h100_2026-11-24_session12.json.
"""Tuner picks with and without finalist re-timing: fresh tunings repeated, fwd+bwd step ms after each."""
import sys, json, os, time, statistics
import torch, triton
sys.path.insert(0, "src")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops
from sparse_attn.backends.flex import _compiled_flex
OUT = os.environ.get("OUT", ".")
S = int(sys.argv[1]); dens = [float(x) for x in sys.argv[2].split(",")]; R = int(sys.argv[3])
flex = _compiled_flex()
torch.manual_seed(0)
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn_like(q)
rows = []
def clear():
    ops.TUNED.clear(); ops._CHOSEN.clear(); ops._COMPILED.clear()
for d in dens:
    layout = random_layout(S, density=d, num_heads=32, block_size=128, seed=1, device="cuda")
    bm = layout.to_flex_block_mask(num_heads=32)
    step = lambda: sparse_attention(q, k, v, layout, backend="triton").backward(g)
    fstep = lambda: flex(q, k, v, block_mask=bm, enable_gqa=True).backward(g)
    fstep()
    flex_ms = triton.testing.do_bench(fstep, warmup=50, rep=300, grad_to_none=[q, k, v], return_mode="median")
    for rep in range(R):
        for retime in (False, True):
            ops.RETIME_FINALISTS = retime
            clear()
            t0 = time.time(); step(); torch.cuda.synchronize(); tune_s = time.time() - t0
            picks = {kk[0]: "%dx%d/%dw/%ds" % (vv[1]["BLOCK_M"], vv[1]["BLOCK_N"], vv[1]["num_warps"], vv[1]["num_stages"])
                     for kk, vv in ops._CHOSEN.items()}
            ms = triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=[q, k, v], return_mode="median")
            row = dict(S=S, d=d, rep=rep, retime=retime, tune_s=tune_s, picks=picks, fwdbwd_ms=ms, flex_ms=flex_ms,
                       flex_over_ours=flex_ms / ms)
            rows.append(row); print(json.dumps(row), flush=True)
            json.dump(rows, open(os.path.join(OUT, f"retime_{S}.json"), "w"), indent=1)
for d in dens:
    for retime in (False, True):
        ms = [r["fwdbwd_ms"] for r in rows if r["d"] == d and r["retime"] == retime]
        print(f"SUMMARY d={d} retime={retime}: min {min(ms):.3f} median {statistics.median(ms):.3f} max {max(ms):.3f} "
              f"flex/ours worst {min(r['flex_over_ours'] for r in rows if r['d'] == d and r['retime'] == retime):.3f}")
