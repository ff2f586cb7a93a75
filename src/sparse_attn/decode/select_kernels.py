"""Triton kernels of the decode page selection (:mod:`.select`): page scores, then top-k pages.

* :func:`_page_logits_kernel`, grid ``(page tiles, B * Hkv)``: the logits of ``PAGE_TILE`` pages
  of one (sequence, KV head) for every query row of its group, read once per group from the page
  summaries in their stored dtype. Quest: ``max(q, 0) . kmax + min(q, 0) . kmin`` (int8 bounds:
  ``qscale * (max(q, 0) . qmax + min(q, 0) . qmin)``); pooled:
  ``q . ksum / tokens``; either way ``scale * score + log(tokens in the page)``, ``-inf`` for a page
  with no token.
* :func:`_select_pages_kernel`, one program per (sequence, KV head): softmax of each row's logits
  over the pages (normalized with the per-tile maxima and sums the score kernel wrote beside the
  logits), the group's score per page (sum or max of the rows' shares), sink and recent
  pages forced in, and the ``width`` best pages found by a search on the top 16 bits of the
  scores' float32 bit patterns (non-negative float32 values order as their int32 bits; 16 bits, a
  bfloat16's precision, bound the search to 10 steps of two probes), written in increasing page order with the
  padding slots repeating the last page. The whole row of pages lives in registers, so the
  kernel takes indexes of up to :data:`.select.KERNEL_MAX_PAGES` pages.

Both follow the PyTorch selection of :class:`~.select.PageSelection` (its reference), which tests
compare them with; pages whose scores tie at the budget's edge (at that precision) are taken in page
order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.kernels import dot
from ..backends.triton.launch import launch_jit
from ..backends.triton.runtime import (cdiv, dependent_launch_meta, fp32_dot_operands, gdc_launch_dependents,
                                      gdc_wait, next_power_of_2)
from .index_kernels import quantized_bounds

PAGE_TILE = 64  # pages per program of the page-score kernel
ROWS_TOGETHER_MAX = 16384  # the top-k kernel reads every query row's logits at once up to this many values
INF_KEY = tl.constexpr(0x7F80)  # the compared key of +inf (a forced page): the top 16 bits of its float32 bits


@triton.jit
def _page_logits_kernel(
    Q, KA, KB, KSCALE, LENGTHS, OUT, STATS,
    K_NEW, COUNTS, KMIN, KMAX, KSUM, QMIN, QMAX, NEXT_LENGTHS,
    stride_qb, stride_qh, stride_qs,
    stride_ib, stride_ih, stride_ip,
    stride_cb, stride_ch,
    stride_ob, stride_oh, stride_or,
    stride_s0, stride_sb, stride_sh, stride_sr,
    stride_kb, stride_kh, stride_kt,
    stride_mb, stride_mh, stride_mp,
    stride_ub, stride_uh, stride_up,
    scale, max_pages, capacity, new,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, SQ: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, QUEST: tl.constexpr,
    INT8: tl.constexpr, UPCAST: tl.constexpr, WRITE_STATS: tl.constexpr, PDL: tl.constexpr,
    APPEND: tl.constexpr, HAS_COUNTS: tl.constexpr, T_P2: tl.constexpr, INDEX_INT8: tl.constexpr,
):
    """Logits of ``BLOCK_P`` pages of one (sequence, KV head) for every query row of its group
    (``KA`` = kmax and ``KB`` = kmin in the key dtype for Quest, or with ``INT8`` qmax and qmin in
    int8 with the page scales ``KSCALE``; ``KA`` = ksum in float32 for pooled). Pages past the
    sequence are not read. With ``WRITE_STATS``, also each row's softmax
    statistics over the tile: ``STATS[0]`` the largest logit, ``STATS[1]`` the sum of
    ``exp(logit - largest)`` (0 for a tile without pages), at column ``pid_p``.

    With ``APPEND``, first the index update of :meth:`~.page_index.PageIndex.append` for the new keys
    ``K_NEW (B, Hkv, T, D)`` (the first ``COUNTS[b]`` real, or all ``new``): the program whose tile
    holds the pages those keys fall in combines them with the stored ``KMIN``/``KMAX``/``KSUM`` (and
    with int8 bounds ``QMIN``/``QMAX``/``KSCALE`` quantized anew) of its KV head, stores them and
    scores the updated pages; every program scores at the length after the append, which program
    ``(0, b, 0)`` writes to ``NEXT_LENGTHS[b]`` (``LENGTHS`` is left as it was: other programs read it;
    the top-k kernel moves it on)."""
    if PDL:  # a dependent launch: the previous kernel's results are complete past this point
        gdc_wait()
    pid_p = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_ok = rows < GROUP * SQ
    h = kvh * GROUP + rows // SQ
    qi = rows % SQ
    offs_d = tl.arange(0, HEAD_DIM)
    pages = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    length = tl.load(LENGTHS + b)
    if APPEND:
        start = length
        if HAS_COUNTS:
            count = tl.minimum(tl.maximum(tl.load(COUNTS + b), 0), new)
        else:
            count = new + 0 * start
        length = tl.minimum(start + count, capacity)
        first_page = start // PAGE_SIZE
        last_page = tl.where(length > start, (length - 1) // PAGE_SIZE, -1)  # -1: no token is added
        touched = (pages >= first_page) & (pages <= last_page)
        tile_touched = (first_page < pid_p * BLOCK_P + BLOCK_P) & (last_page >= pid_p * BLOCK_P)
        if (pid_p == 0) & (kvh == 0):
            tl.store(NEXT_LENGTHS + b, length)
    tokens = tl.minimum(tl.maximum(length - pages.to(tl.int64) * PAGE_SIZE, 0), PAGE_SIZE)
    has = (tokens > 0) & (pages < max_pages)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    base = b * stride_ib + kvh * stride_ih + pages[:, None].to(tl.int64) * stride_ip + offs_d[None, :]
    # The operands of the scores: Quest's bounds (int8 ones with the pages' scales) or the key sums.
    if QUEST:
        if INT8:
            # int8 bounds are exact in the 16-bit query dtype; the page's scale multiplies the dots.
            kmax = tl.load(KA + base, mask=has[:, None], other=0).to(tl.float32).to(Q.dtype.element_ty)
            kmin = tl.load(KB + base, mask=has[:, None], other=0).to(tl.float32).to(Q.dtype.element_ty)
            page_scale = tl.load(KSCALE + b * stride_cb + kvh * stride_ch + pages, mask=has, other=0.0)
        else:
            kmax = tl.load(KA + base, mask=has[:, None], other=0.0)
            kmin = tl.load(KB + base, mask=has[:, None], other=0.0)
    else:
        ksum = tl.load(KA + base, mask=has[:, None], other=0.0)
    if APPEND:
        if tile_touched:
            # The index update of the pages this step's keys fall in (PageIndex.append): min with
            # min, max with max, sum plus sum; a page holding no token before the step starts afresh.
            put = touched[:, None] & (offs_d[None, :] < HEAD_DIM)
            base_s = b * stride_ub + kvh * stride_uh + pages[:, None].to(tl.int64) * stride_up + offs_d[None, :]
            base_m = b * stride_mb + kvh * stride_mh + pages[:, None].to(tl.int64) * stride_mp + offs_d[None, :]
            fresh = (pages.to(tl.int64) * PAGE_SIZE >= start)[:, None]
            old_min = tl.where(fresh, float("inf"), tl.load(KMIN + base_m, mask=put, other=0.0).to(tl.float32))
            old_max = tl.where(fresh, float("-inf"), tl.load(KMAX + base_m, mask=put, other=0.0).to(tl.float32))
            old_sum = tl.where(fresh, 0.0, tl.load(KSUM + base_s, mask=put, other=0.0))
            new_min = tl.full([BLOCK_P, HEAD_DIM], float("inf"), tl.float32)
            new_max = tl.full([BLOCK_P, HEAD_DIM], float("-inf"), tl.float32)
            new_sum = tl.zeros([BLOCK_P, HEAD_DIM], tl.float32)
            for t in tl.static_range(T_P2):
                real = (t < count) & (start + t < capacity)
                k_t = tl.load(K_NEW + b * stride_kb + kvh * stride_kh + t * stride_kt + offs_d,
                              mask=offs_d < tl.where(real, HEAD_DIM, 0), other=0.0).to(tl.float32)
                hit = (pages == tl.where(real, (start + t) // PAGE_SIZE, -1))[:, None]
                new_min = tl.where(hit, tl.minimum(new_min, k_t[None, :]), new_min)
                new_max = tl.where(hit, tl.maximum(new_max, k_t[None, :]), new_max)
                new_sum = tl.where(hit, new_sum + k_t[None, :], new_sum)
            low = tl.minimum(old_min, new_min).to(KMIN.dtype.element_ty)
            high = tl.maximum(old_max, new_max).to(KMAX.dtype.element_ty)
            total = old_sum + new_sum
            tl.store(KMIN + base_m, low, mask=put)
            tl.store(KMAX + base_m, high, mask=put)
            tl.store(KSUM + base_s, total, mask=put)
            if INDEX_INT8:  # the index's int8 bounds of those pages, quantized anew
                # (rows of other pages hold infinities: zeros stand in, and they are not stored)
                q_low, q_high, new_scale = quantized_bounds(tl.where(put, low, 0.0), tl.where(put, high, 0.0))
                tl.store(QMAX + base_m, q_high, mask=put)
                tl.store(QMIN + base_m, q_low, mask=put)
                tl.store(KSCALE + b * stride_cb + kvh * stride_ch + pages, new_scale, mask=touched)
                if INT8:
                    kmax = tl.where(put, q_high.to(tl.float32).to(Q.dtype.element_ty), kmax)
                    kmin = tl.where(put, q_low.to(tl.float32).to(Q.dtype.element_ty), kmin)
                    page_scale = tl.where(touched, new_scale, page_scale)
            if QUEST:
                if not INT8:
                    kmax = tl.where(put, high, kmax)
                    kmin = tl.where(put, low, kmin)
            else:
                ksum = tl.where(put, total, ksum)
    if QUEST:
        # The positive and negative parts of q, split in float32 (exact) and fed to the dots in
        # the query (= key) dtype.
        q32 = q.to(tl.float32)
        q_pos = tl.where(q32 > 0.0, q32, 0.0).to(Q.dtype.element_ty)
        q_neg = tl.where(q32 < 0.0, q32, 0.0).to(Q.dtype.element_ty)
        score = dot(q_pos, tl.trans(kmax), UPCAST)
        score = dot(q_neg, tl.trans(kmin), UPCAST, score)
        if INT8:
            score = score * page_scale[None, :]
    else:
        mean = ksum / tl.maximum(tokens, 1).to(tl.float32)[:, None]
        score = dot(q, tl.trans(mean.to(Q.dtype.element_ty)), UPCAST)
    log_tokens = tl.log(tl.maximum(tokens, 1).to(tl.float32))
    logw = tl.where(has[None, :], score * scale + log_tokens[None, :], float("-inf"))
    if PDL:
        gdc_launch_dependents()
    o_ptrs = OUT + b * stride_ob + kvh * stride_oh + rows[:, None] * stride_or + pages[None, :]
    tl.store(o_ptrs, logw, mask=row_ok[:, None] & (pages[None, :] < max_pages))
    if WRITE_STATS:
        top = tl.max(logw, 1)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(tl.exp(logw - top_safe[:, None]), 1)
        s_ptrs = STATS + b * stride_sb + kvh * stride_sh + rows * stride_sr + pid_p
        tl.store(s_ptrs, top, mask=row_ok)
        tl.store(s_ptrs + stride_s0, total, mask=row_ok)


@triton.jit
def _select_pages_kernel(
    LOGITS, STATS, LENGTHS, PAGES, COUNTS, LENGTHS_OUT,
    stride_lb, stride_lh, stride_lr,
    stride_s0, stride_sb, stride_sh, stride_sr,
    stride_pb, stride_ph, stride_cb,
    max_pages, width, sink_pages, recent, tiles,
    KV_HEADS: tl.constexpr, ROWS: tl.constexpr, PAGE_SIZE: tl.constexpr, NP_P2: tl.constexpr,
    W_P2: tl.constexpr, TILES_P2: tl.constexpr, SCORED: tl.constexpr, GROUP_MAX: tl.constexpr,
    ROWS_P2: tl.constexpr, ROWS_TOGETHER: tl.constexpr, PDL: tl.constexpr, WRITE_LENGTHS: tl.constexpr,
):
    """The ``width`` pages one (sequence, KV head) reads: sink and recent pages first (key
    ``+inf``), then the best group scores; an unscored selection (``SCORED=False``,
    sink_window) takes every page of a sequence that fits the width, else the forced ones. With
    ``WRITE_LENGTHS`` (``LENGTHS``: the lengths after an append the score kernel made), program
    ``(b, 0)`` stores sequence ``b``'s length in ``LENGTHS_OUT`` (the index's lengths)."""
    if PDL:  # a dependent launch: the previous kernel's results are complete past this point
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    offs = tl.arange(0, NP_P2)
    length = tl.load(LENGTHS + b)
    if WRITE_LENGTHS:
        if kvh == 0:
            tl.store(LENGTHS_OUT + b, length)
    num_pages = tl.minimum((length + PAGE_SIZE - 1) // PAGE_SIZE, max_pages)
    valid = offs < num_pages
    forced = offs < sink_pages
    if recent > 0:
        recent_first = tl.maximum(length - recent, 0) // PAGE_SIZE
        forced = forced | (offs >= recent_first)
    forced = forced & valid

    group = tl.zeros([NP_P2], dtype=tl.float32)
    if SCORED:
        candidates = valid
        row_ptr = LOGITS + b * stride_lb + kvh * stride_lh
        stats_ptr = STATS + b * stride_sb + kvh * stride_sh
        tile = tl.arange(0, TILES_P2)
        if ROWS_TOGETHER:
            # Every row at once: the loads of all rows are in flight together (one memory latency
            # instead of one per row), then each row's softmax over all pages from its per-tile
            # maxima and sums.
            r = tl.arange(0, ROWS_P2)
            row_ok = r < ROWS
            tile_ok = row_ok[:, None] & (tile < tiles)[None, :]
            stats_rows = stats_ptr + r[:, None] * stride_sr + tile[None, :]
            tile_top = tl.load(stats_rows, mask=tile_ok, other=float("-inf"))
            tile_sum = tl.load(stats_rows + stride_s0, mask=tile_ok, other=0.0)
            logw = tl.load(row_ptr + r[:, None] * stride_lr + offs[None, :],
                           mask=row_ok[:, None] & (offs < max_pages)[None, :], other=float("-inf"))
            top = tl.max(tile_top, 1)
            top = tl.where(top == float("-inf"), 0.0, top)  # a row with no page: every share 0
            total = tl.sum(tile_sum * tl.exp(tile_top - top[:, None]), 1)
            share = tl.exp(logw - top[:, None]) / tl.where(total > 0, total, 1.0)[:, None]
            if GROUP_MAX:
                group = tl.max(share, 0)
            else:
                group = tl.sum(share, 0)
        else:
            for r in range(ROWS):
                # The row's softmax over all pages, from the per-tile maxima and sums.
                tile_top = tl.load(stats_ptr + r * stride_sr + tile, mask=tile < tiles, other=float("-inf"))
                tile_sum = tl.load(stats_ptr + stride_s0 + r * stride_sr + tile, mask=tile < tiles, other=0.0)
                top = tl.max(tile_top, 0)
                top = tl.where(top == float("-inf"), 0.0, top)  # a row with no page: every share 0
                total = tl.sum(tile_sum * tl.exp(tile_top - top), 0)
                logw = tl.load(row_ptr + r * stride_lr + offs, mask=offs < max_pages, other=float("-inf"))
                share = tl.exp(logw - top) / tl.where(total > 0, total, 1.0)
                if GROUP_MAX:
                    group = tl.maximum(group, share)
                else:
                    group += share
    else:
        candidates = forced | (valid & (num_pages <= width))
    key = tl.where(forced, float("inf"), group)
    # Keys >= 0: their bits order as their values; the top 16 bits are compared (ties in page order).
    bits = tl.where(candidates, key.to(tl.int32, bitcast=True) >> 16, -1)

    # Search for the width-th largest key's bits, keeping count(bits >= lo) >= width > count(bits >= hi)
    # (at_lo, at_hi those counts): each step counts the keys at two probes splitting [lo, hi) in
    # thirds with one reduction (the two counts packed in one int32, 15 bits each), so 16-bit keys
    # take at most 10 steps; it stops early once exactly `width` keys are >= lo (or all candidates fit).
    lo = tl.zeros([], dtype=tl.int32)
    hi = lo + (INF_KEY + 1)
    at_lo = tl.sum((bits >= 0).to(tl.int32), 0)
    at_hi = tl.zeros([], dtype=tl.int32)
    while (hi - lo > 1) & (at_lo > width):
        third = hi - lo
        probe1 = lo + tl.maximum(third // 3, 1)
        probe2 = tl.maximum(lo + (2 * third) // 3, probe1)
        packed = tl.sum((bits >= probe1).to(tl.int32) + ((bits >= probe2).to(tl.int32) << 15), 0)
        at1 = packed & 0x7FFF
        at2 = packed >> 15
        upper = at2 >= width
        middle = (at1 >= width) & (at2 < width)
        new_lo = tl.where(upper, probe2, tl.where(middle, probe1, lo))
        at_lo = tl.where(upper, at2, tl.where(middle, at1, at_lo))
        hi = tl.where(upper, hi, tl.where(middle, probe2, probe1))
        at_hi = tl.where(upper, at_hi, tl.where(middle, at2, at1))
        lo = new_lo
    if at_lo <= width:  # every key >= lo fits (the usual end)
        chosen = bits >= lo
        count = at_lo
    else:  # hi == lo + 1 and more keys tie at lo than fit: the first ones in page order
        ties = bits == lo
        chosen = (bits >= hi) | (ties & (tl.cumsum(ties.to(tl.int32), 0) <= width - at_hi))
        count = width + 0 * at_lo

    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    out = PAGES + b * stride_pb + kvh * stride_ph
    tl.store(out + slot, offs, mask=chosen)
    if count < width:  # fewer candidates than slots: the padding repeats the last page
        last = tl.max(tl.where(chosen, offs, 0), 0)
        slots = tl.arange(0, W_P2)
        tl.store(out + slots, tl.zeros([W_P2], dtype=tl.int32) + last, mask=(slots >= count) & (slots < width))
    tl.store(COUNTS + b * stride_cb + kvh, count)


def triton_page_logits(q: Tensor, index, method: str, scale: float, with_stats: bool = False,
                       fast_launch: bool = True, dependent_launch: bool = False,
                       k_new: Optional[Tensor] = None, counts: Optional[Tensor] = None):
    """``(B, Hkv, G * Sq, max_pages)`` float32 page logits (rows ordered query head, then query
    index) of ``method`` (``"quest"`` or ``"pooled"``) for the checked queries ``q (B, H, Sq, D)``
    against a :class:`~.page_index.PageIndex`; ``with_stats``: ``(logits, stats)`` with the rows'
    per-tile softmax statistics ``(2, B, Hkv, G * Sq, tiles)`` that :func:`triton_select_pages` reads.
    ``fast_launch`` (here and below): see :func:`~sparse_attn.backends.triton.launch.launch_jit`;
    ``dependent_launch`` (here and below): launch as a programmatic dependent launch
    (:meth:`~sparse_attn.options.KernelOptions.dependent_launch_on`).

    ``k_new (B, Hkv, T, D)`` (checked by the caller, ``counts`` int64 ``(B,)`` or None as for
    :func:`~.index_kernels.triton_append`): the kernel first appends these keys to the index's
    summaries and scores the pages at the lengths after it; then the return value gains a third
    element, those lengths ``(B,)`` int64, which :func:`triton_select_pages` takes as
    ``next_lengths`` and writes to the index (until then ``index.lengths`` is unchanged: the two
    launches go together, as :meth:`~.select.PageSelection.append_and_select` makes them, and need
    ``with_stats``)."""
    if k_new is not None and not with_stats:
        raise ValueError("triton_page_logits: k_new (an append) needs with_stats=True: the top-k kernel that "
                         "finishes the append reads the statistics")
    batch, heads, q_len, dim = q.shape
    kv_heads, max_pages = index.kv_heads, index.max_pages
    group = heads // kv_heads
    rows = max(16, next_power_of_2(group * q_len))
    q = q if q.stride(-1) == 1 else q.contiguous()
    int8 = method == "quest" and index.bounds == "int8"
    index_int8 = index.bounds == "int8"
    if int8:
        first, second = index.qmax, index.qmin
    elif method == "quest":
        first, second = index.kmax, index.kmin
    else:
        first = second = index.ksum
    page_scales = index.qscale if index_int8 else index.lengths  # no scales: never read
    out = torch.empty(batch, kv_heads, group * q_len, max_pages, device=q.device, dtype=torch.float32)
    tiles = cdiv(max_pages, PAGE_TILE)
    stats = torch.empty(2, batch, kv_heads, group * q_len, tiles, device=q.device, dtype=torch.float32) \
        if with_stats else out
    append = k_new is not None
    if append:
        k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
        next_lengths = torch.empty_like(index.lengths)
        new = k_new.shape[2]
        # Without int8 bounds the kernel never writes QMIN/QMAX; the exact bounds stand in.
        qmin, qmax = (index.qmin, index.qmax) if index_int8 else (index.kmin, index.kmax)
        append_args = (k_new, index.lengths if counts is None else counts.contiguous(), index.kmin, index.kmax,
                       index.ksum, qmin, qmax, next_lengths)
        append_strides = (*k_new.stride()[:3], *index.kmin.stride()[:3], *index.ksum.stride()[:3])
    else:  # placeholder pointers, never read
        new = 0
        append_args = (q, index.lengths, first, first, first, first, first, index.lengths)
        append_strides = (0,) * 9
    launch_jit(_page_logits_kernel, (tiles, batch * kv_heads), (
        q, first, second, page_scales, index.lengths, out, stats, *append_args,
        *q.stride()[:3], *first.stride()[:3], *(page_scales.stride()[:2] if index_int8 else (0, 0)),
        *out.stride()[:3], *(stats.stride()[:4] if with_stats else (0,) * 4), *append_strides,
        scale, max_pages, index.capacity, new,
    ), dict(
        KV_HEADS=kv_heads, GROUP=group, SQ=q_len, HEAD_DIM=dim, PAGE_SIZE=index.page_size, ROWS=rows,
        BLOCK_P=PAGE_TILE, QUEST=method == "quest", INT8=int8, UPCAST=fp32_dot_operands(q.dtype),
        WRITE_STATS=with_stats, APPEND=append, HAS_COUNTS=append and counts is not None, INDEX_INT8=index_int8,
        T_P2=next_power_of_2(max(new, 1)),
        **dependent_launch_meta(dependent_launch), num_warps=4 if rows * dim <= 64 * 128 else 8,
    ), fast_launch)
    if append:
        return out, stats, next_lengths
    return (out, stats) if with_stats else out


def triton_select_pages(scores: tuple[Tensor, Tensor] | None, index, width: int, sink_pages: int, recent: int,
                        group_max: bool, fast_launch: bool = True, num_warps: int | None = None,
                        dependent_launch: bool = False,
                        next_lengths: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(pages (B, Hkv, width) int32, counts (B, Hkv) int32)`` as
    :meth:`~.select.PageSelection.__call__` defines them, from the page logits ``(B, Hkv, R,
    max_pages)`` and their statistics, ``triton_page_logits(..., with_stats=True)`` (None: no
    scores, the sink_window selection); ``num_warps`` overrides the kernel's (None: by the page count);
    ``next_lengths``: the lengths after the append :func:`triton_page_logits` made (its third
    result): pages are selected at them, and they are written to ``index.lengths``."""
    batch, kv_heads, max_pages = index.batch, index.kv_heads, index.max_pages
    device = index.device
    pages = torch.empty(batch, kv_heads, width, device=device, dtype=torch.int32)
    counts = torch.empty(batch, kv_heads, device=device, dtype=torch.int32)
    scored = scores is not None
    if scored:
        logits, stats = scores
        rows, tiles = logits.shape[2], stats.shape[-1]
        strides = (*logits.stride()[:3], *stats.stride()[:4])
    else:  # placeholder pointers, never read
        logits, stats, rows, tiles, strides = counts, counts, 0, 1, (0,) * 7
    np_p2 = next_power_of_2(max_pages)
    rows_p2 = next_power_of_2(max(rows, 1))
    together = rows_p2 * np_p2 <= ROWS_TOGETHER_MAX
    lengths = index.lengths if next_lengths is None else next_lengths
    launch_jit(_select_pages_kernel, (batch * kv_heads,), (
        logits, stats, lengths, pages, counts, index.lengths,
        *strides, pages.stride(0), pages.stride(1), counts.stride(0),
        max_pages, width, sink_pages, recent, tiles,
    ), dict(
        KV_HEADS=kv_heads, ROWS=rows, PAGE_SIZE=index.page_size, NP_P2=np_p2,
        W_P2=next_power_of_2(width), TILES_P2=next_power_of_2(tiles), SCORED=scored,
        GROUP_MAX=group_max, ROWS_P2=rows_p2, ROWS_TOGETHER=together, WRITE_LENGTHS=next_lengths is not None,
        **dependent_launch_meta(dependent_launch),
        # Warps by the values a program holds at once: the rows' logits together, or one row's (on an
        # H100, 4 rows of 2048 pages ran fastest with 8 warps: 7.7 us, against 8.7 with 16).
        num_warps=num_warps or max(4, min(16, rows_p2 * np_p2 // 1024 if together else np_p2 // 128)),
    ), fast_launch)
    return pages, counts
