"""Reading transformers models: load one from a directory (a model saved with NSA or DSA layers comes
back with them) and the shape of its attention."""

from __future__ import annotations


def load_model(path, *, dtype=None, device=None):
    """The causal LM in the directory ``path``, in eval mode (on ``device`` when given): a model
    written by :func:`sparse_attn.nsa.save_nsa_model` with its NSA attention, one written by
    :func:`sparse_attn.dsa.save_dsa_model` with its DSA attention, any other through transformers'
    SDPA attention."""
    from transformers import AutoModelForCausalLM

    from ...dsa.checkpoint import is_dsa_model, load_dsa_model
    from ...nsa.checkpoint import is_nsa_model, load_nsa_model

    if is_nsa_model(path):
        return load_nsa_model(path, dtype=dtype, device=device)
    if is_dsa_model(path):
        return load_dsa_model(path, dtype=dtype, device=device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return (model.to(device) if device is not None else model).eval()


def attention_shape(model) -> tuple:
    """``(heads, kv_heads, head_dim)`` of a transformers model's attention, from its (text) config."""
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
