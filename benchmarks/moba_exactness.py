"""How far the block-granular MoBA layout (method ``moba``) is from exact, per-token MoBA.

Exact MoBA lets every query token choose its own key blocks; the ``moba`` method chooses once per
query block of ``block_size`` rows (from the block's mean query), so that the block-sparse kernels
run it. On the retrieval prompts of the evaluation harness, for each layer of the model and each
MoBA setting, this reports:

* ``agreement``: the share of exact MoBA's (token, MoBA block) choices the layout keeps;
* the relative error of each layer's attention output: block-granular vs exact MoBA, and each of
  them vs dense attention (on the same captured q, k, v);
* the layout's density, and the share of (query, key) pairs exact MoBA reads;
* task accuracy: greedy answers with block-granular MoBA (``patch``), exact MoBA (an attention
  function running :func:`~sparse_attn.methods.moba.moba_reference` for prefill) and dense.

    python benchmarks/moba_exactness.py --model canary --lengths 2048 --samples 4 --out results/moba_exactness

Runs on CPU or GPU (exact MoBA builds a dense S x S mask per head: keep lengths to a few thousand).
Prints a table and writes ``<out>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import rel  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn.eval.canary import resolve_model  # noqa: E402
from sparse_attn.eval.runner import greedy_score  # noqa: E402
from sparse_attn.eval.tasks import TASKS, make_sample  # noqa: E402
from sparse_attn.methods.moba import moba_reference, moba_selection_agreement  # noqa: E402

EXACT = "moba_exact"
CAPTURE = "moba_capture"


def _dense(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=q.shape[2] > 1, scale=scale)


def _register(name, attend):
    """An attention function ``name`` computing ``attend(q, k, v, scale)`` ((B, H, S, D) in, out)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = attend(module, query, key, value, scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="canary")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--samples", type=int, default=4, help="prompts per length (the tasks in turn)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--moba-blocks", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default="results/moba_exactness")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    captured = []
    _register(CAPTURE, lambda module, q, k, v, s: captured.append((q, k, v, s)) or _dense(q, k, v, s))
    rows = []
    for length in args.lengths:
        samples = [make_sample(TASKS[i % len(TASKS)], tokenizer, length, seed=i) for i in range(args.samples)]
        for moba_block in args.moba_blocks:
            method = sparse_attn.get_method("moba", block_size=args.block_size, moba_block=moba_block,
                                            top_k=args.top_k)
            stats = {key: [] for key in ("agreement", "err_vs_exact", "exact_vs_dense", "granular_vs_dense",
                                         "density")}
            for sample in samples:
                ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(device)
                captured.clear()
                model.set_attn_implementation(CAPTURE)
                with torch.no_grad():
                    model(ids, use_cache=False)
                model.set_attn_implementation("sdpa")
                for q, k, v, scale in captured:
                    layout = method.estimate(q, k, scale=scale)
                    granular = sparse_attn.sparse_attention(q, k, v, layout, scale=scale, backend="reference")
                    exact = moba_reference(q, k, v, moba_block, args.top_k, scale)
                    dense = _dense(q, k, v, scale)
                    stats["agreement"].append(moba_selection_agreement(q, k, method, scale))
                    stats["err_vs_exact"].append(rel(granular, exact))
                    stats["exact_vs_dense"].append(rel(exact, dense))
                    stats["granular_vs_dense"].append(rel(granular, dense))
                    stats["density"].append(layout.density())
            accuracy = {}
            _register(EXACT, lambda module, q, k, v, s, mb=moba_block: moba_reference(q, k, v, mb, args.top_k, s)
                      if q.shape[2] > 1 else _dense(q, k, v, s))
            for mode in ("dense", "granular", "exact"):
                if mode == "granular":
                    sparse_attn.patch(model, method="moba", block_size=args.block_size, moba_block=moba_block,
                                      top_k=args.top_k, min_kv_len=0, fallback="never")
                elif mode == "exact":
                    model.set_attn_implementation(EXACT)
                accuracy[mode] = statistics.mean(greedy_score(model, tokenizer, s) for s in samples)
                sparse_attn.unpatch(model)
                model.set_attn_implementation("sdpa")
            row = {"length": length, "moba_block": moba_block, "top_k": args.top_k, "block_size": args.block_size,
                   "samples": len(samples), **{key: statistics.mean(vals) for key, vals in stats.items()},
                   **{f"accuracy_{mode}": acc for mode, acc in accuracy.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "argv": sys.argv[1:]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n| length | moba_block | top_k | agreement | density | err granular vs exact | exact vs dense | "
          "granular vs dense | accuracy dense / granular / exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['moba_block']} | {r['top_k']} | {r['agreement']:.3f} | {r['density']:.3f} | "
              f"{r['err_vs_exact']:.3f} | {r['exact_vs_dense']:.3f} | {r['granular_vs_dense']:.3f} | "
              f"{r['accuracy_dense']:.2f} / {r['accuracy_granular']:.2f} / {r['accuracy_exact']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
