# Archived scratch probe (session 13, commit f0d8720 code). Ran on an H100 from the repo root with
# forward_warp_specialized_kernel_session13.py copied to .base_src/ws_kernel.py:
#   python .base_src/ws_probe.py 32768 1.0,0.2,0.05,0.02 128x64x4x2,128x64x4x3,128x128x4x2,64x64x4x2
# Raw output: forward_warp_specialized_rejected_h100_2026-11-24_session13.json
"""Probe: Hopper auto-warp-specialized forward vs the current forward vs Flex, same inputs."""
import sys, json, os, time
import torch, triton
sys.path.insert(0, "src"); sys.path.insert(0, ".base_src")
from sparse_attn import random_layout
from sparse_attn.backends.triton import ops
from sparse_attn.backends.flex import _compiled_flex
import ws_kernel
OUT = os.environ.get("OUT", ".")
lengths = [int(x) for x in sys.argv[1].split(",")]
dens = [float(x) for x in sys.argv[2].split(",")]
variants = [tuple(int(v) for v in c.split("x")) for c in sys.argv[3].split(",")]  # BMxBNxWxS
flex = _compiled_flex()
rows = []

def ws_forward(q, k, v, layout, scale, cfg):
    bm, bn, w, st = cfg
    batch, heads, _, dim = q.shape
    lse = torch.empty(batch, heads, q.shape[2], device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    cnt, idx, cnt_strides, idx_strides, width = ops._block_lists(layout)
    ops._use_tma(None, k, v)
    dummy = ops._dummy(q.device)
    grid = (triton.cdiv(layout.num_q_blocks * layout.q_block, bm), batch * heads)
    ws_kernel._fwd_ws_kernel[grid](q, k, v, out, lse, cnt, idx, dummy, dummy,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], lse.stride(0), lse.stride(1),
        *cnt_strides, *idx_strides, layout.q_len, layout.kv_len, scale * ops.LOG2E, width,
        H=heads, GROUP=heads // k.shape[1], LAYOUT_HDIV=heads // layout.heads, HEAD_DIM=dim,
        Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block, BLOCK_M=bm, BLOCK_N=bn,
        CAUSAL=layout.causal, VARLEN=False, UPCAST=False, TMA=True, num_warps=w, num_stages=st)
    return out, lse

for S in lengths:
    torch.manual_seed(0)
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
    scale = 128 ** -0.5
    for d in dens:
        layout = random_layout(S, density=d, num_heads=32, block_size=128, seed=1, device="cuda")
        bm = layout.to_flex_block_mask(num_heads=32)
        o_ref, l_ref = ops.attention_forward(q, k, v, layout, scale, batch=1)
        ours = triton.testing.do_bench(lambda: ops.attention_forward(q, k, v, layout, scale, batch=1), warmup=30, rep=200, return_mode="median")
        fl = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), warmup=30, rep=200, return_mode="median")
        pick = {kk[0]: vv[1] for kk, vv in ops._CHOSEN.items() if kk[0] == "fwd"}
        base = dict(S=S, d=d, density=float(layout.density()) if hasattr(layout, "density") else d, ours_ms=ours, flex_ms=fl)
        print(json.dumps({**base, "ours_pick": str(pick)}), flush=True)
        for cfg in variants:
            try:
                t0 = time.time()
                o, l = ws_forward(q, k, v, layout, scale, cfg); torch.cuda.synchronize()
                comp = time.time() - t0
                err_o = (o.float() - o_ref.float()).abs().max().item()
                err_l = (l - l_ref).abs().max().item()
                ms = triton.testing.do_bench(lambda: ws_forward(q, k, v, layout, scale, cfg), warmup=30, rep=200, return_mode="median")
                row = dict(base, cfg="x".join(map(str, cfg)), ws_ms=ms, ours_over_ws=ours / ms, flex_over_ws=fl / ms,
                           err_o=err_o, err_lse=err_l, first_call_s=comp)
            except Exception as e:
                row = dict(base, cfg="x".join(map(str, cfg)), error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row); print(json.dumps(row), flush=True)
            json.dump(rows, open(os.path.join(OUT, "ws_probe.json"), "w"), indent=1)
