# Archived scratch probe (session 13, commit f0d8720 code). Ran on an H100 from the repo root with a copy
# of src/ (the variant: dkdv_split_loops_rejected_session13.diff applied) in .base_src/src_split:
#   python .base_src/dkdv_variant_probe.py .base_src/src_split 32768 1.0,0.2,0.05 64x64x4x1,64x64x4x2,32x64x4x2 3
# Raw output: dkdv_split_loops_rejected_h100_2026-11-24_session13.json
"""A/B of a dK/dV kernel variant (another src tree) against the current one: backward ms with each
dK/dV config pinned, interleaved rounds, same inputs; plus gradient agreement."""
import sys, json, os, statistics, importlib.util
import torch, triton
sys.path.insert(0, "src")
from sparse_attn import random_layout
from sparse_attn.backends.triton import ops as ops_main
OUT = os.environ.get("OUT", ".")
variant_dir, S = sys.argv[1], int(sys.argv[2])
dens = [float(x) for x in sys.argv[3].split(",")]
cfgs = [tuple(int(v) for v in c.split("x")) for c in sys.argv[4].split(",")]
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
root = os.path.join(os.path.abspath(variant_dir), "sparse_attn")
spec = importlib.util.spec_from_file_location("sparse_attn_variant", os.path.join(root, "__init__.py"), submodule_search_locations=[root])
variant = importlib.util.module_from_spec(spec); sys.modules["sparse_attn_variant"] = variant; spec.loader.exec_module(variant)
from sparse_attn_variant.backends.triton import ops as ops_var
torch.manual_seed(0)
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
do = torch.randn_like(q)
scale = 128 ** -0.5
rows = []
for d in dens:
    layout = random_layout(S, density=d, num_heads=32, block_size=128, seed=1, device="cuda")
    vlayout = variant.BlockSparseLayout(layout.kv_num_blocks, layout.kv_indices, layout.q_len, layout.kv_len,
                                        layout.q_block, layout.kv_block, layout.causal)
    out, lse = ops_main.attention_forward(q, k, v, layout, scale, batch=1)
    ops_main.set_kernel_configs("dq", None); ops_main.attention_backward(do, q, k, v, out, lse, layout, scale, batch=1)
    dq_pick = [v_[1] for k_, v_ in ops_main._CHOSEN.items() if k_[0] == "dq"][0]
    dq_cfg = [(dq_pick["BLOCK_M"], dq_pick["BLOCK_N"], dq_pick["num_warps"], dq_pick["num_stages"])]
    for o in (ops_main, ops_var):
        o.set_kernel_configs("dq", dq_cfg)
    for cfg in cfgs:
        for o in (ops_main, ops_var):
            o.set_kernel_configs("dkdv", [cfg])
        fm = lambda: ops_main.attention_backward(do, q, k, v, out, lse, layout, scale, batch=1)
        fv = lambda: ops_var.attention_backward(do, q, k, v, out, lse, vlayout, scale, batch=1)
        gm, gv = fm(), fv()
        err = max((a.float() - b.float()).abs().max().item() for a, b in zip(gm, gv))
        tm, tv = [], []
        for r in range(rounds):
            tm.append(triton.testing.do_bench(fm, warmup=20, rep=250, return_mode="median"))
            tv.append(triton.testing.do_bench(fv, warmup=20, rep=250, return_mode="median"))
        row = dict(S=S, d=d, dkdv=cfg, dq=dq_cfg[0], main_ms=statistics.median(tm), variant_ms=statistics.median(tv),
                   main_over_variant=statistics.median(tm) / statistics.median(tv), max_grad_diff=err, main_all=tm, variant_all=tv)
        rows.append(row); print(json.dumps(row), flush=True)
        json.dump(rows, open(os.path.join(OUT, f"dkdv_variant_{S}.json"), "w"), indent=1)
for d in dens:
    best_m = min(r["main_ms"] for r in rows if r["d"] == d); best_v = min(r["variant_ms"] for r in rows if r["d"] == d)
    print(f"SUMMARY S={S} d={d}: best main {best_m:.3f} ms, best variant {best_v:.3f} ms, main/variant {best_m / best_v:.3f}")
