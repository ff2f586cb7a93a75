"""PageIndex: per-page summaries of a KV cache's keys, kept up to date as tokens are appended.

For every (sequence, KV head, page of ``page_size`` consecutive tokens) the index holds the
element-wise minimum and maximum of the page's keys (Quest's bounds) and their sum (the mean key of
pooled scoring is ``sum / tokens in the page``), plus each sequence's length in tokens. The page
selection of :mod:`.select` reads only these summaries, so a decode step scores pages in
``O(B * Hkv * pages * D)`` without touching the K cache.

An index made with ``bounds="int8"`` also keeps Quest's bounds as int8 with one float32 scale per
page (:func:`quantize_bounds`: rounded outward, so they still bound every key of the page from above
and below), and Quest scores pages from those: a decode step then reads half the bytes to score the
pages (``1 / P`` of the K cache for 16-bit keys instead of ``2 / P``), at the price of bounds up to one
step (``max |bound| / 127``) looser per element.

Memory, for a K cache of ``capacity`` tokens and ``P = page_size``: min and max take ``2 / P`` of the K
cache (they keep the key dtype), the float32 sum ``4 / (P * e)`` of it for keys of ``e`` bytes, e.g.
``4 / P`` in all for 16-bit keys (6.25% at ``P = 64``, 25% at ``P = 16``); int8 bounds add ``1 / P``
(plus 4 bytes per page and KV head); see :meth:`PageIndex.memory_bytes`.

Shapes are fixed by the capacity when the index is made, and updates write in place, so an index can
live inside a captured CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..layout import SUPPORTED_BLOCK_SIZES
from ..methods.primitives.dispatch import use_triton
from ..options import KernelOptions, resolve_kernel_options
from .bounds import check_bounds, quantize_bounds

__all__ = ["PageIndex", "PAGE_SIZES"]

PAGE_SIZES = SUPPORTED_BLOCK_SIZES  # the powers of two from 16 to 256
KERNEL_MAX_NEW = 16  # most new tokens per append that the Triton kernel takes

Lengths = Union[None, int, Sequence[int], Tensor]


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream (no host sync allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_page_size(page_size) -> int:
    """``page_size`` if it is a power of two from 16 to 256, else ValueError naming it."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size not in PAGE_SIZES:
        raise ValueError(f"page_size must be a power of two from {PAGE_SIZES[0]} to {PAGE_SIZES[-1]} "
                         f"(one of {PAGE_SIZES}), got {page_size!r}")
    return page_size


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PageIndex:
    """Per-page key summaries of a KV cache of ``capacity`` tokens per sequence.

    Attributes (all preallocated for the capacity, updated in place):
        kmin, kmax: ``(B, Hkv, max_pages, D)`` in the key dtype, the element-wise min / max of each
            page's keys; a page with no token holds ``+inf`` / ``-inf`` (after :meth:`append_at`
            set a sequence back, the pages past its length keep what they held until tokens reach
            them: read pages below :meth:`num_pages` only).
        ksum: ``(B, Hkv, max_pages, D)`` float32, the sum of each page's keys (0 for an empty page).
        lengths: ``(B,)`` int64, the tokens of each sequence; page ``p`` of sequence ``b`` holds
            ``clamp(lengths[b] - p * page_size, 0, page_size)`` of them (:meth:`page_tokens`).
        bounds: ``"exact"`` or ``"int8"``: with ``"int8"`` also ``qmin``, ``qmax`` ``(B, Hkv,
            max_pages, D)`` int8 and ``qscale`` ``(B, Hkv, max_pages)`` float32, Quest's bounds as
            :func:`quantize_bounds` gives them from ``kmin``/``kmax`` (kept in step with them), which
            Quest scores pages from; None otherwise.

    Make one with :meth:`build` (from the K cache at the end of prefill) or :meth:`empty`, then
    :meth:`append` the keys of each decode step's new tokens. Memory: :meth:`memory_bytes`.
    """

    def __init__(self, kmin: Tensor, kmax: Tensor, ksum: Tensor, lengths: Tensor, page_size: int, capacity: int,
                 bounds: str = "exact", quantized: Optional[tuple] = None):
        check_page_size(page_size)
        check_bounds(bounds)
        _positive_int("capacity", capacity)
        shape = tuple(kmin.shape)
        if len(shape) != 4 or tuple(kmax.shape) != shape or tuple(ksum.shape) != shape:
            raise ValueError(f"kmin, kmax and ksum must share one (B, Hkv, max_pages, D) shape, got "
                             f"{tuple(kmin.shape)}, {tuple(kmax.shape)} and {tuple(ksum.shape)}")
        if shape[2] != math.ceil(capacity / page_size):
            raise ValueError(f"capacity={capacity} with page_size={page_size} needs "
                             f"{math.ceil(capacity / page_size)} pages, the summaries have {shape[2]}")
        if ksum.dtype != torch.float32 or kmax.dtype != kmin.dtype:
            raise ValueError(f"ksum must be float32 and kmax have kmin's dtype, got {ksum.dtype} and "
                             f"{kmin.dtype}/{kmax.dtype}")
        if tuple(lengths.shape) != shape[:1] or lengths.dtype != torch.int64:
            raise ValueError(f"lengths must be int64 of shape ({shape[0]},), got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        self.kmin, self.kmax, self.ksum, self.lengths = kmin, kmax, ksum, lengths
        self.page_size = page_size
        self.capacity = capacity
        self.bounds = bounds
        self.qmin = self.qmax = self.qscale = None
        if bounds == "int8":  # ``quantized``: (qmin, qmax, qscale) known to be quantize_bounds(kmin, kmax)
            self.qmin, self.qmax, self.qscale = quantized if quantized is not None else quantize_bounds(kmin, kmax)
        # A host-side upper bound on max(lengths): appends check the capacity without a device sync
        # until this bound passes it.
        self._length_bound = capacity

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, capacity: int, page_size: int, *,
              dtype: torch.dtype = torch.float16, device=None, bounds: str = "exact") -> "PageIndex":
        """An index of ``batch`` empty sequences (length 0) of up to ``capacity`` tokens; ``bounds``:
        see the class docstring."""
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("capacity", capacity)):
            _positive_int(name, value)
        check_page_size(page_size)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        shape = (batch, kv_heads, math.ceil(capacity / page_size), head_dim)
        kmin = torch.full(shape, float("inf"), dtype=dtype, device=device)
        kmax = torch.full(shape, float("-inf"), dtype=dtype, device=device)
        ksum = torch.zeros(shape, dtype=torch.float32, device=device)
        lengths = torch.zeros(batch, dtype=torch.int64, device=device)
        quantized = None
        if bounds == "int8":  # an empty page's int8 bounds and scale are 0
            quantized = (torch.zeros(shape, dtype=torch.int8, device=device),
                         torch.zeros(shape, dtype=torch.int8, device=device),
                         torch.zeros(shape[:3], dtype=torch.float32, device=device))
        index = cls(kmin, kmax, ksum, lengths, page_size, capacity, bounds=bounds, quantized=quantized)
        index._length_bound = 0
        return index

    @classmethod
    def build(cls, k: Tensor, page_size: int, lengths: Lengths = None,
              capacity: Optional[int] = None, bounds: str = "exact") -> "PageIndex":
        """The index of a K cache ``k (B, Hkv, S, D)``, in one pass over it (at the end of prefill).

        ``lengths``: the tokens of each sequence (``(B,)`` ints, the first ``lengths[b]`` positions of
        row ``b`` are its keys; None: all ``S``). ``capacity``: the most tokens a sequence will hold
        (at least ``S``; None: ``S``), which fixes the summaries' shapes. ``bounds``: ``"exact"`` or
        ``"int8"`` (see the class docstring)."""
        _check_keys("k", k)
        check_bounds(bounds)
        batch, kv_heads, seq, dim = k.shape
        check_page_size(page_size)
        capacity = seq if capacity is None else capacity
        _positive_int("capacity", capacity)
        if capacity < seq:
            raise ValueError(f"capacity={capacity} is smaller than the cache's {seq} positions")
        index = cls.empty(batch, kv_heads, dim, capacity, page_size, dtype=k.dtype, device=k.device, bounds=bounds)
        lens = _lengths_tensor("lengths", lengths, batch, seq, k.device)
        if seq == 0:
            return index
        full = seq // page_size
        if full:  # whole pages: reduce in place of the cache (no copy), clear past each length below
            pages = k[:, :, :full * page_size].reshape(batch, kv_heads, full, page_size, dim)
            index.kmin[:, :, :full] = pages.amin(3)
            index.kmax[:, :, :full] = pages.amax(3)
            index.ksum[:, :, :full] = pages.sum(3, dtype=torch.float32)
        done = torch.div(lens, page_size, rounding_mode="floor") * page_size  # whole pages of each sequence
        index._clear_from(done)
        index._quantize_pages(slice(0, full))
        index.lengths.copy_(done)
        index._length_bound = (min(seq, capacity) // page_size) * page_size
        # The last, partial page of each sequence: its (< page_size) tokens, appended.
        step = torch.arange(page_size - 1, device=k.device)
        pos = (done[:, None] + step[None, :]).clamp(max=seq - 1)
        rest = k.gather(2, pos[:, None, :, None].expand(batch, kv_heads, page_size - 1, dim))
        index.append(rest, counts=lens - done)
        return index

    def copy_(self, other: "PageIndex") -> "PageIndex":
        """Copy ``other``'s summaries and lengths into this index's own tensors; returns ``self``.

        ``other`` must have this index's shapes, dtype, device, page size, capacity and bounds. The
        tensors stay the same objects at the same addresses, so a CUDA graph captured over this index
        (a compiled decoding forward) reads the copied state when it replays."""
        if not isinstance(other, PageIndex):
            raise TypeError(f"copy_ takes a PageIndex, got {type(other).__name__}")
        same = (other.kmin.shape == self.kmin.shape and other.dtype == self.dtype and other.device == self.device
                and other.page_size == self.page_size and other.capacity == self.capacity
                and other.bounds == self.bounds)
        if not same:
            raise ValueError(f"copy_: {other!r} does not have this index's geometry {self!r}")
        for name in ("kmin", "kmax", "ksum", "lengths", "qmin", "qmax", "qscale"):
            mine = getattr(self, name)
            if mine is not None:
                mine.copy_(getattr(other, name))
        self._length_bound = other._length_bound
        return self

    # ------------------------------------------------------------------ geometry
    @property
    def batch(self) -> int:
        return self.kmin.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.kmin.shape[1]

    @property
    def max_pages(self) -> int:
        """Pages per sequence at full capacity: ``ceil(capacity / page_size)``."""
        return self.kmin.shape[2]

    @property
    def head_dim(self) -> int:
        return self.kmin.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        """The key dtype (of ``kmin`` / ``kmax``)."""
        return self.kmin.dtype

    @property
    def device(self) -> torch.device:
        return self.kmin.device

    def num_pages(self) -> Tensor:
        """``(B,)`` int64: pages holding at least one token, ``ceil(lengths / page_size)``."""
        return torch.div(self.lengths + self.page_size - 1, self.page_size, rounding_mode="floor")

    def page_tokens(self) -> Tensor:
        """``(B, max_pages)`` int64: tokens in each page (``page_size`` except the last, 0 past it)."""
        first = torch.arange(self.max_pages, device=self.device) * self.page_size
        return (self.lengths[:, None] - first[None, :]).clamp(0, self.page_size)

    def mean(self) -> Tensor:
        """``(B, Hkv, max_pages, D)`` float32: the mean key of each page (0 for an empty page)."""
        return self.ksum / self.page_tokens().clamp(min=1)[:, None, :, None].float()

    def memory_bytes(self) -> int:
        """Bytes held by the summaries and lengths: ``2 / page_size`` of the K cache (of ``capacity``
        tokens) for min/max, plus the float32 sum (``4 / (page_size * e)`` of it for ``e``-byte keys),
        plus, with int8 bounds, ``2 / (page_size * e)`` and a float32 scale per page and KV head."""
        held = (self.kmin, self.kmax, self.ksum, self.lengths, self.qmin, self.qmax, self.qscale)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def quest_bounds(self) -> tuple[Tensor, Tensor]:
        """``(kmin, kmax)`` float32 ``(B, Hkv, max_pages, D)``: the bounds Quest scores pages from, the
        exact ones or, with int8 bounds, ``qmin * qscale`` and ``qmax * qscale``; 0 for a page with no
        token."""
        if self.bounds == "int8":
            scale = self.qscale[..., None]
            return self.qmin.float() * scale, self.qmax.float() * scale
        empty = (self.page_tokens() == 0)[:, None, :, None]
        return self.kmin.float().masked_fill(empty, 0.0), self.kmax.float().masked_fill(empty, 0.0)

    def __repr__(self) -> str:
        return (f"PageIndex(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"page_size={self.page_size}, capacity={self.capacity}, dtype={self.dtype}, device={self.device}, "
                f"bounds={self.bounds!r})")

    # ------------------------------------------------------------------ updates
    def append(self, k_new: Tensor, counts: Lengths = None, *,
               kernel_options: Optional[KernelOptions] = None) -> "PageIndex":
        """Add the keys of new tokens, ``k_new (B, Hkv, T, D)``; returns ``self``.

        The new tokens of sequence ``b`` take positions ``lengths[b]`` to ``lengths[b] + counts[b] - 1``
        (``counts``: ``(B,)`` ints in ``[0, T]``, the first ``counts[b]`` rows of ``k_new[b]`` are real,
        the rest padding; None: all ``T``), then ``lengths += counts``. The work is ``O(T + page_size)``
        per (sequence, KV head): only the pages the new tokens fall in are combined with them (min with
        min, max with max, sum plus sum; int8 bounds of those pages quantized anew); no other page's
        entries change. A page holding no token before the step (its start at or past ``lengths[b]``)
        takes the new tokens' summaries alone, whatever it held, so an index whose ``lengths`` were
        set back to 0 (a new sequence) or to a page boundary of the same cache (a crop) is brought up
        to date by the appends that follow.

        Raises ValueError where a sequence would pass the capacity. That check reads the lengths on the
        host only when a host-side bound says the capacity may be passed, never while a CUDA graph is
        captured (there, tokens past the capacity are dropped). ``counts`` given as a CUDA tensor are
        clamped to ``[0, T]`` rather than checked (no device sync); elsewhere they are checked.

        ``kernel_options``: a :class:`~sparse_attn.options.KernelOptions` (None: the current default);
        its ``estimator_kernels`` picks a single Triton kernel launch (``"auto"`` on CUDA tensors, for
        up to :data:`KERNEL_MAX_NEW` new tokens and power-of-two head dims) or the PyTorch update (the
        reference).
        """
        counts_t, bound = self.check_append(k_new, counts)
        batch, kv_heads, new, dim = k_new.shape
        if new == 0:
            return self
        page, cap = self.page_size, self.capacity
        start = self.lengths

        # A window of whole pages from the page holding each sequence's next position: slot s holds
        # new token s - (lengths % page_size) where that is one of this step's real tokens.
        pages_in_window = min((page - 1 + new + page - 1) // page, self.max_pages)
        if use_triton(k_new, kernel_options, self._append_kernel_supports(k_new)):
            from .index_kernels import triton_append

            options = resolve_kernel_options(kernel_options)
            triton_append(self, k_new, counts_t, pages_in_window, fast_launch=options.fast_launch,
                          dependent_launch=options.dependent_launch_on(k_new.device))
            self._length_bound = min(bound, cap)
            return self
        if counts_t is None:
            counts_t = torch.full((batch,), new, dtype=torch.int64, device=self.device)
        width = pages_in_window * page
        offset = start % page
        token = torch.arange(width, device=self.device)[None, :] - offset[:, None]  # (B, W)
        real = (token >= 0) & (token < counts_t[:, None]) & (start[:, None] + token < cap)
        window = k_new.gather(2, token.clamp(0, new - 1)[:, None, :, None].expand(batch, kv_heads, width, dim))
        window = window.view(batch, kv_heads, pages_in_window, page, dim)
        real = real.view(batch, 1, pages_in_window, page, 1)
        new_min = torch.where(real, window, float("inf")).amin(3)
        new_max = torch.where(real, window, float("-inf")).amax(3)
        new_sum = torch.where(real, window.float(), 0.0).sum(3)

        # The window's pages in the index. Pages past the capacity wrap to distinct low pages, which
        # get no token from this step and so are written back unchanged: every index is written once.
        first = torch.div(start, page, rounding_mode="floor")
        slots = (first[:, None] + torch.arange(pages_in_window, device=self.device)[None, :]) % self.max_pages
        slots = slots[:, None, :, None].expand(batch, kv_heads, pages_in_window, dim)
        # A page that gets tokens this step and held none before it starts afresh, whatever it held
        # (lengths set back); the window's wrapped slots get no token and are written back unchanged.
        fresh = ((first[:, None] + torch.arange(pages_in_window, device=self.device)[None, :]) * page
                 >= start[:, None]) & real.view(batch, pages_in_window, page).any(-1)
        fresh = fresh.view(batch, 1, pages_in_window, 1)
        old_min = torch.where(fresh, float("inf"), self.kmin.gather(2, slots))
        old_max = torch.where(fresh, float("-inf"), self.kmax.gather(2, slots))
        old_sum = torch.where(fresh, 0.0, self.ksum.gather(2, slots))
        self.kmin.scatter_(2, slots, torch.minimum(old_min, new_min).to(self.kmin.dtype))
        self.kmax.scatter_(2, slots, torch.maximum(old_max, new_max).to(self.kmax.dtype))
        self.ksum.scatter_(2, slots, old_sum + new_sum)
        if self.bounds == "int8":
            qmin, qmax, scale = quantize_bounds(self.kmin.gather(2, slots), self.kmax.gather(2, slots))
            self.qmin.scatter_(2, slots, qmin)
            self.qmax.scatter_(2, slots, qmax)
            self.qscale.scatter_(2, slots[..., 0], scale)
        self.lengths.copy_((start + counts_t).clamp(max=cap))
        self._length_bound = min(bound, cap)
        return self

    def check_append(self, k_new: Tensor, counts: Lengths = None) -> tuple[Optional[Tensor], int]:
        """Check an :meth:`append` of ``k_new`` with ``counts`` (ValueError naming the argument);
        returns ``(counts, bound)``: the counts as an int64 ``(B,)`` tensor (None for None: all ``T``
        tokens) and the host-side bound on the lengths after it, which the appending code stores in
        ``_length_bound``."""
        _check_keys("k_new", k_new)
        batch, kv_heads, new, dim = k_new.shape
        if (batch, kv_heads, dim) != (self.batch, self.kv_heads, self.head_dim):
            raise ValueError(f"k_new {tuple(k_new.shape)} does not fit the index: expected "
                             f"({self.batch}, {self.kv_heads}, T, {self.head_dim})")
        if k_new.dtype != self.dtype:
            raise ValueError(f"k_new has dtype {k_new.dtype}, the index holds {self.dtype} keys")
        if k_new.device != self.device:
            raise ValueError(f"k_new is on device {k_new.device}, the index on device {self.device}")
        if new == 0:
            return None, self._length_bound
        # counts=None: every sequence takes all T tokens, and the Triton update needs no counts tensor.
        counts_t = None if counts is None else _counts_tensor(counts, batch, new, self.device)
        cap = self.capacity
        bound = self._length_bound + new
        if bound > cap and not _capturing(self.device):
            longest = int((self.lengths + (new if counts_t is None else counts_t)).max())
            if longest > cap:
                raise ValueError(f"append: a sequence would reach {longest} tokens, past the index's "
                                 f"capacity={cap}")
            bound = longest
        return counts_t, bound

    def append_at(self, k_cache: Tensor, positions: Tensor, rows: int, *,
                  kernel_options: Optional[KernelOptions] = None, check_values: bool = True) -> "PageIndex":
        """Add the keys of ``rows`` new tokens that the cache ``k_cache (B, Hkv, S, D)`` already holds at
        positions ``positions[b] .. positions[b] + rows - 1`` (``positions``: ``(B,)`` int64 on the
        index's device); returns ``self``, with ``lengths = positions + rows``.

        Where ``positions[b]`` is below ``lengths[b]`` (the cache was set back, as assisted decoding
        does), the page holding it first takes the cache's keys before it, so the summaries describe
        the cache exactly up to the new length, provided the pages before that one still describe
        the cache (a set-back keeps them; another sequence in the cache needs a rebuild,
        :meth:`build` or :meth:`copy_`); pages past that keep what
        they held until tokens reach them (each starts afresh then: :meth:`append`). No host reads, so
        a CUDA graph can capture it; tokens past the capacity are dropped. ``kernel_options``: as
        :meth:`append` (one Triton launch on CUDA tensors). ``check_values`` (default, skipped while a
        CUDA graph is captured): read ``positions`` and ``lengths`` on the host (a device sync) and
        refuse positions below 0, past a sequence's length (a gap no token fills) or whose ``rows``
        the cache does not hold."""
        _check_keys("k_cache", k_cache)
        batch, kv_heads, slots, dim = k_cache.shape
        if (batch, kv_heads, dim) != (self.batch, self.kv_heads, self.head_dim):
            raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit the index: expected "
                             f"({self.batch}, {self.kv_heads}, S, {self.head_dim})")
        if k_cache.dtype != self.dtype or k_cache.device != self.device:
            raise ValueError(f"k_cache is {k_cache.dtype} on {k_cache.device}; the index holds {self.dtype} keys "
                             f"on {self.device}")
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (batch,) or positions.dtype != torch.int64 \
                or positions.device != self.device:
            raise ValueError(f"positions must be an int64 ({batch},) tensor on {self.device}, got "
                             f"{getattr(positions, 'dtype', type(positions).__name__)} "
                             f"{tuple(getattr(positions, 'shape', ()))}")
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= slots:
            raise ValueError(f"rows must be an int from 1 to the cache's {slots} positions, got {rows!r}")
        if check_values and not _capturing(positions.device):
            for b, (at, length) in enumerate(zip(positions.tolist(), self.lengths.tolist())):
                if not 0 <= at <= length or at + rows > slots:
                    raise ValueError(f"positions[{b}] = {at}: expected 0 to the sequence's length {length} (a "
                                     f"position past it leaves a gap), with positions + rows ({rows}) at most the "
                                     f"cache's {slots} positions")
        page, cap = self.page_size, self.capacity
        start = positions.clamp(0, cap)
        where = (start[:, None] + torch.arange(rows, device=self.device)[None, :]).clamp(max=slots - 1)
        k_new = k_cache.gather(2, where[:, None, :, None].expand(batch, kv_heads, rows, dim))
        pages_in_window = min((page - 1 + rows + page - 1) // page, self.max_pages)
        if k_cache.stride(-1) == 1 and use_triton(k_new, kernel_options, self._append_kernel_supports(k_new)):
            from .index_kernels import triton_append

            options = resolve_kernel_options(kernel_options)
            triton_append(self, k_new, None, pages_in_window, fast_launch=options.fast_launch,
                          dependent_launch=options.dependent_launch_on(k_new.device), cache=k_cache, positions=start)
            self._length_bound = cap  # unknown on the host: a later append checks the capacity
            return self
        # The page holding each moved sequence's position, from the cache's keys before it.
        first = torch.div(start, page, rounding_mode="floor")
        moved = (start != self.lengths) & (first < self.max_pages)
        before = first[:, None] * page + torch.arange(page, device=self.device)[None, :]  # (B, P)
        keys = k_cache.gather(2, before.clamp(max=slots - 1)[:, None, :, None].expand(batch, kv_heads, page, dim))
        kept = (before < start[:, None]).view(batch, 1, page, 1)
        slot = first.clamp(max=self.max_pages - 1)[:, None, None, None].expand(batch, kv_heads, 1, dim)
        mv = moved.view(batch, 1, 1, 1)
        for name, fill, reduce in (("kmin", float("inf"), torch.amin), ("kmax", float("-inf"), torch.amax)):
            table = getattr(self, name)
            rebuilt = reduce(torch.where(kept, keys, fill), 2, keepdim=True)
            table.scatter_(2, slot, torch.where(mv, rebuilt, table.gather(2, slot)))
        rebuilt_sum = torch.where(kept, keys.float(), 0.0).sum(2, keepdim=True)
        self.ksum.scatter_(2, slot, torch.where(mv, rebuilt_sum, self.ksum.gather(2, slot)))
        self.lengths.copy_(start)
        self._length_bound = 0  # no host-side capacity check: tokens past it are dropped
        self.append(k_new, kernel_options=kernel_options)
        self._length_bound = cap
        return self

    def _append_kernel_supports(self, k_new: Tensor, one_kv_head: bool = False) -> bool:
        """Whether the Triton append takes ``k_new``: the append kernel (every KV head of a sequence in
        one program), or with ``one_kv_head`` the page-score kernel's append (one KV head per program)."""
        kv_heads, new, dim = k_new.shape[1:]
        quantized = self.bounds != "int8" or (
            self.qmin.stride() == self.qmax.stride() == self.kmin.stride() and self.qscale.is_contiguous())
        return (new <= KERNEL_MAX_NEW and dim >= 16 and dim & (dim - 1) == 0
                and (one_kv_head or kv_heads * new * dim <= 32768) and self.kmin.stride() == self.kmax.stride()
                and self.kmin.stride(-1) == 1 and self.ksum.stride(-1) == 1 and quantized)

    def _quantize_pages(self, pages: slice) -> None:
        """Recompute the int8 bounds of ``pages`` (a slice of page numbers) from kmin/kmax."""
        if self.bounds == "int8":
            qmin, qmax, scale = quantize_bounds(self.kmin[:, :, pages], self.kmax[:, :, pages])
            self.qmin[:, :, pages], self.qmax[:, :, pages], self.qscale[:, :, pages] = qmin, qmax, scale

    def _clear_from(self, lengths: Tensor) -> None:
        """Reset every page from ``ceil(lengths / page_size)`` on to the empty summaries."""
        first_empty = torch.div(lengths + self.page_size - 1, self.page_size, rounding_mode="floor")
        empty = torch.arange(self.max_pages, device=self.device)[None, :] >= first_empty[:, None]
        empty = empty[:, None, :, None]
        self.kmin.masked_fill_(empty, float("inf"))
        self.kmax.masked_fill_(empty, float("-inf"))
        self.ksum.masked_fill_(empty, 0.0)
        if self.bounds == "int8":
            self.qmin.masked_fill_(empty, 0)
            self.qmax.masked_fill_(empty, 0)
            self.qscale.masked_fill_(empty[..., 0], 0.0)


def _check_keys(name: str, k) -> None:
    if not isinstance(k, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B, Hkv, S, D), got {type(k).__name__}")
    if k.dim() != 4:
        raise ValueError(f"{name} must be (B, Hkv, S, D), got shape {tuple(k.shape)}")
    if not k.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {k.dtype}")
    if min(k.shape[0], k.shape[1], k.shape[3]) < 1:
        raise ValueError(f"{name} has an empty batch, head or head_dim dimension: {tuple(k.shape)}")


def _lengths_tensor(name: str, lengths: Lengths, batch: int, most: int, device) -> Tensor:
    """``lengths`` as ``(B,)`` int64 on ``device``, each in ``[0, most]`` (None: ``most``). Checked on
    the host unless a CUDA graph is being captured."""
    if lengths is None:
        return torch.full((batch,), most, dtype=torch.int64, device=device)
    if isinstance(lengths, bool):
        raise ValueError(f"{name} must be an int or (B,) ints, got {lengths!r}")
    if isinstance(lengths, int):
        values = torch.full((batch,), lengths, dtype=torch.int64, device=device)
    else:
        values = torch.as_tensor(lengths, device=device)
        if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{name} must hold ints, got {values.dtype}")
        values = values.to(torch.int64).flatten()
        if values.numel() == 1:
            values = values.expand(batch)
        if values.numel() != batch:
            raise ValueError(f"{name} must hold one value per sequence ({batch}), got {values.numel()}")
    if not _capturing(values.device):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > most:
            raise ValueError(f"{name} must lie in [0, {most}], got values from {low} to {high}")
    return values.contiguous()


def _counts_tensor(counts: Lengths, batch: int, new: int, device) -> Tensor:
    if isinstance(counts, Tensor) and counts.device.type == "cuda":
        if counts.is_floating_point() or counts.dtype == torch.bool:
            raise ValueError(f"counts must hold ints, got {counts.dtype}")
        values = counts.to(device=device, dtype=torch.int64).flatten()
        if values.numel() == 1:
            values = values.expand(batch)
        if values.numel() != batch:
            raise ValueError(f"counts must hold one value per sequence ({batch}), got {values.numel()}")
        return values.clamp(0, new)
    return _lengths_tensor("counts", counts, batch, new, device)
