"""Plain-PyTorch helpers shared by the estimators and the primitives' references.

GQA is handled by viewing queries as ``(B, Hkv, G, S, D)`` against keys ``(B, Hkv, S, D)``: keys are
never repeated. Nothing here imports from :mod:`.primitives`.
"""

from __future__ import annotations

import math
import time

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


class WorkTimer:
    """The time a stretch of work takes on ``device``, without draining the device's queue first:
    on a GPU, CUDA events recorded around the work (the GPU time between them, idle gaps while the
    host launches included; earlier queued work is not counted and goes on overlapping the host's
    launches), elsewhere the wall time. ``seconds()`` after the work (it waits for the end event)."""

    def __init__(self, device):
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._began = time.perf_counter()
        self._seconds = None

    def stop(self) -> "WorkTimer":
        """Mark the end of the work (queued on a GPU: no wait)."""
        if self._cuda:
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._began
        return self

    def seconds(self) -> float:
        if self._cuda and self._seconds is None:
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1e3
        return self._seconds
