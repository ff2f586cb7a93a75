"""Block grids: the token extents of every block of a geometry, shared by the static patterns and the
sparsity methods, and per-head block rules -> layout."""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, dense_to_csr, block_size_pair

PerHead = Union[int, Sequence[int]]


def per_head(value: PerHead, num_heads: int, name: str) -> list:
    """Broadcast an int to every head, or check a per-head list has ``num_heads`` entries."""
    if isinstance(value, int):
        values = [value] * num_heads
    else:
        values = [int(v) for v in value]
        if len(values) != num_heads:
            raise ValueError(f"{name} has {len(values)} entries but num_heads={num_heads}")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    return values


class BlockGrid:
    """Token extents of every query block (absolute positions) and key block of a geometry."""

    def __init__(self, q_len: int, kv_len: int, block_size, causal: bool, device=None):
        self.q_block, self.kv_block = block_size_pair(block_size)
        # An empty layout gives us the geometry helpers without duplicating them.
        probe = BlockSparseLayout(
            torch.zeros(1, 1, -(-q_len // self.q_block), dtype=torch.int32, device=device),
            torch.zeros(1, 1, -(-q_len // self.q_block), 1, dtype=torch.int32, device=device),
            q_len, kv_len, self.q_block, self.kv_block, causal, check=False,
        )
        self.q_len, self.kv_len, self.causal, self.device = q_len, kv_len, causal, device
        self.q_first, self.q_last, self.k_first, self.k_last = probe._block_bounds()
        self.reachable = probe.causal_block_mask()  # (NQ, NK)
        self.qb = torch.arange(probe.num_q_blocks, device=device)[:, None]
        self.kb = torch.arange(probe.num_kv_blocks, device=device)[None, :]
        self._masks = {}  # (rule, argument) -> block mask, computed once per grid (read-only)

    def window_blocks(self, window: int) -> Tensor:
        """Key blocks overlapping the last ``window`` positions up to each query block's last query."""
        if window <= 0:
            return torch.zeros_like(self.reachable)
        lo = self.q_first[:, None] - window + 1
        return (self.k_last[None, :] >= lo) & (self.k_first[None, :] <= self.q_last[:, None])

    def sink_blocks(self, sink: int) -> Tensor:
        """Key blocks overlapping the first ``sink`` positions (read-only: kept with the grid)."""
        key = ("sink", sink)
        if key not in self._masks:
            self._masks[key] = (self.k_first[None, :] < sink).expand_as(self.reachable)
        return self._masks[key]

    def diagonal_blocks(self) -> Tensor:
        """The key block that holds each query block's last query position (its own block)."""
        return self.recent_blocks(1)

    def recent_blocks(self, count: int) -> Tensor:
        """Each query block's own (diagonal) key block and the ``count - 1`` blocks before it
        (read-only: kept with the grid)."""
        key = ("recent", count)
        if key not in self._masks:
            last_kv = torch.clamp(self.q_last, 0, self.kv_len - 1) // self.kv_block
            distance = last_kv[:, None] - self.kb
            self._masks[key] = (distance >= 0) & (distance < max(count, 1))
        return self._masks[key]

    def build(self, head_masks: list, batch: int = 1) -> BlockSparseLayout:
        dense = torch.stack(head_masks)[None] & self.reachable
        if batch > 1:
            dense = dense.expand(batch, -1, -1, -1)
        cnt, idx = dense_to_csr(dense)
        return BlockSparseLayout(cnt, idx, self.q_len, self.kv_len, self.q_block, self.kv_block,
                                 self.causal, check=False)


def shared_block_grid(q_len: int, kv_len: int, block_size, causal: bool, device) -> BlockGrid:
    """The :class:`BlockGrid` of a geometry, built once per geometry and device and shared by every
    call that asks for it (its tensors are read-only); a new one inside a CUDA-graph capture."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return BlockGrid(q_len, kv_len, block_size, causal, device)
    return _cached_grid(q_len, kv_len, block_size_pair(block_size), causal, device)


# A grid holds (NQ, NK) masks (4 MB each at 128K with 64-token blocks): few are kept. A prefill with the
# pre-check asks for 5 geometries (4 sampled runs and the call), the same at every layer.
@functools.lru_cache(maxsize=16)
def _cached_grid(q_len: int, kv_len: int, block_size: tuple, causal: bool, device: torch.device) -> BlockGrid:
    return BlockGrid(q_len, kv_len, block_size, causal, device)


def layout_from_block_rule(rule: Callable[[int, BlockGrid], Tensor], num_heads: int, q_len: int,
                           kv_len: int, block_size, causal: bool, device=None) -> BlockSparseLayout:
    """Build a layout from ``rule(head, grid) -> (NQ, NK) bool`` evaluated per head."""
    grid = BlockGrid(q_len, kv_len, block_size, causal, device)
    return grid.build([rule(h, grid) for h in range(num_heads)])
