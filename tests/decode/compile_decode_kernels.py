"""Compile every decode kernel for sm_90 on any machine, no GPU needed, and print JSON: the page-score
kernel (Quest with exact and int8 bounds, pooled; with and without the fused append), the top-k
kernel (with and without writing the lengths), the index append kernel (exact and int8, at
positions), the split-KV decode kernel (contiguous and paged cache, self-merging) and the merge
kernel, with dependent launches on.

Run by test_decode_kernels_compile.py in a fresh process with ``TRITON_INTERPRET=0`` (Triton decides
at import time whether ``@triton.jit`` interprets).
"""

import inspect
import json
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).parents[2] / "src"))

from sparse_attn.decode import index_kernels, kernels, select_kernels  # noqa: E402


def compile_kernel(kernel, constexprs: dict, pointers: dict, warps: int = 8) -> dict:
    """Compile ``kernel`` with ``constexprs``; pointer parameters (upper-case names) are bf16 unless
    ``pointers`` names their type; scalars are fp32 where named ``scale*``, else i32."""
    params = list(inspect.signature(kernel.fn).parameters)
    fixed = {(i,): constexprs[p] for i, p in enumerate(params) if p in constexprs}
    signature = {}
    for i, p in enumerate(params):
        if (i,) in fixed:
            signature[p] = "constexpr"
        elif p[0].isupper():
            signature[p] = pointers.get(p, "*bf16")
        else:
            signature[p] = "fp32" if p.startswith("scale") else "i32"
    try:
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=fixed),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    except Exception as exc:  # reported; the test fails with the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    return {"ok": True}


def main() -> None:
    results = {}
    int64 = {"LENGTHS": "*i64", "COUNTS": "*i64", "NEXT_LENGTHS": "*i64", "POSITIONS": "*i64"}
    for scoring in ("quest", "quest_int8", "pooled"):
        for append in (False, True):
            int8 = scoring == "quest_int8"
            pointers = {**int64, "OUT": "*fp32", "STATS": "*fp32", "KSUM": "*fp32", "KSCALE": "*fp32",
                        "QMIN": "*i8", "QMAX": "*i8"}
            if int8:
                pointers.update(KA="*i8", KB="*i8")
            elif scoring == "pooled":
                pointers.update(KA="*fp32", KB="*fp32")
            constexprs = dict(KV_HEADS=8, GROUP=4, SQ=2, HEAD_DIM=128, PAGE_SIZE=64, ROWS=16, BLOCK_P=64,
                              QUEST=scoring != "pooled", INT8=int8, UPCAST=False, WRITE_STATS=True, PDL=True,
                              APPEND=append, HAS_COUNTS=append, T_P2=2, INDEX_INT8=int8)
            results[f"page_logits-{scoring}-{'append' if append else 'plain'}"] = compile_kernel(
                select_kernels._page_logits_kernel, constexprs, pointers)
    for write in (False, True):
        constexprs = dict(KV_HEADS=8, ROWS=4, PAGE_SIZE=64, NP_P2=2048, W_P2=32, TILES_P2=32, SCORED=True,
                          GROUP_MAX=False, ROWS_P2=4, ROWS_TOGETHER=True, PDL=True, WRITE_LENGTHS=write)
        pointers = {"LOGITS": "*fp32", "STATS": "*fp32", "LENGTHS": "*i64", "PAGES": "*i32", "COUNTS": "*i32",
                    "LENGTHS_OUT": "*i64"}
        results[f"select_pages-{'lengths' if write else 'plain'}"] = compile_kernel(
            select_kernels._select_pages_kernel, constexprs, pointers)
    for int8 in (False, True):
        for at_positions in (False, True):
            constexprs = dict(KV_HEADS=8, HEADS_P2=8, T_P2=2, HEAD_DIM=128, PAGE_SIZE=64, WINDOW=2, HAS_COUNTS=True,
                              INT8=int8, AT_POSITIONS=at_positions, PDL=True)
            pointers = {**int64, "KSUM": "*fp32", "QMIN": "*i8", "QMAX": "*i8", "QSCALE": "*fp32"}
            results[f"append-{'int8' if int8 else 'exact'}-{'positions' if at_positions else 'lengths'}"] = \
                compile_kernel(index_kernels._append_kernel, constexprs, pointers)
    for paged in (False, True):
        constexprs = dict(KV_HEADS=8, GROUP=4, SQ=1, HEAD_DIM=128, PAGE_SIZE=64, BLOCK_N=128, ROWS=16, NUM_SPLITS=16,
                          PAGED=paged, UPCAST=False, SCAN=64, FUSED_MERGE=True, PDL=True)
        pointers = {"PAGES": "*i32", "COUNTS": "*i32", "CACHE_LENS": "*i32", "BLOCK_TABLE": "*i32", "LSE": "*fp32",
                    "O_PART": "*fp32", "LSE_PART": "*fp32", "ARRIVALS": "*i32"}
        results[f"decode_split-{'paged' if paged else 'contiguous'}"] = compile_kernel(
            kernels._decode_split_kernel, constexprs, pointers)
    results["decode_merge"] = compile_kernel(
        kernels._decode_merge_kernel, dict(HEADS=32, SQ=1, HEAD_DIM=128, NUM_SPLITS=16, ROWS=16, PDL=True),
        {"O_PART": "*fp32", "LSE_PART": "*fp32", "LSE": "*fp32"}, warps=4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
