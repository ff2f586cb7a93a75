"""``DecodeWorkspace``: device memory that :func:`~.attention.decode_attention` calls reuse.

It holds int32 arrival counters, one per (sequence, KV head, query-row tile) of a call. With them
the split-KV decode kernel merges its splits by itself (the last split of each row to finish
merges all of them) instead of launching a second, merge kernel: one launch less per decode step.
Every counter is 0 between calls; the merging program puts its counter back to 0.

Like FlashInfer's workspace buffer, allocate one per device and stream (or per model) and pass it
to every call on that stream. Two calls that may run at the same time (on different streams) must
not share one. The counters grow on demand outside a CUDA-graph capture; inside one, a call that
needs more counters than the workspace holds merges with the separate kernel instead (call
:meth:`reserve` before capturing to avoid that).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .page_index import _capturing

__all__ = ["DecodeWorkspace"]


class DecodeWorkspace:
    """Arrival counters for :func:`~.attention.decode_attention` (see the module docstring).

    Args:
        device: where the decode calls run.
        rows: counters to allocate now (default 4096: batch 512 with 8 KV heads); a call needs
            ``batch * kv_heads * row_tiles`` of them (``row_tiles`` is 1 unless a KV group has more
            than 128 query rows).
    """

    def __init__(self, device, rows: int = 4096):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"DecodeWorkspace: rows must be an int >= 1, got {rows!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if _capturing(self.device):
            raise RuntimeError("DecodeWorkspace: create the workspace before a CUDA-graph capture, not inside one")
        self._counters = torch.zeros(rows, dtype=torch.int32, device=self.device)

    @property
    def rows(self) -> int:
        """How many counters the workspace holds."""
        return self._counters.numel()

    def reserve(self, rows: int) -> "DecodeWorkspace":
        """Hold at least ``rows`` counters (grows outside a CUDA-graph capture only); returns self."""
        if rows > self.rows:
            if _capturing(self.device):
                raise RuntimeError(f"DecodeWorkspace: cannot grow from {self.rows} to {rows} counters inside a "
                                   "CUDA-graph capture; call reserve() before capturing")
            self._counters = torch.zeros(max(rows, 2 * self.rows), dtype=torch.int32, device=self.device)
        return self

    def arrival_counters(self, rows: int) -> Optional[Tensor]:
        """``rows`` zeroed counters, grown if needed; None inside a CUDA-graph capture when the
        workspace holds fewer (the caller then merges with the separate kernel)."""
        if rows > self.rows:
            if _capturing(self.device):
                return None
            self.reserve(rows)
        return self._counters[:rows]

    def check_device(self, device: torch.device) -> None:
        """ValueError unless the workspace lives on ``device``."""
        if device != self.device:
            raise ValueError(f"workspace is on device {self.device}, the decode call on device {device}")

    def __repr__(self) -> str:
        return f"DecodeWorkspace(device={self.device}, rows={self.rows})"
