"""Helpers for attention modules that replace a transformers layer's attention and keep their own
state beside its KV cache (NSA's compressed keys, DSA's indexer keys).

* :func:`rotary_qkv`: a Llama-family layer's queries, keys and values with RoPE;
* :func:`check_causal_mask` and :func:`check_growing_cache`: the inputs such a module accepts;
* :func:`append_to_cache`: the step's keys and values appended to the cache;
* :func:`cache_layer_keys`: the key tensor a transformers cache holds for a layer;
* :class:`CacheFollower`: whether that tensor is still the one seen after the last step (a cache
  that only grew since), or was replaced (beam search reorders rows; a crop) or changed in place.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["rotary_qkv", "check_causal_mask", "check_growing_cache", "append_to_cache", "cache_layer_keys",
           "CacheFollower"]


def rotary_qkv(layer, hidden_states, position_embeddings):
    """``q (B, H, S, D)``, ``k, v (B, Hkv, S, D)`` from a Llama-family attention layer's ``q_proj``,
    ``k_proj``, ``v_proj`` (and ``head_dim``), RoPE applied with ``position_embeddings = (cos, sin)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden_shape = (*hidden_states.shape[:-1], -1, layer.head_dim)
    q = layer.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = layer.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = layer.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def append_to_cache(cache, layer_idx: int, k, v, owner: str):
    """``(k, v, keys_before)``: the whole cached keys and values after appending this step's ``k, v``
    to transformers' ``cache`` (checked by :func:`check_growing_cache`), and the layer's key tensor
    the cache held before (for :class:`CacheFollower`)."""
    check_growing_cache(cache, owner)
    keys_before = cache_layer_keys(cache, layer_idx)
    k, v = cache.update(k, v, layer_idx)
    return k, v, keys_before


def check_causal_mask(mask, q_len: int, kv_len: int, owner: str) -> None:
    """ValueError unless ``mask`` (transformers' attention mask for the layer, or None) is plain causal
    for queries that are the last ``q_len`` of ``kv_len`` positions (``owner`` names the module)."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0
    positions = torch.arange(kv_len - q_len, kv_len, device=mask.device)[:, None]
    causal = torch.arange(kv_len, device=mask.device)[None, :] <= positions
    if allowed.shape[-2:] != (q_len, kv_len) or not bool((allowed == causal).all()):
        raise ValueError(f"{owner} attends unpadded sequences with a causal mask only; got an attention mask with "
                         f"padding (pass equal-length sequences without attention_mask)")


def check_growing_cache(cache, owner: str) -> None:
    """ValueError unless ``cache`` grows with the sequence (transformers' DynamicCache, the default of
    ``generate()``): a preallocated cache (StaticCache) hands attention its unused slots too."""
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise ValueError(f"{owner} decodes with a DynamicCache (transformers' default); got "
                         f"{type(cache).__name__}, whose unused slots it would attend to")


def cache_layer_keys(cache, layer_idx):
    """The key tensor transformers' cache holds for ``layer_idx`` (None if it has none yet, or keeps
    its layers otherwise)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layer_idx, int) or layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    return keys if isinstance(keys, torch.Tensor) else None


class CacheFollower:
    """Remembers (weakly) the key tensor a cache held for a layer after a step, and its in-place
    version: :meth:`follows` tells whether the cache still holds exactly that tensor before the next
    step, i.e. nothing replaced it (transformers' DynamicCache replaces the tensor when it reorders
    rows for beam search, crops or appends) or changed it in place since."""

    def __init__(self) -> None:
        self._seen, self._pointer, self._version = None, None, None

    def follows(self, keys) -> bool:
        return keys is not None and self._seen is not None and self._seen() is keys and keys._version == self._version

    def follows_or_cropped(self, keys) -> bool:
        """:meth:`follows`, or ``keys`` is a view of the seen tensor's rows from their start, unchanged
        (a crop: assisted decoding drops rejected candidates' positions, the earlier ones stay)."""
        return self.follows(keys) or (keys is not None and self._seen is not None
                                      and keys.data_ptr() == self._pointer and keys._version == self._version)

    def saw(self, keys) -> None:
        self._seen = None if keys is None else weakref.ref(keys)
        self._pointer = None if keys is None else keys.data_ptr()
        self._version = None if keys is None else keys._version
