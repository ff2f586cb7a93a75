"""``sparse_attention``: the single entry point that checks inputs and dispatches to a backend."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .backends import explain_choice, select_backend
from .layout import BlockSparseLayout, LayoutError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
    """Raise ``ValueError`` / :class:`LayoutError` naming the bad argument and what was expected."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, q_len, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (batch, heads, seq)")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k/v heads ({kv_heads}) must divide q heads ({heads}) for GQA")
    if k.shape[-1] != dim:
        raise ValueError(f"q head_dim {dim} and k head_dim {k.shape[-1]} differ")
    if q_len == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q_len={q_len}, kv_len={k.shape[2]}")
    layout.check_compatible(batch, heads, kv_heads, q_len, k.shape[2], q.device)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, *,
                     causal: Optional[bool] = None, scale: Optional[float] = None,
                     backend: str = "auto", return_lse: bool = False):
    """Attention restricted to the key blocks ``layout`` keeps.

    Args:
        q: ``(B, H, Sq, D)`` queries; float16, bfloat16, float32 or float64.
        k, v: ``(B, Hkv, Skv, D)`` keys and values; ``Hkv`` must divide ``H`` (GQA: query head
            ``h`` reads KV head ``h // (H // Hkv)``; K/V are never repeated in fast paths).
        layout: a :class:`BlockSparseLayout` built for ``(Sq, Skv)``; its heads are 1, ``Hkv`` or
            ``H`` and its batch 1 or ``B``.
        causal: defaults to ``layout.causal``; if given it must agree with the layout. Causal
            queries are bottom-right aligned: query ``i`` sits at position ``i + Skv - Sq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (fastest that can run), ``"triton"``, ``"flex"`` or ``"reference"``.
        return_lse: also return the log-sum-exp ``(B, H, Sq)`` float32 (natural log).

    Rows with no kept key get output 0 and LSE ``-inf``. Gradients flow through every backend
    that supports them (``reference`` always).
    """
    check_attention_inputs(q, k, v, layout)
    if causal is not None and bool(causal) != layout.causal:
        raise LayoutError(
            f"causal={causal} disagrees with the layout (built with causal={layout.causal}); "
            "rebuild the layout or omit causal"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select_backend(backend, q, k, v, layout)
    out, lse = chosen.forward(q, k, v, layout, scale)
    return (out, lse) if return_lse else out


def which_backend(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> tuple[str, list]:
    """What ``backend="auto"`` would run for these inputs, and why each faster one was skipped."""
    check_attention_inputs(q, k, v, layout)
    return explain_choice(q, k, v, layout)
