"""The Triton block-sparse FlashAttention kernels (forward + backward, GQA, varlen) and the Gluon
kernels for Hopper GPUs, as two backends of the registry: ``triton`` and ``gluon``.

Nothing here touches the GPU or imports Triton at import time; the ``*_can_run`` functions import
it lazily and explain why they cannot run a call.
"""

from __future__ import annotations

import os

import torch

from ...options import KernelOptions

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_BATCH_HEADS = 65535  # CUDA's limit on the grid's second dimension, which walks (batch, head)


def _kernels_unavailable_reason(q, v) -> str | None:
    """Why neither kernel family can run on these tensors (None when the Triton kernels can)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "q is not on a CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton kernels; use float16 or bfloat16"
    dim = q.shape[-1]
    if dim not in SUPPORTED_HEAD_DIMS or v.shape[-1] != dim:
        return (f"head_dim {dim} (v: {v.shape[-1]}) is not supported by the Triton kernels; "
                f"supported: {SUPPORTED_HEAD_DIMS} with equal q/k/v head dims")
    return None


def grid_limit_reason(batch: int, heads: int, batch_name: str = "batch") -> str | None:
    """None when the kernels' grid can hold ``batch * heads`` programs, else why not (one grid
    dimension walks the (batch, head) pairs; ``batch_name`` names what ``batch`` counts)."""
    if batch * heads > MAX_BATCH_HEADS:
        return (f"{batch_name} * heads = {batch * heads} is over the Triton kernels' {MAX_BATCH_HEADS} "
                f"(one grid dimension walks them): split the {batch_name}")
    return None


def triton_can_run(q, k, v, layout, options: KernelOptions = KernelOptions(), num_seqs=None) -> str | None:
    """None when the Triton kernels can run this call, else the reason they cannot. Padded
    ``(B, H, S, D)`` tensors, or packed ``(T, H, D)`` ones of ``num_seqs`` sequences."""
    if options.forward == "gluon":
        return "KernelOptions.forward='gluon' asks for the Gluon forward"
    reason = _kernels_unavailable_reason(q, v)
    if reason is not None:
        return reason
    if num_seqs is not None:
        return grid_limit_reason(num_seqs, q.shape[1], "packed batch")
    return grid_limit_reason(q.shape[0], q.shape[1])


def triton_can_run_fast(q, k, v, layout, options: KernelOptions = KernelOptions(), num_seqs=None) -> str | None:
    """For ``auto``: the interpreter is exact but slow, so only real GPUs qualify."""
    reason = triton_can_run(q, k, v, layout, options, num_seqs)
    if reason is None and not q.is_cuda:
        return "Triton would run in the CPU interpreter (slow); only chosen when named"
    return reason


def gluon_can_run(q, k, v, layout, options: KernelOptions = KernelOptions(), num_seqs=None) -> str | None:
    """None when the Gluon forward (Hopper GPUs) can run this call, else the reason it cannot."""
    if options.forward == "triton":
        return "KernelOptions.forward='triton' asks for the Triton forward"
    reason = _kernels_unavailable_reason(q, v)
    if reason is not None:
        return reason
    from .ops import gluon_unsupported_reason

    return gluon_unsupported_reason(q, k, v, layout) or grid_limit_reason(
        q.shape[0] if num_seqs is None else num_seqs, q.shape[1])


def backward_kernel(q, k, v, layout, options: KernelOptions = KernelOptions()) -> tuple[str, str | None]:
    """Which kernels the backward of a call runs (for a contiguous output gradient): ``("gluon",
    None)`` (the Hopper dQ and dK/dV kernels) or ``("triton", why not Gluon)``."""
    from .ops import choose_kernel

    return choose_kernel("backward", options.backward, q, k, v, layout, (q, q))  # out and dO are shaped like q


def run_triton(q, k, v, layout, scale, options: KernelOptions):
    from .ops import triton_attention

    return triton_attention(q, k, v, layout, scale, "triton", options)


def run_gluon(q, k, v, layout, scale, options: KernelOptions):
    from .ops import triton_attention

    return triton_attention(q, k, v, layout, scale, "gluon", options)


def run_triton_varlen(q, k, v, cu_q, cu_k, layout, scale, options: KernelOptions):
    from .ops import triton_attention_varlen

    return triton_attention_varlen(q, k, v, cu_q, cu_k, layout, scale, "triton", options)


def run_gluon_varlen(q, k, v, cu_q, cu_k, layout, scale, options: KernelOptions):
    from .ops import triton_attention_varlen

    return triton_attention_varlen(q, k, v, cu_q, cu_k, layout, scale, "gluon", options)
