"""Natively trainable sparse attention, forward and forward+backward: MoBA and NSA against dense
cuDNN and flash SDPA and FlexAttention, on the same inputs (bf16, batch 1, causal).

    python benchmarks/bench_trainable.py --lengths 8192 32768 65536 --kv-heads 8 2 --out results/trainable

Rows per (length, KV heads), each timed forward (no autograd graph) and forward+backward:

* ``cudnn``, ``flash``: dense causal SDPA (K/V repeated to the query heads, as SDPA needs).
* ``flex causal``: FlexAttention with a causal block mask (compiled), dense.
* ``moba``: MoBA (``moba_block`` 512, ``top_k`` 3, 64-token kernel blocks) through the library's
  kernels: the block selection (no gradient, parameter-free gate) plus the block-sparse attention;
  ``estimate_ms`` is the selection alone.
* ``moba on flex``: the same MoBA layout run by FlexAttention (selection excluded).
* ``nsa``: :class:`sparse_attn.nsa.NSAAttention` with the default :class:`~sparse_attn.nsa.NSAConfig`
  (all three branches, the selection, the gates, the compression MLPs' gradients); its selected
  branch's reads chosen by ``KernelOptions.nsa_selected="auto"``.
* ``nsa per token``, ``nsa shared reads``: the same with ``nsa_selected`` set to either way of reading
  the selected blocks (``"auto"`` picks shared reads when a block read serves enough tokens).
* ``dsa``: DeepSeek Sparse Attention's attention, :func:`sparse_attn.dsa.token_sparse_attention`, each
  query token over its 2048 keys chosen by a random lightning indexer (4 heads of 64);
  ``dsa_select_ms`` is the indexer's scoring and top-k alone (:func:`sparse_attn.dsa.select_tokens`).

With ``--decode-contexts``, also one NSA decode step (one query token, batch 1, no gradient) over a
KV cache of each length, per KV-head count: ``nsa step, kept compression`` (the compressed keys and
values kept by a :class:`~sparse_attn.nsa.CompressedKVCache`, as ``generate()`` runs it), ``nsa step,
compressing the cache`` (all of it, every step), ``dsa step`` (the lightning indexer's scores over
the cache and its top 2048 keys, then the token-sparse attention over them) and dense SDPA's decode
step (``cudnn``/``flash``, the query heads of a KV head as its rows, as ``bench_decode.py`` times it).

With ``--train-contexts``, also one training step (forward with the language loss, backward, AdamW
step; bf16, batch 1) of the canary's architecture with random weights at each length, per attention
(``dense`` SDPA, ``moba`` patched in, ``nsa`` and ``dsa`` converted layers, at the canary's scale as
``python -m tools.canary train --attention ...`` uses them; DSA in its sparse stage, its indexer
loss included): tokens per second.

``--skip`` leaves attentions out of the ``--lengths`` rows (e.g. ``--skip dsa "moba on flex"``).

Prints markdown tables and writes ``<out>.json`` row by row; needs a CUDA GPU (exits with status
2 without one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tools.canary: the canary's settings
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import bench, sdpa_fn, tqdm  # noqa: E402
from bench_estimators import structured_qk  # noqa: E402

MOBA_KNOBS = {"moba_block": 512, "top_k": 3, "block_size": 64}
DSA_TOP_K = 2048


def timed_modes(run, inputs) -> dict:
    """Median ms of ``run()`` forward only (no graph) and forward+backward (a fixed upstream
    gradient; the inputs' gradients cleared first)."""
    with torch.no_grad():
        fwd = bench(run)
    out = run()
    grad = torch.randn_like(out)
    del out

    def step():
        for t in inputs:
            t.grad = None
        run().backward(grad)

    return {"fwd_ms": fwd, "fwdbwd_ms": bench(step)}


def attempt(row: dict, name: str, make) -> None:
    """Time the attention ``make()`` returns (``(run, inputs)``) into ``row[name]``; an error is
    recorded in the row instead (out of memory included) and the cache emptied."""
    try:
        run, inputs = make()
        row[name] = timed_modes(run, inputs)
    except Exception as exc:  # noqa: BLE001 - reported in the row
        row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    torch.cuda.empty_cache()


class _Skipped(Exception):
    """An attention left out with ``--skip``."""


def rows_for(args):
    from sparse_attn import BlockSparseLayout, KernelOptions, get_method, sparse_attention
    from sparse_attn.dsa import select_tokens, token_sparse_attention
    from sparse_attn.nsa import NSAAttention, NSAConfig
    from sparse_attn.nsa.shared_reads import shared_tiles, tile_tokens

    heads, dim = args.heads, args.dim
    moba = get_method("moba", **MOBA_KNOBS)
    nsa_config = NSAConfig()
    shapes = [(s, kv) for s in args.lengths for kv in args.kv_heads]
    for seq, kv_heads in tqdm(shapes, desc="shapes"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        if args.inputs == "structured":
            torch.manual_seed(0)
            q, k = structured_qk(heads, kv_heads, seq, dim, "cuda")
        q, k, v = (t.contiguous().requires_grad_() for t in (q, k, v))
        row = {"seq": seq, "heads": heads, "kv_heads": kv_heads, "dim": dim, "inputs": args.inputs}

        def timed(name, make, row=row):
            if name in args.skip:
                row[name] = {"skipped": "--skip"}
            else:
                attempt(row, name, make)

        for name in ("cudnn", "flash"):
            def dense(name=name):
                run, (kr, vr) = sdpa_fn(q, k, v, name)
                return run, (q, kr, vr)
            attempt(row, name, dense)

        blocks = math.ceil(seq / 128)
        causal = BlockSparseLayout.from_dense(torch.ones(blocks, blocks, dtype=torch.bool, device="cuda").tril(),
                                              seq, seq, 128)
        timed("flex causal", lambda: (lambda: sparse_attention(q, k, v, causal, backend="flex"), (q, k, v)))

        with torch.no_grad():
            layout = moba.estimate(q, k)
        row["moba_density"] = float(layout.density())
        row["moba_estimate_ms"] = bench(lambda: moba.estimate(q, k))

        def moba_run():
            return sparse_attention(q, k, v, moba.estimate(q, k))

        timed("moba", lambda: (moba_run, (q, k, v)))
        timed("moba on flex", lambda: (lambda: sparse_attention(q, k, v, layout, backend="flex"), (q, k, v)))

        module = NSAAttention(nsa_config, heads, kv_heads, dim).cuda()
        with torch.no_grad():  # how much nearby tokens' selections overlap: what shared reads save
            _, chosen = module(q, k, v, return_selection=True)
            block = nsa_config.select_block
            tiles = shared_tiles(chosen, None, seq, block, tile_tokens(heads // kv_heads, block))
            own = torch.arange(seq, device="cuda") // block
            earlier = chosen & (torch.arange(chosen.shape[-1], device="cuda")[None, :] < own[:, None])
            row["nsa_blocks_per_token"] = float(earlier.sum(-1).float().mean())
            row["nsa_union_blocks_per_tile"] = float(tiles.counts.float().mean())
            row["nsa_tile_tokens"] = tiles.tokens
            chosen = earlier = tiles = None
        timed("nsa", lambda: (lambda: module(q, k, v), (q, k, v, *module.parameters())))
        for reads in ("per_token", "shared_reads"):
            options = KernelOptions(nsa_selected=reads)
            timed(f"nsa {reads.replace('_', ' ')}", lambda options=options: (
                lambda: module(q, k, v, kernel_options=options), (q, k, v, *module.parameters())))
        module = None

        index = (torch.randn(1, seq, 4, 64, device="cuda", generator=gen), torch.randn(1, seq, 4, device="cuda",
                 generator=gen), torch.randn(1, seq, 64, device="cuda", generator=gen))
        try:
            if "dsa" in args.skip:
                raise _Skipped
            lists = select_tokens(*index, DSA_TOP_K)
            row["dsa_select_ms"] = bench(lambda: select_tokens(*index, DSA_TOP_K))
            attempt(row, "dsa", lambda: (lambda: token_sparse_attention(q, k, v, lists, check_values=False),
                                         (q, k, v)))
        except _Skipped:
            row["dsa"] = {"skipped": "--skip"}
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row["dsa"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        index = lists = None
        best = {mode: min(row[n][mode] for n in ("cudnn", "flash") if mode in row[n])
                for mode in ("fwd_ms", "fwdbwd_ms") if any(mode in row[n] for n in ("cudnn", "flash"))}
        for name in ("flex causal", "moba", "moba on flex", "nsa", "nsa per token", "nsa shared reads", "dsa"):
            for mode, dense_ms in best.items():
                if mode in row[name]:
                    row[name][mode.replace("_ms", "_speedup")] = dense_ms / row[name][mode]
        yield row
        q = k = v = None
        torch.cuda.empty_cache()


def decode_rows(args):
    """One NSA decode step per (context, KV heads): kept compression vs compressing the cache vs dense."""
    from bench_decode import dense_sdpa
    from sparse_attn.dsa import select_tokens, token_sparse_attention
    from sparse_attn.nsa import CompressedKVCache, NSAAttention, NSAConfig

    heads, dim = args.heads, args.dim
    shapes = [(s, kv) for s in args.decode_contexts for kv in args.kv_heads]
    for seq, kv_heads in tqdm(shapes, desc="decode shapes"):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, kv_heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        row = {"seq": seq, "heads": heads, "kv_heads": kv_heads, "dim": dim}
        module = NSAAttention(NSAConfig(), heads, kv_heads, dim).cuda().to(torch.bfloat16)
        kept = CompressedKVCache(module.config)
        index = (torch.randn(1, 1, 4, 64, device="cuda", generator=gen), torch.randn(1, 1, 4, device="cuda",
                 generator=gen), torch.randn(1, seq, 64, device="cuda", generator=gen))

        def dsa_step():
            lists = select_tokens(*index, DSA_TOP_K)
            return token_sparse_attention(q, k, v, lists, check_values=False)

        with torch.no_grad():
            for name in ("cudnn", "flash"):
                try:
                    row[name] = {"step_ms": bench(dense_sdpa(q, k, v, name))}
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            for name, run in (("nsa step, kept compression",
                               lambda: module(q, k, v, compressed_kv=kept.update(k, v, module.nsa_params()))),
                              ("nsa step, compressing the cache", lambda: module(q, k, v)),
                              ("dsa step", dsa_step)):
                try:
                    row[name] = {"step_ms": bench(run)}
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        dense = [row[n]["step_ms"] for n in ("cudnn", "flash") if "step_ms" in row[n]]
        for name in DECODE_NAMES[2:]:
            if dense and "step_ms" in row[name]:
                row[name]["step_speedup"] = min(dense) / row[name]["step_ms"]
        yield row
        q = k = v = module = kept = index = None
        torch.cuda.empty_cache()


TRAIN_ATTENTIONS = ("dense", "moba", "nsa", "dsa")


def training_model(attention: str, seq: int, device, dtype=torch.bfloat16, dsa_top_k: Optional[int] = None):
    """The canary's architecture with random weights, ``attention`` applied, in training mode
    (``dsa_top_k``: DSA's keys per token; None: the canary tool's)."""
    import transformers

    from sparse_attn.eval.canary import canary_config
    from tools.canary.training import DSA_TOP_K as CANARY_DSA_TOP_K
    from tools.canary.training import MOBA_KNOBS, canary_dsa_config, canary_nsa_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(canary_config(seq, 259), attn_implementation="sdpa")
    if attention == "moba":
        from sparse_attn.integrations.hf import SparseConfig, patch

        patch(model, config=SparseConfig(method="moba", knobs=MOBA_KNOBS, fallback="never", min_kv_len=0))
    elif attention == "nsa":
        from sparse_attn.nsa import convert_llama

        convert_llama(model, canary_nsa_config())
    elif attention == "dsa":
        from sparse_attn.dsa import convert_llama

        top_k = CANARY_DSA_TOP_K if dsa_top_k is None else dsa_top_k
        convert_llama(model, canary_dsa_config(top_k, model.config.head_dim), stage="sparse")
    elif attention != "dense":
        raise ValueError(f"attention must be one of {TRAIN_ATTENTIONS}, got {attention!r}")
    return model.to(device=device, dtype=dtype).train()


def training_step(model, ids, optimizer) -> float:
    """One step: the language loss (plus the DSA indexers' loss, when the model has DSA layers),
    backward, optimizer step; returns the loss."""
    from sparse_attn.dsa import indexer_loss

    loss = model(ids, labels=ids, use_cache=False).loss
    extra = indexer_loss(model)
    if extra is not None:
        loss = loss + extra
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_rows(args):
    """Training-step tokens/s of the canary architecture per (length, attention)."""
    for seq in tqdm(args.train_contexts, desc="training lengths"):
        row = {"seq": seq}
        ids = torch.randint(0, 259, (1, seq), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
        for attention in TRAIN_ATTENTIONS:
            model = optimizer = None
            try:
                model = training_model(attention, seq, "cuda")
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                ms = bench(lambda: training_step(model, ids, optimizer))
                row[attention] = {"step_ms": ms, "tokens_per_s": seq / ms * 1e3}
            except Exception as exc:  # noqa: BLE001 - reported in the row
                row[attention] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            model = optimizer = None
            torch.cuda.empty_cache()
        if "step_ms" in row["dense"]:
            for attention in TRAIN_ATTENTIONS[1:]:
                if "step_ms" in row[attention]:
                    row[attention]["speedup"] = row["dense"]["step_ms"] / row[attention]["step_ms"]
        yield row


def train_table(rows, meta) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; the canary's architecture "
             "(4 layers, hidden 384, 6 heads / 2 KV heads, head dim 64), random weights, bf16, batch 1; one "
             "training step (forward, backward, AdamW): tokens/s (speed-up over dense)", "",
             "| S | " + " | ".join(TRAIN_ATTENTIONS) + " |", "|---|" + "---|" * len(TRAIN_ATTENTIONS)]
    for r in rows:
        cells = []
        for name in TRAIN_ATTENTIONS:
            entry = r[name]
            if "error" in entry:
                cells.append("error")
            else:
                speed = entry.get("speedup")
                cells.append(f"{entry['tokens_per_s']:,.0f}" + (f" ({speed:.2f}x)" if speed is not None else ""))
        lines.append(f"| {r['seq']} | " + " | ".join(cells) + " |")
    notes = [f"{r['seq']} {n}: {r[n]['error']}" for r in rows for n in TRAIN_ATTENTIONS if "error" in r[n]]
    return "\n".join(lines + ([""] + notes if notes else []))


DECODE_NAMES = ("cudnn", "flash", "nsa step, kept compression", "nsa step, compressing the cache", "dsa step")


def decode_table(rows, meta) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, batch 1, one query token, "
             f"H={meta['heads']}, D={meta['dim']}; ms per decode step (speed-up over the faster dense SDPA)", "",
             "| context | Hkv | " + " | ".join(DECODE_NAMES) + " |", "|---|---|" + "---|" * len(DECODE_NAMES)]
    for r in rows:
        lines.append(f"| {r['seq']} | {r['kv_heads']} | " + " | ".join(cell(r[n], "step") for n in DECODE_NAMES)
                     + " |")
    notes = [f"{r['seq']}/{r['kv_heads']} {n}: {r[n]['error']}" for r in rows for n in DECODE_NAMES
             if "error" in r[n]]
    return "\n".join(lines + ([""] + notes if notes else []))


def cell(entry: dict, mode: str) -> str:
    if "error" in entry:
        return "error"
    if "skipped" in entry:
        return "skipped"
    ms = entry.get(f"{mode}_ms")
    speed = entry.get(f"{mode}_speedup")
    return "-" if ms is None else (f"{ms:.2f}" + (f" ({speed:.2f}x)" if speed is not None else ""))


ATTENTION_NAMES = ("cudnn", "flash", "flex causal", "moba", "moba on flex", "nsa", "nsa per token", "nsa shared reads",
                   "dsa")


def table(rows, meta) -> str:
    names = ATTENTION_NAMES
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, batch 1, H={meta['heads']}, "
             f"D={meta['dim']}, causal; ms (speed-up over the faster of cuDNN and flash)", "",
             "| S | Hkv | mode | " + " | ".join(names) + " | MoBA density | MoBA selection ms | DSA selection ms | "
             "NSA earlier blocks per token / per tile |",
             "|---|---|---|" + "---|" * (len(names) + 4)]
    for r in rows:
        for mode in ("fwd", "fwdbwd"):
            cells = " | ".join(cell(r.get(n, {}), mode) for n in names)
            lines.append(f"| {r['seq']} | {r['kv_heads']} | {mode} | " + cells
                         + f" | {r['moba_density']:.3f} | {r['moba_estimate_ms']:.2f} | "
                         + (f"{r['dsa_select_ms']:.2f}" if "dsa_select_ms" in r else "-") + " | "
                         + (f"{r['nsa_blocks_per_token']:.1f} / {r['nsa_union_blocks_per_tile']:.1f} "
                            f"({r['nsa_tile_tokens']} tokens)" if "nsa_tile_tokens" in r else "-") + " |")
    notes = [f"{r['seq']}/{r['kv_heads']} {n}: {r[n].get('error') or r[n].get('skipped')}"
             for r in rows for n in names if "error" in r.get(n, {}) or "skipped" in r.get(n, {})]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 65536])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--inputs", choices=["random", "structured"], default="random",
                        help="q and k: i.i.d. noise, or bench_estimators' structured_qk (a shared direction per "
                             "KV group under RoPE: local, slowly changing attention, so nearby tokens select "
                             "overlapping NSA blocks)")
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[],
                        help="also time one NSA decode step over KV caches of these lengths")
    parser.add_argument("--train-contexts", type=int, nargs="*", default=[],
                        help="also time a training step of the canary architecture at these lengths")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(ATTENTION_NAMES[2:]),
                        help="attentions not to time at --lengths (dense cuDNN and flash always run)")
    parser.add_argument("--out", default="results/trainable")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_trainable.py needs a CUDA GPU: none is visible, nothing was measured", file=sys.stderr)
        return 2
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "heads": args.heads, "dim": args.dim,
            "moba_knobs": MOBA_KNOBS, "argv": sys.argv[1:]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows, decode, train = [], [], []

    def save():
        with open(args.out + ".json", "w") as fh:
            json.dump({"meta": meta, "rows": rows, "decode_rows": decode, "train_rows": train}, fh, indent=1)

    for row in rows_for(args) if args.lengths else ():
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    for row in decode_rows(args):
        decode.append(row)
        print(json.dumps(row), flush=True)
        save()
    for row in train_rows(args):
        train.append(row)
        print(json.dumps(row), flush=True)
        save()
    tables = ([table(rows, meta)] if rows else []) + ([decode_table(decode, meta)] if decode else []) \
        + ([train_table(train, meta)] if train else [])
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
