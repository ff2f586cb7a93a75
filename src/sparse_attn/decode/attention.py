"""``decode_attention``: sparse attention of a few decoding queries over selected KV-cache pages.

Checks its inputs (every problem is a ``ValueError`` naming the argument and what was expected)
and runs the ``reference`` (PyTorch) or ``triton`` (split-KV kernel) backend. Triton is imported
only when the Triton backend runs or is considered.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..options import KernelOptions, resolve_kernel_options
from .page_index import check_page_size
from .workspace import DecodeWorkspace

BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_QUERIES = 16


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, page_counts: Tensor,
                     cache_lens: Tensor, *, page_size: int, scale: Optional[float] = None,
                     block_table: Optional[Tensor] = None, backend: str = "auto", return_lse: bool = False,
                     check_values: bool = True, kernel_options: Optional[KernelOptions] = None,
                     workspace: Optional[DecodeWorkspace] = None, out: Optional[Tensor] = None):
    """Attention of the last ``Sq`` positions of each sequence over the selected pages of its cache.

    Args:
        q: ``(B, H, Sq, D)``, ``1 <= Sq <= 16``. Query ``i`` of sequence ``b`` sits at position
            ``cache_lens[b] - Sq + i`` and sees the selected keys at positions up to its own.
        k_cache, v_cache: contiguous ``(B, Hkv, S_max, D)``, or with ``block_table`` paged
            ``(num_blocks, page_size, Hkv, D)`` (the vLLM / FlashInfer layout). ``Hkv`` divides ``H``;
            query head ``h`` reads KV head ``h // (H // Hkv)``. Same dtype as q.
        pages: ``(B, Hkv, max_pages)`` int32: the logical pages (page ``p`` holds positions
            ``[p * page_size, (p + 1) * page_size)``) selected for each (sequence, KV head), strictly
            increasing in the first ``page_counts[b, h]`` slots. Later slots are padding and never
            read. Every query head of a KV group reads its group's pages.
        page_counts: ``(B, Hkv)`` int32, each in ``[0, max_pages]`` (0: nothing to attend).
        cache_lens: ``(B,)`` int32 or int64 (a :class:`~.page_index.PageIndex`'s ``lengths`` can be
            passed as they are), each in ``[Sq, capacity]`` (capacity: ``S_max``, or
            ``max_blocks * page_size`` when paged). Positions at or past it are never attended, so
            a selected page may be partial or lie past the end.
        page_size: a power of two in 16..256 (for a paged cache, ``k_cache.shape[1]``).
        scale: softmax scale, default ``1/sqrt(D)``.
        block_table: ``(B, max_blocks)`` int32 mapping sequence ``b``'s logical page ``p`` to its
            physical block ``block_table[b, p]`` of a paged cache; None for a contiguous cache.
        backend: ``"reference"`` (PyTorch, any floating dtype, CPU or GPU), ``"triton"`` (the
            split-KV kernel: float16/bfloat16, head dims 16/32/64/128, CUDA or the CPU
            interpreter) or ``"auto"`` (Triton on CUDA when it can run the call, else reference).
        return_lse: also return the natural-log LSE.
        check_values: check the index values (``cache_lens``, ``page_counts``, ``pages``, the
            ``block_table`` entries they use), which reads them on the host: one device sync per
            call. Pass False in a decoding loop whose indices come from :func:`~.select.select_pages`
            (always valid); shapes, dtypes and devices are checked either way.
        kernel_options: a :class:`~sparse_attn.options.KernelOptions` (default: the current one);
            its ``fast_launch`` lets the Triton kernels launch through their compiled launchers once
            compiled (less host time per step).
        workspace: a :class:`~.workspace.DecodeWorkspace` on q's device (one per stream): the split
            kernel then merges its splits itself, one kernel launch per call instead of two. Its
            counters are shared state: calls running at the same time must not share one. The
            reference backend does not use it.
        out: a ``(B, H, Sq, D)`` tensor of q's dtype and device with a unit last stride to write the
            output into (and return), e.g. ``buffer.transpose(1, 2)`` of a ``(B, Sq, H, D)`` buffer,
            the layout a transformers attention layer returns; None: a new tensor.

    Returns:
        ``out`` ``(B, H, Sq, D)`` in q's dtype and, with ``return_lse``, ``lse`` ``(B, H, Sq)``
        float32. A query that sees no key gets output 0 and LSE ``-inf``.

    The value checks (``check_values``) are also skipped inside a CUDA-graph capture. Unchecked,
    the kernel still reads no memory out of bounds for ``cache_lens`` and pages within the cache,
    but gives meaningless results for invalid indices.
    """
    options = resolve_kernel_options(kernel_options)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, flag in (("return_lse", return_lse), ("check_values", check_values)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_decode_inputs(q, k_cache, v_cache, pages, page_counts, cache_lens, page_size, block_table,
                        check_values=check_values)
    if out is not None:
        _check_out(out, q, k_cache, v_cache)
    if workspace is not None:
        if not isinstance(workspace, DecodeWorkspace):
            raise TypeError(f"workspace must be a DecodeWorkspace or None, got {type(workspace).__name__}")
        workspace.check_device(q.device)
    dim = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    scale = float(scale)
    kv_heads = k_cache.shape[2] if block_table is not None else k_cache.shape[1]

    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_unsupported_reason(q, k_cache, kv_heads) is None else "reference"
    if backend == "triton":
        reason = triton_unsupported_reason(q, k_cache, kv_heads)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        from .kernels import triton_decode_attention

        result, lse = triton_decode_attention(q, k_cache, v_cache, pages, page_counts, cache_lens, page_size,
                                              scale, block_table, fast_launch=options.fast_launch,
                                              workspace=workspace, out=out,
                                              dependent_launch=options.dependent_launch_on(q.device))
    else:
        from .reference import reference_decode_attention

        result, lse = reference_decode_attention(q, k_cache, v_cache, pages, page_counts, cache_lens, page_size,
                                                 scale, block_table)
        if out is not None:
            result = out.copy_(result)
    return (result, lse) if return_lse else result


def _check_out(out, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} tensor of q's dtype {q.dtype} on {q.device} with a unit "
                         f"last stride, got shape {tuple(out.shape)}, {out.dtype} on {out.device}, "
                         f"strides {out.stride()}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if _overlaps(out, t):
            raise ValueError(f"out must not share memory with {name} (the kernel reads {name} while writing out)")


def _overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of ``a`` and ``b`` (first to last element) intersect."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() or a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    return a0 < b1 and b0 < a1


def _byte_span(t: Tensor) -> tuple:
    """``[first, last]`` byte addresses of ``t``'s elements, as a half-open pair."""
    start = t.data_ptr()
    return start, start + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) * t.element_size() + 1


def triton_unsupported_reason(q: Tensor, k_cache: Tensor, kv_heads: int) -> Optional[str]:
    """Why the Triton decode kernel cannot run this (checked) call; None when it can."""
    try:
        from .kernels import unsupported_reason
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return unsupported_reason(q, k_cache, kv_heads)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_decode_inputs(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, page_counts: Tensor,
                        cache_lens: Tensor, page_size: int, block_table: Optional[Tensor] = None,
                        check_values: bool = True) -> None:
    """Raise ``ValueError`` naming the bad argument and what was expected (see
    :func:`decode_attention` for the contract). Shape, dtype and device checks first, then the
    value checks, which read the index tensors on the host (skipped in a CUDA-graph capture).
    A non-tensor argument is a ``TypeError``, as in :func:`sparse_attn.sparse_attention`."""
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("pages", pages),
             ("page_counts", page_counts), ("cache_lens", cache_lens)]
    if block_table is not None:
        named.append(("block_table", block_table))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, heads, queries, head_dim), got shape {_shape(q)}")
    batch, heads, q_len, dim = q.shape
    if not 1 <= q_len <= MAX_QUERIES:
        raise ValueError(f"q must hold 1 to {MAX_QUERIES} queries per sequence (dim 2), got {q_len}")
    if batch == 0 or heads == 0 or dim == 0:
        raise ValueError(f"q must have nonzero batch, heads and head_dim, got shape {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; supported: {FLOAT_DTYPES}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    for name, t in named[3:]:
        if t.dtype != torch.int32 and not (name == "cache_lens" and t.dtype == torch.int64):
            kinds = "an int32 or int64" if name == "cache_lens" else "an int32"
            raise ValueError(f"{name} must be {kinds} tensor, got {t.dtype}")
    for name, t in named[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    check_page_size(page_size)

    if block_table is None:
        if k_cache.dim() != 4 or k_cache.shape[0] != batch or k_cache.shape[3] != dim:
            raise ValueError(f"k_cache must be (batch={batch}, kv_heads, max_seq_len, head_dim={dim}) for a "
                             f"contiguous cache, got shape {_shape(k_cache)}")
        kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
        cache_layout = "(batch, kv_heads, max_seq_len, head_dim)"
    else:
        if k_cache.dim() != 4 or k_cache.shape[1] != page_size or k_cache.shape[3] != dim:
            raise ValueError(f"k_cache must be (num_blocks, page_size={page_size}, kv_heads, head_dim={dim}) for "
                             f"a paged cache (block_table given), got shape {_shape(k_cache)}")
        if k_cache.shape[0] == 0:
            raise ValueError("k_cache must hold at least one block (num_blocks > 0)")
        if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"block_table must be (batch={batch}, max_blocks > 0), got shape {_shape(block_table)}")
        kv_heads, capacity = k_cache.shape[2], block_table.shape[1] * page_size
        cache_layout = "(num_blocks, page_size, kv_heads, head_dim)"
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {_shape(k_cache)} {cache_layout}, "
                         f"got {_shape(v_cache)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k_cache's kv_heads ({kv_heads}) must divide q's heads ({heads}) for GQA")
    if pages.dim() != 3 or pages.shape[:2] != (batch, kv_heads):
        raise ValueError(f"pages must be (batch={batch}, kv_heads={kv_heads}, max_pages), got shape {_shape(pages)}")
    if page_counts.shape != (batch, kv_heads):
        raise ValueError(f"page_counts must be (batch={batch}, kv_heads={kv_heads}), got shape "
                         f"{_shape(page_counts)}")
    if cache_lens.shape != (batch,):
        raise ValueError(f"cache_lens must be (batch={batch},), got shape {_shape(cache_lens)}")
    if capacity < q_len:
        raise ValueError(f"the cache holds {capacity} positions per sequence, fewer than q's {q_len} queries")

    if not check_values or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    _check_index_values(pages, page_counts, cache_lens, block_table, q_len, capacity, page_size,
                        k_cache.shape[0] if block_table is not None else None)


def _check_index_values(pages: Tensor, page_counts: Tensor, cache_lens: Tensor, block_table: Optional[Tensor],
                        q_len: int, capacity: int, page_size: int, num_blocks: Optional[int]) -> None:
    """The value checks of :func:`check_decode_inputs`, computed on the device and read back once."""
    width = pages.shape[-1]
    counts = page_counts.long()
    lens = cache_lens.long()
    valid = torch.arange(width, device=pages.device) < counts[..., None]
    pg = pages.long()
    max_page = (capacity + page_size - 1) // page_size  # pages the cache can hold
    bad = [
        (lens < q_len).any(),
        (lens > capacity).any(),
        ((counts < 0) | (counts > width)).any(),
        (valid & ((pg < 0) | (pg >= max_page))).any(),
        (valid[..., 1:] & (pg[..., 1:] <= pg[..., :-1])).any() if width > 1 else lens.new_zeros((), dtype=torch.bool),
    ]
    if block_table is not None:
        # Blocks read: those of selected pages holding a position below cache_lens.
        used = valid & (pg * page_size < lens[:, None, None])
        logical = torch.where(used, pg, 0).clamp(0, block_table.shape[1] - 1).flatten(1)
        blocks = torch.gather(block_table.long(), 1, logical).view_as(pg)
        bad.append((used & ((blocks < 0) | (blocks >= num_blocks))).any())
    flags = torch.stack(bad).tolist()
    messages = [
        f"cache_lens must be >= the number of queries per sequence ({q_len})",
        f"cache_lens must be <= the cache capacity ({capacity} positions per sequence)",
        f"page_counts must be in [0, {width}] (the width of pages)",
        (f"pages must hold page numbers in [0, {max_page}) in their first page_counts slots "
         f"({'block_table covers' if block_table is not None else 'the cache holds'} {max_page} pages of "
         f"{page_size})"),
        "pages must be strictly increasing in their first page_counts slots",
        f"block_table entries of the selected pages must be block indices in [0, {num_blocks}) (k_cache's blocks)",
    ]
    for flag, message in zip(flags, messages):
        if flag:
            raise ValueError(message)
