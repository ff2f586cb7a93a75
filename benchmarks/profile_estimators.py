"""Where each estimator's time goes: the top GPU kernels of ``method.estimate`` under torch.profiler.

Same inputs as ``bench_estimators.py`` (structured q/k, B=1, bf16; by default H=32, Hkv=8,
D=128, 128-token blocks; ``--heads 6 --kv-heads 2 --dim 64 --block-size 64`` is one layer of the
canary as the evaluation harness runs it). For each method: total CUDA time and wall time per call,
and the kernels taking most of it (name, calls per estimate, ms per estimate, share). Prints a
table per method and writes JSON.

    python benchmarks/profile_estimators.py --length 131072 --methods vertical_slash flexprefill
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from bench_estimators import METHODS, structured_qk  # noqa: E402

from sparse_attn import get_method  # noqa: E402
from sparse_attn.options import ESTIMATOR_KERNEL_CHOICES, KernelOptions  # noqa: E402


def kernel_breakdown(fn, calls: int, top: int) -> dict:
    """Run ``fn`` ``calls`` times under the profiler; per-call CUDA time and its ``top`` kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        entry = kernels.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us() / 1000.0  # a kernel event spans its GPU run; us -> ms
    total = sum(ms for _, ms in kernels.values()) / calls
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    return {"cuda_ms_per_call": total,
            "kernels": [{"name": name[:110], "calls_per_estimate": n / calls, "ms_per_estimate": ms / calls,
                         "share": ms / calls / max(total, 1e-9)} for name, (n, ms) in ranked]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--methods", nargs="+", default=["vertical_slash", "flexprefill", "xattention_s16",
                                                         "pooled_topp"])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--estimator-kernels", choices=ESTIMATOR_KERNEL_CHOICES, default="auto",
                        help="KernelOptions.estimator_kernels of every estimate")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--host", action="store_true",
                        help="also print the host-side (CPU) operators taking most time per estimate")
    parser.add_argument("--out", default="results/estimator_profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_estimators: no CUDA device; this benchmark could not run.")
        return 1
    torch.manual_seed(0)
    q, k = structured_qk(args.heads, args.kv_heads, args.length, args.dim, "cuda")
    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "length": args.length,
                       "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim,
                       "block_size": args.block_size, "estimator_kernels": args.estimator_kernels,
                       "date": datetime.date.today().isoformat()}, "methods": {}}
    options = KernelOptions(estimator_kernels=args.estimator_kernels)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for label in args.methods:
        name, knobs = METHODS[label]
        method = get_method(name, **knobs, measure_cost=False, block_size=args.block_size)
        profile_row = kernel_breakdown(lambda: method.estimate(q, k, kernel_options=options), args.calls, args.top)
        result["methods"][label] = profile_row
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            method.estimate(q, k, kernel_options=options)
        torch.cuda.synchronize()
        profile_row["wall_ms_per_call"] = (time.perf_counter() - start) * 1000 / args.calls
        print(f"\n## {label} at {args.length}: {profile_row['cuda_ms_per_call']:.2f} ms of GPU kernels, "
              f"{profile_row['wall_ms_per_call']:.2f} ms wall per estimate\n")
        if args.host:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=True) as prof:
                for _ in range(args.calls):
                    method.estimate(q, k, kernel_options=options)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
            for event in sorted(prof.key_averages(group_by_stack_n=4), key=lambda e: -e.self_cpu_time_total)[:6]:
                print(f"{event.key} {event.self_cpu_time_total / args.calls:.0f} us/estimate, "
                      f"shapes {event.input_shapes}:\n    " + "\n    ".join(event.stack or []))
        print("| kernel | calls | ms | share |\n|---|---|---|---|")
        for row in profile_row["kernels"]:
            print(f"| {row['name']} | {row['calls_per_estimate']:.0f} | {row['ms_per_estimate']:.2f} | "
                  f"{row['share']:.2f} |", flush=True)
        with open(args.out + ".json", "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
