"""Block- and line-level selection shared by several estimators (plain PyTorch): the top ``k``
entries per row, the blocks that kept vertical and slash lines cross, and whether line or block
counts keep every block whatever the scores."""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns.grid import BlockGrid
from .knobs import min_count, resolve_count


def select_top_k(scores: Tensor, k, valid: Tensor | None = None, k_max: int | None = None) -> Tensor:
    """Per row, the ``k`` largest entries (``k`` int or a per-row tensor). Returns a bool mask.

    ``k_max`` (an upper bound of ``k`` known on the host) spares reading ``k.max()`` from the
    device, a synchronization in the middle of an estimate."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    if isinstance(k, int):
        k_max = k
    k = torch.as_tensor(k, device=scores.device)
    if k_max is None:
        k_max = int(k.max()) if k.numel() else 0
    most = min(int(k_max), scores.shape[-1])
    if 0 < most <= scores.shape[-1] // 4:  # a partial selection: far cheaper than a full sort of long rows
        order = torch.topk(scores, most, dim=-1, sorted=True).indices
    else:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.arange(order.shape[-1], device=scores.device)
    keep_sorted = (rank < k[..., None] if k.dim() else rank < k).expand_as(order)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, keep_sorted)
    return mask if valid is None else mask & valid


def lines_to_blocks(grid: BlockGrid, vertical: Tensor, slash: Tensor) -> Tensor:
    """Block mask ``(B, H, NQ, NK)`` covering token-level vertical columns and slash diagonals.

    ``vertical``: bool ``(B, H, Skv)`` kept key columns; ``slash``: bool ``(B, H, Skv)`` kept
    diagonals by distance ``o = query_pos - key_pos``. A block is kept when a kept line crosses it
    at an allowed (causal) position. Each test is a range query on prefix counts of the kept lines,
    so every block is answered at once: O(NQ x NK + Skv) work whatever the number of lines.
    """
    b, h, kv_len = vertical.shape
    nq, nk = grid.reachable.shape
    dev = vertical.device
    q_first, q_last = grid.q_first.to(dev)[:, None], grid.q_last.to(dev)[:, None]  # (NQ, 1)
    k_first, k_last = grid.k_first.to(dev)[None, :], grid.k_last.to(dev)[None, :]  # (1, NK)

    def any_kept(kept: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Per block, whether ``kept (B, H, Skv)`` has an entry in ``[lo, hi]`` ((NQ, NK) bounds)."""
        counts = torch.nn.functional.pad(kept.to(torch.int32).cumsum(-1), (1, 0))  # counts[i]: kept < i
        lo, hi = lo.clamp(0, kv_len), (hi + 1).clamp(0, kv_len)
        between = counts.gather(-1, hi.flatten().expand(b, h, -1)) - counts.gather(-1, lo.flatten().expand(b, h, -1))
        return (between > 0).view(b, h, nq, nk) & (hi > lo)

    # Column j meets block (qb, kb) at an allowed position iff k_first <= j <= min(k_last, q_last);
    # diagonal o iff q_first - k_last <= o <= q_last - k_first (o >= 0: causal).
    columns = any_kept(vertical, k_first.expand(nq, nk), torch.minimum(k_last, q_last))
    diagonals = any_kept(slash, (q_first - k_last).clamp(min=0), q_last - k_first)
    return (columns | diagonals) & grid.reachable


def lines_keep_every_block(grid: BlockGrid, columns: int, diagonals: int, forced: Tensor) -> bool:
    """Whether keeping *any* ``columns`` of the key columns and *any* ``diagonals`` of the diagonals
    keeps every reachable block outside ``forced (NQ, NK)``: true when, in each such block, the
    columns or the diagonals crossing it at an allowed position outnumber the lines left out."""
    kv_len = grid.kv_len
    dev = grid.reachable.device
    q_first, q_last = grid.q_first.to(dev)[:, None], grid.q_last.to(dev)[:, None]
    k_first, k_last = grid.k_first.to(dev)[None, :], grid.k_last.to(dev)[None, :]
    crossing_columns = (torch.minimum(k_last, q_last) - k_first + 1).clamp(min=0)
    crossing_diagonals = ((q_last - k_first).clamp(max=kv_len - 1) - (q_first - k_last).clamp(min=0) + 1).clamp(min=0)
    kept = (crossing_columns > kv_len - columns) | (crossing_diagonals > kv_len - diagonals)
    return bool((kept | forced | ~grid.reachable).all())


def top_k_keeps_every_block(grid: BlockGrid, k: int) -> bool:
    """Whether keeping the ``k`` best key blocks of each query block keeps all its reachable ones."""
    return k >= int(grid.reachable.sum(1).max())


def top_k_dense(top_k, grid: BlockGrid) -> tuple:
    """``("top_k",)`` when ``top_k`` (a count or a share of the key blocks, per head or not) keeps
    every reachable key block of each query block of ``grid``; ``()`` otherwise."""
    return ("top_k",) if top_k_keeps_every_block(grid, min_count(resolve_count(top_k, grid.reachable.shape[1]))) else ()
