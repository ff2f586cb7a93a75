"""token_sparse_attention: each query token attends its own list of key tokens (DeepSeek Sparse
Attention's attention), with a plain-PyTorch reference beside the Triton kernels.

The list is shared by every head (DSA selects tokens once per query token for all heads); query head
``h`` reads KV head ``h // (H / Hkv)``. Forward and backward on both backends.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..attention import autocast_inputs
from ..backends.reference import naive_masked_attention

__all__ = ["token_sparse_attention", "reference_token_sparse_attention", "token_mask", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")


def token_mask(indices: Tensor, seq: int, positions: Optional[Tensor] = None) -> Tensor:
    """Bool ``(B, Sq, S)``: the keys each query token reads, from its list ``indices (B, Sq, K)``
    (-1 entries unused), causal (no key after the query's position). ``positions (Sq,)``: the
    queries' positions, default the last ``Sq`` of ``seq``."""
    batch, q_len, _ = indices.shape
    idx = indices.long()
    mask = torch.zeros(batch, q_len, seq + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(2, torch.where(idx >= 0, idx, seq).clamp(max=seq), True)
    if positions is None:
        positions = torch.arange(seq - q_len, seq, device=indices.device)
    causal = torch.arange(seq, device=indices.device)[None, :] <= positions[:, None]
    return mask[..., :seq] & causal


def reference_token_sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float):
    """``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32)`` with a dense ``Sq x S`` mask,
    softmax in float32 (float64 for float64 inputs); differentiable. A query that reads no key
    gets output 0 and LSE ``-inf``."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = token_mask(indices, k.shape[2])[:, None]  # (B, 1, Sq, S): every head alike
    out, lse = naive_masked_attention(q.to(work), k.to(work), v.to(work), mask, scale)
    return out.to(q.dtype), lse.float()


class _TritonTokenSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, scale):
        from .kernels import triton_forward

        out, lse = triton_forward(q, k, v, indices, scale)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, indices, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from .kernels import triton_backward

        q, k, v, indices, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_backward(q, k, v, indices, out, lse, grad_out, ctx.scale)
        return dq, dk, dv, None, None


def _triton_unsupported_reason(q: Tensor, k: Tensor) -> Optional[str]:
    try:
        from .kernels import unsupported_reason
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return unsupported_reason(q, k)


def _check(q, k, v, indices, check_values: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share batch, head_dim and dtype, got q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)} {k.dtype}, v {v.dtype}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k's {k.shape[1]} KV heads must divide q's {q.shape[1]} heads")
    if not 0 < q.shape[2] <= k.shape[2]:
        raise ValueError(f"q must hold 1 to S = {k.shape[2]} queries (the last positions), got {q.shape[2]}")
    expected = (q.shape[0], q.shape[2])
    if not isinstance(indices, Tensor) or indices.dim() != 3 or tuple(indices.shape[:2]) != expected \
            or indices.dtype not in (torch.int32, torch.int64) or indices.shape[2] < 1:
        raise ValueError(f"indices must be an int32/int64 tensor of shape (batch, Sq, K) = ({expected[0]}, "
                         f"{expected[1]}, K >= 1), got {getattr(indices, 'dtype', type(indices).__name__)} "
                         f"{tuple(getattr(indices, 'shape', ()))}")
    for name, t in (("k", k), ("v", v), ("indices", indices)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if check_values:
        seq = k.shape[2]
        if bool(((indices < -1) | (indices >= seq)).any()):
            raise ValueError(f"indices must hold key positions in [0, {seq}) or -1 (unused)")
        ordered = torch.sort(indices, -1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if bool(repeated.any()):
            raise ValueError("indices must not list a key position twice for one query token")


def token_sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, *, scale: Optional[float] = None,
                           backend: str = "auto", return_lse: bool = False, check_values: bool = True):
    """Attention of each query token over the key tokens its list names.

    Args:
        q: ``(B, H, Sq, D)``, the queries at the last ``Sq`` of ``S`` positions.
        k, v: ``(B, Hkv, S, D)``; ``Hkv`` divides ``H``. Same dtype as q.
        indices: ``(B, Sq, K)`` int32/int64: the key positions query token ``i`` reads (every head
            alike), in any order; -1 marks an unused entry; a position after the query's own is
            skipped (causal). No position twice in one list.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"reference"`` (PyTorch, dense ``Sq x S`` masks, any floating dtype),
            ``"triton"`` (float16/bfloat16, head dims 16-128, CUDA or the CPU interpreter) or
            ``"auto"`` (Triton on CUDA when it can run the call, else the reference).
        return_lse: also return the natural-log LSE ``(B, H, Sq)`` float32.
        check_values: check the index values on the host (one device sync); pass False for lists
            from :func:`~sparse_attn.dsa.select_tokens`.

    Returns ``out (B, H, Sq, D)`` in q's dtype (and the LSE); differentiable in q, k, v on both
    backends. A query that reads no key gets output 0 (LSE ``-inf``). Inside a ``torch.autocast``
    region, float32 inputs are cast to its dtype first, as autocast does for SDPA.
    """
    q, k, v = autocast_inputs(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, k, v, indices, check_values)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    scale = float(scale)
    reason = _triton_unsupported_reason(q, k)
    if backend == "auto":
        backend = "triton" if q.is_cuda and reason is None else "reference"
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = _TritonTokenSparse.apply(q, k, v, indices.to(torch.int32).contiguous(), scale)
    else:
        with torch.autocast(q.device.type, enabled=False):  # the reference computes in float32
            out, lse = reference_token_sparse_attention(q, k, v, indices, scale)
    return (out, lse) if return_lse else out
