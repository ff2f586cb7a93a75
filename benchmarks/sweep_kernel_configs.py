"""Time every tile config of one of our Triton kernels, one config at a time.

The autotuner picks among a fixed space per kernel (``autotune._configs``); this sweep pins each config
of a wider grid in turn (``autotune.set_kernel_configs``) and times it on the benchmark's inputs (B=1,
bf16, causal, random per-head layouts with the diagonal kept), so one can see whether the built-in
space holds the best config for a GPU, how far the others are, and which ones spill registers.
"fwd" times the forward; "dq" and "dkdv" time the whole backward with the other backward kernel
left to its usual tuning (so differences between rows are the swept kernel's).

    python benchmarks/sweep_kernel_configs.py --kinds dkdv dq --length 32768 --densities 0.2 0.05

Prints one table per kind and density (fastest first; the built-in tuner's pick is marked) and
writes ``<out>.json``. Configs the GPU cannot run (shared memory) are listed as such.

``--sustain SECONDS --sustain-top N`` re-times the N fastest configs (and the tuner's pick) back to
back for SECONDS each, with joules per call and the mean SM clock (benchmarks/gpu_power.py): the
sweep's short timings run at full clock, a long run at the power cap's lower one.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(__file__))

import gpu_power  # noqa: E402

from sparse_attn import random_layout  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x

GRID = {"BLOCK_M": (32, 64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)}


def sweep_grid(block: int):
    """The configs swept: tiles dividing the block, and no 128x128 tile on 4 warps (it spills
    hundreds of registers in every kernel)."""
    for m, n, w, s in itertools.product(*GRID.values()):
        if block % m or block % n or (m * n > 8192 and w == 4):
            continue
        yield (m, n, w, s)


def compiled_registers(autotune, kind: str):
    """(registers, spills) of the kernel ``kind`` compiled last, if the fast launcher holds it."""
    kernels = [entry[0] for key, entry in autotune._COMPILED.items() if key[0] == kind]
    if not kernels:
        return None, None
    return getattr(kernels[-1], "n_regs", None), getattr(kernels[-1], "n_spills", None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["dkdv", "dq"], choices=["fwd", "dq", "dkdv"])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.05])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                        help="re-time the fastest configs back to back for this long each (power-capped clocks)")
    parser.add_argument("--sustain-top", type=int, default=4, metavar="N",
                        help="how many of the fastest configs --sustain re-times (the tuner's pick is added)")
    parser.add_argument("--out", default="results/kernel_configs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernel_configs: no CUDA device; this benchmark could not run.")
        return 1
    import triton

    from sparse_attn import KernelOptions
    from sparse_attn.backends.triton import autotune, ops

    options = KernelOptions(forward="triton", backward="triton")  # the Triton kernels, whose configs are swept

    torch.manual_seed(0)
    shape_q = (1, args.heads, args.length, args.dim)
    shape_kv = (1, args.kv_heads, args.length, args.dim)
    q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn_like(q)
    scale = args.dim ** -0.5
    rows = []
    reader = gpu_power.nvml_reader(torch.cuda.current_device()) if args.sustain else None
    for density in args.densities:
        layout = random_layout(args.length, density=density, num_heads=args.heads, block_size=args.block,
                               seed=1, device="cuda")
        out, lse = ops.attention_forward(q, k, v, layout, scale, None, None, 1, "triton", options)
        forward = lambda: ops.attention_forward(q, k, v, layout, scale, None, None, 1, "triton", options)  # noqa: E731
        backward = lambda: ops.attention_backward(grad, q, k, v, out, lse, layout, scale, None, None, 1,  # noqa: E731
                                                  options)
        for kind in args.kinds:
            run = forward if kind == "fwd" else backward
            run()  # the built-in space's pick, for the mark in the table
            picked = next((tiles | {k2: v2 for k2, v2 in opts.items() if k2 in ("num_warps", "num_stages")}
                           for key, (tiles, opts) in autotune._CHOSEN.items() if key[0] == kind), None)
            table = []
            try:
                for config in tqdm(list(sweep_grid(args.block)), desc=f"{kind} d={density}"):
                    autotune.set_kernel_configs(kind, [config])
                    row = {"kind": kind, "density": layout.density(), "config": config}
                    try:
                        run()
                        torch.cuda.synchronize()
                        row["ms"] = float(triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median"))
                        row["registers"], row["spills"] = compiled_registers(autotune, kind)
                    except Exception as exc:  # out of shared memory and the like: reported, not fatal
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    table.append(row)
                for row in table:
                    m, n, w, s = row["config"]
                    row["built_in_pick"] = picked == {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
                timed = sorted((r for r in table if "ms" in r), key=lambda r: r["ms"])
                if args.sustain:
                    chosen = timed[:args.sustain_top] + [r for r in timed[args.sustain_top:] if r["built_in_pick"]]
                    for row in tqdm(chosen, desc=f"{kind} d={density} sustained"):
                        autotune.set_kernel_configs(kind, [row["config"]])
                        row["sustained"] = gpu_power.sustained(run, args.sustain, reader, torch.cuda.synchronize)
            finally:
                autotune.set_kernel_configs(kind, None)
            rows += table
            what = "forward" if kind == "fwd" else "backward"
            print(f"\n{kind} at S={args.length}, density {layout.density():.3f} ({what} ms; * = built-in tuner's pick)")
            print(f"| BLOCK_M | BLOCK_N | warps | stages | {what} ms | vs fastest | registers | spills |")
            print("|---|---|---|---|---|---|---|---|")
            for r in timed:
                mark = " *" if r["built_in_pick"] else ""
                print(f"| {r['config'][0]} | {r['config'][1]} | {r['config'][2]} | {r['config'][3]}{mark} | "
                      f"{r['ms']:.3f} | {r['ms'] / timed[0]['ms']:.3f} | {r['registers']} | {r['spills']} |")
            if args.sustain:
                print(f"\nsustained for {args.sustain:g} s each ({what} ms per call, joules per call, mean SM MHz)")
                print("| BLOCK_M | BLOCK_N | warps | stages | sustained ms | J | SM MHz |")
                print("|---|---|---|---|---|---|---|")
                for r in sorted((r for r in timed if "sustained" in r), key=lambda r: r["sustained"]["ms"]):
                    sus = r["sustained"]
                    print(f"| {' | '.join(map(str, r['config']))}{' *' if r['built_in_pick'] else ''} | "
                          f"{sus['ms']:.3f} | {sus.get('joules', float('nan')):.3f} | "
                          f"{sus.get('sm_mhz') or float('nan'):.0f} |")
            for r in table:
                if "error" in r:
                    print(f"| {' | '.join(map(str, r['config']))} | could not run: {r['error'][:60]} |")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), **{key: value for key, value in vars(args).items()}}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
