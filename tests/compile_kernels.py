"""Compile the block-sparse attention kernels for sm_90 (and the pointer path for sm_80) on any
machine, no GPU needed, and print JSON; also the Gluon forward for sm_90.

Run by tests/test_triton_compile.py in a fresh process with ``TRITON_INTERPRET=0``: Triton decides
at import time whether ``@triton.jit`` interprets, so compiling cannot share a process with the
interpreter tests. Only Triton is imported (the kernels module is loaded by path).
"""

import importlib.util
import inspect
import json
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS_PY = Path(__file__).parents[1] / "src" / "sparse_attn" / "backends" / "triton" / "kernels.py"
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "KV_CNT": "*i32", "KV_IDX": "*i32", "QT_CNT": "*i32",
                 "QT_IDX": "*i32", "CU_Q": "*i32", "CU_K": "*i32"}  # the rest: bf16 tensors
CONSTEXPRS = {"H": 32, "KV_HEADS": 8, "GROUP": 4, "LAYOUT_HDIV": 1, "HEAD_DIM": 128, "Q_BLOCK": 128,
              "KV_BLOCK": 128, "BLOCK_M": 64, "BLOCK_N": 64, "CAUSAL": True, "VARLEN": False, "UPCAST": False}
KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")
GLUON_PY = KERNELS_PY.with_name("gluon_forward.py")


def compile_one(module, name: str, tma: bool, arch: int = 90) -> dict:
    kernel = getattr(module, name)
    params = list(inspect.signature(kernel.fn).parameters)
    values = {**CONSTEXPRS, "TMA": tma}
    constexprs = {(i,): values[p] for i, p in enumerate(params) if p in values}
    signature = {}
    for i, p in enumerate(params):
        if (i,) in constexprs:
            signature[p] = "constexpr"
        elif p[0].isupper():
            signature[p] = POINTER_TYPES.get(p, "*bf16")
        else:
            signature[p] = "fp32" if "scale" in p else "i32"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
    except Exception as exc:  # reported, and the test fails with the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {"ok": True, "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
            "bulk_tensor_loads": ptx.count("cp.async.bulk.tensor")}


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_gluon_forward(module, dim: int, causal: bool) -> dict:
    """The Gluon forward (gluon_forward.py, loaded as ``module``) for sm_90, bf16, 128x64 tiles."""
    if module.GLUON_IMPORT_ERROR is not None:
        return {"ok": False, "error": f"Gluon unavailable: {module.GLUON_IMPORT_ERROR}"}
    from triton.experimental.gluon._runtime import GluonASTSource

    import torch

    kernel = module._gluon_fwd_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    values = {"GROUP": 4, "LAYOUT_HDIV": 1, "HEAD_DIM": dim, "KV_BLOCK": 128, "BLOCK_M": module.BLOCK_M,
              "BLOCK_N": module.BLOCK_N, "CAUSAL": causal, "STAGES": module.STAGES, "num_warps": module.NUM_WARPS}
    q_layout = module._shared_layout(module.BLOCK_M, dim, torch.bfloat16)
    kv_layout = module._shared_layout(module.BLOCK_N, dim, torch.bfloat16)
    types = {"q_desc": f"tensordesc<bf16[{module.BLOCK_M}, {dim}],{q_layout!r}>",
             "k_desc": f"tensordesc<bf16[{module.BLOCK_N}, {dim}],{kv_layout!r}>",
             "v_desc": f"tensordesc<bf16[{module.BLOCK_N}, {dim}],{kv_layout!r}>",
             "OUT": "*bf16", "LSE": "*fp32", "CNT": "*i32", "IDX": "*i32", "scale_log2": "fp32"}
    signature = {p: "constexpr" if p in values else types.get(p, "i32") for p in params}
    constexprs = {(i,): values[p] for i, p in enumerate(params) if p in values}
    try:
        compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": module.NUM_WARPS})
    except Exception as exc:  # reported, and the test fails with the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {"ok": True, "wgmma": "wgmma" in ptx, "bulk_tensor_loads": ptx.count("cp.async.bulk.tensor")}


def main() -> int:
    module = load_by_path("sparse_attn_kernels_for_compile", KERNELS_PY)
    results = {f"{name}-{'tma' if tma else 'pointers'}": compile_one(module, name, tma)
               for name in KERNELS for tma in (False, True)}
    results.update({f"{name}-sm80": compile_one(module, name, False, arch=80) for name in KERNELS})
    gluon = load_by_path("sparse_attn_gluon_for_compile", GLUON_PY)
    results.update({f"gluon_forward-d{dim}-{'causal' if causal else 'full'}": compile_gluon_forward(gluon, dim, causal)
                    for dim in (64, 128) for causal in (True, False)})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
