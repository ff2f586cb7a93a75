"""Probe (session 16): the Gluon forward on 64-row query blocks (4 warps per program) against the
Triton forward on the same layouts; tile variants (keys per tile, stages).
Run from the repository root on a GPU: `PYTHONPATH=src python docs/results/gluon_forward_64row_probe_session16.py`
(writes $OUT/fwd64.json).
"""
import json
import os

import torch
import triton

from sparse_attn import random_layout
from sparse_attn.backends.triton import gluon_forward as gf, ops

OUT = os.environ.get("OUT", "/tmp")
heads, kv_heads, dim = 32, 8, 128
bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))  # noqa: E731
res = []
for seq, d in ((32768, 0.2), (32768, 0.1), (32768, 0.02), (8192, 0.1), (131072, 0.05)):
    torch.manual_seed(0)
    q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
    scale = dim ** -0.5
    for block in (64, 128):
        layout = random_layout(seq, density=d, num_heads=heads, block_size=block, seed=1, device="cuda")
        cnt, idx, cs, ids, _ = ops._block_lists(layout)
        row = {"seq": seq, "density": d, "block": block}
        ops.GLUON_FORWARD = False
        ref_out, _ = ops.attention_forward(q, k, v, layout, scale)
        row["triton_ms"] = bench(lambda: ops.attention_forward(q, k, v, layout, scale))
        ops.GLUON_FORWARD = None
        variants = [(64, 2), (64, 3), (32, 2), (32, 3)] if block == 64 else [(64, 2)]
        for bn, st in variants:
            def run(bn=bn, st=st):
                return gf.gluon_attention_forward(q, k, v, layout, scale * ops.LOG2E, cnt, idx, cs, ids,
                                                  launch=ops._launch_gluon, block_n=bn, stages=st)
            try:
                out, _ = run()
                err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
                row[f"gluon_n{bn}_s{st}_ms"] = bench(run)
                row[f"gluon_n{bn}_s{st}_err"] = err
            except Exception as exc:
                row[f"gluon_n{bn}_s{st}_ms"] = repr(exc)[:120]
        res.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
json.dump(res, open(f"{OUT}/fwd64.json", "w"), indent=1)
