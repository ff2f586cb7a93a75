"""Plain-PyTorch helpers shared by the estimators and the primitives' references.

GQA is handled by viewing queries as ``(B, Hkv, G, S, D)`` against keys ``(B, Hkv, S, D)``: keys are
never repeated. Nothing here imports from :mod:`.primitives`.
"""

from __future__ import annotations

import math

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
