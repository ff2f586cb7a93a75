"""``context_parallel_prefill``: a transformers causal LM's prefill with the sequence split over ranks.

Every rank runs the whole model on its own contiguous shard of the tokens: embeddings, MLPs, norms
and the LM head act on each position alone, so only attention needs the other ranks. Each layer's
attention estimates its layout from the sharded queries and keys
(:func:`~sparse_attn.distributed.context_parallel_estimate`) and attends through
:func:`~sparse_attn.distributed.context_parallel_attention`, which moves only the key/value blocks
that kept blocks read. Rotary positions are the tokens' global positions.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ..methods import Method, StaticPattern, get_method
from ..patterns.dense import dense_layout
from .context_parallel import _group_rank, context_parallel_attention
from .estimate import ROW_LOCAL_METHODS, context_parallel_estimate
from .partition import PartitionPlan, plan_partition

__all__ = ["context_parallel_prefill"]


def context_parallel_prefill(model, input_ids: Tensor, method: Union[str, Method] = "dense", group=None, *,
                             plan: Optional[PartitionPlan] = None, backend: str = "auto",
                             gather_logits: bool = True, **knobs):
    """Prefill ``input_ids (B, S)`` through ``model`` (a transformers causal LM with rotary positions,
    Llama-family attention) with the sequence split over the ranks of ``group`` (default: the world).

    Every rank passes the same ``input_ids``; rank ``r`` runs tokens ``plan.bounds[r]:plan.bounds[r+1]``
    at their global positions, with every attention layer block-sparse under ``method`` (a name of
    :data:`~sparse_attn.distributed.ROW_LOCAL_METHODS` with its ``knobs``, or a ``Method``), estimated
    on the shards and attended with context parallelism. ``plan``: the split (default:
    :func:`~sparse_attn.distributed.plan_partition` of the method's layer-0 layout for a static
    pattern, else of the dense causal layout, balancing kept blocks). ``backend``: the attention
    backend of each rank's local call. No KV cache is kept (a prefill for scoring or for the logits of
    the next token).

    Returns ``(logits, plan)``: with ``gather_logits`` the whole ``(B, S, vocab)`` logits on every
    rank, otherwise this rank's ``(B, S_r, vocab)``. Equal to the same model patched with ``method``
    on one device (``sparse_attn.patch(model, method=..., fallback="never", min_kv_len=0)``).
    """
    from ..integrations.hf.attention_hook import attention_hook

    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, seq) tensor with seq > 0, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    _check_model(model)
    rank, world = _group_rank(group, "context_parallel_prefill")
    if knobs and not isinstance(method, str):
        raise ValueError(f"knobs {sorted(knobs)} go with a method name; a Method carries its own")
    method = get_method(method, **knobs) if isinstance(method, str) else method
    if not isinstance(method, Method):
        raise TypeError(f"method must be a method name or a sparse_attn.methods.Method, got {type(method).__name__}")
    if method.name not in ROW_LOCAL_METHODS:
        raise ValueError(f"method {method.name!r} cannot be estimated on sequence shards; supported: "
                         f"{list(ROW_LOCAL_METHODS)}")
    seq = input_ids.shape[1]
    if plan is None:
        plan = plan_partition(_planning_layout(model, method, input_ids), world)
    elif plan.bounds[-1] != seq or len(plan.bounds) != world + 1:
        raise ValueError(f"plan splits {plan.bounds[-1]} tokens over {len(plan.bounds) - 1} ranks; input_ids has "
                         f"{seq} tokens and the group {world} ranks")
    start, end = plan.bounds[rank], plan.bounds[rank + 1]
    device = input_ids.device

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = int(module.layer_idx)
        layout = context_parallel_estimate(method, query, key, group, plan=plan, layer_idx=layer, scale=scaling)
        out = context_parallel_attention(query, key, value, layout, group, plan=plan, backend=backend, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    positions = torch.arange(start, end, device=device)[None].expand(input_ids.shape[0], -1)
    with attention_hook(model, attention):
        logits = model(input_ids[:, start:end], position_ids=positions, use_cache=False).logits
    if not gather_logits:
        return logits, plan
    return _gather_rows(logits, plan, rank, world, group), plan


def _check_model(model) -> None:
    """ValueError for models whose attention or positions depend on more than a token's global
    position: a sliding-window attention (the hook attends the method's layout, not the window) or a
    rotary scaling computed from the sequence length (``dynamic``, ``longrope``: each shard would see
    its own length)."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    if getattr(cfg, "sliding_window", None) is not None or "sliding_attention" in (getattr(cfg, "layer_types", None)
                                                                                   or ()):
        raise ValueError(f"context_parallel_prefill: {type(model).__name__} uses sliding-window attention "
                         f"(config.sliding_window={getattr(cfg, 'sliding_window', None)!r}), which it does not "
                         "apply; only full causal attention layers are supported")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"context_parallel_prefill: rope_type={rope_type!r} scales positions by the sequence "
                         "length each rank sees (its shard), so shards would disagree; not supported")


def _planning_layout(model, method: Method, input_ids: Tensor):
    """The layout the default plan balances: a static pattern's own (layer 0, shapes only), else the
    dense causal layout at the method's block size."""
    seq = input_ids.shape[1]
    layer_method = method.for_layer(0)
    if isinstance(method, StaticPattern):
        from ..integrations.hf import attention_shape

        heads, kv_heads, dim = attention_shape(model)
        stand_in = torch.zeros((), device=input_ids.device)
        q = stand_in.expand(input_ids.shape[0], heads, seq, dim)
        k = stand_in.expand(input_ids.shape[0], kv_heads, seq, dim)
        return layer_method.estimate(q, k, 0)
    return dense_layout(seq, block_size=layer_method.block_size, device=input_ids.device)


def _gather_rows(local: Tensor, plan: PartitionPlan, rank: int, world: int, group) -> Tensor:
    """The ranks' ``(B, S_r, ...)`` rows concatenated along dim 1, on every rank."""
    longest = max(plan.shard_lengths)
    padded = local.new_zeros(local.shape[0], longest, *local.shape[2:])
    padded[:, :local.shape[1]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:, :n] for part, n in zip(parts, plan.shard_lengths)], dim=1)
