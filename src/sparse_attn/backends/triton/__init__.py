"""Triton block-sparse FlashAttention backend (forward + backward, GQA, varlen).

Nothing here touches the GPU or imports Triton at import time; :func:`triton_can_run` imports it
lazily and explains why it cannot run a call.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_BATCH_HEADS = 65535  # CUDA's limit on the grid's second dimension, which walks (batch, head)


def triton_can_run(q, k, v, layout) -> str | None:
    """None when the Triton kernels can run this call, else the reason they cannot."""
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
    return grid_limit_reason(q.shape[0], q.shape[1])


def grid_limit_reason(batch: int, heads: int, batch_name: str = "batch") -> str | None:
    """None when the kernels' grid can hold ``batch * heads`` programs, else why not (one grid
    dimension walks the (batch, head) pairs; ``batch_name`` names what ``batch`` counts)."""
    if batch * heads > MAX_BATCH_HEADS:
        return (f"{batch_name} * heads = {batch * heads} is over the Triton kernels' {MAX_BATCH_HEADS} "
                f"(one grid dimension walks them): split the {batch_name}")
    return None


def triton_can_run_fast(q, k, v, layout) -> str | None:
    """For ``auto``: the interpreter is exact but slow, so only real GPUs qualify."""
    reason = triton_can_run(q, k, v, layout)
    if reason is None and not q.is_cuda:
        return "Triton would run in the CPU interpreter (slow); only chosen when named"
    return reason


def forward_kernel(q, k, v, layout) -> tuple[str, str | None]:
    """Which kernel ``backend="triton"`` runs the forward of a call with (padded ``(B, H, S, D)`` or,
    for ``sparse_attention_varlen``, packed ``(T, H, D)`` tensors): ``("gluon", None)`` (the Hopper
    forward in Gluon) or ``("triton", why the Gluon one is skipped)``."""
    from .ops import gluon_skip_reason

    reason = gluon_skip_reason(q, k, v, layout)
    return ("gluon", None) if reason is None else ("triton", reason)


def backward_kernel(q, k, v, layout) -> tuple[str, str | None]:
    """Which kernels the backward of a padded-batch call runs (for a contiguous output gradient):
    ``("gluon", None)`` (the Hopper dQ and dK/dV kernels in Gluon) or ``("triton", why not Gluon)``."""
    from .ops import gluon_skip_reason

    reason = gluon_skip_reason(q, k, v, layout, (q, q))  # the output and its gradient are shaped like q
    return ("gluon", None) if reason is None else ("triton", reason)


def triton_forward(q, k, v, layout, scale):
    from .ops import triton_attention

    return triton_attention(q, k, v, layout, scale)


def triton_varlen_forward(q, k, v, cu_q, cu_k, layout, scale):
    from .ops import triton_attention_varlen

    return triton_attention_varlen(q, k, v, cu_q, cu_k, layout, scale)
