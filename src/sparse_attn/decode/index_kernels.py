"""Triton kernel of :meth:`~.page_index.PageIndex.append` for a decode step's few new tokens.

:func:`_append_kernel`, one program per sequence: loads the step's new keys of every KV head
(``(Hkv, T, D)``, only the real tokens below the capacity), reduces them per page of the window
the sequence's next positions fall in (min, max, float32 sum), combines them with the stored
summaries of those pages (with int8 bounds, quantizes those pages' bounds anew as
:func:`~.bounds.quantize_bounds` does), and finally moves the sequence's length on. A program reads its
sequence's length before it writes it and no other program touches it, so one launch updates the
whole index. Follows the PyTorch update of :meth:`PageIndex.append` (its reference), which tests
compare it with.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.launch import launch_jit
from ..backends.triton.runtime import dependent_launch_meta, gdc_launch_dependents, gdc_wait, next_power_of_2
from .bounds import SCALE_FLOOR as _SCALE_FLOOR
from .bounds import SCALE_ROUND_UP as _SCALE_ROUND_UP

# quantize_bounds' constants, as the kernel's compile-time constants
SCALE_FLOOR = tl.constexpr(_SCALE_FLOOR)
SCALE_ROUND_UP = tl.constexpr(_SCALE_ROUND_UP)
REBUILD_CHUNK = tl.constexpr(4)  # cache keys per step when the append kernel rebuilds a page (append_at)


@triton.jit
def quantized_bounds(low, high):
    """``(qmin, qmax, scale)`` of pages' bounds ``low``/``high`` ``(pages, D)``, as
    :func:`~.bounds.quantize_bounds` gives them: int8 ``floor(low / scale)`` and ``ceil(high / scale)``,
    the float32 page scale ``max|bound| / 127`` rounded outward (0 for an all-zero page)."""
    low = low.to(tl.float32)
    high = high.to(tl.float32)
    absmax = tl.max(tl.maximum(tl.abs(high), tl.abs(low)), 1)
    magnitude = tl.maximum(absmax, SCALE_FLOOR)
    levels = tl.full(absmax.shape, 127.0, tl.float32)
    # Rounded divisions (a plain fp32 `/` is approximate on GPUs), as the PyTorch reference divides.
    inv = tl.math.div_rn(levels, magnitude)
    q_high = tl.minimum(tl.maximum(tl.ceil(high * inv[:, None]), -127.0), 127.0)
    q_low = tl.minimum(tl.maximum(tl.floor(low * inv[:, None]), -127.0), 127.0)
    page_scale = tl.where(absmax > 0, tl.math.div_rn(magnitude, levels) * SCALE_ROUND_UP, 0.0)
    return q_low.to(tl.int8), q_high.to(tl.int8), page_scale


@triton.jit
def _append_kernel(
    K_NEW, COUNTS, KMIN, KMAX, KSUM, LENGTHS, QMIN, QMAX, QSCALE, CACHE, POSITIONS,
    stride_kb, stride_kh, stride_kt,
    stride_ib, stride_ih, stride_ip,
    stride_sb, stride_sh, stride_sp,
    stride_cb, stride_ch,
    stride_xb, stride_xh, stride_xt,
    capacity, max_pages, new,
    KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, T_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, WINDOW: tl.constexpr, HAS_COUNTS: tl.constexpr, INT8: tl.constexpr,
    AT_POSITIONS: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # a dependent launch: the previous kernel's results are complete past this point
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)
    d = tl.arange(0, HEAD_DIM)
    head_ok = heads < KV_HEADS
    # AT_POSITIONS: the new tokens go at POSITIONS[b]; where that is not the index's length (the cache
    # was set back or moved on), the page holding it first takes the cache's keys before it (CACHE).
    base_min = tl.full([HEADS_P2, HEAD_DIM], float("inf"), tl.float32)
    base_max = tl.full([HEADS_P2, HEAD_DIM], float("-inf"), tl.float32)
    base_sum = tl.zeros([HEADS_P2, HEAD_DIM], tl.float32)
    if AT_POSITIONS:
        start = tl.minimum(tl.maximum(tl.load(POSITIONS + b), 0), capacity)
        moved = start != tl.load(LENGTHS + b)
        if moved:
            first_pos = (start // PAGE_SIZE) * PAGE_SIZE
            # A few keys at a time (a loop, not unrolled): registers stay those of the plain append.
            for c in range(0, start - first_pos, REBUILD_CHUNK):
                pos_c = first_pos + c + tl.arange(0, REBUILD_CHUNK)
                before = pos_c < start
                kc = tl.load(CACHE + b * stride_xb + heads[:, None, None] * stride_xh
                             + pos_c[None, :, None] * stride_xt + d[None, None, :],
                             mask=head_ok[:, None, None] & before[None, :, None], other=0.0).to(tl.float32)
                sel_c = before[None, :, None]
                base_min = tl.minimum(base_min, tl.min(tl.where(sel_c, kc, float("inf")), 1))
                base_max = tl.maximum(base_max, tl.max(tl.where(sel_c, kc, float("-inf")), 1))
                base_sum += tl.sum(tl.where(sel_c, kc, 0.0), 1)
    else:
        start = tl.load(LENGTHS + b)
        moved = start < 0  # never
    if HAS_COUNTS:
        count = tl.minimum(tl.maximum(tl.load(COUNTS + b), 0), new)
    else:
        count = new
    t = tl.arange(0, T_P2)
    pos = start + t
    real = (t < count) & (pos < capacity)
    k = tl.load(K_NEW + b * stride_kb + heads[:, None, None] * stride_kh + t[None, :, None] * stride_kt
                + d[None, None, :], mask=head_ok[:, None, None] & real[None, :, None], other=0.0).to(tl.float32)
    first = start // PAGE_SIZE
    for w in tl.static_range(WINDOW):
        page = first + w
        in_page = real & (pos // PAGE_SIZE == page)
        sel = in_page[None, :, None]
        new_min = tl.min(tl.where(sel, k, float("inf")), 1)
        new_max = tl.max(tl.where(sel, k, float("-inf")), 1)
        new_sum = tl.sum(tl.where(sel, k, 0.0), 1)
        # Only pages this step writes to, below the capacity (a page past it gets no token).
        limit = tl.where(tl.sum(in_page.to(tl.int32), 0) > 0, tl.minimum(page + 1, max_pages), 0)
        ok = head_ok[:, None] & (page + d[None, :] * 0 < limit)
        at = b * stride_ib + heads[:, None] * stride_ih + page * stride_ip + d[None, :]
        at_sum = b * stride_sb + heads[:, None] * stride_sh + page * stride_sp + d[None, :]
        # A page that holds no token before this step starts afresh, whatever it held: the lengths may
        # have been set back (a cropped cache, see PageIndex.append_at).
        fresh = page * PAGE_SIZE >= start
        old_min = tl.where(fresh, float("inf"), tl.load(KMIN + at, mask=ok, other=0.0).to(tl.float32))
        old_max = tl.where(fresh, float("-inf"), tl.load(KMAX + at, mask=ok, other=0.0).to(tl.float32))
        old_sum = tl.where(fresh, 0.0, tl.load(KSUM + at_sum, mask=ok, other=0.0))
        if w == 0:  # the page holding the first new token: rebuilt from the cache where moved
            old_min = tl.where(moved, base_min, old_min)
            old_max = tl.where(moved, base_max, old_max)
            old_sum = tl.where(moved, base_sum, old_sum)
        low = tl.minimum(old_min, new_min).to(KMIN.dtype.element_ty)
        high = tl.maximum(old_max, new_max).to(KMAX.dtype.element_ty)
        tl.store(KMIN + at, low, mask=ok)
        tl.store(KMAX + at, high, mask=ok)
        tl.store(KSUM + at_sum, old_sum + new_sum, mask=ok)
        if INT8:  # the page's int8 bounds from the stored ones
            q_low, q_high, page_scale = quantized_bounds(low, high)
            tl.store(QMAX + at, q_high, mask=ok)
            tl.store(QMIN + at, q_low, mask=ok)
            at_scale = b * stride_cb + heads * stride_ch + page
            tl.store(QSCALE + at_scale, page_scale, mask=head_ok & (page + heads * 0 < limit))
    tl.store(LENGTHS + b, tl.minimum(start + count, capacity))


def triton_append(index, k_new: Tensor, counts: Optional[Tensor], window: int, fast_launch: bool = True,
                  dependent_launch: bool = False, cache: Optional[Tensor] = None,
                  positions: Optional[Tensor] = None) -> None:
    """Append ``k_new (B, Hkv, T, D)`` (the first ``counts[b]`` rows real; int64 ``(B,)``; None: all
    ``T`` rows, with no counts tensor to fill) to the summaries and lengths of ``index`` in place;
    ``window``: pages the new tokens can span; ``fast_launch``: see
    :func:`~sparse_attn.backends.triton.launch.launch_jit`; ``dependent_launch``: launch as a
    programmatic dependent launch (:meth:`~sparse_attn.options.KernelOptions.dependent_launch_on`);
    ``cache`` and ``positions``: the tokens go at ``positions (B,)`` int64 instead of the lengths, and
    where a position is not its sequence's length, the page holding it first takes the keys before it
    from ``cache (B, Hkv, S, D)`` (:meth:`~.page_index.PageIndex.append_at`)."""
    batch, kv_heads, new, dim = k_new.shape
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    has_counts = counts is not None
    int8 = index.bounds == "int8"
    # Without int8 bounds the kernel never touches QMIN/QMAX/QSCALE; the exact bounds stand in.
    qmin, qmax, qscale = (index.qmin, index.qmax, index.qscale) if int8 else (index.kmin, index.kmax, index.ksum)
    at_positions = positions is not None
    # Without positions the kernel reads neither CACHE nor POSITIONS; k_new and the lengths stand in.
    cache_arg = cache if at_positions else k_new
    launch_jit(_append_kernel, (batch,), (
        # Without counts the kernel never reads COUNTS; the lengths stand in for the pointer.
        k_new, counts.contiguous() if has_counts else index.lengths,
        index.kmin, index.kmax, index.ksum, index.lengths, qmin, qmax, qscale,
        cache_arg, positions if at_positions else index.lengths,
        *k_new.stride()[:3], *index.kmin.stride()[:3], *index.ksum.stride()[:3],
        *(index.qscale.stride()[:2] if int8 else (0, 0)),
        *cache_arg.stride()[:3],
        index.capacity, index.max_pages, new,
    ), dict(
        KV_HEADS=kv_heads, HEADS_P2=next_power_of_2(kv_heads), T_P2=next_power_of_2(new),
        HEAD_DIM=dim, PAGE_SIZE=index.page_size, WINDOW=window, HAS_COUNTS=has_counts, INT8=int8,
        AT_POSITIONS=at_positions,
        **dependent_launch_meta(dependent_launch),
        num_warps=max(4, min(16, next_power_of_2(kv_heads) * next_power_of_2(new) * dim // 1024)),
    ), fast_launch)
