"""Sparse decode speed: one decode step's attention, ours vs dense SDPA and FlexAttention.

For every (context, batch, budget) on identical inputs (H query heads, Hkv KV heads, head dim D,
bf16, one query row per sequence):

* ``kernel``: our split-KV decode kernel over the selected pages (no checks, no selection), launched
  eagerly and replayed as a CUDA graph of 8 back-to-back launches, reported per launch (the graph
  shows the GPU time of launch-bound rows).
* ``step``: the whole decode step: ``PageSelection.append_and_select`` (the page-score kernel
  appends the new key to the page index, then Quest scores and one selection per KV group) and the
  kernel; eagerly, and as a CUDA graph of 8 successive steps (each appends the next key and attends
  at the length it reaches) after one rewind of the index's lengths, reported per step; on GPUs
  with programmatic dependent launch (Hopper and newer) the kernel and the graph steps run with
  ``KernelOptions(dependent_launch=True)``, and the graph steps are timed again without it.
  ``append kernel apart`` is the graph step with ``index.append`` as a kernel of its own before
  the selection. ``append`` and ``select`` time those two parts alone as CUDA graphs (8 calls each,
  per call), and ``same pages`` is the share of selected pages equal to the PyTorch selection's.
* ``flash`` / ``cudnn``: dense SDPA over the whole cache (the group's query heads as query rows of
  their KV head, so K/V are read once, as GQA decode kernels do).
* ``flex``: FlexAttention (compiled) on a BlockMask holding the same selection (page-sized KV
  blocks), ``enable_gqa``.

Bandwidth is the bytes each must read (ours and Flex: the selected K/V; dense: the whole cache)
over its time, next to the device's measured copy bandwidth. Every row first checks our kernel
against the PyTorch reference, and Flex against ours, on the same selection.

    python benchmarks/bench_decode.py --out results/decode
    python benchmarks/bench_decode.py --contexts 32768 131072 --batches 1 8 --budgets 2048 --out results/decode
    python benchmarks/bench_decode.py --generate --contexts 32768 131072 --batches 1 --out results/decode_generate

``--launch triton`` launches every kernel through Triton's own path (more host time per launch);
the default launches compiled kernels through their compiled launchers.

``--generate`` times ``model.generate()`` instead: an 8B-shaped Llama (hidden 4096, 32 heads / 8 KV
heads, MLP 14336, ``--layers`` layers, random weights, bf16), dense decode vs sparse decode through
``sparse_attn.patch(model, decode={...})``, at every context and batch: time per decode step and
tokens per second over the batch (prefill excluded).

Prints a table and writes ``<out>.json`` (rows written as they are measured) and ``<out>.md``.
Needs a CUDA GPU; without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from bench_attention import bench, graphed, rel  # noqa: E402

from sparse_attn.decode import DecodeWorkspace, PageIndex, PageSelection  # noqa: E402
from sparse_attn.decode.kernels import triton_decode_attention  # noqa: E402
from sparse_attn.decode.reference import reference_decode_attention  # noqa: E402
from sparse_attn.options import KernelOptions, kernel_options  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(x, **_):
        return x


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def dense_sdpa(q, k, v, backend_name):
    """Dense decode with SDPA: ``q (B, H, 1, D)`` viewed as ``(B, Hkv, G, D)`` (each KV head's
    query heads as its query rows, non-causal: every row sees the whole cache)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
    batch, heads, _, dim = q.shape
    qg = q.view(batch, k.shape[1], heads // k.shape[1], dim)

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qg, k, v).view(batch, heads, 1, dim)

    return run


def flex_on_selection(q, k, v, pages, counts, page_size):
    """Compiled FlexAttention over the selected pages (a BlockMask of page-sized KV blocks)."""
    from torch.nn.attention.flex_attention import BlockMask

    from sparse_attn.backends.flex import _compiled_flex, _recompile_limit

    batch, heads = q.shape[:2]
    kv_heads, seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    total_pages = -(-seq // page_size)
    idx = torch.zeros(batch, heads, 1, total_pages, dtype=torch.int32, device=q.device)
    idx[..., : pages.shape[-1]] = pages.repeat_interleave(group, 1)[:, :, None, :]
    num = counts.repeat_interleave(group, 1)[:, :, None].contiguous()
    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(128, page_size), seq_lengths=(1, seq))
    fn = _compiled_flex()
    # Flex's decode kernel walks KV blocks in tiles of 64 keys by default; smaller pages need smaller tiles.
    options = {"BLOCK_N": page_size} if page_size < 64 else None

    def run():
        with _recompile_limit():
            return fn(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)

    return run


STEPS_PER_GRAPH = 8  # decode steps per captured graph (one rewind of the index per graph)
CALLS_PER_GRAPH = 8  # calls per captured graph when one call is timed: a replay's own launch cost is shared


def page_overlap(pages, reference, max_pages: int) -> float:
    """The share of ``reference``'s selected pages (``(B, Hkv, width)``, padding repeats) that ``pages``
    also holds, over every (sequence, KV head)."""
    def chosen(p):
        return torch.zeros(*p.shape[:2], max_pages, dtype=torch.bool, device=p.device).scatter_(2, p.long(), True)

    mine, theirs = chosen(pages), chosen(reference)
    return float((mine & theirs).sum() / theirs.sum())


def graph_ms_per_call(fn, calls: int = CALLS_PER_GRAPH) -> float:
    """Milliseconds per call of ``fn`` replayed ``calls`` times back to back in one CUDA graph."""
    def repeated():
        for _ in range(calls):
            out = fn()
        return out

    return bench(graphed(lambda: repeated)) / calls


def kernel_rows(args, copy_gbs):
    dtype = torch.bfloat16
    heads, kv_heads, dim, page = args.heads, args.kv_heads, args.head_dim, args.page
    for context in args.contexts:
        for batch in args.batches:
            cache_gib = 2 * batch * kv_heads * context * dim * 2 / 2 ** 30
            if cache_gib > args.max_cache_gib:
                yield {"context": context, "batch": batch,
                       "skipped": f"K/V cache {cache_gib:.0f} GiB > --max-cache-gib"}
                continue
            gen = torch.Generator(device="cuda").manual_seed(0)
            k = torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=dtype, generator=gen)
            v = torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=dtype, generator=gen)
            q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=dtype, generator=gen)
            dense = {name: bench(dense_sdpa(q, k, v, name)) for name in ("flash", "cudnn")}
            dense_bytes = 2 * batch * kv_heads * context * dim * 2
            # The index holds every key but the step's own, which the timed step appends.
            index = PageIndex.build(k[:, :, : context - 1], page, capacity=context, bounds=args.bounds)
            index.append(k[:, :, context - 1:])
            exact_index = None if args.bounds == "exact" else PageIndex.build(k, page, capacity=context)
            lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
            scale = 1.0 / math.sqrt(dim)
            workspace = DecodeWorkspace("cuda")
            for budget in args.budgets:
                row = {"context": context, "batch": batch, "budget": budget, "page": page,
                       "flash_ms": dense["flash"], "cudnn_ms": dense["cudnn"],
                       "dense_gbs": dense_bytes / min(dense.values()) / 1e6}
                selection = PageSelection(method=args.method, budget=budget, sink=64, recent=64)
                pages, counts = selection(q, index)
                torch_pages, torch_counts = selection(q, index, kernel_options=KernelOptions(estimator_kernels="torch"))
                row["same_pages_as_torch"] = float((pages == torch_pages).float().mean())
                row["bounds"] = args.bounds
                if exact_index is not None:  # the share of the exact bounds' selected pages also selected here
                    exact_pages, _ = selection(q, exact_index)
                    row["pages_shared_with_exact_bounds"] = page_overlap(pages, exact_pages, index.max_pages)
                # The split kernel merges its splits itself (a workspace), as users who pass a
                # DecodeWorkspace run it; "separate" launches the merge kernel after it, as patch() runs it.
                pdl = KernelOptions(dependent_launch=True).dependent_launch_on(q.device)
                row["dependent_launch"] = pdl
                ours = lambda: triton_decode_attention(q, k, v, pages, counts, lens, page, scale,  # noqa: E731
                                                       workspace=workspace, dependent_launch=pdl)
                separate = lambda: triton_decode_attention(q, k, v, pages, counts, lens, page, scale,  # noqa: E731
                                                           dependent_launch=pdl)
                out = ours()[0]
                ref = reference_decode_attention(q, k, v, pages, counts, lens, page, scale)[0]
                row["check_rel_err"] = rel(out, ref)
                row["kernel_ms"] = bench(ours)
                row["kernel_graph_ms"] = graph_ms_per_call(ours)
                row["kernel_separate_merge_graph_ms"] = graph_ms_per_call(separate)
                read = 2 * batch * kv_heads * int(counts.sum() // (batch * kv_heads)) * page * dim * 2
                row["kernel_gbs"] = read / min(row["kernel_ms"], row["kernel_graph_ms"]) / 1e6
                row["kernel_of_copy"] = row["kernel_gbs"] / copy_gbs
                new_key = k[:, :, context - 1:].clone()

                def append():
                    # Rewind the index by the one key the step appends, so the timed step repeats.
                    index.lengths.fill_(context - 1)
                    index._length_bound = context - 1
                    return index.append(new_key)

                def step():
                    index.lengths.fill_(context - 1)
                    index._length_bound = context - 1
                    p, c = selection.append_and_select(q, index, new_key)
                    return triton_decode_attention(q, k, v, p, c, lens, page, scale, workspace=workspace)

                # The CUDA-graph step: STEPS_PER_GRAPH successive steps (each appends the next key
                # and attends with the cache length it reaches) after one rewind, per step.
                firsts = context - STEPS_PER_GRAPH
                next_keys = [k[:, :, firsts + i: firsts + i + 1].clone() for i in range(STEPS_PER_GRAPH)]
                lens_after = [torch.full_like(lens, firsts + i + 1) for i in range(STEPS_PER_GRAPH)]

                def steps(workspace=workspace, dependent=True, append_in_select=True):
                    options = KernelOptions(dependent_launch=dependent)
                    index.lengths.fill_(firsts)
                    index._length_bound = firsts
                    for i in range(STEPS_PER_GRAPH):
                        if append_in_select:  # the page-score kernel appends the key
                            p, c = selection.append_and_select(q, index, next_keys[i], kernel_options=options)
                        else:
                            index.append(next_keys[i], kernel_options=options)
                            p, c = selection(q, index, kernel_options=options)
                        out = triton_decode_attention(q, k, v, p, c, lens_after[i], page, scale, workspace=workspace,
                                                      dependent_launch=options.dependent_launch_on(q.device))
                    return out

                row["append_graph_ms"] = graph_ms_per_call(append)
                row["select_graph_ms"] = graph_ms_per_call(lambda: selection(q, index))
                row["step_ms"] = bench(step)
                try:
                    row["step_graph_ms"] = bench(graphed(lambda: steps)) / STEPS_PER_GRAPH
                    row["step_separate_merge_graph_ms"] = bench(graphed(lambda: lambda: steps(None))) / STEPS_PER_GRAPH
                    row["step_append_then_select_graph_ms"] = bench(graphed(
                        lambda: lambda: steps(append_in_select=False))) / STEPS_PER_GRAPH
                    if pdl:  # the same two without dependent launches
                        row["step_graph_no_dependent_launch_ms"] = bench(graphed(
                            lambda: lambda: steps(dependent=False))) / STEPS_PER_GRAPH
                        row["step_separate_merge_no_dependent_launch_graph_ms"] = bench(graphed(
                            lambda: lambda: steps(None, dependent=False))) / STEPS_PER_GRAPH
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row["step_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                try:
                    flex = flex_on_selection(q, k, v, pages, counts, page)
                    row["flex_rel_err"] = rel(flex(), out)
                    row["flex_ms"] = bench(flex)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row["flex_error"] = f"{type(exc).__name__}: {exc}"[:300]
                best_dense = min(dense.values())
                row["dense_over_kernel"] = best_dense / min(row["kernel_ms"], row["kernel_graph_ms"])
                row["dense_over_step"] = best_dense / row.get("step_graph_ms", row["step_ms"])
                if "flex_ms" in row:
                    row["flex_over_kernel"] = row["flex_ms"] / min(row["kernel_ms"], row["kernel_graph_ms"])
                yield row
            k = v = index = None  # frees the cache before the next shape
            torch.cuda.empty_cache()


def generate_rows(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparse_attn

    longest = max(args.contexts) + args.new_tokens + 8
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=longest,
                         attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def seconds(ids, new):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, **cache_kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def host_and_step_ms(ids, steps=8):
        """Median ms of one decode forward: until the call returns (the host's work: launches are
        queued, the GPU may still run) and until the GPU is done. Close numbers mean the step is
        host-bound (or something in it waits for the GPU)."""
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            host, step = [], []
            for _ in range(steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True)
                host.append(time.perf_counter() - start)
                torch.cuda.synchronize()
                step.append(time.perf_counter() - start)
        return statistics.median(host[2:]) * 1e3, statistics.median(step[2:]) * 1e3

    def host_profile(ids, forwards=8, top=25):
        """Where the host's time of a decode forward goes: cProfile over ``forwards`` decode forwards,
        the ``top`` functions by own time, in microseconds per forward."""
        import cProfile
        import pstats

        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            model(token, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(forwards):
                model(token, past_key_values=cache, use_cache=True)
            profiler.disable()
            torch.cuda.synchronize()
        stats = pstats.Stats(profiler).stats
        rows = sorted(((own, calls, total, f"{os.path.basename(file)}:{line}({name})")
                       for (file, line, name), (_, calls, own, total, _) in stats.items()), reverse=True)
        return [{"function": where, "calls_per_forward": calls / forwards, "own_us": own / forwards * 1e6,
                 "with_callees_us": total / forwards * 1e6} for own, calls, total, where in rows[:top]]

    decode = {"method": args.method, "budget": args.budgets[0], "page": args.page, "bounds": args.bounds}
    # A static cache makes transformers compile the decoding forward (torch.compile, CUDA graphs);
    # the sparse decode step runs inside the compiled graph (integrations.hf.graph_decode).
    cache_kwargs = {"cache_implementation": "static"} if args.cache == "static" else {}
    for context in args.contexts:
        for batch in args.batches:
            ids = torch.randint(1000, 30000, (batch, context), device="cuda")
            row = {"context": context, "batch": batch, "layers": args.layers, "new_tokens": args.new_tokens,
                   "cache": args.cache, **{
                f"decode_{k}": v for k, v in decode.items()}}
            for mode in ("dense", "sparse"):
                if mode == "sparse":
                    sparse_attn.patch(model, method="dense", decode=decode, record=False)
                seconds(ids, 2)  # warm-up (compiles the kernels)
                prefill = [seconds(ids, 1) for _ in range(args.rounds)]
                full = [seconds(ids, 1 + args.new_tokens) for _ in range(args.rounds)]
                per_token = (statistics.median(full) - statistics.median(prefill)) / args.new_tokens
                row[f"{mode}_ms_per_token"] = per_token * 1e3
                row[f"{mode}_tokens_per_s"] = batch / per_token
                if args.cache == "dynamic":
                    row[f"{mode}_host_ms"], row[f"{mode}_forward_ms"] = host_and_step_ms(ids)
                    if args.host_profile:
                        row[f"{mode}_host_profile"] = host_profile(ids)
                        print(f"{mode}, context {context}, batch {batch}: host us per decode forward, by function")
                        for entry in row[f"{mode}_host_profile"]:
                            print(f"  {entry['own_us']:9.1f} own {entry['with_callees_us']:9.1f} total "
                                  f"{entry['calls_per_forward']:6.1f} calls  {entry['function']}")
                if mode == "sparse":
                    sparse_attn.unpatch(model)
            row["speedup"] = row["dense_ms_per_token"] / row["sparse_ms_per_token"]
            yield row
            ids = None
            torch.cuda.empty_cache()


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def kernel_table(rows, meta) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; bf16, H={meta['heads']}, "
             f"Hkv={meta['kv_heads']}, D={meta['head_dim']}, page {meta['page']}, {meta['method']} selection "
             f"({meta.get('bounds', 'exact')} bounds); "
             f"copy bandwidth {meta['copy_gbs']:.0f} GB/s; launches: {meta.get('launch', 'fast')}", "",
             "| context | batch | budget | flash ms | cuDNN ms | Flex ms | ours kernel ms | kernel, CUDA graph ms | "
             "ours step ms | step, CUDA graph ms | step, append kernel apart | step, separate merge | "
             "step / separate merge, no dependent launch | "
             "append ms | select ms | dense/kernel | dense/step | Flex/kernel | "
             "kernel GB/s (of copy) | check | same pages |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {r['batch']} | - | {r['skipped']} |")
            continue
        flex = fmt(r.get("flex_ms"), ".4f") if "flex_ms" in r else "failed"
        graph = fmt(r.get("step_graph_ms"), ".4f") if "step_graph_ms" in r else "failed"
        shared = (f" ({100 * r['pages_shared_with_exact_bounds']:.1f}% of the exact bounds' pages)"
                  if "pages_shared_with_exact_bounds" in r else "")
        lines.append(
            f"| {r['context']} | {r['batch']} | {r['budget']} | {r['flash_ms']:.4f} | {r['cudnn_ms']:.4f} | {flex} | "
            f"{r['kernel_ms']:.4f} | {r['kernel_graph_ms']:.4f} | {r['step_ms']:.4f} | {graph} | "
            f"{fmt(r.get('step_append_then_select_graph_ms'), '.4f')} | "
            f"{fmt(r.get('step_separate_merge_graph_ms'), '.4f')} | "
            f"{fmt(r.get('step_graph_no_dependent_launch_ms'), '.4f')} / "
            f"{fmt(r.get('step_separate_merge_no_dependent_launch_graph_ms'), '.4f')} | "
            f"{r['append_graph_ms']:.4f} | {r['select_graph_ms']:.4f} | "
            f"{r['dense_over_kernel']:.1f}x | {r['dense_over_step']:.1f}x | {fmt(r.get('flex_over_kernel'), '.1f')}x | "
            f"{r['kernel_gbs']:.0f} ({100 * r['kernel_of_copy']:.0f}%) | {r['check_rel_err']:.1e} | "
            f"{100 * r['same_pages_as_torch']:.1f}%{shared} |")
    return "\n".join(lines)


def generate_table(rows, meta) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}, transformers "
             f"{meta.get('transformers')}; 8B-shaped Llama, random weights, bf16; launches: "
             f"{meta.get('launch', 'fast')}", "",
             "| context | batch | layers | cache | decode | dense ms/step | sparse ms/step | dense tok/s | "
             "sparse tok/s | speed-up | host ms/forward, dense / sparse | GPU-done ms/forward, dense / sparse |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r.get('batch', 1)} | {r['layers']} | {r.get('cache', 'dynamic')} | "
                     f"{r['decode_method']} budget "
                     f"{r['decode_budget']} page "
                     f"{r['decode_page']} | {r['dense_ms_per_token']:.2f} | {r['sparse_ms_per_token']:.2f} | "
                     f"{r['dense_tokens_per_s']:.1f} | {r['sparse_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{fmt(r.get('dense_host_ms'), '.2f')} / {fmt(r.get('sparse_host_ms'), '.2f')} | "
                     f"{fmt(r.get('dense_forward_ms'), '.2f')} / {fmt(r.get('sparse_forward_ms'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096],
                        help="tokens read per (sequence, KV head); --generate uses the first")
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--method", default="quest", choices=("quest", "pooled", "sink_window"))
    parser.add_argument("--bounds", default="exact", choices=("exact", "int8"),
                        help="how the page index keeps Quest's bounds (int8: half the bytes to score the pages); "
                             "--generate passes it to patch()")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-cache-gib", type=float, default=40.0, help="skip shapes whose K/V cache is larger")
    parser.add_argument("--generate", action="store_true", help="time model.generate() instead of one step")
    parser.add_argument("--layers", type=int, default=4, help="--generate: decoder layers")
    parser.add_argument("--new-tokens", type=int, default=32, help="--generate: tokens decoded per call")
    parser.add_argument("--rounds", type=int, default=3, help="--generate: calls per median")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="--generate: transformers' cache; static compiles the decoding forward")
    parser.add_argument("--host-profile", action="store_true",
                        help="--generate with the dynamic cache: cProfile the host's work of a decode forward, "
                             "dense and sparse (the top functions by own time, per forward)")
    parser.add_argument("--launch", choices=("fast", "triton"), default="fast",
                        help="kernel launches: compiled launchers once compiled (fast) or Triton's own path "
                             "each time (KernelOptions.fast_launch); host-bound rows depend on it")
    parser.add_argument("--out", default="results/decode")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU: none is visible, nothing was measured", file=sys.stderr)
        return 2
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page": args.page,
            "method": args.method, "bounds": args.bounds, "launch": args.launch,
            "date": datetime.date.today().isoformat(), "argv": sys.argv[1:]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.generate:
        import transformers

        meta["transformers"] = transformers.__version__
        rows_iter, table = generate_rows(args), generate_table
    else:
        meta["copy_gbs"] = copy_bandwidth_gbs()
        rows_iter, table = kernel_rows(args, meta["copy_gbs"]), kernel_table
    rows = []
    with kernel_options(fast_launch=args.launch == "fast"):
        for row in tqdm(rows_iter, desc="decode rows"):
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = table(rows, meta)
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
