"""``attention_hook``: run a function in place of a transformers model's attention, for one block.

Calibration and distillation (``sparse-attn profile``, ``sparse-attn train-gates``) watch each
layer's query and key. One attention function is registered with transformers, once, under
:data:`HOOK_NAME`; it calls the hook stored on the module it serves, so no per-call closure stays
registered after the block, and two models can be hooked at once.
"""

from __future__ import annotations

import contextlib
import warnings

HOOK_NAME = "sparse_attn_hook"
_HOOK_ATTR = "_sparse_attn_hook"


def _hooked_attention(module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, _HOOK_ATTR, None)
    if hook is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        warnings.warn(f"{type(module).__name__} runs the {HOOK_NAME!r} attention outside attention_hook(); "
                      "running dense SDPA", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return hook(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HOOK_NAME, _hooked_attention)
    AttentionMaskInterface.register(HOOK_NAME, sdpa_mask)


@contextlib.contextmanager
def attention_hook(model, hook):
    """Within the block, every attention layer of ``model`` (the modules with a ``layer_idx``) runs
    ``hook(module, query, key, value, attention_mask, **kwargs)`` instead of its attention, with the
    arguments and return value of transformers' attention functions (``query (B, H, Sq, D)``, keys
    and values after the cache update; returns ``(out (B, Sq, H, D), weights or None)``) and the
    SDPA causal mask. The model's attention implementation is restored on exit."""
    _register()
    layers = [m for m in model.modules() if hasattr(m, "layer_idx")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention module with a layer_idx to hook")
    if any(hasattr(module, _HOOK_ATTR) for module in layers):
        raise RuntimeError(f"{type(model).__name__} is already inside an attention_hook block; hooks do not nest")
    before = model.config._attn_implementation
    for module in layers:
        setattr(module, _HOOK_ATTR, hook)
    try:
        model.set_attn_implementation(HOOK_NAME)
        yield model
    finally:
        model.set_attn_implementation(before)
        for module in layers:
            if getattr(module, _HOOK_ATTR, None) is hook:
                delattr(module, _HOOK_ATTR)
