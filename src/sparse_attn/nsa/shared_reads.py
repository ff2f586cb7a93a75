"""NSA's selected branch over the blocks before each token's own, with block reads shared by nearby
tokens: forward and backward Triton kernels, their PyTorch reference, and the tiles they walk.

Each query token of a KV group reads its own selected blocks. Consecutive tokens mostly select the
same blocks (the compressed scores they come from change slowly, and the forced initial and local
blocks are common to all), so the kernels work on **tiles** of ``T`` consecutive tokens
(:func:`tile_tokens`: ``T * G`` query rows, ``G`` the group's query heads, about 64 rows): a tile
walks the **union** of its tokens' earlier blocks once, and a per-block bit mask of which of its
``T`` tokens selected the block keeps every row to its own token's blocks. A block read once per tile
serves every token that chose it, where reading per token (:meth:`NSAAttention._selected
<sparse_attn.nsa.module.NSAAttention>`'s token-major call) reads it once per token.

* :func:`shared_tiles` builds, per (sequence, KV head), each tile's union as sorted block indices
  with their token bit masks, and the transposed lists (per key block: the tiles whose union holds
  it, with the same masks) that the dK/dV kernel walks.
* :func:`_fwd_kernel`, grid ``(tiles, B * Hkv)``: online softmax over the union's blocks, each row
  masked to its token's blocks; writes the output and the natural-log LSE (``-inf`` for a row whose
  token has no earlier block, output 0).
* :func:`_dq_kernel`, grid ``(tiles, B * Hkv)``, and :func:`_dkdv_kernel`, grid ``(key sub-tiles,
  B * Hkv)``: the backward, each output written by one program (no atomics); the LSE's gradient enters
  through ``delta = rowsum(dO * O) - dLSE``.

Only blocks strictly before a tile's own block enter (tiles never straddle a selection block, since
``T`` divides it), so no causal mask is needed inside the kernels. :func:`shared_reads_reference` is
the plain-PyTorch reference (dense masked softmax) that tests compare the kernels with.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.kernels import LN2, LOG2E, dot
from ..backends.triton.launch import launch_jit
from ..backends.triton.runtime import fp32_dot_operands, interpreting, next_power_of_2
from ..layout import dense_to_csr

__all__ = ["SharedTiles", "shared_tiles", "tile_tokens", "shared_reads_attention", "shared_reads_reference",
           "shared_reads_supported"]

LOG2E_HOST = 1.4426950408889634
TILE_ROWS = 64  # query rows (tokens x group heads) a tile aims at
MAX_TILE_TOKENS = 16  # a tile's token bit masks are int32
BLOCK_N = 64  # keys per step inside a selection block
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def tile_tokens(group: int, select_block: int) -> int:
    """Tokens per tile for ``group`` query heads per KV head: the largest power of two with at most
    :data:`TILE_ROWS` rows, at most :data:`MAX_TILE_TOKENS` and dividing ``select_block``."""
    tokens = 1
    while tokens * 2 * group <= TILE_ROWS and tokens * 2 <= MAX_TILE_TOKENS and select_block % (tokens * 2) == 0:
        tokens *= 2
    return tokens


class SharedTiles(NamedTuple):
    """The tiles of one call (see the module docstring). ``counts (B, Hkv, NT)`` and ``blocks, masks
    (B, Hkv, NT, W)`` int32: each tile's union of earlier blocks (ascending) and, per block, the bit
    ``t`` set when the tile's token ``t`` selected it; ``tile_counts (B, Hkv, Ns)``, ``tiles,
    tile_masks (B, Hkv, Ns, W')``: per key block, the tiles whose union holds it and the same masks.
    ``tokens``: tokens per tile; ``selections``: the (token, earlier block) pairs of the selection, a
    0-d int64 tensor (over the union blocks, :meth:`tokens_per_read`)."""

    counts: Tensor
    blocks: Tensor
    masks: Tensor
    tile_counts: Tensor
    tiles: Tensor
    tile_masks: Tensor
    tokens: int
    selections: Tensor

    def tokens_per_read(self) -> float:
        """Tokens a block read serves on average: the selection's (token, block) pairs over the
        tiles' union blocks (1: no two tokens of a tile share a block; up to ``tokens``). Reads the
        counts back to the host."""
        return float(self.selections) / max(float(self.counts.sum()), 1.0)

    def pay(self, group: int) -> bool:
        """Whether shared reads do no more work than per-token reads for ``group`` query heads per KV
        head: a block read serves at least as many tokens as a tile has rows per per-token query
        block (a tile computes ``T * G`` rows, padded to 16 or more, for every union block; per-token
        reads compute ``G`` rows padded to 16 for every selected block). With 4 heads per group that
        is 4 tokens per read; both read far fewer bytes shared."""
        tile_rows = max(16, 1 << (self.tokens * group - 1).bit_length())
        token_rows = max(16, 1 << (group - 1).bit_length())
        return self.tokens_per_read() >= tile_rows / token_rows


def shared_tiles(chosen: Optional[Tensor], blocks: Optional[Tensor], seq: int, select_block: int,
                 tokens: int) -> SharedTiles:
    """The tiles of ``tokens`` query tokens for a sequence of ``seq`` tokens (queries = keys), from
    the selection as bools ``chosen (B, Hkv, S, Ns)`` or as block indices ``blocks (B, Hkv, S, n)``
    (-1: none; read when given). Only blocks before a token's own block enter."""
    num_blocks = math.ceil(seq / select_block)
    own = torch.arange(seq, device=(blocks if blocks is not None else chosen).device) // select_block
    num_tiles = math.ceil(seq / tokens)
    if blocks is not None:
        return _tiles_from_blocks(blocks, own, tokens, num_tiles, num_blocks)
    pad = num_tiles * tokens - seq
    bit = (1 << torch.arange(tokens, device=own.device, dtype=torch.int32))
    batch, kv_heads = chosen.shape[:2]
    earlier = chosen[..., :num_blocks] & (torch.arange(num_blocks, device=own.device)[None, :] < own[:, None])
    if pad:
        earlier = torch.nn.functional.pad(earlier, (0, 0, 0, pad))
    bits = (earlier.view(batch, kv_heads, num_tiles, tokens, num_blocks).to(torch.int32)
            * bit[:, None]).sum(3, dtype=torch.int32)
    counts, indices = dense_to_csr(bits != 0)
    masks = bits.gather(-1, indices.long())
    bits_t = bits.transpose(-1, -2)
    tile_counts, tiles = dense_to_csr(bits_t != 0)
    tile_masks = bits_t.gather(-1, tiles.long())
    return SharedTiles(counts, indices, masks.contiguous(), tile_counts, tiles, tile_masks.contiguous(), tokens,
                       earlier.sum())


def _tiles_from_blocks(blocks: Tensor, own: Tensor, tokens: int, num_tiles: int, num_blocks: int) -> SharedTiles:
    """:func:`shared_tiles` from block indices, in memory of the selection's size (no tiles x blocks
    table): each tile's ``tokens * n`` (block, token) pairs sorted, equal blocks merged into one entry
    whose mask ORs the tokens' bits; then the entries of all tiles sorted by block for the transposed
    lists."""
    batch, kv_heads, seq, n = blocks.shape
    device = blocks.device
    pad = num_tiles * tokens - seq
    earlier = (blocks >= 0) & (blocks < own[:, None].to(blocks.dtype))
    token = (torch.arange(seq, device=device) % tokens)[:, None].expand(seq, n)
    none = num_blocks * tokens  # sorts after every real (block, token) pair
    keys = torch.where(earlier, blocks.long() * tokens + token, none)
    if pad:
        keys = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=none)
    keys = keys.reshape(batch, kv_heads, num_tiles, tokens * n).sort(-1).values
    block = torch.div(keys, tokens, rounding_mode="floor")
    real = keys < none
    first = real & torch.cat([torch.ones_like(block[..., :1], dtype=torch.bool), block[..., 1:] != block[..., :-1]],
                             -1)
    slot = torch.cumsum(first.to(torch.int32), -1) - 1  # each pair's entry in its tile
    counts = first.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    dump = tokens * n  # where pairs that start no entry (or are not real) write
    bit = torch.where(real, 1 << (keys % tokens), 0).to(torch.int32)
    masks = torch.zeros(batch, kv_heads, num_tiles, dump + 1, dtype=torch.int32, device=device)
    masks.scatter_add_(-1, torch.where(real, slot, dump).long(), bit)  # one bit per token: adding is OR
    indices = torch.zeros_like(masks)
    indices.scatter_(-1, torch.where(first, slot, dump).long(), block.to(torch.int32))
    valid = torch.arange(width, device=device) < counts[..., None]
    indices = torch.where(valid, indices[..., :width], 0).contiguous()
    masks = torch.where(valid, masks[..., :width], 0).contiguous()
    # Transposed: every (tile, entry) by block, then by tile.
    tile_ids = torch.arange(num_tiles, device=device)[:, None].expand(num_tiles, width)
    order_keys = torch.where(valid, indices.long() * num_tiles + tile_ids, num_blocks * num_tiles)
    order_keys, order = order_keys.reshape(batch, kv_heads, -1).sort(-1)
    by_block = torch.div(order_keys, num_tiles, rounding_mode="floor")
    listed = by_block < num_blocks
    tile_counts = torch.zeros(batch, kv_heads, num_blocks + 1, dtype=torch.int32, device=device)
    tile_counts.scatter_add_(-1, by_block, listed.to(torch.int32))
    tile_counts = tile_counts[..., :num_blocks].contiguous()
    starts = torch.cumsum(tile_counts, -1) - tile_counts
    rank = torch.arange(order_keys.shape[-1], device=device) - starts.gather(-1, by_block.clamp(max=num_blocks - 1))
    width_t = max(int(tile_counts.max()) if tile_counts.numel() else 0, 1)
    flat = torch.where(listed, by_block * width_t + rank, num_blocks * width_t)
    tiles = torch.zeros(batch, kv_heads, num_blocks * width_t + 1, dtype=torch.int32, device=device)
    tile_masks = torch.zeros_like(tiles)
    tiles.scatter_(-1, flat, torch.remainder(order_keys, num_tiles).to(torch.int32))
    tile_masks.scatter_(-1, flat, masks.reshape(batch, kv_heads, -1).gather(-1, order))
    shape = (batch, kv_heads, num_blocks, width_t)
    return SharedTiles(counts, indices, masks, tile_counts, tiles[..., :-1].reshape(shape).contiguous(),
                       tile_masks[..., :-1].reshape(shape).contiguous(), tokens, earlier.sum())


def shared_reads_supported(q: Tensor) -> Optional[str]:
    """Why the kernels cannot run this call (None when they can)."""
    if not q.is_cuda and not interpreting():
        return "q is not on a CUDA device"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernels take {SUPPORTED_DTYPES})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernels take {SUPPORTED_HEAD_DIMS})"
    return None


@triton.jit
def _tile_queries(Q, tile, b, kvh, seq, stride_qb, stride_qh, stride_qs, KV_HEADS: tl.constexpr,
                  GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A tile's rows (row ``r``: token ``r // GROUP`` of the tile, the group's head ``r % GROUP``):
    ``(t, row_ok, q, rows_at)``, ``rows_at`` each row's index in contiguous ``(B, H, S)`` tensors."""
    rows = tl.arange(0, ROWS)
    t = rows // GROUP
    tok = (tile * TOKENS + t).to(tl.int64)
    row_ok = (rows < TOKENS * GROUP) & (tok < seq)
    h = kvh * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (b * stride_qb + h * stride_qh + tok * stride_qs)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    return t, row_ok, q, (b * (KV_HEADS * GROUP) + h) * seq + tok


@triton.jit
def _tile_gradients(DO, LSE, DELTA, rows_at, row_ok, HEAD_DIM: tl.constexpr):
    """The rows' output gradient, base-2 LSE (0 for a row with no key) and ``delta``."""
    do = tl.load(DO + rows_at[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], mask=row_ok[:, None],
                 other=0.0)
    lse2 = tl.load(LSE + rows_at, mask=row_ok, other=0.0) * LOG2E
    return do, tl.where(lse2 == float("-inf"), 0.0, lse2), tl.load(DELTA + rows_at, mask=row_ok, other=0.0)


@triton.jit
def _tile_list(COUNTS, K, V, b, kvh, entry, stride_cb, stride_ch, stride_ib, stride_ih, stride_it,
               stride_kb, stride_kh, stride_vb, stride_vh):
    """``(n, list_row, k_base, v_base)``: the length of list ``entry`` of this (sequence, KV head)
    (a tile's union, or a key block's tiles), the offset of its entries, and the K and V bases."""
    n = tl.load(COUNTS + b * stride_cb + kvh * stride_ch + entry)
    list_row = b * stride_ib + kvh * stride_ih + entry * stride_it
    return n, list_row, K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh


@triton.jit
def _members(MASKS, at, t, row_ok):
    """Rows whose token selected the listed block at ``at`` (its bit ``t`` is set)."""
    return (((tl.load(MASKS + at) >> t) & 1) != 0) & row_ok


@triton.jit
def _fwd_kernel(
    Q, K, V, COUNTS, BLOCKS, MASKS, O, LSE,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_it,
    seq, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, SELECT_BLOCK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    t, row_ok, q, rows_at = _tile_queries(Q, pid_t, b, kvh, seq, stride_qb, stride_qh, stride_qs, KV_HEADS, GROUP,
                                          TOKENS, ROWS, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BN)
    n, list_row, k_base, v_base = _tile_list(COUNTS, K, V, b, kvh, pid_t, stride_cb, stride_ch, stride_ib, stride_ih,
                                             stride_it, stride_kb, stride_kh, stride_vb, stride_vh)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for s in range(0, n):
        block = tl.load(BLOCKS + list_row + s).to(tl.int64)
        member = _members(MASKS, list_row + s, t, row_ok)
        for sub in tl.static_range(SELECT_BLOCK // BN):
            keys = block * SELECT_BLOCK + sub * BN + offs_n
            k = tl.load(k_base + keys[:, None] * stride_ks + offs_d[None, :])
            scores = dot(q, tl.trans(k), UPCAST) * scale_log2
            scores = tl.where(member[:, None], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :])
            acc = dot(p.to(v.dtype), v, UPCAST, acc * alpha[:, None])
            m_i = m_new
    has = l_i > 0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + rows_at[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + rows_at, tl.where(has, (m_i + tl.log2(l_safe)) * LN2, float("-inf")), mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, COUNTS, BLOCKS, MASKS, DQ,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_it,
    seq, scale, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, SELECT_BLOCK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
):
    """dQ of one tile (``DO``, ``LSE``, ``DELTA``, ``DQ`` contiguous ``(B, H, S, ...)``)."""
    pid_t = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    t, row_ok, q, rows_at = _tile_queries(Q, pid_t, b, kvh, seq, stride_qb, stride_qh, stride_qs, KV_HEADS, GROUP,
                                          TOKENS, ROWS, HEAD_DIM)
    do, lse2, delta = _tile_gradients(DO, LSE, DELTA, rows_at, row_ok, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BN)
    n, list_row, k_base, v_base = _tile_list(COUNTS, K, V, b, kvh, pid_t, stride_cb, stride_ch, stride_ib, stride_ih,
                                             stride_it, stride_kb, stride_kh, stride_vb, stride_vh)
    dq = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for s in range(0, n):
        block = tl.load(BLOCKS + list_row + s).to(tl.int64)
        member = _members(MASKS, list_row + s, t, row_ok)
        for sub in tl.static_range(SELECT_BLOCK // BN):
            keys = block * SELECT_BLOCK + sub * BN + offs_n
            k = tl.load(k_base + keys[:, None] * stride_ks + offs_d[None, :])
            v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :])
            scores = dot(q, tl.trans(k), UPCAST) * scale_log2
            p = tl.where(member[:, None], tl.exp2(scores - lse2[:, None]), 0.0)
            dp = dot(do, tl.trans(v), UPCAST)
            ds = p * (dp - delta[:, None])
            dq = dot(ds.to(k.dtype), k, UPCAST, dq)
    tl.store(DQ + rows_at[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, TILE_COUNTS, TILES, TILE_MASKS, DK, DV,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_it,
    seq, scale, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, SELECT_BLOCK: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr,
):
    """dK and dV of ``BN`` keys of one selection block (``DK``, ``DV`` contiguous ``(B, Hkv, S, D)``),
    from the tiles whose union holds the block."""
    SUBS: tl.constexpr = SELECT_BLOCK // BN
    pid_k = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    block = pid_k // SUBS
    keys = (pid_k * BN + tl.arange(0, BN)).to(tl.int64)
    key_ok = keys < seq
    offs_d = tl.arange(0, HEAD_DIM)
    n, list_row, k_base, v_base = _tile_list(TILE_COUNTS, K, V, b, kvh, block, stride_cb, stride_ch, stride_ib,
                                             stride_ih, stride_it, stride_kb, stride_kh, stride_vb, stride_vh)
    k = tl.load(k_base + keys[:, None] * stride_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BN, HEAD_DIM], dtype=tl.float32)
    for e in range(0, n):
        tile = tl.load(TILES + list_row + e)
        t, row_ok, q, rows_at = _tile_queries(Q, tile, b, kvh, seq, stride_qb, stride_qh, stride_qs, KV_HEADS,
                                              GROUP, TOKENS, ROWS, HEAD_DIM)
        member = _members(TILE_MASKS, list_row + e, t, row_ok)
        do, lse2, delta = _tile_gradients(DO, LSE, DELTA, rows_at, row_ok, HEAD_DIM)
        scores = dot(q, tl.trans(k), UPCAST) * scale_log2
        p = tl.where(member[:, None], tl.exp2(scores - lse2[:, None]), 0.0)  # (ROWS, BN)
        dv = dot(tl.trans(p.to(do.dtype)), do, UPCAST, dv)
        dp = dot(do, tl.trans(v), UPCAST)
        ds = p * (dp - delta[:, None])
        dk = dot(tl.trans(ds.to(q.dtype)), q, UPCAST, dk)
    at = ((b * KV_HEADS + kvh) * seq + keys)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + at, (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + at, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


def _geometry(q: Tensor, k: Tensor, tiles: SharedTiles, select_block: int) -> dict:
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[-1]
    group = heads // kv_heads
    rows = max(16, next_power_of_2(tiles.tokens * group))
    bn = min(BLOCK_N, select_block)
    return dict(KV_HEADS=kv_heads, GROUP=group, TOKENS=tiles.tokens, ROWS=rows, HEAD_DIM=dim,
                SELECT_BLOCK=select_block, BN=bn, UPCAST=fp32_dot_operands(q.dtype),
                num_warps=4 if rows * dim <= 64 * 64 else 8)


def _strides(q: Tensor, k: Tensor, v: Tensor, counts: Tensor, lists: Tensor) -> tuple:
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], counts.stride(0), counts.stride(1),
            *lists.stride()[:3])


def _forward(q: Tensor, k: Tensor, v: Tensor, tiles: SharedTiles, select_block: int, scale: float):
    batch, heads, seq, dim = q.shape
    out = torch.empty(batch, heads, seq, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, seq, device=q.device, dtype=torch.float32)
    meta = _geometry(q, k, tiles, select_block)
    launch_jit(_fwd_kernel, (tiles.counts.shape[-1], batch * k.shape[1]), (
        q, k, v, tiles.counts, tiles.blocks, tiles.masks, out, lse,
        *_strides(q, k, v, tiles.counts, tiles.blocks), seq, scale * LOG2E_HOST,
    ), meta)
    return out, lse


def _backward(q, k, v, out, lse, dout, dlse, tiles: SharedTiles, select_block: int, scale: float):
    batch, heads, seq, dim = q.shape
    dout = dout.contiguous() if dout is not None else torch.zeros_like(out)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = torch.empty(batch, heads, seq, dim, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    meta = _geometry(q, k, tiles, select_block)
    kv_heads = k.shape[1]
    launch_jit(_dq_kernel, (tiles.counts.shape[-1], batch * kv_heads), (
        q, k, v, dout, lse, delta, tiles.counts, tiles.blocks, tiles.masks, dq,
        *_strides(q, k, v, tiles.counts, tiles.blocks), seq, scale, scale * LOG2E_HOST,
    ), meta)
    launch_jit(_dkdv_kernel, (math.ceil(seq / meta["BN"]), batch * kv_heads), (
        q, k, v, dout, lse, delta, tiles.tile_counts, tiles.tiles, tiles.tile_masks, dk, dv,
        *_strides(q, k, v, tiles.tile_counts, tiles.tiles), seq, scale, scale * LOG2E_HOST,
    ), meta)
    return dq, dk, dv


class _SharedReads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tiles, select_block, scale):
        out, lse = _forward(q, k, v, tiles, select_block, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.tiles, ctx.select_block, ctx.scale = tiles, select_block, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.tiles, ctx.select_block, ctx.scale)
        return dq, dk, dv, None, None, None


def shared_reads_attention(q: Tensor, k: Tensor, v: Tensor, tiles: SharedTiles, select_block: int,
                           scale: float) -> tuple:
    """``(out (B, H, S, D), lse (B, H, S) float32)``: each query token's attention over its selected
    blocks before its own (``tiles`` from :func:`shared_tiles`), differentiable in ``q``, ``k`` and
    ``v`` (and through ``lse``). ``q (B, H, S, D)``, ``k, v (B, Hkv, S, D)``, the queries the keys'
    positions; inputs assumed checked (:func:`shared_reads_supported`)."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    return _SharedReads.apply(q, k, v, tiles, select_block, scale)


def shared_reads_reference(q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, select_block: int,
                           scale: float) -> tuple:
    """What :func:`shared_reads_attention` computes, in plain PyTorch (dense ``S x S`` masks): each
    token attends to the keys of its chosen blocks (``chosen (B, Hkv, S, Ns)`` bool) before its own
    block; ``(out, lse)``, out 0 and lse ``-inf`` for a token with no such block."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    own = torch.arange(seq, device=q.device) // select_block
    key_block = torch.arange(seq, device=q.device) // select_block
    earlier = chosen[..., key_block] & (key_block[None, :] < own[:, None])  # (B, Hkv, S, S)
    mask = earlier.repeat_interleave(group, 1)
    scores = torch.matmul(q.float(), k.repeat_interleave(group, 1).float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None]).masked_fill(~mask, 0.0)
    out = torch.matmul(probs, v.repeat_interleave(group, 1).float())
    return out.to(q.dtype), lse
