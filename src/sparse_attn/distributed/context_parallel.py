"""Context-parallel block-sparse attention: the sequence split over the ranks of a process group.

Each rank holds the queries, keys and values of one contiguous shard of the sequence. The key/value
shards a rank's kept blocks read are sent to it with one ``all_to_all_single`` (shards nobody's rows
need stay home; a rank that needs no remote shard receives zero rows); the rank then runs
:func:`~sparse_attn.sparse_attention` once on its own query rows against the received shards in rank
order followed by its own shard, under a layout whose key-block indices point into that buffer. Under
a causal layout a rank reads only shards at or before its own, so the buffer is in sequence order and
ends with the rank's own tokens: the kernels' bottom-right causal alignment puts each query at its
true position relative to every key it reads. The backward of the exchange is the reverse
``all_to_all_single``: every rank gets back the gradients the other ranks computed for its keys and
values, and sums them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import _check_qkv, sparse_attention
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
    _check_qkv(q_shard, k_shard, v_shard, layout)
    _check_self_attention(layout)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(gloo on CPU, nccl on GPUs) before context_parallel_attention")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group does not contain this process")
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
    # Joined even when nothing arrived: every rank's graph then holds the exchange, so every rank
    # runs its backward (a collective) when the loss is differentiated.
    k_all = torch.cat([k_remote, k_shard], dim=2)
    v_all = torch.cat([v_remote, v_shard], dim=2)
    scale = 1.0 / math.sqrt(q_shard.shape[-1]) if scale is None else float(scale)
    return sparse_attention(q_shard, k_all, v_all, local_layout(layout, plan, rank), scale=scale, backend=backend)


def local_layout(layout: BlockSparseLayout, plan: PartitionPlan, rank: int) -> BlockSparseLayout:
    """The layout rank ``rank`` runs: its query rows of ``layout`` against the key buffer it holds
    (the remote shards it needs in rank order, then its own), key-block indices renumbered to that
    buffer. Kept blocks that hold no allowed (query, key) pair are dropped."""
    q0, q1 = plan.bounds[rank], plan.bounds[rank + 1]
    reach = reachable_dense(layout)[:, :, q0 // layout.q_block:math.ceil(q1 / layout.q_block)]
    shards = [s for s in plan.needs[rank] if s != rank] + [rank]
    columns = [reach[..., plan.bounds[s] // layout.kv_block:math.ceil(plan.bounds[s + 1] / layout.kv_block)]
               for s in shards]
    cnt, idx = dense_to_csr(torch.cat(columns, dim=-1))
    kv_len = sum(plan.shard_lengths[s] for s in shards)
    return BlockSparseLayout(cnt, idx, q1 - q0, kv_len, layout.q_block, layout.kv_block, layout.causal,
                             check=False)


def _check_plan(plan: PartitionPlan, layout: BlockSparseLayout, world: int) -> None:
    if not isinstance(plan, PartitionPlan):
        raise TypeError(f"plan must be a PartitionPlan, got {type(plan).__name__}")
    if plan.world_size != world:
        raise ValueError(f"plan is for {plan.world_size} ranks but the group has {world}")
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
    """The remote shards rank ``rank`` needs, in rank order, as ``(B, Hkv, rows, D)`` keys and values."""
    packed = _ExchangeShards.apply(_pack(k_shard, v_shard), plan, rank, group)
    return _unpack(packed, k_shard, v_shard)


def _split_sizes(plan: PartitionPlan, rank: int):
    """Rows rank ``rank`` sends to and receives from every rank (its own shard never travels)."""
    lengths = plan.shard_lengths
    send = [lengths[rank] if rank in plan.needs[d] and d != rank else 0 for d in range(plan.world_size)]
    recv = [lengths[s] if s in plan.needs[rank] and s != rank else 0 for s in range(plan.world_size)]
    return send, recv


def _any_transfer(plan: PartitionPlan) -> bool:
    return any(s != r for r in range(plan.world_size) for s in plan.needs[r])


class _ExchangeShards(torch.autograd.Function):
    """Forward: every rank sends its packed K/V shard to the ranks that need it and receives the
    shards it needs (one ``all_to_all_single``). Backward: the reverse exchange returns each
    receiver's gradient of a shard to its owner, which sums them."""

    @staticmethod
    def forward(ctx, packed: Tensor, plan: PartitionPlan, rank: int, group):
        send, recv = _split_sizes(plan, rank)
        ctx.send, ctx.recv, ctx.group, ctx.local = send, recv, group, packed.shape
        ctx.active = _any_transfer(plan)  # the same on every rank: all call the collective or none does
        out = packed.new_empty(sum(recv), packed.shape[1])
        if ctx.active:
            dests = sum(1 for n in send if n)
            outgoing = packed.contiguous().repeat(dests, 1)
            dist.all_to_all_single(out, outgoing, output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_local = grad.new_zeros(ctx.local)
        if ctx.active:
            dests = sum(1 for n in ctx.send if n)
            back = grad.new_empty(sum(ctx.send), ctx.local[1])
            dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send,
                                   input_split_sizes=ctx.recv, group=ctx.group)
            if dests:
                grad_local = back.view(dests, *ctx.local).sum(dim=0)
        return grad_local, None, None, None
