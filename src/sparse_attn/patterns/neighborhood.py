"""Block neighborhood attention over 1-3D token grids (Generalized Neighborhood Attention).

Tokens are expected in *tile-major* order: the grid is cut into tiles of ``tile_shape`` tokens, one
tile per attention block, tiles in row-major order and tokens row-major inside each tile.
:func:`tile_tokens` / :func:`untile_tokens` convert from and to the usual row-major flattening.
A key tile is kept for a query tile when any query in it has any neighbor in the key tile, so the
layout is the exact block cover of the token-level neighborhood.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, dense_to_csr

IntOrTuple = Union[int, Sequence[int]]


def _per_dim(value: IntOrTuple, ndim: int, name: str) -> tuple:
    values = (int(value),) * ndim if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} entries (one per grid dimension), got {values}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} entries must be >= 1, got {values}")
    return values


def neighborhood_1d(length: int, kernel: int, stride: int = 1, dilation: int = 1, device=None) -> Tensor:
    """Token-level ``(length, length)`` neighborhood mask of 1-D neighborhood attention.

    Query ``i`` attends to ``kernel`` positions of its dilation group ``i % dilation``, a window
    centered on it and shifted inward at the borders (constant size). With ``stride > 1`` queries
    are grouped ``stride`` at a time and share the window of the group's center.
    """
    if kernel * dilation > length:
        raise ValueError(
            f"kernel ({kernel}) x dilation ({dilation}) exceeds the grid length {length}"
        )
    pos = torch.arange(length, device=device)
    group = pos % dilation
    group_len = (length - group + dilation - 1) // dilation
    j = pos // dilation
    leader = torch.minimum((j // stride) * stride + (stride - 1) // 2, group_len - 1)
    start = torch.clamp(leader - kernel // 2, min=0)
    start = torch.minimum(start, torch.clamp(group_len - kernel, min=0))
    kj = pos[None, :] // dilation
    same_group = group[None, :] == group[:, None]
    return same_group & (kj >= start[:, None]) & (kj < start[:, None] + kernel)


def neighborhood_layout(grid_shape: Sequence[int], kernel_size: IntOrTuple, *,
                        tile_shape: IntOrTuple, stride: IntOrTuple = 1, dilation: IntOrTuple = 1,
                        num_heads: int = 1, device=None) -> BlockSparseLayout:
    """Non-causal block layout of neighborhood attention on a ``grid_shape`` token grid.

    ``grid_shape`` is (L,), (H, W) or (T, H, W); ``kernel_size``, ``stride``, ``dilation`` and
    ``tile_shape`` are per dimension (an int applies to all). Each tile (``prod(tile_shape)``
    tokens, 16..256) is one attention block. The pattern is shared by ``num_heads`` heads.
    """
    grid = tuple(int(g) for g in grid_shape)
    ndim = len(grid)
    if not 1 <= ndim <= 3:
        raise ValueError(f"grid_shape must have 1 to 3 dimensions, got {grid}")
    kernel = _per_dim(kernel_size, ndim, "kernel_size")
    tile = _per_dim(tile_shape, ndim, "tile_shape")
    strides = _per_dim(stride, ndim, "stride")
    dilations = _per_dim(dilation, ndim, "dilation")
    for g, t in zip(grid, tile):
        if g % t:
            raise ValueError(f"grid_shape {grid} must be divisible by tile_shape {tile}")
    block = math.prod(tile)
    tile_mask = None
    for g, t, k, s, d in zip(grid, tile, kernel, strides, dilations):
        tokens = neighborhood_1d(g, k, s, d, device=device)
        per_dim = tokens.view(g // t, t, g // t, t).any(3).any(1)  # (tiles, tiles)
        tile_mask = per_dim if tile_mask is None else (
            tile_mask[:, None, :, None] & per_dim[None, :, None, :]
        ).reshape(tile_mask.shape[0] * per_dim.shape[0], -1)
    seq = math.prod(grid)
    dense = tile_mask[None, None].expand(1, num_heads, -1, -1)
    cnt, idx = dense_to_csr(dense)
    return BlockSparseLayout(cnt, idx, seq, seq, block, block, causal=False)


def _tile_permutation(grid_shape: Sequence[int], tile_shape: IntOrTuple, device=None) -> Tensor:
    """``perm`` with ``tile_major = row_major[..., perm, :]``."""
    grid = tuple(int(g) for g in grid_shape)
    tile = _per_dim(tile_shape, len(grid), "tile_shape")
    if any(g % t for g, t in zip(grid, tile)):
        raise ValueError(f"grid_shape {grid} must be divisible by tile_shape {tile}")
    ids = torch.arange(math.prod(grid), device=device).view(grid)
    split = []
    for g, t in zip(grid, tile):
        split += [g // t, t]
    ids = ids.view(split)
    ndim = len(grid)
    order = [2 * i for i in range(ndim)] + [2 * i + 1 for i in range(ndim)]
    return ids.permute(order).reshape(-1)


def tile_tokens(x: Tensor, grid_shape: Sequence[int], tile_shape: IntOrTuple) -> Tensor:
    """Reorder ``(..., L, D)`` row-major grid tokens into the tile-major order the layout expects."""
    return x[..., _tile_permutation(grid_shape, tile_shape, x.device), :]


def untile_tokens(x: Tensor, grid_shape: Sequence[int], tile_shape: IntOrTuple) -> Tensor:
    """Inverse of :func:`tile_tokens`."""
    perm = _tile_permutation(grid_shape, tile_shape, x.device)
    return x[..., torch.argsort(perm), :]
