"""Dense attention the library runs itself: a method's dense fallback, a layer or call that stays
dense under ``patch``. One place decides which SDPA backend runs it (``KernelOptions.dense``).

On Hopper GPUs cuDNN's attention is the fastest dense kernel PyTorch ships for bf16/fp16 prefill
(on an H100 at 32K-128K tokens, SDPA's flash backend takes 1.25-1.45x cuDNN's time: see
docs/benchmarks.md), but SDPA does not pick it by itself, so ``"auto"`` puts it first there.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ..options import KernelOptions, resolve_kernel_options

__all__ = ["dense_backend_order", "dense_backend_context", "dense_causal_attention"]

_FALLBACK = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
PREFILL_ROWS = 17  # "auto" puts cuDNN first from this many query rows on (decode steps keep SDPA's choice)


def dense_backend_order(choice: str, device: torch.device, q_len: int) -> Optional[tuple]:
    """SDPA backend names in the order tried for ``KernelOptions.dense == choice`` on ``device`` for
    ``q_len`` query rows; None for SDPA's own choice (``"auto"``: off Hopper-or-newer GPUs, and for
    decode steps of up to 16 rows)."""
    if choice == "sdpa" or device.type != "cuda":
        return None
    first = choice
    if choice == "auto":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 9 or q_len < PREFILL_ROWS:
            return None
        first = "cudnn"
    first = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}[first]
    return (first,) + tuple(name for name in _FALLBACK if name != first)


def dense_backend_context(device: torch.device, q_len: int, kernel_options: Optional[KernelOptions] = None):
    """A context in which SDPA calls of ``q_len`` query rows on ``device`` try the backends of
    ``kernel_options.dense`` (None: the current default) in order; a no-op where SDPA chooses."""
    order = dense_backend_order(resolve_kernel_options(kernel_options).dense, torch.device(device), q_len)
    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in order], set_priority=True)


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, *,
                           kernel_options: Optional[KernelOptions] = None) -> Tensor:
    """Exact causal attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, Skv, D)`` through SDPA,
    queries bottom-right aligned (query ``i`` at position ``i + Skv - Sq``), GQA without repeating
    K/V, on the backend ``kernel_options.dense`` picks."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = None
    if q_len != kv_len:
        positions = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= positions
    with dense_backend_context(q.device, q_len, kernel_options):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
