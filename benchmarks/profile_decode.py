"""Where one sparse decode step's GPU time goes: every kernel of the step (page scores, which append
the new key to the index first, top-k selection, decode attention, which merges its splits itself:
``PageSelection.append_and_select`` then the attention) with its device time from the PyTorch
profiler, at each (context, batch, page); then the device time of the kernels' tuning choices, which all
give the same result: the top-k kernel by warp count, and the decode attention by split count and
software-pipelining stages.

    python benchmarks/profile_decode.py --contexts 131072 --batches 1 8 --pages 16 32 --out results/decode_profile

Same inputs as ``bench_decode.py`` (bf16, H=32, Hkv=8, D=128, Quest selection, sink 64, recent 64).
Prints a table and writes ``<out>.json``; needs a CUDA GPU (exits with status 2 without one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from profile_estimators import kernel_breakdown  # noqa: E402

from sparse_attn.decode import DecodeWorkspace, PageIndex, PageSelection  # noqa: E402
from sparse_attn.decode.kernels import triton_decode_attention  # noqa: E402


def kernel_times(step, repeats: int = 20) -> dict:
    """Mean device time (microseconds) per call of each kernel ``step()`` launches."""
    for _ in range(2):
        step()
    breakdown = kernel_breakdown(step, repeats, top=32)
    return {k["name"][:60]: 1000.0 * k["ms_per_estimate"] for k in breakdown["kernels"]}


def device_us(launch, repeats: int = 20) -> float | str:
    """Device time (microseconds) per call of every kernel ``launch()`` runs, or the error it raised."""
    try:
        return round(sum(kernel_times(launch, repeats).values()), 2)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return f"{type(exc).__name__}: {exc}"[:200]


def topk_variants(scores, index, width, sink_pages, recent, warps_list) -> dict:
    """Device time (us) of the top-k kernel alone, by ``"<warps> warps"``."""
    from sparse_attn.decode.select_kernels import triton_select_pages

    return {f"{warps} warps": device_us(
        lambda warps=warps: triton_select_pages(scores, index, width, sink_pages, recent, group_max=False,
                                                num_warps=warps)) for warps in warps_list}


def split_variants(q, k, v, pages, counts, lens, page, splits_list, stages_list, workspace) -> dict:
    """Device time (us) of the decode attention (split kernel, merging by itself through a workspace),
    by ``"<splits> splits, <n> stages"`` (splits 0: the default count)."""
    out = {}
    for splits in splits_list:
        for stages in stages_list:
            out[f"{splits} splits, {stages} stages"] = device_us(
                lambda splits=splits, stages=stages: triton_decode_attention(
                    q, k, v, pages, counts, lens, page, q.shape[-1] ** -0.5, num_splits=splits or None,
                    workspace=workspace, num_stages=stages))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pages", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 4, 8, 16, 32],
                        help="split counts of the decode attention (0: the default choice)")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 3],
                        help="software-pipelining stages of the decode attention (1: the default)")
    parser.add_argument("--bounds", default="exact", choices=("exact", "int8"),
                        help="how the page index keeps Quest's bounds (int8: half the bytes to score the pages)")
    parser.add_argument("--out", default="results/decode_profile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU: none is visible, nothing was measured", file=sys.stderr)
        return 2
    import triton

    from sparse_attn.decode.select_kernels import triton_page_logits

    heads, kv_heads, dim = 32, 8, 128
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "argv": sys.argv[1:]}
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            gen = torch.Generator(device="cuda").manual_seed(0)
            k = torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn_like(k)
            q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            new_key = k[:, :, context - 1:].clone()
            workspace = DecodeWorkspace("cuda")
            for page in args.pages:
                index = PageIndex.build(k, page, capacity=context, bounds=args.bounds)
                selection = PageSelection(method="quest", budget=args.budget, sink=64, recent=64)

                def step():
                    index.lengths.fill_(context - 1)
                    index._length_bound = context - 1
                    p, c = selection.append_and_select(q, index, new_key)
                    return triton_decode_attention(q, k, v, p, c, lens, page, 1.0 / math.sqrt(dim),
                                                   workspace=workspace)

                row = {"context": context, "batch": batch, "page": page, "budget": args.budget, "bounds": args.bounds,
                       "kernels_us": {name: round(us, 2) for name, us in kernel_times(step).items()}}
                scores = triton_page_logits(q, index, "quest", 1.0 / math.sqrt(dim), with_stats=True)
                width = min(selection.budget_pages(page), index.max_pages)
                row["topk_us"] = topk_variants(
                    scores, index, width, selection.sink_pages(page), selection.recent, args.warps)
                p, c = selection(q, index)
                row["attention_us"] = split_variants(q, k, v, p, c, lens, page, args.splits, args.stages, workspace)
                rows.append(row)
                print(json.dumps(row), flush=True)
            k = v = None
            torch.cuda.empty_cache()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    for r in rows:
        print(f"\ncontext {r['context']}, batch {r['batch']}, page {r['page']}, budget {r['budget']}, "
              f"{r['bounds']} bounds")
        print("| kernel | device us per step |\n|---|---|")
        for name, us in r["kernels_us"].items():
            print(f"| {name} | {us:.2f} |")
        for title, key in (("top-k kernel", "topk_us"), ("decode attention", "attention_us")):
            print(f"| {title} | device us |\n|---|---|")
            for name, us in r[key].items():
                print(f"| {name} | {us} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
