"""Context-parallel block-sparse attention: the sequence split over the ranks of a process group.

Each rank holds the queries, keys and values of one contiguous shard of the sequence. The key/value
blocks a rank's kept blocks read from other shards are sent to it with one ``all_to_all_single``
(blocks nobody else reads stay home; a rank that reads no remote block receives zero rows); the rank
then runs :func:`~sparse_attn.sparse_attention` once on its own query rows against a buffer of the
received blocks and its own shard in sequence order, under a layout whose key-block indices point into
that buffer. Under a causal layout every remote block a rank reads precedes its shard, so the buffer
ends with the rank's own tokens: the kernels' bottom-right causal alignment puts each query at its true
position relative to every key it reads. The backward of the exchange is the reverse
``all_to_all_single``: every rank gets back the gradients the other ranks computed for its keys and
values, and adds them up.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import check_qkv, sparse_attention
from ..layout import BlockSparseLayout, LayoutError, dense_to_csr
from .partition import PartitionPlan, _check_self_attention, alignment, reachable_dense

__all__ = ["context_parallel_attention", "local_layout"]


def context_parallel_attention(q_shard: Tensor, k_shard: Tensor, v_shard: Tensor, layout: BlockSparseLayout,
                               group=None, *, plan: Optional[PartitionPlan] = None, backend: str = "auto",
                               scale: Optional[float] = None) -> Tensor:
    """Block-sparse self-attention over a sequence sharded across the ranks of ``group``.

    Args:
        q_shard: ``(B, H, S_r, D)``, this rank's queries: tokens ``bounds[r]:bounds[r + 1]`` of the
            sequence, rank ``r`` being this process's rank in ``group``.
        k_shard, v_shard: ``(B, Hkv, S_r, D)``, the keys and values of the same tokens (GQA as in
            :func:`~sparse_attn.sparse_attention`).
        layout: the layout of the whole sequence (``q_len == kv_len == sum of S_r``), identical on
            every rank; its causal flag decides causality.
        group: the process group (default: the world); ``torch.distributed`` must be initialized.
        plan: a :class:`~sparse_attn.distributed.PartitionPlan` for this layout and group size, e.g.
            from :func:`~sparse_attn.distributed.plan_partition`; each rank then passes the rows the
            plan assigns it. Without a plan the shards are what the ranks pass (their lengths are
            gathered, one small all-gather): every shard but the last a multiple of
            ``max(q_block, kv_block)`` tokens.
        backend, scale: as in :func:`~sparse_attn.sparse_attention`, for the local attention.

    Returns this rank's output rows ``(B, H, S_r, Dv)``, equal to those rows of
    ``sparse_attention`` on the whole sequence. Differentiable in the three shards: the gradients of
    keys and values read by other ranks come back to their owners. Every rank of the group must call
    it with the same layout, plan, backend and scale, and differentiate through it together (its
    backward is a collective too, as in DistributedDataParallel).
    """
    check_qkv(q_shard, k_shard, v_shard, layout)
    _check_self_attention(layout)
    rank, world = _group_rank(group, "context_parallel_attention")
    local_len = q_shard.shape[2]
    if k_shard.shape[2] != local_len:
        raise ValueError(f"k_shard/v_shard hold {k_shard.shape[2]} positions but q_shard holds {local_len}; "
                         "each rank passes the queries, keys and values of the same tokens")
    if plan is None:
        plan = PartitionPlan.from_shard_lengths(layout, _gather_lengths(local_len, q_shard.device, world, group))
    else:
        _check_plan(plan, layout, world)
        if plan.shard_lengths[rank] != local_len:
            raise ValueError(f"q_shard holds {local_len} positions but the plan gives rank {rank} "
                             f"{plan.shard_lengths[rank]} (tokens {plan.bounds[rank]}:{plan.bounds[rank + 1]})")
    batch, heads = q_shard.shape[:2]
    layout.check_compatible(batch, heads, k_shard.shape[1], layout.q_len, layout.kv_len, q_shard.device)

    k_remote, v_remote = _gather_needed_kv(k_shard, v_shard, plan, rank, group)
    # The buffer in sequence order: blocks from lower ranks, the own shard, blocks from higher ranks.
    # Joined even when nothing arrived: every rank's graph then holds the exchange, so every rank
    # runs its backward (a collective) when the loss is differentiated.
    before = sum(_split_sizes(plan, rank)[1][:rank])
    k_all = torch.cat([k_remote[:, :, :before], k_shard, k_remote[:, :, before:]], dim=2)
    v_all = torch.cat([v_remote[:, :, :before], v_shard, v_remote[:, :, before:]], dim=2)
    scale = 1.0 / math.sqrt(q_shard.shape[-1]) if scale is None else float(scale)
    return sparse_attention(q_shard, k_all, v_all, local_layout(layout, plan, rank), scale=scale, backend=backend)


def local_layout(layout: BlockSparseLayout, plan: PartitionPlan, rank: int) -> BlockSparseLayout:
    """The layout rank ``rank`` runs: its query rows of ``layout`` against the key buffer it holds
    (the remote key blocks it reads and all blocks of its own shard, in sequence order), key-block
    indices renumbered to that buffer. Kept blocks that hold no allowed (query, key) pair are dropped."""
    q0, q1 = plan.bounds[rank], plan.bounds[rank + 1]
    reach = reachable_dense(layout)[:, :, q0 // layout.q_block:math.ceil(q1 / layout.q_block)]
    columns = _buffer_blocks(plan, rank)
    cnt, idx = dense_to_csr(reach[..., columns])
    kv_len = sum(plan.block_tokens(j) for j in columns)
    return BlockSparseLayout(cnt, idx, q1 - q0, kv_len, layout.q_block, layout.kv_block, layout.causal,
                             check=False)


def _own_blocks(plan: PartitionPlan, rank: int) -> range:
    return range(plan.bounds[rank] // plan.kv_block, math.ceil(plan.bounds[rank + 1] / plan.kv_block))


def _buffer_blocks(plan: PartitionPlan, rank: int) -> list:
    """The key blocks of rank ``rank``'s buffer, in sequence order. Under a causal layout the remote
    ones all precede the own shard, so the buffer ends with the rank's own tokens; without causality
    a partial last block of the sequence can only come last."""
    remote = {j for j in plan.kv_blocks[rank] if plan.owner(j) != rank}
    return sorted(remote | set(_own_blocks(plan, rank)))


def _group_rank(group, caller: str):
    """``(rank, world size)`` of this process in ``group``; errors when torch.distributed is not
    initialized or the group does not contain this process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           f"(gloo on CPU, nccl on GPUs) before {caller}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group does not contain this process")
    return rank, world


def _check_plan_group(plan: PartitionPlan, world: int) -> None:
    if not isinstance(plan, PartitionPlan):
        raise TypeError(f"plan must be a PartitionPlan, got {type(plan).__name__}")
    if plan.world_size != world:
        raise ValueError(f"plan is for {plan.world_size} ranks but the group has {world}")


def _check_plan(plan: PartitionPlan, layout: BlockSparseLayout, world: int) -> None:
    _check_plan_group(plan, world)
    geometry = (layout.q_len, layout.q_block, layout.kv_block, layout.causal)
    if (plan.seq_len, plan.q_block, plan.kv_block, plan.causal) != geometry:
        raise LayoutError(f"plan was built for seq_len={plan.seq_len}, blocks {plan.q_block}x{plan.kv_block}, "
                          f"causal={plan.causal}; the layout has seq_len={layout.q_len}, blocks "
                          f"{layout.q_block}x{layout.kv_block}, causal={layout.causal}")
    unit = alignment(layout)
    if any(b % unit for b in plan.bounds[1:-1]):
        raise ValueError(f"plan bounds {plan.bounds} must be multiples of max(q_block, kv_block) = {unit}")


def _gather_lengths(local_len: int, device, world: int, group) -> list:
    mine = torch.tensor([local_len], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [int(t) for t in every]


def _pack(k: Tensor, v: Tensor) -> Tensor:
    """``(B, Hkv, S, Dk)`` and ``(B, Hkv, S, Dv)`` -> ``(S, B * Hkv * (Dk + Dv))``, sequence first."""
    seq = k.shape[2]
    return torch.cat([k.permute(2, 0, 1, 3).reshape(seq, -1), v.permute(2, 0, 1, 3).reshape(seq, -1)], dim=1)


def _unpack(packed: Tensor, k: Tensor, v: Tensor):
    seq = packed.shape[0]
    batch, kv_heads, _, dk = k.shape
    split = batch * kv_heads * dk
    k_out = packed[:, :split].reshape(seq, batch, kv_heads, dk).permute(1, 2, 0, 3)
    v_out = packed[:, split:].reshape(seq, batch, kv_heads, v.shape[-1]).permute(1, 2, 0, 3)
    return k_out, v_out


def _gather_needed_kv(k_shard: Tensor, v_shard: Tensor, plan: PartitionPlan, rank: int, group):
    """The remote key blocks rank ``rank`` reads, in sequence order, as ``(B, Hkv, rows, D)`` keys and values."""
    packed = _ExchangeShards.apply(_pack(k_shard, v_shard), plan, rank, group)
    return _unpack(packed, k_shard, v_shard)


def _send_rows(plan: PartitionPlan, rank: int) -> list:
    """Per destination rank, the rows of this rank's shard it reads (empty for itself)."""
    base = plan.bounds[rank]
    own = set(_own_blocks(plan, rank))
    rows = []
    for d in range(plan.world_size):
        blocks = [j for j in plan.kv_blocks[d] if j in own] if d != rank else []
        rows.append([j * plan.kv_block + t - base for j in blocks for t in range(plan.block_tokens(j))])
    return rows


def _split_sizes(plan: PartitionPlan, rank: int):
    """Rows rank ``rank`` sends to and receives from every rank (its own shard never travels)."""
    send = [len(rows) for rows in _send_rows(plan, rank)]
    recv = [0] * plan.world_size
    for j in plan.kv_blocks[rank]:
        if plan.owner(j) != rank:
            recv[plan.owner(j)] += plan.block_tokens(j)
    return send, recv


def _any_transfer(plan: PartitionPlan) -> bool:
    return any(plan.owner(j) != r for r in range(plan.world_size) for j in plan.kv_blocks[r])


class _ExchangeShards(torch.autograd.Function):
    """Forward: every rank sends the rows of its packed K/V shard that other ranks' kept blocks read
    to those ranks and receives the rows it reads (one ``all_to_all_single``). Backward: the reverse
    exchange returns each receiver's gradient of those rows to their owner, which adds them up."""

    @staticmethod
    def forward(ctx, packed: Tensor, plan: PartitionPlan, rank: int, group):
        send, recv = _split_sizes(plan, rank)
        rows = torch.tensor([t for dest in _send_rows(plan, rank) for t in dest], dtype=torch.long,
                            device=packed.device)
        ctx.send, ctx.recv, ctx.group, ctx.local = send, recv, group, packed.shape
        ctx.save_for_backward(rows)
        ctx.active = _any_transfer(plan)  # the same on every rank: all call the collective or none does
        out = packed.new_empty(sum(recv), packed.shape[1])
        if ctx.active:
            outgoing = packed.index_select(0, rows)
            dist.all_to_all_single(out, outgoing, output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        grad_local = grad.new_zeros(ctx.local)
        if ctx.active:
            back = grad.new_empty(sum(ctx.send), ctx.local[1])
            dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send,
                                   input_split_sizes=ctx.recv, group=ctx.group)
            grad_local.index_add_(0, rows, back)
        return grad_local, None, None, None
