"""The pieces of a page-index decode step that the general path (:mod:`.patching`) and the compiled
path (:mod:`.graph_decode`) share: the checked page selection of a layer's knobs, the streaming and
full heads' policies, and the decode attention over the selected pages."""

from __future__ import annotations

import functools
from typing import Optional

import torch


def attend_pages(query, key, value, pages, counts, lengths, page: int, scaling, out, kernel: bool) -> None:
    """``decode_attention`` of a decode step over the pages its layer selected, into ``out``. The
    integration makes every input itself (the layer's contiguous cache, its own selection, the index
    lengths, a fresh ``out`` of the layer's layout), so with ``kernel`` (CUDA tensors) it launches the
    Triton kernel directly, without the public call's input checks, whose host work is about half of
    that call's; where the kernel cannot run the call (or without ``kernel``), the public call runs."""
    from ...decode import decode_attention

    if kernel:
        try:
            from ...decode.kernels import triton_decode_attention, unsupported_reason
        except ImportError:  # no Triton: the public call picks the reference
            unsupported_reason = None
        if unsupported_reason is not None and unsupported_reason(query, key, key.shape[1]) is None:
            from ...options import resolve_kernel_options

            options = resolve_kernel_options(None)
            scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
            triton_decode_attention(query, key, value, pages, counts, lengths, page, scale,
                                    fast_launch=options.fast_launch, out=out,
                                    dependent_launch=options.dependent_launch_on(query.device))
            return
    decode_attention(query, key, value, pages, counts, lengths, page_size=page, scale=scaling, check_values=False,
                     out=out)


@functools.lru_cache(maxsize=256)
def page_selection(method: str, budget: int, sink: int, recent: int, scale):
    """The checked :class:`~sparse_attn.decode.PageSelection` of a layer's decode knobs, built once
    per distinct knobs (a decode step then skips the knob checks)."""
    from ...decode import PageSelection

    return PageSelection(method=method, budget=budget, sink=sink, recent=recent, scale=scale)


def _widen(pages, width: int):
    """``pages (B, Hkv, W)`` padded to ``width`` slots by repeating the last one (as select_pages pads)."""
    extra = width - pages.shape[-1]
    return pages if extra <= 0 else torch.cat([pages, pages[..., -1:].expand(*pages.shape[:-1], extra)], -1)


def head_policies(query, index, pages, counts, knobs: dict, streaming, full, scaling, filled: Optional[int] = None):
    """The layer's selection with its streaming KV heads switched to the sink and recent pages
    (``sink_window`` under the layer's budget) and its full KV heads to every page of the filled
    cache; the three selections are widened to one width and combined per KV head. ``filled``: the
    cache's filled length, read on the host (the full heads read its pages); None: the index's lengths
    on the device (the full heads' width is every page of the index, their counts the pages of each
    sequence), for a step with no host reads."""
    from ...decode import select_pages

    batch, kv_heads = pages.shape[:2]
    choices = [(pages, counts, None)]
    if streaming:
        s_pages, s_counts = select_pages(query, index, method="sink_window", budget=knobs["budget"],
                                         sink=knobs["sink"], recent=knobs["recent"], scale=scaling)
        choices.append((s_pages, s_counts, streaming))
    if full:
        if filled is None:
            n = index.max_pages
            f_counts = index.num_pages().to(counts.dtype)[:, None].expand_as(counts)
        else:
            n = -(-filled // index.page_size)
            f_counts = torch.full_like(counts, n)
        f_pages = torch.arange(n, dtype=pages.dtype, device=pages.device).expand(batch, kv_heads, n)
        choices.append((f_pages, f_counts, full))
    width = max(p.shape[-1] for p, _, _ in choices)
    # Copies: the layer's own selection may be shared with later layers (select_layers) unchanged.
    out_pages, out_counts = _widen(pages, width).clone(), counts.clone()
    for p, c, heads in choices[1:]:
        p = _widen(p, width)
        for head in heads:  # per-head copies (a device-side mask from a host list would copy to the device)
            out_pages[:, head] = p[:, head]
            out_counts[:, head] = c[:, head]
    return out_pages, out_counts
