"""Estimation cost of each dynamic method vs attention time, on one GPU run.

For each S: dense cuDNN causal attention time, then per method and estimator-step variant
(``--steps``: PyTorch references; Triton; Triton with ``block_mass`` in one pass, XAttention and the
oracle only; blocks where a variant's choice differs from the first variant's are counted) the
estimation time, the density it chose, our sparse attention time at that density, and the ratios
estimate/dense and estimate/sparse.
The target: estimation <= 5% of dense attention time at 128K.

Inputs (``--inputs``): ``structured`` (default) gives q and k a shared per-head direction and
rotary position embedding, so attention is local with a slowly decaying tail, like a real model's
early layers and unlike i.i.d. noise, where every method rightly keeps almost everything; ``random``
is i.i.d. noise. The point here is cost; accuracy is the evaluation harness's job.

    python benchmarks/bench_estimators.py --lengths 32768 131072 --out results/estimators
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sparse_attn import get_method, sparse_attention  # noqa: E402
from sparse_attn.options import KernelOptions  # noqa: E402

METHODS = {  # label -> (method, knobs)
    "pooled_topp": ("pooled_topp", {"top_p": 0.9}),
    "xattention": ("xattention", {"threshold": 0.9, "stride": 8}),
    "xattention_s16": ("xattention", {"threshold": 0.9, "stride": 16}),
    "vertical_slash": ("vertical_slash", {"vertical_size": 1000, "slash_size": 6096}),
    "flexprefill": ("flexprefill", {"gamma": 0.9, "tau": 0.1}),
    "flexprefill_union": ("flexprefill", {"gamma": 0.9, "tau": 0.1, "line_search": "union"}),
    "oracle": ("oracle", {"top_p": 0.95}),
    "seer": ("seer", {"top_k": 0.1}),  # untrained gates of the benchmark's shape: cost, not choice
}
# Estimator steps: (KernelOptions.estimator_kernels, the block-mass methods' one_pass knob): PyTorch
# references, Triton with block_mass in two passes, Triton with it in one.
STEPS = {"torch": ("torch", False), "triton": ("triton", False), "triton_one_pass": ("triton", True)}
USES_BLOCK_MASS = ("xattention", "oracle")  # the only methods the one-pass variant changes (their one_pass knob)


def structured_qk(heads: int, kv_heads: int, seq: int, dim: int, device: str, scale: float = 1.5):
    """q, k with a shared per-KV-group direction plus noise, rotated by RoPE (theta 1e4): local,
    distance-decaying attention with per-head strength, like a real model's early layers."""
    group = heads // kv_heads
    common = torch.randn(1, kv_heads, 1, dim, device=device) * scale
    k = common + torch.randn(1, kv_heads, seq, dim, device=device) * 0.5
    q = common.repeat_interleave(group, 1) + torch.randn(1, heads, seq, dim, device=device) * 0.5
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    angles = torch.arange(seq, device=device).float()[:, None] * inv_freq[None]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)

    def rotate(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    return rotate(q).bfloat16(), rotate(k).bfloat16()


def untrained_seer_gates(heads: int, kv_heads: int, dim: int, directory: str, block_size: int = 128) -> str:
    """A one-layer gates file of the given shape with fresh weights (what a seer estimate costs does
    not depend on training); returns its path."""
    from sparse_attn.methods.seer_gate import GateSpec, SeerGates

    spec = GateSpec(layers=1, heads=heads, kv_heads=kv_heads, head_dim=dim, block_size=block_size, gate_dim=dim,
                    rope_theta=10000.0, rope_scaling=1.0, model_hash="untrained", model_name="untrained")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    path = os.path.join(directory, "untrained_gates.safetensors")
    SeerGates(spec, inv_freq).save(path)
    return path


def _dense_cudnn_ms(bench, q, k, v) -> float:
    """Dense causal attention time with SDPA's cuDNN backend (k, v already repeated to q's heads)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def _measure(bench, method, q, k, v, options: KernelOptions) -> dict:
    """Estimation time of ``method`` on (q, k) (as layer 0) with ``options``, the density it chose and
    our attention time there."""
    layout = method.estimate(q, k, 0, kernel_options=options)
    return {"layout": layout, "density": layout.density(),
            "estimate_ms": bench(lambda: method.estimate(q, k, 0, kernel_options=options)),
            "sparse_ms": bench(lambda: sparse_attention(q, k, v, layout, backend="triton"))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--inputs", choices=["structured", "random"], default="structured")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS),
                        help="estimator step variants to time (the first is the reference for 'blocks differing')")
    parser.add_argument("--out", default="results/estimators")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_estimators: no CUDA device; this benchmark could not run.")
        return 1
    import triton

    def bench(fn):
        return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "inputs": args.inputs,
            "triton": triton.__version__, "date": datetime.date.today().isoformat()}
    rows = []
    gates_dir = tempfile.mkdtemp(prefix="bench_estimators_")
    print("| S | method | estimator steps | blocks differing from the first | density | estimate ms | sparse ms | "
          "dense cuDNN ms | estimate / dense | estimate / sparse |\n|" + "---|" * 10, flush=True)
    for seq in args.lengths:
        torch.manual_seed(0)
        if args.inputs == "structured":
            q, k = structured_qk(args.heads, args.kv_heads, seq, args.dim, "cuda")
        else:
            q = torch.randn(1, args.heads, seq, args.dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, args.kv_heads, seq, args.dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        group = args.heads // args.kv_heads
        dense_ms = _dense_cudnn_ms(bench, q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        for label in args.methods:
            name, knobs = METHODS[label]
            reference_dense = None
            for steps in args.steps:
                if steps == "triton_one_pass" and name not in USES_BLOCK_MASS:
                    continue
                if name == "seer" and steps != args.steps[0]:
                    continue  # the gate is the same PyTorch code under every step variant
                kernels, one_pass = STEPS[steps]
                step_knobs = {**knobs, "one_pass": one_pass} if name in USES_BLOCK_MASS else knobs
                if name == "seer":
                    step_knobs = {**step_knobs, "gates": untrained_seer_gates(
                        args.heads, args.kv_heads, args.dim, gates_dir)}
                try:
                    row = _measure(bench, get_method(name, **step_knobs, measure_cost=False), q, k, v,
                                   KernelOptions(estimator_kernels=kernels))
                except Exception as err:  # a failing variant is reported, and the others still run
                    row = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                    print(f"| {seq} | {label} | {steps} | failed: {row['error']} |", flush=True)
                    rows.append({"seq": seq, "method": label, "estimator_steps": steps, **row})
                    continue
                layout = row.pop("layout").to_dense()
                if reference_dense is None:  # every variant should choose the blocks the first one does
                    reference_dense = layout
                row["blocks_differing_from_first"] = int((layout != reference_dense).sum())
                row = {"seq": seq, "method": label, "estimator_steps": steps, **row, "dense_cudnn_ms": dense_ms,
                       "estimate_over_dense": row["estimate_ms"] / dense_ms,
                       "estimate_over_sparse": row["estimate_ms"] / row["sparse_ms"]}
                rows.append(row)
                print(f"| {seq} | {label} | {steps} | {row['blocks_differing_from_first']} | {row['density']:.3f} | "
                      f"{row['estimate_ms']:.2f} | {row['sparse_ms']:.2f} | {dense_ms:.2f} | "
                      f"{row['estimate_over_dense']:.3f} | {row['estimate_over_sparse']:.3f} |", flush=True)
                del layout
            with open(args.out + ".json", "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
