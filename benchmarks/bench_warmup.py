"""First-call compile cost of each method, and what ``sparse_attn.warmup`` takes to pay it up front.

Each row runs in a fresh Python process on a Llama-8B-shaped model with random weights (hidden 4096,
32 heads / 8 KV heads, head dim 128, ``--layers`` layers), patched with one method (the prefill
methods with ``fallback="auto"``, as a server runs them; ``decode quest`` with sparse decode too):

* ``warmup s``: ``warmup(model, [length])`` in that process, with Triton's kernel cache (a fresh
  ``TRITON_CACHE_DIR``) empty: every kernel the config uses is compiled and then run once;
* ``warmup again s``: the same call once more in the same process (nothing left to compile), so
  ``warmup s - warmup again s`` is the compilation;
* ``restarted s``: ``warmup`` in a new process whose cache directory the first one filled (a
  restarted server on the same machine: Triton loads the compiled kernels from disk);
* ``first request ms`` / ``steady ms``: after the warm-up, the first prefill of the same length and
  the median of the next three: the first request pays no compilation when they agree.

    python benchmarks/bench_warmup.py --length 32768 --out results/warmup
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)

CONFIGS = {  # label -> patch() arguments (the knobs of bench_prefill's rows)
    "xattention": dict(method="xattention", threshold=0.9, stride=8),
    "flexprefill": dict(method="flexprefill", gamma=0.9, min_budget=256),
    "vertical_slash": dict(method="vertical_slash", vertical_size=64, slash_size=256),
    "pooled_topp": dict(method="pooled_topp", top_p=0.9),
    "decode quest": dict(method="dense", decode={"method": "quest", "budget": 2048, "page": 64}),
}


def child(label: str, length: int, layers: int) -> dict:
    """One row's measurements in this process (see the module docstring)."""
    from bench_prefill import _eight_b_shape

    import sparse_attn

    device = "cuda"
    start = time.perf_counter()
    model = _eight_b_shape(layers, device, torch.bfloat16)
    build_s = time.perf_counter() - start
    sparse_attn.patch(model, min_kv_len=0, **CONFIGS[label])
    first = sparse_attn.warmup(model, [length])[0]["seconds"]
    again = sparse_attn.warmup(model, [length])[0]["seconds"]
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    times = []
    with torch.no_grad():
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return {"warmup_s": first, "warmup_again_s": again, "first_request_ms": times[0],
            "steady_ms": statistics.median(times[1:]), "model_build_s": build_s}


def run_child(label: str, args, cache_dir: str) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": cache_dir}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", label, "--length", str(args.length),
           "--layers", str(args.layers)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:300] if (done.stderr or done.stdout)
                else f"exit {done.returncode}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per process")
    parser.add_argument("--out", default="results/warmup")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.length, args.layers)), flush=True)
        return
    if not torch.cuda.is_available():
        print("bench_warmup needs a CUDA GPU: nothing measured")
        return
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "length": args.length, "layers": args.layers,
            "model": "8B-shaped Llama, random weights, bf16"}
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; {meta['model']}, "
          f"{args.layers} layer(s), {args.length} tokens\n")
    print("| config | warmup s (empty kernel cache) | warmup again s | compile s | restarted process, "
          "warmup s | first request ms | steady ms |")
    print("|---|---|---|---|---|---|---|")
    for label in args.configs:
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = run_child(label, args, cache_dir)
            warm_disk = run_child(label, args, cache_dir) if "error" not in cold else {}
        row = {"config": label, "cold": cold, "restarted": warm_disk}
        rows.append(row)
        if "error" in cold:
            print(f"| {label} | failed: {cold['error'][:80]} | | | | | |", flush=True)
        else:
            restarted = f"{warm_disk['warmup_s']:.2f}" if "warmup_s" in warm_disk else "-"
            print(f"| {label} | {cold['warmup_s']:.2f} | {cold['warmup_again_s']:.2f} | "
                  f"{cold['warmup_s'] - cold['warmup_again_s']:.2f} | {restarted} | "
                  f"{cold['first_request_ms']:.1f} | {cold['steady_ms']:.1f} |", flush=True)
        with open(args.out + ".json", "w") as fh:  # rewritten per row: a cut run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
    main()
