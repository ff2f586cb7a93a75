"""Backend registry: each backend says whether it can run a call (and why not) and runs it.

``auto`` walks :data:`AUTO_ORDER` and takes the first backend whose ``can_run`` returns no reason;
:func:`explain_choice` reports every skipped backend with its reason (NATTEN-style), and naming a
backend that cannot run raises with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..layout import BlockSparseLayout
from .flex import flex_attention_forward, flex_available
from .reference import reference_attention
from .triton import triton_can_run, triton_can_run_fast, triton_forward

CanRun = Callable[[Tensor, Tensor, Tensor, BlockSparseLayout], Optional[str]]
Forward = Callable[..., tuple]


@dataclass(frozen=True)
class Backend:
    name: str
    can_run: CanRun  # returns None when it can run, else the reason it cannot
    forward: Forward  # (q, k, v, layout, scale) -> (out, lse)


def _reference_can_run(q, k, v, layout):
    return None


def _flex_can_run(q, k, v, layout):
    ok, why = flex_available()
    if not ok:
        return why
    if q.dtype == torch.float64 and q.is_cuda:
        return "Flex on CUDA does not compile float64"
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < 16:  # inductor: "NYI: embedding dimension ... at least 16"
        return f"Flex on CUDA compiles head dims of 16 or more only (q: {q.shape[-1]}, v: {v.shape[-1]})"
    return None


def _flex_can_run_fast(q, k, v, layout):
    reason = _flex_can_run(q, k, v, layout)
    if reason is None and not q.is_cuda:
        return "Flex runs eagerly on CPU and materializes the full score matrix"
    return reason


BACKENDS: dict = {
    "reference": Backend("reference", _reference_can_run, reference_attention),
    "flex": Backend("flex", _flex_can_run, flex_attention_forward),
    "triton": Backend("triton", triton_can_run, triton_forward),
}

# Backends `auto` may choose, fastest first, each with the check used for the automatic choice.
AUTO_ORDER: list = [
    ("triton", triton_can_run_fast),
    ("flex", _flex_can_run_fast),
    ("reference", _reference_can_run),
]


def register_backend(backend: Backend, auto_position: Optional[int] = None,
                     auto_check: Optional[CanRun] = None) -> None:
    """Add a backend; with ``auto_position`` it also joins the automatic choice at that rank."""
    BACKENDS[backend.name] = backend
    if auto_position is not None:
        AUTO_ORDER[:] = [entry for entry in AUTO_ORDER if entry[0] != backend.name]
        AUTO_ORDER.insert(auto_position, (backend.name, auto_check or backend.can_run))


def explain_choice(q, k, v, layout) -> tuple[str, list]:
    """The backend ``auto`` picks, and ``[(name, reason)]`` for each one it skipped."""
    skipped = []
    for name, check in AUTO_ORDER:
        reason = check(q, k, v, layout)
        if reason is None:
            return name, skipped
        skipped.append((name, reason))
    raise RuntimeError(f"no backend can run this call: {skipped}")  # reference always can


def select_backend(name: str, q, k, v, layout) -> Backend:
    if name == "auto":
        return BACKENDS[explain_choice(q, k, v, layout)[0]]
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {['auto', *BACKENDS]}")
    backend = BACKENDS[name]
    reason = backend.can_run(q, k, v, layout)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this call: {reason}")
    return backend
