"""How a sequence is split over ranks for context-parallel attention, and what each rank must receive.

A :class:`PartitionPlan` cuts the sequence of a self-attention layout (``q_len == kv_len``) into
contiguous shards, one per rank, at multiples of ``max(q_block, kv_block)`` tokens: rank ``r`` owns the
queries, keys and values of tokens ``bounds[r]:bounds[r + 1]``. From the layout it knows which key
blocks the kept blocks of each rank's query rows read (``kv_blocks``), so a rank is sent only those.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from ..layout import BlockSparseLayout, LayoutError

__all__ = ["PartitionPlan", "plan_partition"]


@dataclass(frozen=True)
class PartitionPlan:
    """Contiguous shards of one sequence over ``world_size`` ranks.

    Attributes:
        bounds: ``world_size + 1`` token offsets; rank ``r`` owns tokens ``bounds[r]:bounds[r + 1]``.
        kept_blocks: per rank, the kept (causally reachable) blocks of its query rows, summed over
            the layout's batch and heads: the work the rank does.
        kv_blocks: per rank, the sorted key blocks its kept (causally reachable) blocks read; rank
            ``r`` is sent exactly those of them that other ranks own.
        needs: per rank, the ranks owning some block of ``kv_blocks[r]`` (its own included when it
            reads it).
        seq_len, q_block, kv_block, causal: the geometry of the layout the plan was built for.
    """

    bounds: tuple
    kept_blocks: tuple
    kv_blocks: tuple
    needs: tuple
    seq_len: int
    q_block: int
    kv_block: int
    causal: bool

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def shard_lengths(self) -> tuple:
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    @property
    def balance(self) -> float:
        """Max over mean kept blocks per rank: 1.0 is perfectly balanced work."""
        mean = sum(self.kept_blocks) / self.world_size
        return max(self.kept_blocks) / mean if mean else 1.0

    def received_tokens(self) -> tuple:
        """Per rank, the key/value tokens it receives from other ranks."""
        return tuple(sum(self.block_tokens(j) for j in self.kv_blocks[r] if self.owner(j) != r)
                     for r in range(self.world_size))

    def owner(self, kv_block: int) -> int:
        """The rank owning key block ``kv_block``."""
        return bisect.bisect_right(self.bounds, kv_block * self.kv_block) - 1

    def block_tokens(self, kv_block: int) -> int:
        """The tokens in key block ``kv_block`` (fewer than ``kv_block`` only for the last)."""
        return min(self.kv_block, self.seq_len - kv_block * self.kv_block)

    def received_bytes(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       value_dim: int | None = None) -> tuple:
        """Per rank, the bytes of keys and values it receives for ``(batch, kv_heads, seq, head_dim)``
        K/V of ``dtype`` (``value_dim`` defaults to ``head_dim``)."""
        value_dim = head_dim if value_dim is None else value_dim
        per_token = batch * kv_heads * (head_dim + value_dim) * torch.empty((), dtype=dtype).element_size()
        return tuple(tokens * per_token for tokens in self.received_tokens())

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s rows of the full-sequence tensor ``x`` (sequence along ``dim``)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}; the plan is for {self.seq_len}")
        return x.narrow(dim, self.bounds[rank], self.bounds[rank + 1] - self.bounds[rank])

    def summary(self) -> dict:
        """Numbers for logs: shard lengths, kept blocks and received tokens per rank, balance."""
        return {"world_size": self.world_size, "shard_lengths": list(self.shard_lengths),
                "kept_blocks": list(self.kept_blocks), "balance": self.balance,
                "received_tokens": list(self.received_tokens()), "needs": [list(n) for n in self.needs]}

    @classmethod
    def from_shard_lengths(cls, layout: BlockSparseLayout, lengths) -> "PartitionPlan":
        """The plan of given shard lengths (one per rank, summing to the sequence length; all but the
        last a multiple of ``max(q_block, kv_block)``)."""
        _check_self_attention(layout)
        lengths = [int(n) for n in lengths]
        unit = alignment(layout)
        if not lengths or sum(lengths) != layout.q_len or min(lengths) < 1:
            raise ValueError(f"shard lengths {lengths} must be positive and sum to the layout's sequence length "
                             f"{layout.q_len}")
        if any(n % unit for n in lengths[:-1]):
            raise ValueError(f"shard lengths {lengths}: every shard but the last must be a multiple of "
                             f"max(q_block, kv_block) = {unit} tokens")
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        return _plan(layout, bounds)


def alignment(layout: BlockSparseLayout) -> int:
    """Shard boundaries fall on multiples of this many tokens, so no query or key block straddles two."""
    return max(layout.q_block, layout.kv_block)


def plan_partition(layout: BlockSparseLayout, world_size: int, *, balance: str = "blocks") -> PartitionPlan:
    """Split the sequence of ``layout`` into ``world_size`` contiguous shards.

    ``balance="blocks"`` (default) cuts so the largest per-rank count of kept blocks is as small as
    contiguous cuts at ``max(q_block, kv_block)`` tokens allow (binary search on that count with a
    greedy left-to-right fill); ``balance="tokens"`` cuts into shards of (nearly) equal token counts,
    the split that ignores sparsity. The layout must be self-attention (``q_len == kv_len``) with at
    least ``world_size`` alignment units.
    """
    _check_self_attention(layout)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    unit = alignment(layout)
    units = math.ceil(layout.q_len / unit)
    if units < world_size:
        raise ValueError(f"the sequence of {layout.q_len} tokens has {units} units of max(q_block, kv_block) = "
                         f"{unit} tokens, fewer than world_size={world_size}")
    if balance == "tokens":
        cuts = [round(r * units / world_size) for r in range(world_size + 1)]
    elif balance == "blocks":
        per_row = _kept_per_q_block(layout)
        rows_per_unit = unit // layout.q_block
        weights = [int(per_row[u * rows_per_unit:(u + 1) * rows_per_unit].sum()) for u in range(units)]
        cuts = _balanced_cuts(weights, world_size)
    else:
        raise ValueError(f"balance must be 'blocks' or 'tokens', got {balance!r}")
    return _plan(layout, [min(c * unit, layout.q_len) for c in cuts])


def _check_self_attention(layout: BlockSparseLayout) -> None:
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if layout.q_len != layout.kv_len:
        raise LayoutError(f"context-parallel attention needs the layout of the full sequence (q_len == kv_len), "
                          f"got q_len={layout.q_len}, kv_len={layout.kv_len}")


def reachable_dense(layout: BlockSparseLayout) -> torch.Tensor:
    """``(Bl, Hl, NQ, NK)`` bool: kept blocks holding at least one allowed (query, key) pair."""
    return layout.to_dense() & layout.causal_block_mask()


def _kept_per_q_block(layout: BlockSparseLayout) -> torch.Tensor:
    return reachable_dense(layout).sum(dim=(0, 1, 3)).cpu()


def _balanced_cuts(weights: list, parts: int) -> list:
    """Unit offsets of ``parts`` contiguous non-empty groups minimizing the largest group sum."""

    def groups(cap: int) -> list:
        cuts, load, n = [0], 0, len(weights)
        for i, w in enumerate(weights):
            left_after = parts - len(cuts)  # groups still to open after the current one
            if i > cuts[-1] and (load + w > cap or n - i == left_after):
                cuts.append(i)
                load = 0
            load += w
        return cuts + [n]

    lo, hi = max(weights), max(sum(weights), max(weights))
    while lo < hi:
        mid = (lo + hi) // 2
        if len(groups(mid)) - 1 <= parts:
            hi = mid
        else:
            lo = mid + 1
    cuts = groups(lo)
    if len(cuts) - 1 != parts:  # the greedy fill opens exactly `parts` groups at a feasible cap
        raise AssertionError(f"partition into {parts} groups failed: {cuts}")
    return cuts


def _plan(layout: BlockSparseLayout, bounds: list) -> PartitionPlan:
    dense = reachable_dense(layout).any(dim=(0, 1)).cpu()  # (NQ, NK)
    per_row = _kept_per_q_block(layout)
    kv_first = torch.arange(layout.num_kv_blocks) * layout.kv_block
    owner = torch.searchsorted(torch.tensor(bounds), kv_first, right=True) - 1  # rank of each key block
    kept, blocks, needs = [], [], []
    for r in range(len(bounds) - 1):
        rows = slice(bounds[r] // layout.q_block, math.ceil(bounds[r + 1] / layout.q_block))
        kept.append(int(per_row[rows].sum()))
        read = dense[rows].any(dim=0)
        blocks.append(tuple(int(j) for j in read.nonzero().flatten()))
        needs.append(tuple(sorted({int(o) for o in owner[read]})))
    return PartitionPlan(tuple(bounds), tuple(kept), tuple(blocks), tuple(needs), layout.q_len, layout.q_block,
                         layout.kv_block, layout.causal)
