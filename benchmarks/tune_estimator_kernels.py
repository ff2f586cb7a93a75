"""Tile / warp variants of the estimator kernels that the dynamic methods spend most time in.

``line_scores`` (last 128 and last 64 rows, 32 heads, GQA 4; vertical-slash and FlexPrefill) with
key tiles of 64 or 128 and 4 or 8 warps; ``block_mean_pool`` (q: 32 heads) with 16-64 rows per step
and 4 or 8 warps; the one-pass ``block_mass`` on XAttention's stride-16 rows (``--kernels``) over
tiles, head-dim chunks, warps and stages; at one length (default 128K), structured bf16 inputs as
in bench_estimators.py. Each variant's output is
checked against the first variant's (max abs difference printed); the fastest is the one to set
as the default in ``sparse_attn.methods.primitives`` (``BLOCK_MASS_TILE_WIDE``, ``LINE_SCORES_BLOCK_N``
/ ``LINE_SCORES_WARPS``, ``MEAN_POOL_ROWS`` / ``MEAN_POOL_WARPS``; each variant is passed to the
wrapper as arguments). Prints a table, writes JSON.

    python benchmarks/tune_estimator_kernels.py --length 131072 --out results/tune_estimators
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from bench_estimators import structured_qk  # noqa: E402

from sparse_attn.methods.primitives.block_mass import BlockMassTile, block_mass  # noqa: E402
from sparse_attn.methods.primitives.line_scores import line_scores  # noqa: E402
from sparse_attn.methods.primitives.mean_pool import block_mean_pool  # noqa: E402
from sparse_attn.methods.xattention import antidiagonal_reshape  # noqa: E402
from sparse_attn.options import KernelOptions  # noqa: E402

TRITON = KernelOptions(estimator_kernels="triton")

BLOCK_MASS_TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) for XAttention's wide rows; the first is the default
    (128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (128, 256, 64, 8, 2), (128, 256, 128, 8, 2), (256, 128, 64, 8, 3),
    (128, 256, 64, 16, 3), (256, 256, 64, 16, 2), (256, 256, 32, 16, 3), (128, 512, 32, 16, 2),
    (64, 128, 64, 8, 3),
]


def tune_block_mass(q, k, bench, stride: int = 16) -> list:
    """XAttention's block_mass (one pass) over BLOCK_MASS_TILES (passed as ``tile``; the default is
    ``BLOCK_MASS_TILE_WIDE``, the tile for rows wider than 128): ms and max abs difference from the first."""
    q_r, k_r = antidiagonal_reshape(q, k, stride)
    block, scale = 128 // stride, 128 ** -0.5 / stride
    rows, first = [], None
    for m, n, d, warps, stages in BLOCK_MASS_TILES:
        config = dict(kernel_options=TRITON, tile=BlockMassTile(m, n, d, warps, stages))
        label = f"{m}x{n} D{d} w{warps} s{stages}"
        try:
            got = block_mass(q_r, k_r, block, block, scale, **config)
            ms = bench(lambda: block_mass(q_r, k_r, block, block, scale, **config))
        except Exception as err:  # out of shared memory or registers: reported, not fatal
            print(f"| block_mass | xattention s{stride} | {label} | failed: {str(err)[:100]} | |", flush=True)
            continue
        first = got if first is None else first
        diff = float((got - first).abs().max())
        rows.append({"kernel": "block_mass", "stride": stride, "tile": [m, n, d, warps, stages], "ms": ms,
                     "max_abs_diff": diff})
        print(f"| block_mass | xattention s{stride} | {label} | {ms:.3f} | {diff:.2e} |", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--kernels", nargs="+", default=["line_scores", "block_mean_pool", "block_mass"],
                        choices=["line_scores", "block_mean_pool", "block_mass"])
    parser.add_argument("--out", default="results/tune_estimators")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_estimator_kernels: no CUDA device; this benchmark could not run.")
        return 1
    import triton

    def bench(fn):
        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    torch.manual_seed(0)
    q, k = structured_qk(32, 8, args.length, 128, "cuda")
    scale = 128 ** -0.5
    rows_out = []
    print("| kernel | rows | variant | ms | max abs diff vs first |\n|---|---|---|---|---|", flush=True)
    for rows in (128, 64) if "line_scores" in args.kernels else ():
        first = None
        for block_n, warps in itertools.product((128, 64), (4, 8)):
            config = dict(kernel_options=TRITON, block_n=block_n, num_warps=warps)
            try:
                got = torch.cat(line_scores(q, k, rows, scale, **config), -1)
                ms = bench(lambda: line_scores(q, k, rows, scale, **config))
            except Exception as err:  # a variant that does not compile or fit is reported, not fatal
                print(f"| line_scores | {rows} | BLOCK_N={block_n} warps={warps} | failed: {str(err)[:120]} | |")
                continue
            first = got if first is None else first
            diff = float((got - first).abs().max())
            rows_out.append({"kernel": "line_scores", "rows": rows, "block_n": block_n, "warps": warps,
                             "ms": ms, "max_abs_diff": diff})
            print(f"| line_scores | {rows} | BLOCK_N={block_n} warps={warps} | {ms:.3f} | {diff:.2e} |", flush=True)
    first = None
    for step, warps in itertools.product((16, 32, 64), (4, 8)) if "block_mean_pool" in args.kernels else ():
        config = dict(kernel_options=TRITON, rows=step, num_warps=warps)
        got = block_mean_pool(q, 128, **config)
        ms = bench(lambda: block_mean_pool(q, 128, **config))
        first = got if first is None else first
        diff = float((got - first).abs().max())
        rows_out.append({"kernel": "block_mean_pool", "rows_per_step": step, "warps": warps, "ms": ms,
                         "max_abs_diff": diff})
        print(f"| block_mean_pool | - | ROWS={step} warps={warps} | {ms:.3f} | {diff:.2e} |", flush=True)
    if "block_mass" in args.kernels:
        rows_out += tune_block_mass(q, k, bench)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "length": args.length, "date": datetime.date.today().isoformat()}
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows_out}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
