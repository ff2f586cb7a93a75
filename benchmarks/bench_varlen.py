"""Packed variable-length (training) attention speed: ours varlen vs ours padded vs FlexAttention.

One run times, on identical inputs: ``sparse_attention_varlen`` on a packed batch (sequences of
different lengths concatenated, ``cu_seqlens``); the padded call on the same sequences padded to the
longest (what a caller without varlen would run), with the kernels ``auto`` picks (on Hopper the
Gluon ones) and with the Triton kernels; and
FlexAttention twice: on the packed sequence with a document mask that keeps the same blocks (each
sequence's own block table, causal inside the sequence, nothing across sequences; sequence
boundaries do not fall on block edges, so every kept block Flex walks is a masked one) and on the
padded batch with the layout's BlockMask. Every configuration is first checked against Flex's output
(varlen gradients too); a failed check is reported and no speed-up is claimed for it.

    python benchmarks/bench_varlen.py --total 32768 --num-seqs 8 --out results/varlen
    python benchmarks/bench_varlen.py --total 131072 --num-seqs 16 --densities 0.1 --rounds 5

One layout per sequence (its heads share it: Flex's mask is built for all heads at once, which
keeps building it cheap at long totals). Prints a table and writes ``<out>.json`` and ``<out>.md``.
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

from bench_attention import bench, interleaved, mode_call, rel  # noqa: E402

from sparse_attn import random_layout, sparse_attention, sparse_attention_varlen  # noqa: E402
from sparse_attn.backends.flex import _compiled_flex  # noqa: E402
from sparse_attn import KernelOptions  # noqa: E402

MODES = ("fwd", "fwdbwd")
FLOP_FACTOR = {"fwd": 1.0, "fwdbwd": 3.5}
HEADER = ("| tokens | seqs | density | mode | ours varlen ms | ours padded ms | ours padded, Triton kernels ms | "
          "Flex packed ms | Flex padded ms | Flex packed/ours | Flex padded/ours | padded/ours | ours TF/s | check | "
          "Flex packed/ours per round |")


def sequence_lengths(total: int, num_seqs: int, seed: int) -> list:
    """``num_seqs`` lengths summing to ``total``, between ~0.4x and ~1.6x the mean, seeded."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_seqs, generator=gen) + 0.5
    lengths = (weights / weights.sum() * total).floor().long()
    lengths[0] += total - int(lengths.sum())
    return lengths.tolist()


def kept_flops(layout, lengths, heads: int, dim: int) -> float:
    """Forward FLOPs over each sequence's kept blocks (its layout cut to its own length)."""
    blocks = sum(float(layout.crop(i, n, n).kept_blocks().sum()) for i, n in enumerate(lengths))
    return blocks * (heads // layout.heads) * 4 * layout.q_block * layout.kv_block * dim


def document_mask_mod(layout, lengths, device):
    """Flex ``mask_mod`` over the packed sequence: same sequence, causal inside it, and the
    sequence's own kept block (block indices counted from the sequence's start), i.e. what
    ``sparse_attention_varlen`` computes with a per-sequence ``layout`` of one head."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    kept = layout.to_dense()[:, 0].to(device)  # (seqs, NQ, NK)
    q_block, kv_block = layout.q_block, layout.kv_block

    def mask_mod(b, h, q_idx, kv_idx):
        dq, dk = doc[q_idx], doc[kv_idx]
        local_q, local_k = q_idx - cu[dq], kv_idx - cu[dk]
        return (dq == dk) & (local_k <= local_q) & kept[dq, local_q // q_block, local_k // kv_block]

    return mask_mod


def document_block_mask(layout, lengths, device):
    """Flex BlockMask of :func:`document_mask_mod`, built compiled (no dense token mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = sum(lengths)
    return create_block_mask(document_mask_mod(layout, lengths, device), None, None, total, total, device=device,
                             BLOCK_SIZE=(layout.q_block, layout.kv_block), _compile=True)


# The Triton kernels (not the Hopper Gluon ones) for both directions.
TRITON_KERNELS = KernelOptions(forward="triton", backward="triton")


def padded(t, lengths, max_len):
    """``(B, H, max_len, D)`` copy of packed ``(T, H, D)`` ``t``, each sequence zero-padded."""
    out = t.new_zeros(len(lengths), t.shape[1], max_len, t.shape[2])
    start = 0
    for i, n in enumerate(lengths):
        out[i, :, :n] = t[start:start + n].transpose(0, 1)
        start += n
    return out.detach().requires_grad_(t.requires_grad)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total", type=int, default=32768, help="packed tokens")
    parser.add_argument("--num-seqs", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.05])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/varlen")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_varlen: no CUDA device; this benchmark could not run.")
        return 1
    import triton

    lengths = sequence_lengths(args.total, args.num_seqs, args.seed)
    max_len = max(lengths)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "heads": args.heads, "kv_heads": args.kv_heads,
            "dim": args.dim, "block": args.block, "dtype": "bfloat16", "causal": True, "lengths": lengths,
            "rounds": args.rounds}
    print(json.dumps(meta))
    torch.manual_seed(args.seed)
    device = "cuda"
    q = torch.randn(args.total, args.heads, args.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(args.total, args.kv_heads, args.dim, device=device, dtype=torch.bfloat16,
                        requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    qp, kp, vp = (padded(t, lengths, max_len) for t in (q, k, v))
    packed = [t.detach().transpose(0, 1).contiguous()[None].requires_grad_() for t in (q, k, v)]  # Flex: (1, H, T, D)
    flex = _compiled_flex()
    rows = []
    for density in args.densities:
        layout = random_layout(max_len, density=density, num_heads=1, batch=len(lengths), block_size=args.block,
                               seed=1, device=device)
        block_mask = document_block_mask(layout, lengths, device)
        padded_block_mask = layout.to_flex_block_mask(num_heads=args.heads)

        def ours():
            return sparse_attention_varlen(q, k, v, cu, cu, layout)

        def ours_padded(options=None):
            return sparse_attention(qp, kp, vp, layout, kernel_options=options)

        def ours_padded_triton():
            return ours_padded(TRITON_KERNELS)

        def flex_run():
            return flex(*packed, block_mask=block_mask, enable_gqa=True)

        def flex_padded():
            return flex(qp, kp, vp, block_mask=padded_block_mask, enable_gqa=True)

        out_ours, out_flex = ours(), flex_run()
        check = {"out": rel(out_ours, out_flex[0].transpose(0, 1)), "padded_out": rel(ours_padded(), flex_padded())}
        grad = torch.randn_like(out_ours)
        g_ours = torch.autograd.grad(out_ours, (q, k, v), grad)
        g_flex = torch.autograd.grad(out_flex, packed, grad.transpose(0, 1)[None])
        check.update({f"d{n}": rel(a, b[0].transpose(0, 1)) for n, a, b in zip("qkv", g_ours, g_flex)})
        ok = all(err < 2e-2 for err in check.values())
        flops = kept_flops(layout, lengths, args.heads, args.dim)
        for mode in args.modes:
            calls = {"ours": mode_call(ours, (q, k, v), mode), "padded": mode_call(ours_padded, (qp, kp, vp), mode),
                     "padded_triton": mode_call(ours_padded_triton, (qp, kp, vp), mode),
                     "flex": mode_call(flex_run, packed, mode),
                     "flex_padded": mode_call(flex_padded, (qp, kp, vp), mode)}
            times = interleaved({name: (lambda c=c: bench(c)) for name, c in calls.items()}, args.rounds)
            med = {name: statistics.median(t) for name, t in times.items()}
            ratios = [f / o for o, f in zip(times["ours"], times["flex"])]
            row = {"tokens": args.total, "seqs": len(lengths), "density": layout.density(), "mode": mode,
                   "ours_ms": med["ours"], "padded_ms": med["padded"], "padded_triton_ms": med["padded_triton"],
                   "flex_ms": med["flex"], "flex_padded_ms": med["flex_padded"],
                   "speedup_vs_flex": med["flex"] / med["ours"] if ok else None,
                   "speedup_vs_flex_padded": med["flex_padded"] / med["ours"] if ok else None,
                   "padded_over_ours": med["padded"] / med["ours"],
                   "ours_tflops": FLOP_FACTOR[mode] * flops / med["ours"] / 1e9, "check_rel_err": check,
                   "check_ok": ok, "ratio_min": min(ratios) if ok else None, "ratio_max": max(ratios) if ok else None,
                   "round_ms": times}
            rows.append(row)
            print(format_row(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = format_table(rows, meta)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_row(r) -> str:
    return (f"| {r['tokens']} | {r['seqs']} | {r['density']:.3f} | {r['mode']} | {r['ours_ms']:.2f} | "
            f"{r['padded_ms']:.2f} | {r['padded_triton_ms']:.2f} | {r['flex_ms']:.2f} | {r['flex_padded_ms']:.2f} | "
            f"{_ratio(r['speedup_vs_flex'])} | {_ratio(r['speedup_vs_flex_padded'])} | {r['padded_over_ours']:.2f} | "
            f"{r['ours_tflops']:.0f} | {'ok' if r['check_ok'] else 'FAILED'} | "
            f"{_ratio(r['ratio_min'])}-{_ratio(r['ratio_max'])} |")


def format_table(rows, meta) -> str:
    lines = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; "
             f"sequence lengths {meta['lengths']}", "", HEADER, "|" + "---|" * 15]
    return "\n".join(lines + [format_row(r) for r in rows])


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"total {time.time() - t0:.0f} s")
    sys.exit(code)
