"""Triton kernels for sparse decode attention over selected pages (split-KV, flash-decoding).

Two kernels:

* :func:`_decode_split_kernel`, grid ``(num_splits, B * Hkv, row_tiles)``. A program serves one
  (sequence, KV head) and one share ("split") of its selected pages. Its query tile holds every
  query row of the KV group, ``GROUP * Sq`` rows ordered (query head, query index), padded to a
  power of two ``ROWS >= 16`` (at most :data:`MAX_ROWS`; larger groups take several row tiles), so
  each K/V tile it loads serves the whole group. It walks its pages' keys in tiles of
  ``BLOCK_N`` keys (:func:`choose_block_n`: 64, or 128 where a split holds at most 128 keys and
  the query tile is small; a tile spans several pages of 16 or 32 tokens, or part of a larger
  page), with an fp32 online softmax. With one split the program writes the final output and
  LSE; otherwise it writes its split's normalized partial output (fp32) and base-2 LSE.
* :func:`_decode_merge_kernel`, one program per ``MERGE_ROWS`` (sequence, query head, query index)
  rows: combines the splits' partial outputs weighted by ``exp2(lse_split - max)``
  (:func:`_merge_rows`, which the split kernel also uses to merge by itself).

With a :class:`~.workspace.DecodeWorkspace` the split kernel merges by itself: each program
counts its arrival on an atomic counter of its (sequence, KV head, row tile) once its partials are
written, and the last to arrive merges every split's partials (read past L1) into the output and
resets the counter to 0, so a step launches one kernel instead of two.

Split ``s`` of a row with ``n`` selected pages takes slots ``[s * c, min(n, (s + 1) * c))`` with
``c = ceil(n / num_splits)``: work is balanced per row, and a split with no slot writes output 0
and LSE ``-inf``, which the merge weighs 0. Selected pages are sorted, so the pages wholly at or
before the earliest query position (``cache_len - Sq``) form a prefix of every split's slots: the
key tiles made only of them run without any mask; the rest (the last pages, holding positions
past some query or past ``cache_len``, and a tile that runs past the split's last slot) are masked.

Conventions follow the prefill kernels (:mod:`sparse_attn.backends.triton.kernels`): scores in
base 2 (``exp2``), LSE returned in natural log, GQA by ``h // GROUP``, int64 offsets, ``tl.dot``
with fp32 operands for bf16 in the CPU interpreter (``UPCAST``). Cache layouts (``PAGED``
constexpr): contiguous ``(B, Hkv, S_max, D)``, or paged ``(num_blocks, page_size, Hkv, D)`` with a
``(B, max_blocks)`` block table; each key's page number (and block) is gathered per key of a tile.

Memory safety does not depend on the index values: counts, cache lengths and blocks are clamped
into range, unmasked tiles clamp their pages into ``[0, full_limit)``, and masked tiles read only
keys of the split's slots below ``cache_len`` (a paged cache's block table included). Results
are only meaningful for inputs that pass :func:`sparse_attn.decode.attention.decode_attention`'s
checks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends.triton.kernels import LN2, dot
from ..backends.triton.launch import launch_jit
from ..backends.triton.runtime import (cdiv, dependent_launch_meta, fp32_dot_operands, gdc_launch_dependents,
                                      gdc_wait, next_power_of_2)

LOG2E = 1.4426950408889634

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
BLOCK_N = 64  # keys per tile
WIDE_BLOCK_N = 128  # keys per tile where a split's keys fit one such tile and the query tile is small
WIDE_MAX_ROWS = 32  # the largest query tile that takes the wide key tile
MAX_ROWS = 128  # query rows of one program (GROUP * Sq above this take several row tiles)
MAX_SPLITS = 32  # most splits of one row's pages
MERGE_ROWS = 16  # query rows of one program of the separate merge kernel
MIN_KEYS_PER_SPLIT = 128  # splits are not made smaller than this many keys of budget
# Split programs per SM the split count aims at: on an H100 at 128K (budget 2048, page 64) one wave of
# 4 per SM was within 0.5% of the best of 4-32 splits at batches 1, 8 and 32
# (docs/results/decode_profile_h100_2026-12-07.json).
PROGRAMS_PER_SM = 4
MAX_GRID_Y = 65535  # CUDA's limit on the grid's second dimension, which walks (batch, KV head)
_INTERPRETER_SMS = 4  # off CUDA (the interpreter), splits are chosen as for a 4-SM device


@triton.jit
def _key_tile(m_i, l_i, acc, q, q_pos, K, V, PAGE_ROW, BT_ROW, first, s1, kv_off_k, kv_off_v, cache_len, full_limit,
              num_blocks, stride_k0, stride_ks, stride_v0, stride_vs, scale_log2, offs_n, offs_d,
              PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update with the ``BLOCK_N`` keys starting ``first`` keys into the row's
    slots (key ``t`` is token ``t % PAGE_SIZE`` of the page in slot ``t // PAGE_SIZE``).
    ``kv_off_k`` / ``kv_off_v``: offset of this (sequence, KV head) in a contiguous cache, or of
    this KV head in a paged one. Unmasked tiles lie wholly in the split and at or before every
    query's position; masked ones drop keys past slot ``s1``, at or past ``cache_len`` (never
    read) and after each query."""
    t = first + offs_n
    slot = t // PAGE_SIZE
    in_page = t % PAGE_SIZE
    if MASKED:
        key_ok = slot < s1
        page = tl.maximum(tl.load(PAGE_ROW + slot, mask=key_ok, other=0).to(tl.int64), 0)
        pos = page * PAGE_SIZE + in_page  # absolute key positions
        key_ok = key_ok & (pos < cache_len)
    else:
        page = tl.load(PAGE_ROW + slot).to(tl.int64)
        page = tl.minimum(tl.maximum(page, 0), full_limit - 1)
        pos = page * PAGE_SIZE + in_page
    if PAGED:
        if MASKED:
            block = tl.load(BT_ROW + page, mask=key_ok, other=0).to(tl.int64)
        else:
            block = tl.load(BT_ROW + page).to(tl.int64)
        block = tl.minimum(tl.maximum(block, 0), num_blocks - 1)
        k_ptrs = K + block[:, None] * stride_k0 + kv_off_k + in_page[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + block[:, None] * stride_v0 + kv_off_v + in_page[:, None] * stride_vs + offs_d[None, :]
    else:
        k_ptrs = K + kv_off_k + pos[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = V + kv_off_v + pos[:, None] * stride_vs + offs_d[None, :]
    # K and V are loaded together, before the scores: both tiles' reads are in flight at once.
    if MASKED:
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = dot(q, tl.trans(k), UPCAST) * scale_log2
    if MASKED:
        s = tl.where(key_ok[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(p.to(v.dtype), v, UPCAST, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, PAGES, COUNTS, CACHE_LENS, BLOCK_TABLE, O, LSE, O_PART, LSE_PART, ARRIVALS,
    stride_qb, stride_qh, stride_qs,
    stride_k0, stride_kh, stride_ks,
    stride_v0, stride_vh, stride_vs,
    stride_pb, stride_ph,
    stride_cb, stride_ch,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    scale_log2, max_pages, capacity, num_blocks,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, SQ: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PAGED: tl.constexpr, UPCAST: tl.constexpr, SCAN: tl.constexpr, FUSED_MERGE: tl.constexpr,
    PDL: tl.constexpr,
):
    """One split of one (sequence, KV head)'s selected pages, for ``ROWS`` rows of its group.
    Strides ``stride_k0`` / ``stride_v0`` are the batch strides of a contiguous cache or the block
    strides of a paged one; ``stride_ks`` / ``stride_vs`` step one token either way. The page
    count and cache length are clamped into ``[0, max_pages]`` and ``[0, capacity]``, and blocks
    into ``[0, num_blocks)``, so no index value makes it read out of bounds."""
    if PDL:  # a dependent launch: the previous kernel's results are complete past this point
        gdc_wait()
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)
    kvh = (pid % KV_HEADS).to(tl.int64)
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < GROUP * SQ
    qi = rows % SQ
    h = kvh * GROUP + rows // SQ  # int64 query head of each row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    cache_len = tl.minimum(tl.maximum(tl.load(CACHE_LENS + b), 0), capacity)
    q_pos = cache_len - SQ + qi
    n = tl.minimum(tl.maximum(tl.load(COUNTS + b * stride_cb + kvh * stride_ch), 0), max_pages)
    per_split = tl.cdiv(n, NUM_SPLITS)
    s0 = split * per_split
    s1 = tl.minimum(n, s0 + per_split)
    page_row = PAGES + b * stride_pb + kvh * stride_ph
    bt_row = BLOCK_TABLE + b * stride_tb
    if PAGED:
        kv_off_k = kvh * stride_kh
        kv_off_v = kvh * stride_vh
    else:
        kv_off_k = b * stride_k0 + kvh * stride_kh
        kv_off_v = b * stride_v0 + kvh * stride_vh

    # Pages below full_limit hold only positions <= cache_len - SQ (the earliest query's): visible
    # to every row. Sorted slots put them first in the split; count them.
    full_limit = (cache_len - SQ + 1) // PAGE_SIZE
    n_full = tl.zeros([], dtype=tl.int32)
    for start in range(s0, s1, SCAN):
        offs = start + tl.arange(0, SCAN)
        idx = tl.load(page_row + offs, mask=offs < s1, other=2147483647)
        n_full += tl.sum((idx < full_limit).to(tl.int32), axis=0)

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    # Key tiles of the split, counted in keys from slot 0: [key0, key_full) unmasked, then masked
    # up to the split's last key.
    key0 = s0 * PAGE_SIZE
    key_full = key0 + (n_full * PAGE_SIZE) // BLOCK_N * BLOCK_N
    for first in range(key0, key_full, BLOCK_N):
        m_i, l_i, acc = _key_tile(m_i, l_i, acc, q, q_pos, K, V, page_row, bt_row, first, s1, kv_off_k, kv_off_v,
                                  cache_len, full_limit, num_blocks, stride_k0, stride_ks, stride_v0, stride_vs,
                                  scale_log2, offs_n, offs_d, PAGE_SIZE, False, PAGED, UPCAST)
    for first in range(key_full, s1 * PAGE_SIZE, BLOCK_N):
        m_i, l_i, acc = _key_tile(m_i, l_i, acc, q, q_pos, K, V, page_row, bt_row, first, s1, kv_off_k, kv_off_v,
                                  cache_len, full_limit, num_blocks, stride_k0, stride_ks, stride_v0, stride_vs,
                                  scale_log2, offs_n, offs_d, PAGE_SIZE, True, PAGED, UPCAST)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
    if PDL:
        gdc_launch_dependents()
    if NUM_SPLITS == 1:
        o_ptrs = O + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + b * stride_lb + h * stride_lh + qi, lse2 * LN2, mask=row_ok)
    else:
        # Partials are contiguous (B, H, SQ, NUM_SPLITS, HEAD_DIM) and (B, H, SQ, NUM_SPLITS).
        part = ((b * (KV_HEADS * GROUP) + h) * SQ + qi) * NUM_SPLITS + split
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(LSE_PART + part, lse2, mask=row_ok)
        if FUSED_MERGE:
            # Every thread's partials are written before one thread counts the arrival (release);
            # the program that arrives last reads all splits' partials (acquire) and merges them.
            tl.debug_barrier()
            counter = ARRIVALS + pid * tl.num_programs(2) + tl.program_id(2)
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == NUM_SPLITS - 1:
                _merge_rows(O_PART, LSE_PART, O, LSE, part - split, b, h, qi, row_ok, offs_d,
                            stride_ob, stride_oh, stride_os, stride_lb, stride_lh, HEAD_DIM, NUM_SPLITS, ROWS)
                tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_rows(O_PART, LSE_PART, O, LSE, first, b, h, qi, row_ok, offs_d,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, ROWS: tl.constexpr):
    """Merge the ``NUM_SPLITS`` partials of ``ROWS`` query rows (``first``: each row's split 0 in
    the partial buffers) by their base-2 LSE with a running maximum; writes the output in O's
    dtype and the natural-log LSE (0 and ``-inf`` where no split saw a key)."""
    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(LSE_PART + first + s, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(O_PART + (first + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o
        total = total * alpha + w
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    t_safe = tl.where(total > 0, total, 1.0)
    out = acc / t_safe[:, None]
    lse_out = tl.where(total > 0, (m_safe + tl.log2(t_safe)) * LN2, float("-inf"))
    o_ptrs = O + (b * stride_ob + h * stride_oh + qi * stride_os)[:, None] + offs_d[None, :]  # b: scalar or per row
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + qi, lse_out, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    total_rows,
    HEADS: tl.constexpr, SQ: tl.constexpr, HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr,
):
    """Merge the split partials of ``ROWS`` query rows (row ``(b * HEADS + h) * SQ + qi``) with
    :func:`_merge_rows`, as the split kernel's last program does with a workspace."""
    if PDL:  # a dependent launch: the split kernel's partials are complete past this point
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = row < total_rows
    qi = row % SQ
    h = (row // SQ) % HEADS
    b = row // (SQ * HEADS)
    _merge_rows(O_PART, LSE_PART, O, LSE, row * NUM_SPLITS, b, h, qi, row_ok, tl.arange(0, HEAD_DIM),
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                HEAD_DIM=HEAD_DIM, NUM_SPLITS=NUM_SPLITS, ROWS=ROWS)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(programs: int, max_pages: int, page_size: int, device: torch.device) -> int:
    """Splits per (sequence, KV head, row tile), from shapes only (no device sync): as many as keep
    ``programs * splits`` within :data:`PROGRAMS_PER_SM` programs per SM (one wave of equal shares,
    no SM left with an extra program), but no more than :data:`MAX_SPLITS`, than the page budget
    ``max_pages`` (the width of ``pages``) has pages, or than it has :data:`MIN_KEYS_PER_SPLIT`-key
    shares."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _INTERPRETER_SMS
    wanted = PROGRAMS_PER_SM * sms // max(programs, 1)
    by_budget = max(1, min(max_pages, max_pages * page_size // MIN_KEYS_PER_SPLIT))
    return max(1, min(wanted, by_budget, MAX_SPLITS))


def choose_block_n(num_splits: int, width: int, page_size: int, rows: int) -> int:
    """Keys per tile of the split kernel: :data:`WIDE_BLOCK_N` where every split's keys (``ceil(width
    / num_splits)`` pages) fit one such tile and the query tile has at most :data:`WIDE_MAX_ROWS`
    rows, so a split issues the loads of all its keys and values at once (batch 1 at long context,
    where a step is latency-bound); else :data:`BLOCK_N`."""
    keys = -(-width // max(num_splits, 1)) * page_size
    return WIDE_BLOCK_N if keys <= WIDE_BLOCK_N and rows <= WIDE_MAX_ROWS else BLOCK_N


def unsupported_reason(q: Tensor, k_cache: Tensor, kv_heads: int) -> str | None:
    """Why :func:`triton_decode_attention` cannot run this call (None when it can); inputs are
    assumed to have passed ``decode_attention``'s checks."""
    from ..backends.triton.runtime import interpreting

    if not q.is_cuda and not interpreting():
        return "q is not on a CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU)"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton decode kernel; use float16 or bfloat16"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not supported by the Triton decode kernel; supported: {SUPPORTED_HEAD_DIMS}"
    if q.shape[0] * kv_heads > MAX_GRID_Y:
        return (f"batch * kv_heads = {q.shape[0] * kv_heads} is over the decode kernel's {MAX_GRID_Y} "
                "(one grid dimension walks them): split the batch")
    return None


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pages: Tensor, page_counts: Tensor,
                            cache_lens: Tensor, page_size: int, scale: float,
                            block_table: Tensor | None = None, num_splits: int | None = None,
                            fast_launch: bool = True, workspace=None, num_stages: int = 1,
                            out: Tensor | None = None, dependent_launch: bool = False,
                            block_n: int | None = None):
    """Launch the decode kernels; returns ``(out (B, H, Sq, D) in q's dtype, lse (B, H, Sq) float32
    natural log)``. Inputs are assumed checked (``decode_attention``); ``num_splits`` overrides
    :func:`choose_num_splits` (tests use it to exercise the merge); ``fast_launch``: see
    :func:`~sparse_attn.backends.triton.launch.launch_jit`; ``workspace``: a
    :class:`~.workspace.DecodeWorkspace` whose arrival counters let the split kernel merge by itself
    (None, or one that cannot hold the counters inside a CUDA-graph capture: a separate merge kernel).
    ``num_stages``: the split kernel's software-pipelining stages (1, none: a split's few key tiles
    gain nothing from prefetching, and one stage runs 12-21% faster than Triton's default of 3 at 128K
    from batch 1 to 32 with budget 2048, page 64). ``out``: the (checked) tensor to write the
    output into, any strides with a unit last one (None: a new one). ``dependent_launch``: launch the
    kernels as programmatic dependent launches
    (:meth:`~sparse_attn.options.KernelOptions.dependent_launch_on`). ``block_n``: keys per tile,
    64 or 128 (None: :func:`choose_block_n`)."""
    batch, heads, q_len, dim = q.shape
    paged = block_table is not None
    q, k_cache, v_cache, pages = (_unit_last_stride(t) for t in (q, k_cache, v_cache, pages))
    cache_lens = cache_lens.contiguous()
    if paged:
        kv_heads = k_cache.shape[2]
        capacity, num_blocks = block_table.shape[1] * page_size, k_cache.shape[0]
        stride_k = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))  # block, head, token
        stride_v = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        block_table = _unit_last_stride(block_table)
        stride_t = block_table.stride(0)
    else:
        kv_heads = k_cache.shape[1]
        capacity, num_blocks = k_cache.shape[2], 1
        stride_k = k_cache.stride()[:3]  # batch, head, token
        stride_v = v_cache.stride()[:3]
        block_table = page_counts  # placeholder pointer, never read
        stride_t = 0
    group = heads // kv_heads
    rows = min(MAX_ROWS, max(16, next_power_of_2(group * q_len)))
    row_tiles = cdiv(group * q_len, rows)
    if num_splits is None:
        num_splits = choose_num_splits(batch * kv_heads * row_tiles, pages.shape[-1], page_size, q.device)
    if block_n is None:
        block_n = choose_block_n(num_splits, pages.shape[-1], page_size, rows)

    if out is None:
        out = torch.empty(batch, heads, q_len, dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, heads, q_len, device=q.device, dtype=torch.float32)
    if num_splits > 1:
        o_part = torch.empty(batch, heads, q_len, num_splits, dim, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(batch, heads, q_len, num_splits, device=q.device, dtype=torch.float32)
    else:
        o_part, lse_part = out, lse  # placeholders, not written
    arrivals = None
    if num_splits > 1 and workspace is not None:
        arrivals = workspace.arrival_counters(batch * kv_heads * row_tiles)
    launch_jit(_decode_split_kernel, (num_splits, batch * kv_heads, row_tiles), (
        q, k_cache, v_cache, pages, page_counts, cache_lens, block_table, out, lse, o_part, lse_part,
        arrivals if arrivals is not None else page_counts,
        *q.stride()[:3], *stride_k, *stride_v,
        pages.stride(0), pages.stride(1), page_counts.stride(0), page_counts.stride(1), stride_t,
        *out.stride()[:3], lse.stride(0), lse.stride(1),
        scale * LOG2E, pages.shape[-1], capacity, num_blocks,
    ), dict(
        KV_HEADS=kv_heads, GROUP=group, SQ=q_len, HEAD_DIM=dim, PAGE_SIZE=page_size, BLOCK_N=block_n,
        ROWS=rows, NUM_SPLITS=num_splits, PAGED=paged, UPCAST=fp32_dot_operands(q.dtype), SCAN=64,
        FUSED_MERGE=arrivals is not None, **dependent_launch_meta(dependent_launch),
        num_warps=8 if rows * dim >= 128 * 128 else 4, num_stages=num_stages,
    ), fast_launch)
    if num_splits > 1 and arrivals is None:
        total_rows = batch * heads * q_len
        launch_jit(_decode_merge_kernel, (cdiv(total_rows, MERGE_ROWS),), (
            o_part, lse_part, out, lse, *out.stride()[:3], lse.stride(0), lse.stride(1), total_rows,
        ), dict(
            HEADS=heads, SQ=q_len, HEAD_DIM=dim, NUM_SPLITS=num_splits, ROWS=MERGE_ROWS,
            **dependent_launch_meta(dependent_launch), num_warps=4,
        ), fast_launch)
    return out, lse
