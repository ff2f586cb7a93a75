"""Facts about the Triton runtime that every kernel launcher in the package shares."""

from __future__ import annotations

import functools
import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated (at import), so it is read once here too.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), what ``triton.next_power_of_2`` gives, for host
    code: Triton's is a constexpr function whose every call costs about 2 us of Python."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``triton.cdiv`` for host code (see :func:`next_power_of_2`)."""
    return -(-a // b)


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


def fp32_dot_operands(dtype: torch.dtype) -> bool:
    """Whether kernels should feed ``tl.dot`` fp32 operands: only bf16 in the CPU interpreter,
    whose bf16 dots are wrong (seen with triton 3.9)."""
    return _INTERPRETING and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def major_capability(index) -> int:
    """Compute capability major of a CUDA device (cached: asked on every call)."""
    return torch.cuda.get_device_capability(index)[0]


def on_hopper() -> bool:
    """Whether the current CUDA device is a Hopper GPU (compute capability 9.x)."""
    return torch.cuda.is_available() and major_capability(torch.cuda.current_device()) == 9
