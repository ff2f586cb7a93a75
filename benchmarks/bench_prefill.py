"""Prefill time of a whole patched model vs the same model dense, at long lengths.

For each length: the prompt is a passkey sample of that many tokens (real haystack text); dense
runs through SDPA with the flash and the cuDNN backend forced in turn, then each method (one knob
setting, sparse on every call: ``fallback="never"``). Each time is the median of ``--repeats``
forward passes after one untimed warm-up (the evaluation harness's ``timed_prefills``); the density
and the estimation share come from the same run. The canary was trained at 8K, so above that its
answers are meaningless, but its prefill time is not: this measures what sparse attention saves
in a whole model (embeddings, MLPs and the LM head included).

    python benchmarks/bench_prefill.py --model canary --lengths 32768 131072 --out results/prefill
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from sparse_attn.eval.canary import resolve_model  # noqa: E402
from sparse_attn.eval.runner import timed_prefills  # noqa: E402
from sparse_attn.eval.tasks import make_sample  # noqa: E402
from sparse_attn.integrations.hf import SparseConfig, patch, unpatch  # noqa: E402

METHODS = {  # method -> knobs (the middle of the evaluation harness's sweep)
    "xattention": {"threshold": 0.9, "stride": 8},
    "flexprefill": {"gamma": 0.9, "min_budget": 256},
    "vertical_slash": {"vertical_size": 64, "slash_size": 256},
    "pooled_topp": {"top_p": 0.9},
}


def _dense_backends(device: str) -> dict:
    """Label -> context manager forcing an SDPA backend (CUDA), or plain SDPA on CPU."""
    if not device.startswith("cuda"):
        return {"dense": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {"dense_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "dense_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="canary", help="local HF causal LM path, or 'canary'")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="results/prefill")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "dtype": str(dtype),
            "block_size": args.block_size, "repeats": args.repeats}
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"# prefill, {meta['device']}, {args.model}\n")
    print("| length | config | prefill ms | estimate ms | density | vs dense flash | vs dense cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = tokenizer(make_sample("passkey", tokenizer, length, seed=0).prompt, return_tensors="pt").input_ids
        ids = ids.to(device)
        dense = {}
        unpatch(model)
        for label, backend in _dense_backends(device).items():
            try:
                with backend():
                    dense[label], _ = timed_prefills(model, ids, device, None, args.repeats)
                rows.append({"length": length, "config": label, "prefill_ms": dense[label], "density": 1.0})
            except RuntimeError as exc:  # a backend that does not run here says so
                rows.append({"length": length, "config": label, "error": str(exc).splitlines()[0]})
        for method in args.methods:
            state = patch(model, config=SparseConfig(
                method=method, knobs={"block_size": args.block_size, **METHODS[method]}, min_kv_len=0,
                fallback="never", record=True))
            with torch.no_grad():
                model(ids)  # one recorded pass for the density
            prefills = [r for r in state.records if r["sparse"]]
            density = sum(r["density"] for r in prefills) / max(len(prefills), 1)
            state.records.clear()
            prefill_ms, estimate_ms = timed_prefills(model, ids, device, state, args.repeats)
            unpatch(model)
            rows.append({"length": length, "config": method, "knobs": METHODS[method], "prefill_ms": prefill_ms,
                         "estimate_ms": estimate_ms, "density": density})
        for row in rows:
            if row["length"] != length:
                continue
            if "error" in row:
                print(f"| {length} | {row['config']} | failed: {row['error'][:60]} | | | | |")
                continue
            ratios = [f"{row['prefill_ms'] / dense[k]:.2f}x" if k in dense else "-"
                      for k in ("dense_flash", "dense_cudnn")]
            print(f"| {length} | {row['config']} | {row['prefill_ms']:.1f} | {row.get('estimate_ms', 0.0):.1f} | "
                  f"{row['density']:.3f} | {ratios[0]} | {ratios[1]} |", flush=True)
        with open(args.out + ".json", "w") as fh:  # rewritten per length: a cut run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
    main()
