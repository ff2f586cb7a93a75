"""Triton kernel of NSA's block selection: from the queries, the compressed keys and the compressed
branch's LSE straight to each query token's selected blocks, with nothing of size ``Sq x Nc`` or
``Sq x Ns`` in memory.

:func:`_select_blocks_kernel`, grid ``(query tiles, B * Hkv)``. A program holds ``BLOCK_M`` query
tokens of one KV group, all ``G`` query heads of the group stacked as rows of one tile, and walks
the selection blocks up to its last token's own block, ``BLOCK_S`` at a time. For each tile of
selection blocks it scores the compressed keys that overlap them (``q . kc``, one ``tl.dot`` for
every head of the group), turns the scores into the compressed branch's probabilities with its LSE
(``exp(s - lse)``, 0 for a compressed block that ends after the token), sums them over the group's
heads and maps them onto the selection blocks by their overlap (stride-``d`` pieces in common, a
second ``tl.dot`` with the overlap weights built from indices). The blocks' importances then
become int64 keys, the importance's order-preserving float32 bits above the reversed block index,
as :func:`~sparse_attn.ranking.top_k_ties_to_earlier` ranks them (ties: the earlier block), the
forced blocks ``+inf`` and the blocks after the token's own ``-inf``; a running top-``TOP`` per token
(``tl.topk``) keeps the best keys across tiles.

Its reference is :func:`~.compressed._selection` (PyTorch, chunked), itself tested against
:func:`~.reference.select_blocks`; tests compare the kernel's choice with it. On an H100 (bf16, H=32,
Hkv=8, D=128, the default :class:`~.config.NSAConfig`) it selects for 64K tokens in 21 ms
(``benchmarks/profile_nsa.py``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.kernels import dot
from ..backends.triton.launch import launch_jit
from ..backends.triton.runtime import cdiv, fp32_dot_operands, next_power_of_2
from .config import NSAConfig

__all__ = ["triton_select_blocks"]

LOG2E = 1.4426950408889634
BLOCK_C = 64  # compressed keys per step
BLOCK_S = 64  # selection blocks per tile
# Below every block's key (-inf's included); its low 32 bits decode to a negative block: never chosen.
PAD_KEY = tl.constexpr(-(2 ** 63) + 2 ** 32 - 1)


@triton.jit
def _select_blocks_kernel(
    Q, KC, LSE, OUT,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kc,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_os,
    q_len, seq, nc, ns, take, scale_log2,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TOP: tl.constexpr,
    COMPRESS_BLOCK: tl.constexpr, COMPRESS_STRIDE: tl.constexpr, SELECT_BLOCK: tl.constexpr,
    FORCED_INITIAL: tl.constexpr, FORCED_LOCAL: tl.constexpr, UPCAST: tl.constexpr,
):
    """The selected blocks of ``BLOCK_M`` query tokens of one (sequence, KV head): ``OUT[b, kvh,
    token, :take]`` in importance order, -1 where the token has fewer blocks to read."""
    pid_m = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    first_row = pid_m * BLOCK_M
    # Tile rows: head h of the group at token i is row h * BLOCK_M + i.
    r = tl.arange(0, GROUP_P2 * BLOCK_M)
    head_in_group = r // BLOCK_M
    row = first_row + r % BLOCK_M
    row_ok = (head_in_group < GROUP) & (row < q_len)
    head = kvh * GROUP + head_in_group
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + row[:, None].to(tl.int64) * stride_qs
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + b * stride_lb + head * stride_lh + row, mask=row_ok, other=float("-inf"))
    lse2 = lse2 * 1.4426950408889634  # log2(e): base-2 like the scores
    pos_r = seq - q_len + row  # each tile row's token position

    tokens = first_row + tl.arange(0, BLOCK_M)
    token_ok = tokens < q_len
    pos = seq - q_len + tokens
    own = pos // SELECT_BLOCK
    last_pos = seq - q_len + tl.minimum(first_row + BLOCK_M, q_len) - 1
    last_own = last_pos // SELECT_BLOCK
    # Compressed blocks the tile's last token sees: c * d + l - 1 <= last_pos.
    # (Where an operand may be negative, tl.where drops the quotient: C and Python round those apart.)
    visible_end = tl.where(last_pos >= COMPRESS_BLOCK - 1, (last_pos - COMPRESS_BLOCK + 1) // COMPRESS_STRIDE + 1, 0)
    visible_end = tl.minimum(visible_end, nc)

    best = tl.full([BLOCK_M, TOP], PAD_KEY, dtype=tl.int64)
    for j0 in range(0, last_own + 1, BLOCK_S):
        blocks = j0 + tl.arange(0, BLOCK_S)
        importance = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        # The compressed blocks overlapping selection blocks [j0, j0 + BLOCK_S): c*d < (j0 + BLOCK_S) * l'
        # and c*d + l > j0 * l'.
        past = j0 * SELECT_BLOCK - COMPRESS_BLOCK
        c_lo = tl.where(past >= 0, past // COMPRESS_STRIDE + 1, 0)
        c_hi = tl.minimum((((j0 + BLOCK_S) * SELECT_BLOCK) + COMPRESS_STRIDE - 1) // COMPRESS_STRIDE, visible_end)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            comp = c0 + tl.arange(0, BLOCK_C)
            comp_ok = comp < c_hi
            kc = tl.load(KC + b * stride_kb + kvh * stride_kh + comp[:, None].to(tl.int64) * stride_kc
                         + offs_d[None, :], mask=comp_ok[:, None], other=0.0)
            s = dot(q, tl.trans(kc), UPCAST) * scale_log2
            ends = comp * COMPRESS_STRIDE + COMPRESS_BLOCK - 1
            seen = row_ok[:, None] & comp_ok[None, :] & (ends[None, :] <= pos_r[:, None])
            p = tl.where(seen, tl.exp2(s - tl.where(seen, lse2[:, None], 0.0)), 0.0)
            p = tl.sum(tl.reshape(p, (GROUP_P2, BLOCK_M, BLOCK_C)), 0)  # summed over the group's heads
            start = comp * COMPRESS_STRIDE
            block_first = blocks * SELECT_BLOCK
            lo = tl.maximum(start[:, None], block_first[None, :])
            hi = tl.minimum(start[:, None] + COMPRESS_BLOCK, block_first[None, :] + SELECT_BLOCK)
            overlap = tl.maximum(hi - lo, 0).to(tl.float32) / COMPRESS_STRIDE  # (BLOCK_C, BLOCK_S)
            importance = tl.dot(p, overlap, importance, input_precision="ieee")
        forced = (blocks[None, :] < FORCED_INITIAL) | (blocks[None, :] > own[:, None] - FORCED_LOCAL)
        value = tl.where(forced, float("inf"), importance)
        value = tl.where(blocks[None, :] > own[:, None], float("-inf"), value) + 0.0  # + 0.0: no -0.0
        bits = value.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        key = ordered * 4294967296 + (ns - 1 - blocks[None, :]).to(tl.int64)
        key = tl.where(blocks[None, :] < ns, key, PAD_KEY)
        if BLOCK_S > TOP:
            key = tl.topk(key, TOP)
        best = tl.topk(tl.reshape(tl.join(best, key), (BLOCK_M, 2 * TOP)), TOP)

    block = ns - 1 - (best & 0xFFFFFFFF)  # PAD_KEY decodes to a negative block
    slot = tl.arange(0, TOP)
    chosen = (block >= 0) & (block <= own[:, None].to(tl.int64)) & (slot[None, :] < take)
    out = OUT + b * stride_ob + kvh * stride_oh + tokens[:, None].to(tl.int64) * stride_os + slot[None, :]
    tl.store(out, tl.where(chosen, block, -1).to(tl.int32), mask=token_ok[:, None] & (slot[None, :] < take))


def triton_select_blocks(q: Tensor, kc: Tensor, lse: Tensor, config: NSAConfig, seq: int, scale: float,
                         fast_launch: bool = True, block_m: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None) -> Tensor:
    """``(B, Hkv, Sq, take)`` int32: the selection blocks (``take = min(select_blocks, Ns)``) each of
    the last ``Sq`` of ``seq`` query tokens reads, best first, -1 in the slots past the blocks it
    has; from ``q (B, H, Sq, D)``, the compressed keys ``kc (B, Hkv, Nc, D)`` (q's dtype) and the
    compressed branch's natural-log LSE ``lse (B, H, Sq)`` (float32, -inf where no compressed block
    is visible), the scores scaled by ``scale``; shapes within
    :func:`~.compressed.selection_kernel_supports`. ``fast_launch``: see
    :func:`~sparse_attn.backends.triton.launch.launch_jit`. Tuning:
    ``block_m`` query tokens per program (a power of two; None: 256 query rows of heads x tokens, 16
    to 64 tokens), ``num_warps`` and ``num_stages`` (None: by the tile's size; Triton's default).
    Tile shapes change the order of the float32 sums, so near-equal importances may rank apart."""
    batch, heads, q_len, dim = q.shape
    kv_heads, nc = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    ns = math.ceil(seq / config.select_block)
    take = min(config.select_blocks, ns)
    top = next_power_of_2(max(take, 2))
    group_p2 = next_power_of_2(group)
    if block_m is None:  # 256 query rows: on an H100 at 64K (G = 4) 2.6x faster than 64 rows
        block_m = min(64, max(16, 256 // group_p2))
    if num_warps is None:
        num_warps = 8 if group_p2 * block_m * dim >= 64 * 128 else 4
    q, kc = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, kc))
    lse = lse.float().contiguous()
    out = torch.empty(batch, kv_heads, q_len, take, device=q.device, dtype=torch.int32)
    launch_jit(_select_blocks_kernel, (cdiv(q_len, block_m), batch * kv_heads), (
        q, kc, lse, out, *q.stride()[:3], *kc.stride()[:3], lse.stride(0), lse.stride(1), *out.stride()[:3],
        q_len, seq, nc, ns, take, scale * LOG2E,
    ), dict(
        KV_HEADS=kv_heads, GROUP=group, GROUP_P2=group_p2, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_C=BLOCK_C,
        BLOCK_S=max(BLOCK_S, top), TOP=top, COMPRESS_BLOCK=config.compress_block,
        COMPRESS_STRIDE=config.compress_stride, SELECT_BLOCK=config.select_block,
        FORCED_INITIAL=config.forced_initial, FORCED_LOCAL=config.forced_local, UPCAST=fp32_dot_operands(q.dtype),
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    ), fast_launch)
    return out
