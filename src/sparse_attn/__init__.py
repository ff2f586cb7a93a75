"""sparse_attn: block-sparse attention for long contexts, one layout for every method and backend."""

from .attention import sparse_attention, sparse_attention_varlen, which_backend
from .layout import BlockSparseLayout, KVMajorLayout, LayoutError
from .methods import CostModel, Method, attend, get_method
from .metrics import attention_recall, output_relative_error
from .options import KernelOptions, kernel_options
from .patterns import (
    dense_layout,
    layout_from_mask_mod,
    neighborhood_layout,
    power_layout,
    random_layout,
    sliding_window_layout,
    strided_layout,
)

__version__ = "0.1.0"


def patch(model, method=None, config=None, *, profile=None, **knobs):
    """Make a transformers model's prefill sparse (see :mod:`sparse_attn.integrations.hf`);
    ``profile="profile.json"`` applies the config a ``sparse-attn profile`` run chose."""
    from .integrations.hf import patch as _patch

    return _patch(model, method=method, config=config, profile=profile, **knobs)


def unpatch(model):
    """Undo :func:`patch`."""
    from .integrations.hf import unpatch as _unpatch

    return _unpatch(model)


def warmup(model, lengths, *, batch_size=1, decode_steps=None, seed=0):
    """Compile a patched model's kernels before serving (see
    :func:`sparse_attn.integrations.hf.warmup`)."""
    from .integrations.hf import warmup as _warmup

    return _warmup(model, lengths, batch_size=batch_size, decode_steps=decode_steps, seed=seed)


__all__ = [
    "patch", "unpatch", "warmup", "get_method", "Method", "attend", "CostModel", "attention_recall",
    "output_relative_error",
    "sparse_attention", "sparse_attention_varlen", "which_backend", "KernelOptions", "kernel_options",
    "BlockSparseLayout", "KVMajorLayout", "LayoutError",
    "dense_layout", "sliding_window_layout", "strided_layout", "power_layout", "neighborhood_layout", "random_layout",
    "layout_from_mask_mod",
]
