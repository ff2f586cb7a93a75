"""Where a block-sparse attention call's time goes: GPU kernels vs wall time, ours and Flex.

Same inputs as ``bench_attention.py`` (B=1, bf16, causal, random per-head layouts with the
diagonal kept). For each density and mode (forward, forward+backward): the CUDA time of the
kernels per call (torch.profiler), the wall time per call with back-to-back calls (what a timer
sees when the host cannot keep the GPU busy), the host time per call while the GPU is kept busy
(Python, launches and autograd alone), and the kernels taking most of it. When wall time is well
above kernel time the call is host-bound (Python checks, launch latency), not kernel-bound. The
"floor" rows are an ``autograd.Function`` with our saved tensors and no kernels: what autograd
itself costs the host per call.

    python benchmarks/profile_attention.py --length 8192 --densities 0.2 0.05 0.02
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from profile_estimators import kernel_breakdown  # noqa: E402

from sparse_attn import random_layout, sparse_attention  # noqa: E402
from sparse_attn.backends.flex import _compiled_flex  # noqa: E402


def wall_ms(fn, calls: int) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls, synchronized at both ends."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def host_ms(fn, calls: int) -> float:
    """Median host milliseconds per call while the GPU is busy with a long spin queued ahead, so
    the host never waits for it: what the Python, the launches and autograd cost by themselves."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # roughly half a second of GPU spin ahead of the calls
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


class NoKernelAttention(torch.autograd.Function):
    """The host floor of any ``autograd.Function`` attention: the same saved tensors and outputs as
    ours (out, and a non-differentiable LSE), buffers from ``empty_like``, no kernels. Its host time
    is what autograd itself costs per call, which no kernel or launch change can remove."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.05, 0.02])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", default="results/attention_profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_attention: no CUDA device; this benchmark could not run.")
        return 1
    torch.manual_seed(0)
    shape_q, shape_kv = (1, args.heads, args.length, args.dim), (1, args.kv_heads, args.length, args.dim)
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for s in (shape_q, shape_kv, shape_kv))
    grad = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    flex = _compiled_flex()
    rows = []
    for density in args.densities:
        layout = random_layout(args.length, density=density, num_heads=args.heads, block_size=args.block,
                               seed=1, device="cuda")
        block_mask = layout.to_flex_block_mask(num_heads=args.heads)
        impls = {"ours": lambda: sparse_attention(q, k, v, layout),
                 "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
                 "floor": lambda: NoKernelAttention.apply(q, k, v)[0]}
        for name, run in impls.items():
            for mode in ("fwd", "fwdbwd"):
                if mode == "fwd":
                    def call(run=run):
                        with torch.no_grad():
                            run()
                else:
                    def call(run=run):
                        run().backward(grad)
                        q.grad = k.grad = v.grad = None
                prof = kernel_breakdown(call, args.calls, args.top)
                row = {"density": layout.density(), "impl": name, "mode": mode,
                       "wall_ms": wall_ms(call, args.calls), "host_ms": host_ms(call, args.calls), **prof}
                rows.append(row)
                print(f"d={row['density']:.3f} {name:5s} {mode:6s} wall {row['wall_ms']:.3f} ms  "
                      f"host {row['host_ms']:.3f} ms  kernels {row['cuda_ms_per_call']:.3f} ms  top: "
                      + "; ".join(f"{kern['name'][:40]} {kern['ms_per_estimate']:.3f}" for kern in row["kernels"]),
                      flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length,
            "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, "block": args.block,
            "date": datetime.date.today().isoformat()}
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
