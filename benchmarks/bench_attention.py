"""Block-sparse attention speed: ours (Triton / Gluon kernels) vs FlexAttention (same BlockMask) vs dense SDPA.

One run times, on identical inputs and layouts: our GPU kernels, FlexAttention with the layout's
BlockMask, and dense causal SDPA with the flash and cuDNN backends; forward, backward alone
(``--modes bwd``: gradients of a retained graph) and forward+backward. Every sparse configuration
is first checked against Flex's output (and gradients at the first length); a failed check is
reported and no speed-up is claimed for it.

    python benchmarks/bench_attention.py --lengths 8192 32768 131072 --out results/attention
    python benchmarks/bench_attention.py --lengths 32768 --baseline-src ../old/src  # A/B two checkouts
    python benchmarks/bench_attention.py --lengths 32768 --modes fwd bwd fwdbwd --rounds 5

``--rounds N`` times ours and Flex N times each, alternating, and reports medians and the range of
the per-round Flex/ours ratios: on an H100 one row's ratio moved by 5-10% between runs (clock and
tuning noise), which single timings cannot show.

``--sustain SECONDS`` also runs ours and Flex back to back for that long each (ours, Flex, Flex,
ours) and reports time per call, joules per call and the mean SM clock: over seconds an H100 hits
its power cap and slows its clock, so the kernel that spends less energy per call wins there.

``--cuda-graphs`` times CUDA-graph replays of each call instead (ours and Flex alike): rows that
are host-bound in eager mode (8K at low density) then show what the kernels take.

``--baseline-src`` loads a second copy of the library (another checkout's ``src``) and times its
Triton kernels on the same inputs and layouts, for before/after comparisons in one run. The chosen
autotune configs of each kernel are saved with the results.

Prints a table and writes ``<out>.json`` (and ``<out>.md``) with device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

sys.path.insert(0, os.path.dirname(__file__))

import gpu_power  # noqa: E402

from sparse_attn import random_layout, sliding_window_layout, sparse_attention  # noqa: E402
from sparse_attn.backends.flex import _compiled_flex  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x


def bench(fn) -> float:
    """Median milliseconds of ``fn`` via CUDA-event timing (triton.testing.do_bench)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def ceilings() -> dict:
    """Measured bf16 matmul rate and device-to-device copy bandwidth: the two roofs."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    src = torch.randn(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * 8192 ** 3 / ms / 1e9, "copy_gbs": 2 * src.numel() * 4 / copy_ms / 1e6}


def kept_flops(layout, heads, dim, batch=1) -> float:
    """Forward FLOPs over kept blocks (two matmuls of q_block x kv_block x dim per kept block)."""
    kept = float(layout.kept_blocks().sum()) * (heads // layout.heads) * (batch // layout.batch)
    return kept * 4 * layout.q_block * layout.kv_block * dim


def sdpa_fn(q, k, v, backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1).detach(), v.repeat_interleave(group, 1).detach()
    kr.requires_grad_(k.requires_grad)
    vr.requires_grad_(v.requires_grad)

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    return run, (kr, vr)


MODES = ("fwd", "bwd", "fwdbwd")
# Matmul FLOPs of each mode relative to the forward's (the backward recomputes scores and runs
# dV, dP, dQ and dK: 2.5x the forward's two matmuls).
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def mode_call(run, inputs, mode):
    """The call a mode times: forward only (no autograd graph), backward only (gradients of one
    retained graph, so no forward in it), or forward+backward with a fixed upstream gradient and
    the inputs' gradients cleared first (so no accumulation is timed)."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return run()

        return forward
    out = run()
    grad = torch.randn_like(out)
    if mode == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)

    def step():
        for t in inputs:
            t.grad = None
        run().backward(grad)

    return step


def timed(run, inputs, mode):
    """Median milliseconds of ``mode_call(run, inputs, mode)``."""
    return bench(mode_call(run, inputs, mode))


def graphed(make_call, warmup: int = 3):
    """The call ``make_call()`` returns, captured into a CUDA graph; returns the graph's replay.
    Built, warmed up (tuning and compilation stay outside the capture) and captured on one side
    stream: autograd runs a backward on its forward's stream, so a ``bwd`` call whose graph was
    built on another stream could not be captured. Replays skip the host work of each call
    (Python, argument checks, launches, autograd), so host-bound rows show the kernels' time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn = make_call()
        for _ in range(warmup):
            fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    torch.cuda.current_stream().wait_stream(side)

    def replay():
        graph.replay()

    replay.captured_call = fn  # keeps what the graph reads (the retained forward, the upstream gradient) alive
    return replay


def interleaved(runs: dict, rounds: int) -> dict:
    """Time each named callable ``rounds`` times, alternating between them every round, so clock and
    thermal drift during a run fall on all of them alike. Returns the per-round milliseconds."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(run())
    return times


def round_summary(ours: list, flex: list) -> dict:
    """Medians of per-round times and the spread of the per-round Flex/ours ratios."""
    ratios = [f / o for o, f in zip(ours, flex)]
    return {"ours_ms": statistics.median(ours), "flex_ms": statistics.median(flex),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05, 0.02])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096, help="sliding-window layout size")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwdbwd"],
                        help="fwd: forward; bwd: backward alone (gradients of a retained graph); fwdbwd: both")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time ours, Flex (and the baseline) this many times each, interleaved; rows report "
                             "medians and the range of the per-round Flex/ours ratios")
    parser.add_argument("--sustain", type=float, default=0.0, metavar="SECONDS",
                        help="also run ours and Flex back to back for this long each (order ours, Flex, Flex, "
                             "ours) and report time, joules per call and mean SM clock under the power cap "
                             "(benchmarks/gpu_power.py; needs nvidia-ml-py for energy)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="time ours and Flex as CUDA-graph replays (each mode's call captured once per row): "
                             "no per-call host cost, for rows where the host, not the GPU, sets the pace")
    parser.add_argument("--skip-dense-sdpa", action="store_true")
    parser.add_argument("--forward-tma", choices=["auto", "on", "off"], default="auto",
                        help="the Triton forward's K/V loads through tensor descriptors (KernelOptions.forward_tma; "
                             "auto: on for Hopper and newer)")
    parser.add_argument("--backward-tma", choices=["auto", "on", "off"], default="auto",
                        help="the Triton backward's tile loads through tensor descriptors (KernelOptions.backward_tma)")
    parser.add_argument("--baseline-src", default=None,
                        help="another checkout's src/ directory: its Triton kernels are timed too")
    parser.add_argument("--out", default="results/attention")
    args = parser.parse_args(argv)
    from sparse_attn import KernelOptions
    from sparse_attn.backends.triton import autotune

    tma = {"auto": None, "on": True, "off": False}
    options = KernelOptions(forward_tma=tma[args.forward_tma], backward_tma=tma[args.backward_tma])
    baseline = load_baseline(args.baseline_src) if args.baseline_src else None
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; this benchmark could not run.")
        return 1
    import triton

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.date.today().isoformat(), "heads": args.heads, "kv_heads": args.kv_heads,
        "dim": args.dim, "block": args.block, "dtype": "bfloat16", "batch": 1, "causal": True,
        "forward_tma": args.forward_tma, "backward_tma": args.backward_tma, "baseline_src": args.baseline_src,
        "rounds": args.rounds, "sustain_s": args.sustain, "cuda_graphs": args.cuda_graphs,
    }
    meta.update(ceilings())
    print(json.dumps(meta))
    rows = []

    def save():
        with open(args.out + ".json", "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)

    if "bwd" in args.modes:
        # Timing the backward alone reuses one graph (retain_graph), which compiled backwards with
        # donated buffers (Flex's) refuse; donation only lets the backward reuse saved memory.
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    flex = _compiled_flex()
    energy_reader = gpu_power.nvml_reader(torch.cuda.current_device()) if args.sustain else None
    for seq in args.lengths:
        torch.manual_seed(0)
        shape_q, shape_kv = (1, args.heads, seq, args.dim), (1, args.kv_heads, seq, args.dim)
        q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dense_ms = {}
        if not args.skip_dense_sdpa:
            for name in ("flash", "cudnn"):
                for mode in args.modes:
                    try:
                        run, extra = sdpa_fn(q, k, v, name)
                        dense_ms[(name, mode)] = timed(run, (q, *extra), mode)
                    except Exception as exc:  # a backend missing on this build: say so
                        print(f"sdpa {name} {mode} at {seq} could not run: {type(exc).__name__}: {exc}")
                        dense_ms[(name, mode)] = None
        layouts = [(f"random d={d}", random_layout(seq, density=d, num_heads=args.heads,
                                                    block_size=args.block, seed=1, device="cuda"))
                   for d in args.densities]
        layouts.append((f"window{args.window}+sink128", sliding_window_layout(
            seq, window=args.window, sink=128, num_heads=1, block_size=args.block, device="cuda")))
        for name, layout in tqdm(layouts, desc=f"S={seq}"):
            block_mask = layout.to_flex_block_mask(num_heads=args.heads)
            density = layout.density()
            flops = kept_flops(layout, args.heads, args.dim)

            def ours():
                return sparse_attention(q, k, v, layout, kernel_options=options)

            def flex_run():
                return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

            base_layout = as_baseline_layout(baseline, layout)

            def base_run():
                return baseline.sparse_attention(q, k, v, base_layout, backend="triton")

            # Correctness gate: ours vs Flex on the same layout (grads at the first length).
            out_ours, out_flex = ours(), flex_run()
            check = {"out": rel(out_ours, out_flex)}
            if seq == args.lengths[0] and args.modes != ["fwd"]:
                grad = torch.randn_like(out_ours)
                g_ours = torch.autograd.grad(out_ours, (q, k, v), grad)
                g_flex = torch.autograd.grad(out_flex, (q, k, v), grad)
                check.update({f"d{n}": rel(a, b) for n, a, b in zip("qkv", g_ours, g_flex)})
            if baseline is not None:
                check["baseline_out"] = rel(base_run(), out_flex)
            del out_ours, out_flex
            ok = all(err < 2e-2 for err in check.values())
            for mode in args.modes:
                impls = {"ours": ours, "flex": flex_run, **({"baseline": base_run} if baseline is not None else {})}
                calls = {}
                for impl, run in impls.items():
                    try:
                        make_call = lambda run=run: mode_call(run, (q, k, v), mode)  # noqa: E731
                        calls[impl] = graphed(make_call) if args.cuda_graphs else make_call()
                    except Exception as exc:  # a capture that fails is reported, and the row is skipped
                        print(f"{impl} {mode} at {seq} {name}: could not capture a CUDA graph: "
                              f"{type(exc).__name__}: {str(exc)[:200]}")
                if set(calls) != set(impls):
                    continue
                times = interleaved({impl: (lambda c=c: bench(c)) for impl, c in calls.items()}, args.rounds)
                summary = round_summary(times["ours"], times["flex"])
                t_ours, t_flex = summary["ours_ms"], summary["flex_ms"]
                t_base = statistics.median(times["baseline"]) if baseline is not None else None
                factor = FLOP_FACTOR[mode]
                cudnn, flash = dense_ms.get(("cudnn", mode)), dense_ms.get(("flash", mode))
                row = {
                    "seq": seq, "layout": name, "density": density, "mode": mode,
                    "ours_ms": t_ours, "flex_ms": t_flex, "cudnn_dense_ms": cudnn, "flash_dense_ms": flash,
                    "ours_tflops": factor * flops / t_ours / 1e9, "flex_tflops": factor * flops / t_flex / 1e9,
                    "speedup_vs_flex": t_flex / t_ours if ok else None,
                    "ours_over_cudnn_dense": t_ours / cudnn if (ok and cudnn) else None,
                    "baseline_ms": t_base, "baseline_over_ours": t_base / t_ours if t_base else None,
                    "check_rel_err": check, "check_ok": ok,
                    "rounds": args.rounds, "ratio_min": summary["ratio_min"] if ok else None,
                    "ratio_max": summary["ratio_max"] if ok else None, "round_ms": times,
                }
                if args.sustain and ok:
                    row["sustained"] = gpu_power.abba(
                        {"ours": calls["ours"], "flex": calls["flex"]},
                        lambda fn: gpu_power.sustained(fn, args.sustain, energy_reader, torch.cuda.synchronize))
                del calls
                rows.append(row)
                save()
                print(format_row(row), flush=True)
        q = k = v = None  # free the inputs before the next length (not del: closures above use the names)
        torch.cuda.empty_cache()
    meta["autotuned"] = autotuned_configs(autotune)
    print(json.dumps(meta["autotuned"], indent=1))
    table = format_table(rows, meta)
    print(table)
    with open(args.out + ".md", "w") as fh:
        fh.write(table + "\n")
    save()
    return 0


def load_baseline(src_dir):
    """A second copy of the library from ``src_dir`` (its ``sparse_attn`` package), importable
    beside ours as ``sparse_attn_baseline`` (the package uses relative imports only)."""
    import importlib.util

    root = os.path.join(os.path.abspath(src_dir), "sparse_attn")
    spec = importlib.util.spec_from_file_location("sparse_attn_baseline", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sparse_attn_baseline"] = module
    spec.loader.exec_module(module)
    return module


def as_baseline_layout(baseline, layout):
    """The same layout as the baseline library's own class (None without a baseline)."""
    if baseline is None:
        return None
    return baseline.BlockSparseLayout(layout.kv_num_blocks, layout.kv_indices, layout.q_len, layout.kv_len,
                                      layout.q_block, layout.kv_block, layout.causal)


def autotuned_configs(autotune) -> dict:
    """The config the autotuner chose for each of our kernels and key (what the timings ran)."""
    chosen = {}
    for (kind, *blocks), tuner in autotune.TUNED.items():  # (kind, q_block, kv_block[, head_dim])
        for key, config in getattr(tuner, "cache", {}).items():
            chosen[f"{kind} q{blocks[0]} kv{blocks[1]} {key}"] = str(config)
    return chosen


def _f(x, spec):
    return "n/a" if x is None else format(x, spec)


HEADER = ("| S | layout | density | mode | ours ms | flex ms | cuDNN dense ms | flash dense ms | "
          "ours TF/s | flex TF/s | flex/ours | ours/cuDNN | check |")
ROUNDS_HEADER = " flex/ours per round |"
SUSTAINED_HEADER = " sustained ours ms | sustained flex/ours | J per call ours/flex | SM MHz ours/flex |"
BASELINE_HEADER = " baseline ms | baseline/ours |"


def format_row(r) -> str:
    line = (f"| {r['seq']} | {r['layout']} | {r['density']:.3f} | {r['mode']} | {r['ours_ms']:.2f} | "
            f"{r['flex_ms']:.2f} | {_f(r['cudnn_dense_ms'], '.2f')} | {_f(r['flash_dense_ms'], '.2f')} | "
            f"{r['ours_tflops']:.0f} | {r['flex_tflops']:.0f} | {_f(r['speedup_vs_flex'], '.2f')} | "
            f"{_f(r['ours_over_cudnn_dense'], '.3f')} | {'ok' if r['check_ok'] else 'FAILED'} |")
    if r.get("rounds", 1) > 1:
        line += f" {_f(r['ratio_min'], '.2f')}-{_f(r['ratio_max'], '.2f')} |"
    if r.get("sustained"):
        ours, flex = r["sustained"]["ours"], r["sustained"]["flex"]
        line += f" {ours['ms']:.2f} | {flex['ms'] / ours['ms']:.3f} |"
        if ours.get("joules") is not None:
            line += (f" {ours['joules']:.2f}/{flex['joules']:.2f} | "
                     f"{_f(ours['sm_mhz'], '.0f')}/{_f(flex['sm_mhz'], '.0f')} |")
        else:
            line += " n/a | n/a |"
    if r.get("baseline_ms") is not None:
        line += f" {r['baseline_ms']:.2f} | {r['baseline_over_ours']:.3f} |"
    return line


def format_table(rows, meta) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             f"measured roofs: bf16 matmul {meta['matmul_tflops']:.0f} TF/s, copy {meta['copy_gbs']:.0f} GB/s",
             "", HEADER + (ROUNDS_HEADER if meta.get("rounds", 1) > 1 else "")
             + (SUSTAINED_HEADER if meta.get("sustain_s") else "")
             + (BASELINE_HEADER if meta.get("baseline_src") else ""),
             "|" + "---|" * (13 + (meta.get("rounds", 1) > 1) + 4 * bool(meta.get("sustain_s"))
                             + 2 * bool(meta.get("baseline_src")))]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(code)
