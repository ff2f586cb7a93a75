"""Session-14 probe (archived): does the Triton forward get the Gluon probe's gain from 8 warps at
128x64 tiles? (No: 8 warps made it slower.) Run from the repository root on an H100:
    PYTHONPATH=src python docs/results/triton_forward_8warps_probe_session14.py
Results: triton_forward_8warps_h100_2026-11-24_session14.json."""
import sys, json, os
import torch, triton
sys.path.insert(0, "src"); sys.path.insert(0, "docs/results")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.triton import ops
from gluon_forward_probe_session14 import gluon_forward
res = []
for S, dens in ((32768, 0.1), (32768, 0.02), (131072, 0.1), (131072, 0.02)):
    torch.manual_seed(0)
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layout = random_layout(S, density=dens, num_heads=32, block_size=128, seed=1, device="cuda")
    row = {"S": S, "density": dens}
    with torch.no_grad():
        for name, cfg in (("tuned", None), ("128x64x8x2", (128, 64, 8, 2)), ("128x64x8x3", (128, 64, 8, 3)),
                          ("128x128x8x2", (128, 128, 8, 2)), ("128x64x4x2", (128, 64, 4, 2))):
            ops.set_kernel_configs("fwd", None if cfg is None else [cfg])
            fn = lambda: sparse_attention(q, k, v, layout, backend="triton")
            fn()
            row[name] = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        ops.set_kernel_configs("fwd", None)
        row["gluon_m128_n64_sync_s2"] = triton.testing.do_bench(
            lambda: gluon_forward(q, k, v, layout, 64, False, 2, 128), warmup=25, rep=200, return_mode="median")
        row["gluon_again_tuned_triton"] = triton.testing.do_bench(
            lambda: sparse_attention(q, k, v, layout, backend="triton"), warmup=25, rep=200, return_mode="median")
    print(S, dens, {k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    res.append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "triton_fwd8w_probe.json"), "w"), indent=1)
