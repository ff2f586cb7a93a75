"""Sparse decode steps inside a compiled decoding forward (``torch.compile``, CUDA graphs).

With a static cache, ``generate()`` compiles the decoding forward (``torch.compile``, mode
``reduce-overhead``: the forward replays as CUDA graphs). The general attention function keeps
host-side state and reads the mask on the host, so it runs outside the compiled graph, and each layer
then pays a graph break. A page-index decode step needs none of that: the new key's cache position
is a device tensor (``position_ids``), the selection and the kernel read the index's lengths on the
device, and every shape is fixed. This module runs that step as one custom op,
``sparse_attn::page_decode_step``, which the compiled forward keeps inside its graph.

A layer takes this path while the forward is being compiled, when:

* its decode method is ``quest``, ``pooled`` or ``sink_window`` (streaming and full heads included),
  with no ``select_layers`` anywhere (selection reuse keeps its selections on the host), and
  ``record`` is off (records read device values on the host);
* its page index exists and was kept plain causal at prefill (a padded prefill drops the index, and
  its decode steps run the general path, dense), and matches the cache's batch, heads, dtype,
  device and length.

Otherwise the general attention function runs; so do steps of more than one new token
per sequence (speculative verification, short prompts through a forward compiled by hand), sliding-
window layers, and calls that need gradients. The step appends the new token's key at its position
(``position_ids``, which transformers passes; without them, at each sequence's index length,
assuming as ``generate()`` does that each forward adds one token) with
:meth:`~sparse_attn.decode.PageIndex.append_at`, which rebuilds the page holding that position
from the cache where the index had followed the cache further (a cache set back by assisted
decoding; pages before that one are taken as they are, so the index must describe this cache's
earlier tokens: a new sequence starts with an eager prefill, which rebuilds it), then selects and
attends. A budget that covers the cache
selects every page (dense attention, as the general path runs it). Page indexes keep their tensors
across prefills of the same shape (:meth:`~sparse_attn.decode.PageIndex.copy_`), so a captured
graph stays valid from one ``generate()`` call to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from .config import decode_layer_knobs
from .page_steps import attend_pages, head_policies, page_selection

GRAPH_METHODS = ("quest", "pooled", "sink_window")  # selections with no host reads (oracle and seer have some)
MAX_GRAPH_ROWS = 1  # query rows of a compiled step: one new token per sequence (steps of more run the general path)


@dataclass(frozen=True)
class GraphDecodePlan:
    """A layer's decode knobs, for the compiled path (see the module docstring)."""

    method: str
    budget: int
    sink: int
    recent: int
    page: int
    bounds: str
    streaming: tuple = ()  # KV heads that read their sink and recent pages only
    full: tuple = ()  # KV heads that read every page


def graph_decode_plans(config, num_layers: int) -> dict:
    """Per layer, the :class:`GraphDecodePlan` of a patched model's config, for the layers whose
    decode settings the compiled path can run (see the module docstring); the others have none."""
    pages = getattr(config, "_decode_pages", None)
    if pages is None or config.record or pages.get("select_layers"):
        return {}
    plans = {}
    for layer in range(num_layers):
        knobs = decode_layer_knobs(pages, layer)
        if knobs["method"] not in GRAPH_METHODS:
            continue
        bounds = pages["bounds"] if knobs["method"] == "quest" else "exact"
        plans[layer] = GraphDecodePlan(knobs["method"], knobs["budget"], knobs["sink"], knobs["recent"],
                                       knobs["page"], bounds, tuple(pages["streaming_heads"].get(layer, ())),
                                       tuple(pages["full_heads"].get(layer, ())))
    return plans


def mark_static_index(index) -> None:
    """Mark the index's tensors as fixed addresses for ``torch.compile``: a compiled forward that
    updates them in place is then captured as a CUDA graph (inductor skips graphs that mutate other
    inputs), as transformers marks its static cache."""
    import torch._dynamo

    for tensor in (index.kmin, index.kmax, index.ksum, index.lengths, index.qmin, index.qmax, index.qscale):
        if tensor is not None:
            torch._dynamo.mark_static_address(tensor)


@torch.library.custom_op("sparse_attn::page_decode_step",
                         mutates_args=("kmin", "kmax", "ksum", "lengths", "qmin", "qmax", "qscale"))
def page_decode_step(query: Tensor, key: Tensor, value: Tensor, kmin: Tensor, kmax: Tensor, ksum: Tensor,
                     lengths: Tensor, qmin: Optional[Tensor], qmax: Optional[Tensor], qscale: Optional[Tensor],
                     positions: Optional[Tensor], page: int, capacity: int, method: str, budget: int, sink: int,
                     recent: int, scale: float, streaming: List[int], full: List[int]) -> Tensor:
    """One decode step of a layer over its page index, with no host reads: add the keys of the
    ``q_len`` new tokens, which the updated cache ``key`` holds from each sequence's ``positions[b]``
    (``(B,)``; None: the index's lengths), with :meth:`~sparse_attn.decode.PageIndex.append_at` (which
    rebuilds the page a position lands in where the index had followed the cache further or another
    sequence), select pages, attend. ``streaming`` and ``full``: KV heads that read their sink and recent pages
    only, or every page (:func:`.page_steps.head_policies`). ``query (B, H, q_len, D)``,
    ``key``/``value (B, Hkv, S, D)``; the index's tensors are updated in place. Returns
    ``(B, q_len, H, D)``."""
    from ...decode import PageIndex

    quantized = None if qmin is None else (qmin, qmax, qscale)
    index = PageIndex(kmin, kmax, ksum, lengths, page, capacity, bounds="exact" if qmin is None else "int8",
                      quantized=quantized)
    batch, rows, dim = query.shape[0], query.shape[2], query.shape[3]
    key = key.contiguous()
    index.append_at(key, lengths.clone() if positions is None else positions, rows, check_values=False)
    pages, counts = page_selection(method, budget, sink, recent, scale)(query, index)
    if streaming or full:
        knobs = {"budget": budget, "sink": sink, "recent": recent}
        pages, counts = head_policies(query, index, pages, counts, knobs, tuple(streaming), tuple(full), scale)
    out = query.new_empty(batch, rows, query.shape[1], dim)
    attend_pages(query, key, value.contiguous(), pages, counts, index.lengths, page, scale,
                  out.transpose(1, 2), kernel=query.is_cuda)
    return out


@page_decode_step.register_fake
def _page_decode_step_shape(query, key, value, kmin, kmax, ksum, lengths, qmin, qmax, qscale, positions, page,
                            capacity, method, budget, sink, recent, scale, streaming, full):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def graph_decode(module, query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling,
                 kwargs) -> Optional[Tensor]:
    """The layer's decode step through :func:`page_decode_step` where the compiled path applies (see
    the module docstring), else None. Traced by ``torch.compile``: plain attribute and dict reads,
    which become the compiled graph's guards."""
    state = getattr(module, "_sparse_attn_state", None)
    if state is None or key.dim() != 4:
        return None
    layer = module.layer_idx
    plan = state.graph_plans.get(layer)
    index = state.page_indexes.get(layer)
    if plan is None or index is None:
        return None
    batch, kv_heads, slots, dim = key.shape
    rows = query.shape[2]
    if not 1 <= rows <= MAX_GRAPH_ROWS or slots > index.capacity or index.page_size != plan.page \
            or index.bounds != plan.bounds or (index.batch, index.kv_heads, index.head_dim) != (batch, kv_heads, dim) \
            or index.dtype != key.dtype or index.device != key.device or query.dtype != key.dtype:
        return None
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions") or (dropout > 0.0 and module.training):
        return None
    if kwargs.get("sliding_window") is not None or torch.is_grad_enabled() and query.requires_grad:
        return None  # a sliding-window cache shifts its keys; the op has no backward
    # The index now runs ahead of the host's count of its tokens: the general path rebuilds it if it
    # ever runs on this cache again.
    state.index_lengths[layer] = -1
    scale = dim ** -0.5 if scaling is None else float(scaling)
    # transformers passes the new tokens' positions (their cache slots when nothing is padded, which a
    # layer with an index guarantees); they place the step even where the cache was set back.
    position_ids = kwargs.get("position_ids")
    positions = None
    if isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[1] == rows \
            and position_ids.shape[0] in (1, batch):
        positions = position_ids[:, 0].to(torch.int64).expand(batch).contiguous()
    return page_decode_step(query, key, value, index.kmin, index.kmax, index.ksum, index.lengths, index.qmin,
                            index.qmax, index.qscale, positions, index.page_size, index.capacity, plan.method,
                            plan.budget, plan.sink, plan.recent, scale, list(plan.streaming), list(plan.full))
