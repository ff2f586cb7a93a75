"""Prefill time of a whole patched model vs the same model dense, at long lengths.

For each length: the prompt is a passkey sample of that many tokens (real haystack text); dense
runs unpatched, as the model runs by default (SDPA choosing its backend), then with SDPA's flash
and cuDNN backends forced in turn, then each method at one knob
setting, once per ``--fallbacks`` value: ``never`` runs sparse on every call (what the method costs
when it must run), ``auto`` is the default a user gets (the pre-check and cost model run dense
wherever sparse would not pay; a layer's decision is cached and serves the next 15 calls of its
length bucket, so the timed passes reuse the warm-up's), ``auto-fresh`` the same with every call
deciding afresh (``precheck={"cache": False}``: what the pre-check itself costs). Each time is the
median of ``--repeats`` forward passes after one untimed warm-up (the evaluation harness's
``timed_prefill_stats``); the density and the estimation share come from the same run. The canary
was trained at 8K, so above that its answers are meaningless, but its prefill time is not: this
measures what sparse attention saves in a whole model (embeddings, MLPs and the LM head included).

    python benchmarks/bench_prefill.py --model canary --lengths 32768 131072 --out results/prefill
    python benchmarks/bench_prefill.py --model 8b-shape --layers 2 --lengths 32768 131072 --densities 0.05 0.1 0.2 \
        --fallbacks auto auto-fresh never --out results/prefill_8b_shape

``--model 8b-shape`` is a Llama-8B-shaped model with random weights (hidden 4096, 32 heads / 8 KV
heads, head dim 128, MLP 14336, vocab 32000, ``--layers`` layers), fed random tokens: random
weights give diffuse attention, so the methods show what they cost when they do not pay, and
``--densities`` adds static random layouts (method ``random``) at those densities, to show what
the pipeline delivers when attention is sparse. Every row also splits its time: ``rest`` is the
same model with attention replaced by nothing (the embeddings, MLPs, norms and LM head), the
estimate is the method's recorded estimation time, attention is the remainder.
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
from sparse_attn.eval.runner import timed_prefill_stats, timed_prefills  # noqa: E402
from sparse_attn.eval.tasks import make_sample  # noqa: E402
from sparse_attn.integrations.hf import SparseConfig, attention_shape, patch, unpatch  # noqa: E402

METHODS = {  # method -> knobs (the middle of the evaluation harness's sweep)
    "xattention": {"threshold": 0.9, "stride": 8},
    "flexprefill": {"gamma": 0.9, "min_budget": 256},
    "vertical_slash": {"vertical_size": 64, "slash_size": 256},
    "pooled_topp": {"top_p": 0.9},
}
FALLBACKS = {"never": "fallback never", "auto": "fallback auto", "auto-fresh": "fallback auto, no decision cache"}


def _dense_backends(device: str) -> dict:
    """Label -> context manager: on CUDA the unpatched model as it runs by default (SDPA choosing its
    backend), then with the flash and the cuDNN backend forced; plain SDPA on CPU."""
    if not device.startswith("cuda"):
        return {"dense": contextlib.nullcontext}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {"dense_default": contextlib.nullcontext,
            "dense_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            "dense_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}


NO_ATTENTION = "bench_no_attention"


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that attends to nothing (zeros out, in the (B, S, H, D) layout
    transformers expects): times the rest of the model."""
    return torch.zeros_like(query).transpose(1, 2), None


def _eight_b_shape(layers: int, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=262144,
                         attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def _rest_of_model_ms(model, ids, device, repeats: int) -> float:
    """Prefill time with attention replaced by :func:`_no_attention`."""
    from transformers import AttentionInterface

    AttentionInterface.register(NO_ATTENTION, _no_attention)
    before = model.config._attn_implementation
    model.set_attn_implementation(NO_ATTENTION)
    try:
        return timed_prefills(model, ids, device, None, repeats)[0]
    finally:
        model.set_attn_implementation(before)


def _predicted_attention_ms(model, calls) -> float:
    """The cost model's prediction of one prefill's attention time (kernels, without the estimate),
    summed over the recorded layer calls: dense time for a call that ran dense, the sparse time at
    its density for one that ran sparse."""
    from sparse_attn.methods.cost import CostModel

    cost = CostModel()
    heads, _, dim = attention_shape(model)
    total = 0.0
    for r in calls:
        dense = cost.dense_ms(1, heads, r["q_len"], r["kv_len"], dim)
        total += cost.sparse_ms(r["density"], dense) if r["sparse"] else dense
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="canary",
                        help="local HF causal LM path, 'canary', or '8b-shape' (random weights, random tokens)")
    parser.add_argument("--layers", type=int, default=2, help="--model 8b-shape: decoder layers")
    parser.add_argument("--densities", type=float, nargs="*", default=[],
                        help="also static random layouts (method 'random') at these densities")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--fallbacks", nargs="+", default=["never"], choices=list(FALLBACKS),
                        help="SparseConfig.fallback of the method rows (the random layouts always run sparse); "
                             "auto-fresh: fallback auto without the decision cache")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="results/prefill")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        parser.error(f"--densities must lie in (0, 1], got {args.densities}")
    if args.model == "8b-shape":
        tokenizer, model = None, _eight_b_shape(args.layers, device, dtype)
    else:
        path = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "dtype": str(dtype),
            "block_size": args.block_size, "repeats": args.repeats,
            "layers": model.config.num_hidden_layers}
    configs = [(method if fallback == "never" else f"{method} ({FALLBACKS[fallback]})", method, METHODS[method],
                fallback) for fallback in args.fallbacks for method in args.methods]
    configs += [(f"random d={d}", "random", {"density": d}, "never") for d in args.densities]
    layers = model.config.num_hidden_layers
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"# prefill, {meta['device']}, {args.model}\n")
    print("| length | config | prefill ms | estimate ms | density | vs dense (SDPA default) | vs dense flash | "
          "vs dense cuDNN | attention / estimate / rest | attention ms: measured / predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        if tokenizer is None:
            ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        else:
            ids = tokenizer(make_sample("passkey", tokenizer, length, seed=0).prompt, return_tensors="pt").input_ids
        ids = ids.to(device)
        dense = {}
        unpatch(model)
        rest_ms = _rest_of_model_ms(model, ids, device, args.repeats)
        rows.append({"length": length, "config": "rest of the model (no attention)", "prefill_ms": rest_ms})
        for label, backend in _dense_backends(device).items():
            try:
                with backend():
                    dense[label], _ = timed_prefills(model, ids, device, None, args.repeats)
                rows.append({"length": length, "config": label, "prefill_ms": dense[label], "density": 1.0,
                             "predicted_attention_ms": _predicted_attention_ms(model, [
                                 {"q_len": length, "kv_len": length, "sparse": False}] * layers)})
            except RuntimeError as exc:  # a backend that does not run here says so
                rows.append({"length": length, "config": label, "error": str(exc).splitlines()[0]})
        for label, method, knobs, fallback in configs:
            fresh = fallback == "auto-fresh"
            state = patch(model, config=SparseConfig(
                method=method, knobs={"block_size": args.block_size, **knobs}, min_kv_len=0,
                fallback="auto" if fresh else fallback, precheck={"cache": False} if fresh else "auto", record=True))
            with torch.no_grad():
                model(ids)  # one recorded pass for the density
            calls = [r for r in state.records if not r["decode"]]
            density = sum(r["density"] if r["sparse"] else 1.0 for r in calls) / max(len(calls), 1)
            predicted = _predicted_attention_ms(model, calls)
            state.records.clear()
            stats = timed_prefill_stats(model, ids, device, state, args.repeats)
            prefill_ms, estimate_ms = stats["median_ms"], stats["estimate_ms"]
            unpatch(model)
            rows.append({"length": length, "config": label, "method": method, "knobs": knobs, "fallback": fallback,
                         "prefill_ms": prefill_ms, "estimate_ms": estimate_ms, "density": density,
                         "predicted_attention_ms": predicted,
                         "precheck_ms": sum((r["precheck"] or {}).get("ms") or 0.0 for r in calls),
                         "estimates_skipped": sum(bool((r["precheck"] or {}).get("skipped_estimate")) for r in calls),
                         "sparse_layers": sum(bool(r["sparse"]) for r in calls), "layer_calls": len(calls),
                         "timed_precheck_outcomes": stats["precheck_outcomes"]})
        for row in rows:
            if row["length"] != length:
                continue
            if "error" in row:
                print(f"| {length} | {row['config']} | failed: {row['error'][:60]} | | | | | | | |")
                continue
            if "density" not in row:  # the rest of the model
                print(f"| {length} | {row['config']} | {row['prefill_ms']:.1f} | | | | | | | |")
                continue
            ratios = [f"{row['prefill_ms'] / dense[k]:.2f}x" if k in dense else "-"
                      for k in ("dense_default", "dense_flash", "dense_cudnn")]
            estimate = row.get("estimate_ms", 0.0)
            attention = max(row["prefill_ms"] - rest_ms - estimate, 0.0)
            row["attention_ms"] = attention
            split = " / ".join(f"{100 * part / row['prefill_ms']:.0f}%" for part in (attention, estimate, rest_ms))
            predicted = row.get("predicted_attention_ms")
            versus = f"{attention:.1f} / {predicted:.1f}" if predicted is not None else f"{attention:.1f} / -"
            print(f"| {length} | {row['config']} | {row['prefill_ms']:.1f} | {estimate:.1f} | "
                  f"{row['density']:.3f} | {ratios[0]} | {ratios[1]} | {ratios[2]} | {split} | {versus} |", flush=True)
        with open(args.out + ".json", "w") as fh:  # rewritten per length: a cut run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
    main()
