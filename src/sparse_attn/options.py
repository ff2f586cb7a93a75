"""Kernel options: which kernels a call may run, passed explicitly per call.

Every switch that decides a kernel lives in one frozen, validated :class:`KernelOptions`. Calls take
it as ``kernel_options=`` (like FlexAttention's ``kernel_options``); a call that passes none uses the
process-wide default, which is ``KernelOptions()`` unless changed inside a :func:`kernel_options`
block::

    from sparse_attn import KernelOptions, kernel_options, sparse_attention

    out = sparse_attention(q, k, v, layout, kernel_options=KernelOptions(forward="triton"))
    with kernel_options(forward_tma=False):      # default for every call inside the block
        out = sparse_attention(q, k, v, layout)

Nothing here changes any global state at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

__all__ = ["KernelOptions", "kernel_options", "current_kernel_options", "resolve_kernel_options"]

KERNEL_CHOICES = ("auto", "gluon", "triton")
ESTIMATOR_KERNEL_CHOICES = ("auto", "triton", "torch")
DENSE_CHOICES = ("auto", "sdpa", "cudnn", "flash")
NSA_SELECTED_CHOICES = ("auto", "shared_reads", "per_token")


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels run a call.

    Attributes:
        forward: the forward kernel of the Triton backends: ``"auto"`` (the Hopper Gluon kernel where
            it can run the call, else the Triton one), ``"gluon"`` (required: a call it cannot run
            raises, naming why) or ``"triton"``.
        backward: the same choice for the dQ and dK/dV kernels.
        forward_tma: tile loads through tensor descriptors (TMA) in the Triton forward: ``None`` on
            Hopper and newer GPUs (off in the CPU interpreter), ``True`` wherever possible (the
            interpreter included), ``False`` never.
        backward_tma: the same for the Triton backward kernels.
        fast_launch: launch compiled Triton kernels through their compiled launcher once they are
            compiled (fewer microseconds of host time per launch). If the installed Triton's
            launcher interface is not the expected one, the library warns once and uses Triton's
            own launch path.
        estimator_kernels: the sparsity methods' estimation steps (block mass, line scores, top-p
            selection, pooling): ``"auto"`` (Triton kernels on CUDA tensors, PyTorch elsewhere),
            ``"triton"`` (required on CUDA tensors) or ``"torch"`` (the PyTorch references).
        dense: the SDPA backend of the dense attention the library runs itself (a method's dense
            fallback, a layer or call that stays dense under ``patch``): ``"auto"`` (cuDNN first for
            prefill, more than 16 query rows, on GPUs of compute capability 9.0 and newer, where it
            is the fastest; SDPA's own choice elsewhere and for decode steps), ``"sdpa"`` (SDPA's
            own choice), ``"cudnn"`` or ``"flash"`` (that backend first). A backend that cannot run
            a call passes it to the next: flash, memory-efficient, math
            (:func:`sparse_attn.backends.dense.dense_backend_order`).
        dependent_launch: launch the sparse decode step's kernels (page index append, page scores,
            top-k pages, split attention, merge) as programmatic dependent launches where the GPU
            has them (compute capability 9.0 and newer; never in the CPU interpreter): each kernel's
            programs start while the previous kernel finishes and wait for its results on the
            device, which hides the launch gaps of a step (about 2 us of a 24-26 us step at 128K
            on an H100). On by default; chained steps give the same bits with and without it
            (``tests/decode``, marked ``gpu``, eager and CUDA graphs, on an H100).
        nsa_selected: how NSA's selected branch reads each token's blocks before its own:
            ``"shared_reads"`` (tiles of nearby tokens read the union of their blocks once, each row
            masked to its token's blocks: :mod:`sparse_attn.nsa.shared_reads`), ``"per_token"``
            (every token reads its blocks through the block-sparse kernels, the group's heads as one
            query block) or ``"auto"`` (shared reads where their kernels run, fp16/bf16 on a GPU or
            in the interpreter, head dims 16-128, and nearby tokens share enough blocks that they
            do no more work, :meth:`~sparse_attn.nsa.shared_reads.SharedTiles.pay`; per token
            otherwise).
    """

    forward: str = "auto"
    backward: str = "auto"
    forward_tma: Optional[bool] = None
    backward_tma: Optional[bool] = None
    fast_launch: bool = True
    estimator_kernels: str = "auto"
    dense: str = "auto"
    dependent_launch: bool = True
    nsa_selected: str = "auto"

    def __post_init__(self) -> None:
        for name in ("forward", "backward"):
            value = getattr(self, name)
            if value not in KERNEL_CHOICES:
                raise ValueError(f"KernelOptions.{name} must be one of {KERNEL_CHOICES}, got {value!r}")
        for name in ("forward_tma", "backward_tma"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"KernelOptions.{name} must be None, True or False, got {value!r}")
        for name in ("fast_launch", "dependent_launch"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"KernelOptions.{name} must be True or False, got {value!r}")
        if self.estimator_kernels not in ESTIMATOR_KERNEL_CHOICES:
            raise ValueError(f"KernelOptions.estimator_kernels must be one of {ESTIMATOR_KERNEL_CHOICES}, "
                             f"got {self.estimator_kernels!r}")
        if self.nsa_selected not in NSA_SELECTED_CHOICES:
            raise ValueError(f"KernelOptions.nsa_selected must be one of {NSA_SELECTED_CHOICES}, "
                             f"got {self.nsa_selected!r}")
        if self.dense not in DENSE_CHOICES:
            raise ValueError(f"KernelOptions.dense must be one of {DENSE_CHOICES}, got {self.dense!r}")

    def dependent_launch_on(self, device) -> bool:
        """Whether kernels that support it launch as programmatic dependent launches on ``device``."""
        import torch

        from .backends.triton.runtime import dependent_launch_supported

        return self.dependent_launch and dependent_launch_supported(torch.device(device))

    def replace(self, **changes) -> "KernelOptions":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


_DEFAULT: contextvars.ContextVar = contextvars.ContextVar("sparse_attn_kernel_options", default=KernelOptions())


def current_kernel_options() -> KernelOptions:
    """The options a call without ``kernel_options=`` uses here (see :func:`kernel_options`)."""
    return _DEFAULT.get()


def resolve_kernel_options(options: Optional[KernelOptions]) -> KernelOptions:
    """``options`` if given (checked to be a :class:`KernelOptions`), else the current default."""
    if options is None:
        return _DEFAULT.get()
    if not isinstance(options, KernelOptions):
        raise TypeError(f"kernel_options must be a KernelOptions, got {type(options).__name__}")
    return options


@contextlib.contextmanager
def kernel_options(options: Optional[KernelOptions] = None, **changes) -> Iterator[KernelOptions]:
    """Within the block, calls without ``kernel_options=`` use ``options`` (or the current default
    with ``changes`` applied). The previous default is restored on exit; each thread and asyncio
    task sees its own default."""
    base = resolve_kernel_options(options)
    chosen = base.replace(**changes) if changes else base
    token = _DEFAULT.set(chosen)
    try:
        yield chosen
    finally:
        _DEFAULT.reset(token)
