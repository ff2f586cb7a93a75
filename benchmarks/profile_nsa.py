"""Where NSA's GPU time goes: the kernels of one :class:`sparse_attn.nsa.NSAAttention` forward and
forward+backward (default :class:`~sparse_attn.nsa.NSAConfig`, bf16, batch 1, H=32, D=128) with
their device time from the PyTorch profiler, at each (length, KV heads); then the selection
kernel's device time at each tuning choice (query tokens per program, warps, pipelining stages) and
the share of its selection equal to the default choice's (tile shapes change the order of float32
sums, so near-equal importances may rank apart).

    python benchmarks/profile_nsa.py --lengths 32768 65536 --kv-heads 8 --out results/nsa_profile

Prints tables and writes ``<out>.json``; needs a CUDA GPU (exits with status 2 without one).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from profile_estimators import kernel_breakdown  # noqa: E402

TOP_KERNELS = 14


def breakdown(fn, calls: int = 3) -> dict:
    result = kernel_breakdown(fn, calls, TOP_KERNELS)
    return {"cuda_ms": round(result["cuda_ms_per_call"], 3),
            "kernels": [(k["name"][:70], round(k["ms_per_estimate"], 3), k["calls_per_estimate"])
                        for k in result["kernels"]]}


def selection_variants(module, q, k, v, config, scale, args) -> dict:
    """Device ms of the selection kernel by ``"<block_m> tokens, <warps> warps, <stages> stages"``."""
    from sparse_attn.nsa.compressed import _phase_attention
    from sparse_attn.nsa.reference import compress_kv
    from sparse_attn.nsa.selection_kernels import triton_select_blocks

    params = {name: p.to(q.dtype) for name, p in module.nsa_params().items()}
    with torch.no_grad():
        kc = compress_kv(k, params, "k", config)
        vc = compress_kv(v, params, "v", config)
        _, lse = _phase_attention(q, kc, vc, k.shape[2], config, scale, "auto", None)
        want = triton_select_blocks(q, kc, lse, config, k.shape[2], scale)
        out = {}
        for block_m, warps, stages in itertools.product(args.block_m, args.warps, args.stages):
            name = f"{block_m} tokens, {warps} warps, {stages} stages"
            try:
                def run(block_m=block_m, warps=warps, stages=stages):
                    return triton_select_blocks(q, kc, lse, config, k.shape[2], scale, block_m=block_m,
                                                num_warps=warps, num_stages=stages)
                same = float((run() == want).float().mean())
                out[name] = {"ms": round(kernel_breakdown(run, 3, 2)["cuda_ms_per_call"], 3), "same_blocks": same}
            except Exception as exc:  # noqa: BLE001 - reported in the row
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8])
    parser.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out", default="results/nsa_profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_nsa.py needs a CUDA GPU: none is visible, nothing was measured", file=sys.stderr)
        return 2
    import triton

    from sparse_attn.nsa import NSAAttention, NSAConfig

    heads, dim = 32, 128
    config = NSAConfig()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "argv": sys.argv[1:]}
    rows = []
    for seq, kv_heads in itertools.product(args.lengths, args.kv_heads):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, h, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        module = NSAAttention(config, heads, kv_heads, dim).cuda()
        grad = torch.randn_like(q)

        def forward():
            with torch.no_grad():
                module(q, k, v)

        def forward_backward():
            module(q, k, v).backward(grad)

        row = {"seq": seq, "kv_heads": kv_heads, "fwd": breakdown(forward), "fwdbwd": breakdown(forward_backward)}
        row["selection_kernel"] = selection_variants(module, q.detach(), k.detach(), v.detach(), config,
                                                     1 / math.sqrt(dim), args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        q = k = v = module = None
        torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            print(f"\nS {r['seq']}, Hkv {r['kv_heads']}, {mode}: {r[mode]['cuda_ms']} ms of GPU time")
            print("| kernel | ms | calls |\n|---|---|---|")
            for name, ms, calls in r[mode]["kernels"]:
                print(f"| {name} | {ms} | {calls:g} |")
        print("| selection kernel | ms | share of blocks as the default's |\n|---|---|---|")
        for name, entry in r["selection_kernel"].items():
            print(f"| {name} | {entry.get('ms', entry.get('error'))} | {entry.get('same_blocks', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
