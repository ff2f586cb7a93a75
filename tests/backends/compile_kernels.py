"""Compile the block-sparse attention kernels for sm_90 (and the pointer path for sm_80) on any
machine, no GPU needed, and print JSON; also the Gluon kernels (forward, dQ, dK/dV) for sm_90.

Run by tests/test_triton_compile.py in a fresh process with ``TRITON_INTERPRET=0``: Triton decides
at import time whether ``@triton.jit`` interprets, so compiling cannot share a process with the
interpreter tests. Only Triton is imported (the kernels module is loaded by path).
"""

import importlib.util
import inspect
import json
import sys
import types
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS_PY = Path(__file__).parents[2] / "src" / "sparse_attn" / "backends" / "triton" / "kernels.py"
POINTER_TYPES = {"LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "KV_CNT": "*i32", "KV_IDX": "*i32", "QT_CNT": "*i32",
                 "QT_IDX": "*i32", "CU_Q": "*i32", "CU_K": "*i32"}  # the rest: bf16 tensors
CONSTEXPRS = {"H": 32, "KV_HEADS": 8, "GROUP": 4, "LAYOUT_HDIV": 1, "HEAD_DIM": 128, "Q_BLOCK": 128,
              "KV_BLOCK": 128, "BLOCK_M": 64, "BLOCK_N": 64, "CAUSAL": True, "VARLEN": False, "UPCAST": False,
              "HAS_DLSE": True}
KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")


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


def load_gluon_module(name: str):
    """A Gluon kernel module of the backend (``gluon_forward``, ``gluon_backward``) imported through
    a stand-in package over the backend's folder, so its relative imports resolve without importing
    sparse_attn (whose Triton kernels would be decorated in this process)."""
    package = "_sparse_attn_triton_backend"
    if package not in sys.modules:
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(KERNELS_PY.parent)]
        sys.modules[package] = stand_in
    return importlib.import_module(f"{package}.{name}")


def _compile_gluon(kernel, signature_types: dict, values: dict, num_warps: int) -> dict:
    """Compile a Gluon kernel for sm_90 (constexpr ``values``, argument types by name, the rest i32)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in values else signature_types.get(p, "i32") for p in params}
    constexprs = {(i,): values[p] for i, p in enumerate(params) if p in values}
    try:
        compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as exc:  # reported, and the test fails with the message
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {"ok": True, "wgmma": "wgmma" in ptx, "bulk_tensor_loads": ptx.count("cp.async.bulk.tensor"),
            "shared_bytes": compiled.metadata.shared}


def _descriptor_type(rows: int, dim: int) -> str:
    """The signature type of a bf16 TMA descriptor argument with ``rows x dim`` tiles (the shared
    layout comes from gluon_forward, which both Gluon modules use)."""
    import torch

    layout = load_gluon_module("gluon_forward")._shared_layout(rows, dim, torch.bfloat16)
    return f"tensordesc<bf16[{rows}, {dim}],{layout!r}>"


def compile_gluon_forward(module, dim: int, causal: bool, rows: int = 128, varlen: bool = False) -> dict:
    """The Gluon forward (gluon_forward.py, loaded as ``module``) for sm_90, bf16, ``rows`` x 64
    tiles (one layout row of ``rows`` queries per program, 16 rows per warp), padded or packed."""
    if module.GLUON_IMPORT_ERROR is not None:
        return {"ok": False, "error": f"Gluon unavailable: {module.GLUON_IMPORT_ERROR}"}
    warps = rows // module.ROWS_PER_WARP
    values = {"GROUP": 4, "LAYOUT_HDIV": 1, "HEAD_DIM": dim, "KV_BLOCK": 128, "BLOCK_M": rows,
              "BLOCK_N": module.BLOCK_N, "CAUSAL": causal, "VARLEN": varlen, "STAGES": module.STAGES,
              "num_warps": warps}
    types = {"q_desc": _descriptor_type(rows, dim), "CU_Q": "*i32", "CU_K": "*i32",
             "k_desc": _descriptor_type(module.BLOCK_N, dim),
             "v_desc": _descriptor_type(module.BLOCK_N, dim),
             "OUT": "*bf16", "LSE": "*fp32", "CNT": "*i32", "IDX": "*i32", "scale_log2": "fp32"}
    return _compile_gluon(module._gluon_fwd_kernel, types, values, warps)


def compile_gluon_backward(module, kind: str, dim: int, causal: bool) -> dict:
    """The Gluon dQ or dK/dV kernel (``kind`` "dq" / "dkdv"; gluon_backward.py, loaded as
    ``module``) for sm_90, bf16, with the tiles the library launches."""
    if module.GLUON_IMPORT_ERROR is not None:
        return {"ok": False, "error": f"Gluon unavailable: {module.GLUON_IMPORT_ERROR}"}
    if kind == "dq":
        rows, keys, warps = module.DQ_BLOCK_M, module.DQ_BLOCK_N, module.DQ_NUM_WARPS
        kernel = module._gluon_dq_kernel
        pointers = {"O": "*bf16", "DQ": "*bf16", "CNT": "*i32", "IDX": "*i32"}
    else:
        rows, keys, warps = module.BLOCK_M, module.BLOCK_N, module.NUM_WARPS
        kernel = module._gluon_dkdv_kernel
        pointers = {"DK": "*bf16", "DV": "*bf16", "QT_CNT": "*i32", "QT_IDX": "*i32"}
    values = {"GROUP": 4, "LAYOUT_HDIV": 1, "HEAD_DIM": dim, "Q_BLOCK": 128, "KV_BLOCK": 128, "BLOCK_M": rows,
              "BLOCK_N": keys, "CAUSAL": causal, "HAS_DLSE": True, "STAGES": module.STAGES, "num_warps": warps}
    types = {"q_desc": _descriptor_type(rows, dim), "do_desc": _descriptor_type(rows, dim),
             "k_desc": _descriptor_type(keys, dim), "v_desc": _descriptor_type(keys, dim),
             "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "scale_log2": "fp32", "scale": "fp32", **pointers}
    return _compile_gluon(kernel, types, values, warps)


def main() -> int:
    module = load_by_path("sparse_attn_kernels_for_compile", KERNELS_PY)
    results = {f"{name}-{'tma' if tma else 'pointers'}": compile_one(module, name, tma)
               for name in KERNELS for tma in (False, True)}
    results.update({f"{name}-sm80": compile_one(module, name, False, arch=80) for name in KERNELS})
    gluon = load_gluon_module("gluon_forward")
    variants = {"gluon_forward": (128, False), "gluon_forward_m64": (64, False), "gluon_forward_varlen": (128, True)}
    results.update({f"{name}-d{dim}-{'causal' if causal else 'full'}":
                    compile_gluon_forward(gluon, dim, causal, rows, varlen)
                    for name, (rows, varlen) in variants.items() for dim in (64, 128) for causal in (True, False)})
    backward = load_gluon_module("gluon_backward")
    results.update({f"gluon_{kind}-d{dim}-{'causal' if causal else 'full'}":
                    compile_gluon_backward(backward, kind, dim, causal)
                    for kind in ("dq", "dkdv") for dim in (64, 128) for causal in (True, False)})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
