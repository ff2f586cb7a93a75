"""Backend registry: each backend says whether it can run a call (and why not) and runs it.

``auto`` walks :data:`AUTO_ORDER` and takes the first backend whose automatic check returns no
reason; :func:`explain_choice` reports the backend, the kernels its forward and backward run, and
every skipped backend with its reason (NATTEN-style). Naming a backend that cannot run raises with
that reason. Padded ``(B, H, S, D)`` calls and packed variable-length ``(T, H, D)`` calls go through
the same registry (``can_run`` / ``forward`` and ``can_run_varlen`` / ``varlen_forward``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..options import KernelOptions
from .flex import flex_attention_forward, flex_available
from .reference import reference_attention, sequence_loop_varlen
from .triton import (backward_kernel, gluon_can_run, run_gluon, run_gluon_varlen, triton_can_run,
                     triton_can_run_fast, run_triton, run_triton_varlen)

# (q, k, v, layout, options, num_seqs) -> None when it can run, else why not; num_seqs is None for
# padded calls and the number of sequences for packed ones.
CanRun = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Backend:
    """A backend: its checks and entry points.

    ``forward(q, k, v, layout, scale, options) -> (out, lse)``; ``varlen_forward(q, k, v, cu_q, cu_k,
    layout, scale, options) -> (out (T, H, D), lse (H, T))``. ``auto_check`` is the check ``auto``
    uses (stricter than ``can_run`` where a backend runs but slowly, e.g. in the CPU interpreter).
    ``backward`` names what differentiates the call: a kernel family, or "autograd".
    """

    name: str
    can_run: CanRun
    forward: Callable[..., tuple]
    varlen_forward: Callable[..., tuple]
    auto_check: Optional[CanRun] = None
    can_run_varlen: Optional[CanRun] = None  # packed calls, when they differ from ``can_run``
    backward: str = "autograd"


@dataclass(frozen=True)
class BackendChoice:
    """What a call runs: the backend, the kernel of its forward and of its backward, and why each
    faster option was skipped (``skipped``: ``(backend, reason)`` for backends ``auto`` passed over;
    ``backward_reason``: why the backward is not the Gluon one, where that applies)."""

    backend: str
    forward_kernel: str
    backward_kernel: str
    skipped: tuple = ()
    backward_reason: Optional[str] = None


def _always(q, k, v, layout, options=None, num_seqs=None):
    return None


def _capture_reason(q) -> Optional[str]:
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return "reads cu_seqlens on the host, which a CUDA-graph capture forbids"
    return None


def _reference_can_run_varlen(q, k, v, layout, options=None, num_seqs=None):
    return _capture_reason(q)


def _flex_can_run(q, k, v, layout, options=None, num_seqs=None):
    ok, why = flex_available()
    if not ok:
        return why
    if q.dtype == torch.float64 and q.is_cuda:
        return "Flex on CUDA does not compile float64"
    if q.is_cuda and min(q.shape[-1], v.shape[-1]) < 16:  # inductor: "NYI: embedding dimension ... at least 16"
        return f"Flex on CUDA compiles head dims of 16 or more only (q: {q.shape[-1]}, v: {v.shape[-1]})"
    if q.is_cuda and q.dtype == torch.float32 and (layout.q_block % 64 or layout.kv_block % 64):
        # inductor: "Q and KV block size must be divisible by BLOCK_M and BLOCK_N" (float32 tiles: 64 x 64)
        return (f"compiled Flex runs float32 in 64 x 64 tiles: blocks {layout.q_block}x{layout.kv_block} must be "
                "multiples of 64")
    return _capture_reason(q) if num_seqs is not None else None


def _flex_can_run_fast(q, k, v, layout, options=None, num_seqs=None):
    reason = _flex_can_run(q, k, v, layout, options, num_seqs)
    if reason is None and not q.is_cuda:
        return "Flex runs eagerly on CPU and materializes the full score matrix"
    return reason


def _reference_forward(q, k, v, layout, scale, options):
    return reference_attention(q, k, v, layout, scale)


def _flex_forward(q, k, v, layout, scale, options):
    return flex_attention_forward(q, k, v, layout, scale)


def _reference_varlen(q, k, v, cu_q, cu_k, layout, scale, options):
    return sequence_loop_varlen(reference_attention, q, k, v, cu_q, cu_k, layout, scale)


def _flex_varlen(q, k, v, cu_q, cu_k, layout, scale, options):
    return sequence_loop_varlen(flex_attention_forward, q, k, v, cu_q, cu_k, layout, scale)


BACKENDS: dict = {
    "reference": Backend("reference", _always, _reference_forward, _reference_varlen,
                         can_run_varlen=_reference_can_run_varlen),
    "flex": Backend("flex", _flex_can_run, _flex_forward, _flex_varlen, auto_check=_flex_can_run_fast),
    "gluon": Backend("gluon", gluon_can_run, run_gluon, run_gluon_varlen, backward="kernels"),
    "triton": Backend("triton", triton_can_run, run_triton, run_triton_varlen,
                      auto_check=triton_can_run_fast, backward="kernels"),
}

# Backends ``auto`` may choose, fastest first.
AUTO_ORDER: list = ["gluon", "triton", "flex", "reference"]


def register_backend(backend: Backend, auto_position: Optional[int] = None) -> None:
    """Add a backend; with ``auto_position`` it also joins the automatic choice at that rank."""
    BACKENDS[backend.name] = backend
    if auto_position is not None:
        AUTO_ORDER[:] = [name for name in AUTO_ORDER if name != backend.name]
        AUTO_ORDER.insert(auto_position, backend.name)


def _check(backend: Backend, q, k, v, layout, options, num_seqs, auto: bool) -> Optional[str]:
    if num_seqs is not None and backend.can_run_varlen is not None:
        return backend.can_run_varlen(q, k, v, layout, options, num_seqs)
    check = (backend.auto_check or backend.can_run) if auto else backend.can_run
    return check(q, k, v, layout, options, num_seqs)


def select_backend(name: str, q, k, v, layout, options: KernelOptions, num_seqs=None) -> tuple:
    """``(backend, skipped)``: the backend a call runs (``name`` or, for "auto", the first of
    AUTO_ORDER that can run it) and ``[(backend, reason)]`` for those ``auto`` passed over. Padded
    calls have ``num_seqs=None``; packed ones pass their number of sequences."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is unknown; choose one of {['auto', *BACKENDS]}")
        backend = BACKENDS[name]
        reason = _check(backend, q, k, v, layout, options, num_seqs, auto=False)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this call: {reason}")
        return backend, []
    skipped = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        reason = _check(backend, q, k, v, layout, options, num_seqs, auto=True)
        if reason is None:
            if options.forward == "gluon" and candidate != "gluon":
                raise ValueError(f"KernelOptions.forward='gluon' but the Gluon forward cannot run this call: "
                                 f"{dict(skipped).get('gluon')}")
            return backend, skipped
        skipped.append((candidate, reason))
    raise ValueError(f"no backend can run this call: {skipped}")


def explain_choice(q, k, v, layout, options: KernelOptions, name: str = "auto") -> BackendChoice:
    """The :class:`BackendChoice` of a padded call under ``backend=name``."""
    backend, skipped = select_backend(name, q, k, v, layout, options)
    if backend.backward == "kernels":
        backward, reason = backward_kernel(q, k, v, layout, options)
    else:
        backward, reason = backend.backward, None
    return BackendChoice(backend.name, backend.name, backward, tuple(skipped), reason)


__all__ = ["Backend", "BackendChoice", "BACKENDS", "AUTO_ORDER", "register_backend", "select_backend",
           "explain_choice"]
