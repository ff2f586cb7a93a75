"""Which implementation of an estimation primitive runs a call: the Triton kernel or the reference."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ...backends.triton import runtime
from ...options import KernelOptions, resolve_kernel_options


def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: Tensor, kernel_options: Optional[KernelOptions], supported: bool = True) -> bool:
    """Whether a primitive runs its Triton kernels on ``t``, per ``estimator_kernels`` of
    ``kernel_options`` (None: the current default, see :func:`sparse_attn.options.kernel_options`);
    never where the kernels do not handle the call's shapes (``supported=False``: the wrapper runs
    the reference):

    * ``"auto"``: on CUDA tensors when Triton is installed (benchmarks/bench_estimators.py on an
      H100: the same blocks as the references, XAttention's estimate 5x and the oracle's 25x
      faster); the PyTorch reference elsewhere (the CPU interpreter is exact but slow).
    * ``"triton"``: always; a CPU tensor needs the interpreter (``TRITON_INTERPRET=1``), else this
      raises ``ValueError``.
    * ``"torch"``: never.
    """
    choice = resolve_kernel_options(kernel_options).estimator_kernels
    if choice == "torch" or not supported:
        return False
    if choice == "auto":
        return t.is_cuda and triton_installed()
    if not t.is_cuda and not runtime.interpreting():
        raise ValueError("estimator_kernels='triton' on a CPU tensor needs TRITON_INTERPRET=1 (Triton's CPU "
                         "interpreter)")
    return True
