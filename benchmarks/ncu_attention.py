"""Hardware counters for one forward and one backward of ours and of FlexAttention, same inputs.

Timings say which kernel is slower; counters say why (tensor-pipe busy, stalls, occupancy, L2 hits).
The script warms both implementations up (autotuning, compilation), then brackets exactly one
forward and one backward of each with ``cudaProfilerStart``/``Stop``, so Nsight Compute started
with ``--profile-from-start off`` profiles only those kernels:

    ncu --profile-from-start off --clock-control none --set full -o $OUT/attn32k \\
        python benchmarks/ncu_attention.py --length 32768 --density 0.1
    ncu --import $OUT/attn32k.ncu-rep --page raw --csv > attn32k_raw.csv
    python benchmarks/ncu_attention.py --summarize attn32k_raw.csv

``--summarize`` prints, per kernel, the duration, throughputs, occupancy, registers and the largest
warp-stall reasons from ncu's raw CSV page (no GPU needed). Same shapes as ``bench_attention.py``:
B=1, bf16, causal, random per-head layouts with the diagonal kept.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sparse_attn import random_layout, sparse_attention  # noqa: E402
from sparse_attn.backends.flex import _compiled_flex  # noqa: E402

# Raw-page metric names and the short labels the summary prints them under.
SUMMARY_METRICS = {
    "gpu__time_duration.sum": "ms",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "gmma %",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "hmma %",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem %",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "lts__t_sector_hit_rate.pct": "L2 hit %",
    "launch__registers_per_thread": "regs",
    "launch__block_size": "threads",
    "launch__grid_size": "blocks",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue %",
    "launch__shared_mem_per_block_dynamic": "smem B",
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def summarize(path: str, top: int = 6) -> str:
    """Compact per-kernel table from ``ncu --page raw --csv`` output (a ``.gz`` file too)."""
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], [r for r in rows[1:] if r and r[0].strip().isdigit()]  # row 2 holds units
    units = dict(zip(header, rows[1]))
    lines = []
    for row in body:
        values = dict(zip(header, row))
        name = values.get("Kernel Name", "?")
        lines.append(f"== {name[:90]}")
        parts = []
        for metric, label in SUMMARY_METRICS.items():
            if metric in values and values[metric] not in ("", "n/a"):
                value = values[metric]
                if metric == "gpu__time_duration.sum":
                    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(units.get(metric), 1.0)
                    value = f"{float(value.replace(',', '')) * scale:.3f}"
                parts.append(f"{label}={value}")
        lines.append("   " + "  ".join(parts))
        stalls = []
        for metric, value in values.items():
            if metric.startswith(STALL_PREFIX) and metric.endswith(STALL_SUFFIX) and "_not_issued" not in metric:
                try:
                    stalls.append((float(value.replace(",", "")), metric[len(STALL_PREFIX):-len(STALL_SUFFIX)]))
                except ValueError:
                    continue
        stalls.sort(reverse=True)
        lines.append("   stalls (warps per issue): " + ", ".join(f"{n}={v:.2f}" for v, n in stalls[:top]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--summarize", metavar="RAW_CSV", help="print a summary of ncu's raw CSV page and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not torch.cuda.is_available():
        print("ncu_attention: no CUDA device; nothing to profile.")
        return 1
    torch.manual_seed(0)
    q = torch.randn(1, args.heads, args.length, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, args.kv_heads, args.length, args.dim, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    layout = random_layout(args.length, density=args.density, num_heads=args.heads, block_size=args.block,
                           seed=1, device="cuda")
    block_mask = layout.to_flex_block_mask(num_heads=args.heads)
    flex = _compiled_flex()
    runs = {
        "ours": lambda: sparse_attention(q, k, v, layout),
        "flex": lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True),
    }
    grad = torch.randn_like(q)
    for _ in range(3):  # autotune and compile outside the profiled range
        for run in runs.values():
            torch.autograd.grad(run(), (q, k, v), grad)
    torch.cuda.synchronize()
    for name, run in runs.items():
        print(f"profiling {name}: length {args.length}, density {layout.density():.3f}", flush=True)
        torch.cuda.cudart().cudaProfilerStart()
        out = run()
        torch.autograd.grad(out, (q, k, v), grad)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
