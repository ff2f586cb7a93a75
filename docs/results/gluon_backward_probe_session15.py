"""Probe: the Gluon dQ and dK/dV kernels (gluon_backward.py) against the Triton ones and Flex's
backward, per kernel and tile variant, on the issue's shapes (B=1, H=32, Hkv=8, D=128, bf16, causal).

    PYTHONPATH=src python docs/results/gluon_backward_probe_session15.py --out $OUT/probe

For each length and layout: the Triton backward (both kernels, and dQ alone: the dK/dV launch
skipped, so dK/dV = both - dQ), each Gluon dQ / dK/dV variant alone (BLOCK rows or keys, warps,
stages), Flex's backward (gradients of one retained graph), and the errors of each Gluon variant's
gradients against the Triton kernels' on the same inputs.

Archived (session 15): what it timed chose gluon_backward.py's tiles (64x64, 4 warps, 2 stages). Results:
gluon_backward_variants_h100_2026-11-24_session15.json (tiles/warps/stages, before LSE/delta were loaded
compact) and gluon_backward_dkdv_variants_h100_2026-11-24_session15.json (dK/dV with LSE/delta in the score
layout or compact, and with the dK/dV wait deferred: switches of an intermediate kernel, removed once
measured, so this copy times tiles/warps/stages only).
"""
import argparse
import json
import sys

import torch
import triton

from sparse_attn import random_layout, sliding_window_layout
from sparse_attn.backends.flex import _compiled_flex
from sparse_attn.backends.triton import gluon_backward, ops

DQ_VARIANTS = [(64, 4, 2), (64, 4, 3), (128, 8, 2)]  # (BLOCK_M, warps, stages)
DKDV_VARIANTS = [(64, 4, 2), (64, 4, 3), (128, 8, 2)]  # (BLOCK_N, warps, stages)


def bench(fn):
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02])
    parser.add_argument("--out", default="results/probe_gluon_backward")
    args = parser.parse_args()
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    flex = _compiled_flex()
    heads, kv_heads, dim = 32, 8, 128
    scale = dim ** -0.5
    rows = []
    real_launch = ops._launch
    for seq in args.lengths:
        torch.manual_seed(0)
        q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16)
        do = torch.randn_like(q)
        layouts = [(f"random d={d}", random_layout(seq, density=d, num_heads=heads, seed=1, device="cuda"))
                   for d in args.densities]
        layouts.append(("window4096+sink128", sliding_window_layout(seq, window=4096, sink=128, num_heads=1,
                                                                    block_size=128, device="cuda")))
        for name, layout in layouts:
            out, lse = ops.attention_forward(q, k, v, layout, scale)
            row = {"seq": seq, "layout": name, "density": layout.density()}
            ops.GLUON_BACKWARD = False
            ref = ops.attention_backward(do, q, k, v, out, lse, layout, scale)
            row["triton_ms"] = bench(lambda: ops.attention_backward(do, q, k, v, out, lse, layout, scale))
            ops._launch = lambda kind, *a, **kw: None if kind == "dkdv" else real_launch(kind, *a, **kw)
            row["triton_dq_ms"] = bench(lambda: ops.attention_backward(do, q, k, v, out, lse, layout, scale))
            ops._launch = real_launch
            row["triton_dkdv_ms"] = row["triton_ms"] - row["triton_dq_ms"]
            ops.GLUON_BACKWARD = None
            cnt, idx, cnt_st, idx_st, _ = ops._block_lists(layout)
            t_cnt, t_idx, t_st, ti_st, _ = ops._block_lists(layout, kv_major=True)
            delta = None
            for bm, w, st in DQ_VARIANTS:
                key = f"gluon_dq_{bm}x64_w{w}_s{st}"
                try:
                    call = lambda: gluon_backward.gluon_attention_dq(  # noqa: E731
                        q, k, v, out, do, lse, layout, scale, scale * ops.LOG2E, cnt, idx, cnt_st, idx_st,
                        block_m=bm, num_warps=w, stages=st)
                    dq, delta = call()
                    row[key + "_err"] = rel(dq, ref[0])
                    row[key + "_ms"] = bench(call)
                except Exception as exc:
                    row[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            for bn, w, st in DKDV_VARIANTS:
                key = f"gluon_dkdv_64x{bn}_w{w}_s{st}"
                try:
                    call = lambda: gluon_backward.gluon_attention_dkdv(  # noqa: E731
                        q, k, v, do, lse, delta, layout, scale, scale * ops.LOG2E, t_cnt, t_idx, t_st, ti_st,
                        block_n=bn, num_warps=w, stages=st)
                    dk, dv = call()
                    row[key + "_err"] = [rel(dk, ref[1]), rel(dv, ref[2])]
                    row[key + "_ms"] = bench(call)
                except Exception as exc:
                    row[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            row["gluon_default_ms"] = bench(lambda: ops.attention_backward(do, q, k, v, out, lse, layout, scale))
            block_mask = layout.to_flex_block_mask(num_heads=heads)
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            flex_out = flex(qg, kg, vg, block_mask=block_mask, enable_gqa=True)
            row["flex_ms"] = bench(lambda: torch.autograd.grad(flex_out, (qg, kg, vg), do, retain_graph=True))
            del flex_out
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out + ".json", "w") as fh:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "rows": rows}, fh, indent=1)
        torch.cuda.empty_cache()
    print(f"{'seq':>6} {'layout':>20} {'triton':>8} {'t_dq':>7} {'t_dkdv':>7} | "
          + " ".join(f"{'dq' + str(v[0]) + 'w' + str(v[1]) + 's' + str(v[2]):>10}" for v in DQ_VARIANTS) + " | "
          + " ".join(f"{'kv%dw%ds%d' % v:>10}" for v in DKDV_VARIANTS)
          + f" | {'gluon':>8} {'flex':>8} {'flex/gl':>7}")
    for r in rows:
        dq = [r.get(f"gluon_dq_{bm}x64_w{w}_s{st}_ms", float("nan")) for bm, w, st in DQ_VARIANTS]
        kv = [r.get(f"gluon_dkdv_64x{bn}_w{w}_s{st}_ms", float("nan")) for bn, w, st in DKDV_VARIANTS]
        print(f"{r['seq']:>6} {r['layout']:>20} {r['triton_ms']:8.3f} {r['triton_dq_ms']:7.3f} "
              f"{r['triton_dkdv_ms']:7.3f} | " + " ".join(f"{x:10.3f}" for x in dq) + " | "
              + " ".join(f"{x:10.3f}" for x in kv)
              + f" | {r['gluon_default_ms']:8.3f} {r['flex_ms']:8.3f} {r['flex_ms'] / r['gluon_default_ms']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
