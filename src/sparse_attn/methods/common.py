"""Plain-PyTorch helpers shared by the estimators and the primitives' references.

GQA is handled by viewing queries as ``(B, Hkv, G, S, D)`` against keys ``(B, Hkv, S, D)``: keys are
never repeated. Nothing here imports from :mod:`.primitives`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """``(B, H, S, D)`` -> ``(B, Hkv, G, S, D)`` view (query head ``h`` -> KV head ``h // G``)."""
    b, h, s, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, s, d)


def default_scale(q: Tensor) -> float:
    """The softmax scale ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(q.shape[-1])


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def per_kv_head(values: Tensor, kv_heads: int) -> Tensor:
    """``(B, Hx)`` values per query head, per KV head or one shared row: the mean over the batch and
    over each KV group's query heads, float32 ``(Hkv,)`` on the values' device."""
    values = values.float().mean(0)
    if values.numel() == 1:
        return values.expand(kv_heads)
    return values.view(kv_heads, -1).mean(1)


def index_list(value) -> list:
    """An index knob (one int or a list of them) as a list."""
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def head_mask(indices, kv_heads: int, device=None) -> Tensor:
    """Bool ``(Hkv,)``, True at ``indices``."""
    mask = torch.zeros(kv_heads, dtype=torch.bool, device=device)
    mask[list(indices)] = True
    return mask
