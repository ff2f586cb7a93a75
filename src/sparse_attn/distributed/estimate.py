"""Dynamic sparsity methods on a sequence sharded across the ranks of a process group.

For the methods that choose each query block's key blocks from that block's rows and the keys up to
them, rank ``r`` estimates its own rows exactly as the single-device estimate would, as a chunked
prefill: its queries against the keys of tokens ``0:bounds[r + 1]``. It receives the key shards of the
lower ranks (one ``all_to_all_single``; static patterns need no keys and receive none), and the
per-row pieces of the layout (``kv_num_blocks`` and ``kv_indices`` rows) are then all-gathered into
the global layout, identical on every rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..layout import BlockSparseLayout
from ..methods import Method, StaticPattern
from ..methods.common import per_kv_head
from ..methods.precheck import counts_of_the_call
from .context_parallel import _check_plan_group, _gather_lengths, _group_rank

__all__ = ["context_parallel_estimate", "ROW_LOCAL_METHODS"]

# Methods whose choice for a query block depends only on that block's rows and the keys up to them.
ROW_LOCAL_METHODS = ("xattention", "pooled_topp", "pooled_topk", "oracle", "quest", "moba", "seer", "dense",
                     "sliding_window", "strided", "power")
_REFUSED = {
    "vertical_slash": "scores every key with the call's last queries (they live on the last rank)",
    "flexprefill": "picks each head's pattern and lines from the call's last queries (they live on the last rank)",
    "random": "draws its layout per shape, so a shard's rows differ from the whole sequence's",
}


def context_parallel_estimate(method: Method, q_shard: Tensor, k_shard: Tensor, group=None, *, plan=None,
                              layer_idx: Optional[int] = None, scale: Optional[float] = None,
                              return_report: bool = False):
    """The layout ``method.estimate(q, k, layer_idx, scale=scale)`` gives for the whole sequence, from
    its shards across the ranks of ``group``.

    Args:
        method: a :class:`~sparse_attn.methods.Method` of :data:`ROW_LOCAL_METHODS`;
            ``vertical_slash``, ``flexprefill`` and ``random`` raise ValueError (see docs/distributed.md).
        q_shard: ``(B, H, S_r, D)``, this rank's queries (tokens ``bounds[r]:bounds[r + 1]``).
        k_shard: ``(B, Hkv, S_r, D)``, the keys of the same tokens.
        group: the process group (default: the world); ``torch.distributed`` must be initialized.
        plan: a :class:`~sparse_attn.distributed.PartitionPlan` whose shards the ranks hold; without
            one the shard lengths are gathered (one small all-gather). Every shard but the last must be
            a multiple of ``method.block_size`` tokens.
        layer_idx, scale: as in ``method.estimate``.
        return_report: also return a dict of what this rank moved: ``received_key_bytes``,
            ``sent_key_bytes`` and ``received_layout_bytes``.

    Returns the global causal layout (``q_len == kv_len == sum of S_r``), the same on every rank, or
    ``(layout, report)``. Every rank of the group must call it with the same method, layer_idx and scale.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be a sparse_attn.methods.Method, got {type(method).__name__}")
    if method.name in _REFUSED:
        raise ValueError(f"method {method.name!r} is not supported by context_parallel_estimate: it "
                         f"{_REFUSED[method.name]}; supported: {list(ROW_LOCAL_METHODS)}")
    if method.name not in ROW_LOCAL_METHODS:
        raise ValueError(f"method {method.name!r} is not known to choose each query block from its own rows; "
                         f"supported: {list(ROW_LOCAL_METHODS)}")
    for name, t in (("q_shard", q_shard), ("k_shard", k_shard)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, S_r, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    local_len = q_shard.shape[2]
    if k_shard.shape[2] != local_len:
        raise ValueError(f"k_shard holds {k_shard.shape[2]} positions but q_shard holds {local_len}; "
                         "each rank passes the queries and keys of the same tokens")
    rank, world = _group_rank(group, "context_parallel_estimate")
    if plan is None:
        lengths = _gather_lengths(local_len, q_shard.device, world, group)
    else:
        _check_plan_group(plan, world)
        lengths = list(plan.shard_lengths)
        if lengths[rank] != local_len:
            raise ValueError(f"q_shard holds {local_len} positions but the plan gives rank {rank} {lengths[rank]} "
                             f"(tokens {plan.bounds[rank]}:{plan.bounds[rank + 1]})")
    block = method.for_layer(layer_idx).block_size
    if min(lengths) < 1 or any(n % block for n in lengths[:-1]):
        raise ValueError(f"shard lengths {lengths}: every shard must be non-empty and all but the last a multiple "
                         f"of the method's block_size={block}")
    seq = sum(lengths)
    end = sum(lengths[:rank + 1])

    layer_method = method.for_layer(layer_idx)
    # Count shares resolve against the whole sequence; dense_above applies to the global densities.
    local_method = dataclasses.replace(counts_of_the_call(layer_method, seq), dense_above=1.0, per_layer={})
    report = {"received_key_bytes": 0, "sent_key_bytes": 0}
    with torch.no_grad():
        if isinstance(method, StaticPattern):  # no keys read: a zero-stride stand-in of the prefix's shape
            k_prefix = k_shard.new_zeros(*k_shard.shape[:2], 1, k_shard.shape[3]).expand(-1, -1, end, -1)
        else:
            k_prefix = _gather_key_prefix(k_shard.detach(), lengths, rank, group, report)
        local = local_method.estimate(q_shard.detach(), k_prefix, layer_idx, scale=scale)
        layout = _gather_rows(local, lengths, block, seq, group, report)
    if layer_method.dense_above < 1.0:
        layout = _fill_dense_groups(layout, k_shard.shape[1], layer_method.dense_above)
    return (layout, report) if return_report else layout


def _gather_key_prefix(k_shard: Tensor, lengths: list, rank: int, group, report: dict) -> Tensor:
    """The keys of tokens ``0:end of this rank's shard`` (B, Hkv, S, D): every rank sends its shard to
    the higher ranks (one ``all_to_all_single``, sequence-first rows)."""
    world = len(lengths)
    local_len = k_shard.shape[2]
    rows = k_shard.permute(2, 0, 1, 3).reshape(local_len, -1)
    send = [local_len if d > rank else 0 for d in range(world)]
    recv = [lengths[s] if s < rank else 0 for s in range(world)]
    received = rows.new_empty(sum(recv), rows.shape[1])
    if world > 1:
        outgoing = rows.repeat(world - rank - 1, 1)
        dist.all_to_all_single(received, outgoing, output_split_sizes=recv, input_split_sizes=send, group=group)
    element = rows.element_size() * rows.shape[1]
    report["received_key_bytes"] += received.shape[0] * element
    report["sent_key_bytes"] += sum(send) * element
    prefix = torch.cat([received, rows]).reshape(-1, *k_shard.shape[:2], k_shard.shape[3])
    return prefix.permute(1, 2, 0, 3)


def _gather_rows(local: BlockSparseLayout, lengths: list, block: int, seq: int, group, report: dict):
    """All-gather every rank's layout rows (``kv_num_blocks`` and ``kv_indices``, padded to the
    largest row count and index width over the ranks) into the layout of the whole sequence."""
    world = len(lengths)
    cnt, idx = local.kv_num_blocks, local.kv_indices
    width = torch.tensor([idx.shape[-1]], dtype=torch.int64, device=cnt.device)
    widths = [torch.empty_like(width) for _ in range(world)]
    dist.all_gather(widths, width, group=group)
    width = max(int(w) for w in widths)
    rows = [math.ceil(n / block) for n in lengths]
    most = max(rows)
    piece = torch.zeros(*cnt.shape[:2], most, 1 + width, dtype=torch.int32, device=cnt.device)
    piece[..., :cnt.shape[2], 0] = cnt
    piece[..., :cnt.shape[2], 1:1 + idx.shape[-1]] = idx
    pieces = [torch.empty_like(piece) for _ in range(world)]
    dist.all_gather(pieces, piece, group=group)
    report["received_layout_bytes"] = (world - 1) * piece.numel() * piece.element_size() + 8 * (world - 1)
    full = torch.cat([p[..., :n, :] for p, n in zip(pieces, rows)], dim=2)
    return BlockSparseLayout(full[..., 0].contiguous(), full[..., 1:].contiguous(), seq, seq, block, block,
                             causal=True)


def _fill_dense_groups(layout: BlockSparseLayout, kv_heads: int, dense_above: float) -> BlockSparseLayout:
    """Full causal rows for the KV groups whose density (over the group and the batch) reaches
    ``dense_above``, as the single-device estimate decides it from the whole sequence's layout."""
    reachable = layout.causal_block_mask()
    density = layout.kept_blocks().float() / reachable.sum().clamp_min(1)
    full = per_kv_head(density, kv_heads) >= dense_above
    if not bool(full.any()):
        return layout
    heads = full.repeat_interleave(layout.kv_num_blocks.shape[1] // kv_heads)
    keep = layout.to_dense() | (heads[None, :, None, None] & reachable)
    return BlockSparseLayout.from_dense(keep, layout.q_len, layout.kv_len, layout.q_block, causal=True)
