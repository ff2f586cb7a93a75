"""How a page index keeps Quest's bounds: ``"exact"`` (in the key dtype) or ``"int8"`` (int8 with a
float32 scale per page, rounded outward so they still bound every key of the page).

:func:`quantize_bounds` is the rule; :class:`~.page_index.PageIndex` applies it in PyTorch and the
append kernel (:mod:`.index_kernels`) applies it on the device with the same constants."""

from __future__ import annotations

import torch
from torch import Tensor

BOUNDS = ("exact", "int8")  # how Quest's bounds are kept for scoring: the key dtype, or int8 + a page scale
INT8_LEVELS = 127.0  # int8 bounds take values in [-127, 127] steps of their page's scale
SCALE_FLOOR = 1e-30  # a page's max |bound| below this is taken as this (so 127 / it stays finite)
SCALE_ROUND_UP = 1.0 + 2.0 ** -21  # raises a scale past float32 rounding: q * scale never lands inside a bound


def check_bounds(bounds) -> str:
    """``bounds`` if it is one of :data:`BOUNDS`, else ValueError naming it."""
    if bounds not in BOUNDS:
        raise ValueError(f"bounds must be one of {BOUNDS}, got {bounds!r}")
    return bounds


def quantize_bounds(kmin: Tensor, kmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(qmin, qmax, scale)``: int8 bounds ``(..., D)`` and a float32 scale ``(...)`` per page of the
    element-wise bounds ``kmin``/``kmax (..., D)`` (a page with no token: ``+inf``/``-inf``).
    ``scale = max |bound| / 127`` over the page (``max |bound|`` taken as at least ``1e-30``), raised by
    ``2**-21`` of itself so that float32 rounding cannot pull a bound inside; ``qmax = ceil(kmax /
    scale)``, ``qmin = floor(kmin / scale)``, so ``qmin * scale <= kmin`` and ``qmax * scale >= kmax``.
    An empty or all-zero page gets 0 everywhere. The Triton append kernel computes the same."""
    lo, hi = kmin.float(), kmax.float()
    empty = hi[..., 0] < lo[..., 0]  # -inf max above +inf min: no token
    lo = lo.masked_fill(empty[..., None], 0.0)
    hi = hi.masked_fill(empty[..., None], 0.0)
    absmax = torch.maximum(hi.abs(), lo.abs()).amax(-1)
    # Tensor divisions (PyTorch may divide by a scalar through its reciprocal, which rounds differently
    # from the append kernel's division).
    levels = torch.full_like(absmax, INT8_LEVELS)
    magnitude = absmax.clamp(min=SCALE_FLOOR)
    scale = torch.where(absmax > 0, (magnitude / levels) * SCALE_ROUND_UP, 0.0)
    inv = levels / magnitude
    qmax = torch.ceil(hi * inv[..., None]).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    qmin = torch.floor(lo * inv[..., None]).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return qmin, qmax, scale
