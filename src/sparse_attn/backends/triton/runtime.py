"""Facts about the Triton runtime that every kernel launcher in the package shares."""

from __future__ import annotations

import functools
import os

import torch

try:  # Grid dependency control (programmatic dependent launch), Triton 3.3 and newer
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: dependent launch stays off
    gdc_launch_dependents = gdc_wait = None

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


def dependent_launch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched as programmatic dependent launches (a kernel's
    programs start while the one before it in the stream finishes, and wait for it with
    ``gdc_wait`` before touching its results): CUDA devices of compute capability 9.0 and newer,
    with a Triton that has grid dependency control; never in the interpreter."""
    if _INTERPRETING or device.type != "cuda" or gdc_wait is None:
        return False
    return major_capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def dependent_launch_meta(enabled: bool) -> dict:
    """The launch keywords of a kernel with a ``PDL`` constexpr: ``PDL`` and Triton's ``launch_pdl``
    (only when on, so the interpreter never sees the option)."""
    return {"PDL": True, "launch_pdl": True} if enabled else {"PDL": False}
