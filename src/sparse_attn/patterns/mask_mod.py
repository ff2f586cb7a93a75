"""Build a layout from a FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

The mask is evaluated in chunks of query blocks (never as one ``q_len x kv_len`` tensor); a block is
kept when any of its (query, key) pairs is allowed.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from ..layout import BlockSparseLayout, dense_to_csr, block_size_pair

MaskMod = Callable[..., torch.Tensor]
_CHUNK_ELEMENTS = 1 << 24


def layout_from_mask_mod(mask_mod: MaskMod, batch: Optional[int], num_heads: Optional[int],
                         q_len: int, kv_len: int, *, block_size=64, causal: Optional[bool] = None,
                         device=None, chunk_elements: int = _CHUNK_ELEMENTS) -> BlockSparseLayout:
    """Layout whose kept blocks are those where ``mask_mod`` allows at least one pair.

    ``mask_mod`` is called with broadcastable index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``,
    ``q_idx (1,1,Q,1)``, ``kv_idx (1,1,1,K)`` (elementwise code and tensor lookups both work);
    ``batch``/``num_heads`` of ``None`` mean the mask does not depend on them.

    The layout is block-granular: inside a kept block every pair is attended except what causal
    masking removes. ``causal=None`` detects it: if the mask never allows a key after its query
    (bottom-right aligned), the layout is causal, so a causal ``mask_mod`` keeps token-level
    causality. A warning says how many kept blocks were only partly allowed by the mask.
    """
    q_block, kv_block = block_size_pair(block_size)
    nb, nh = batch or 1, num_heads or 1
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    offset = kv_len - q_len
    b = torch.arange(nb, device=device).view(nb, 1, 1, 1)
    h = torch.arange(nh, device=device).view(1, nh, 1, 1)
    kv_pos = torch.arange(nk * kv_block, device=device)
    kv_ok = kv_pos < kv_len
    kv_idx = torch.clamp(kv_pos, max=kv_len - 1).view(1, 1, 1, -1)
    rows_per_chunk = max(1, chunk_elements // max(nb * nh * nk * kv_block * q_block, 1))
    blocks, breaks_causal = [], False
    partial_if_causal = partial_if_not = 0
    for start in range(0, nq, rows_per_chunk):
        stop = min(nq, start + rows_per_chunk)
        q_pos = torch.arange(start * q_block, stop * q_block, device=device)
        q_ok = q_pos < q_len
        q_idx = torch.clamp(q_pos, max=q_len - 1).view(1, 1, -1, 1)
        allowed = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx), device=device).bool()
        allowed = allowed.expand(nb, nh, q_pos.numel(), kv_pos.numel())
        in_range = q_ok[:, None] & kv_ok[None, :]
        allowed = allowed & in_range
        future = kv_pos[None, :] > q_pos[:, None] + offset
        breaks_causal |= bool((allowed & future).any())
        tiles = allowed.reshape(nb, nh, stop - start, q_block, nk, kv_block)
        any_kept = tiles.any(dim=5).any(dim=3)
        for valid, name in ((in_range & ~future, "causal"), (in_range, "not")):
            valid = valid.reshape(stop - start, q_block, nk, kv_block)
            count = int((any_kept & ~(tiles | ~valid).all(dim=5).all(dim=3)).sum())
            if name == "causal":
                partial_if_causal += count
            else:
                partial_if_not += count
        blocks.append(any_kept)
    dense = torch.cat(blocks, dim=2)
    is_causal = not breaks_causal if causal is None else bool(causal)
    if causal and breaks_causal:
        raise ValueError("causal=True but mask_mod allows keys after their query; pass causal=False")
    partial_blocks = partial_if_causal if is_causal else partial_if_not
    if partial_blocks:
        warnings.warn(
            f"layout_from_mask_mod: {partial_blocks} kept blocks are only partly allowed by mask_mod; "
            "the layout attends to whole blocks (token-level structure inside them is not kept)",
            stacklevel=2,
        )
    cnt, idx = dense_to_csr(dense)
    return BlockSparseLayout(cnt, idx, q_len, kv_len, q_block, kv_block, is_causal, check=False)
