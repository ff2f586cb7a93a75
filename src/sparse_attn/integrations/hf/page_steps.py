"""The two pieces of a page-index decode step that the general path (:mod:`.patching`) and the
compiled path (:mod:`.graph_decode`) share: the checked page selection of a layer's knobs, and the
decode attention over the selected pages."""

from __future__ import annotations

import functools


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
