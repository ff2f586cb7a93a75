"""Replace a transformers Llama-family model's attention layers by NSA (:func:`convert_llama`)."""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch import nn

from ..converted_checkpoint import replace_attention
from ..kv_cache_state import CacheFollower, append_to_cache, cache_layer_keys, check_causal_mask, rotary_qkv
from ..options import KernelOptions
from .compressed_cache import CompressedKVCache
from .config import NSAConfig
from .module import NSAAttention

__all__ = ["convert_llama", "NSALlamaAttention", "nsa_parameters"]

DEFAULT_GATE_BIAS = (-4.0, 4.0, -4.0)


def _check_packed_mask(mask, cu_seqlens) -> None:
    """ValueError unless ``mask`` (transformers' mask for a packed row, or None) is causal within each
    packed sequence, or plain causal over the row (transformers versions that do not split packed
    rows): anything else (padding) NSA would not apply."""
    if mask is None:
        return
    allowed = (mask if mask.dtype == torch.bool else mask == 0)
    seq = int(cu_seqlens[-1])
    pos = torch.arange(seq, device=mask.device)
    causal = pos[None, :] <= pos[:, None]
    segment = torch.searchsorted(cu_seqlens.to(mask.device), pos, right=True)
    within = causal & (segment[None, :] == segment[:, None])
    if allowed.shape[-2:] != (seq, seq) or not (bool((allowed == within).all()) or bool((allowed == causal).all())):
        raise ValueError("NSALlamaAttention: the attention mask of a packed row is neither causal within its "
                         "sequences nor plain causal (padding?); pass packed rows without padding")


class _KeptCompression:
    """A layer's :class:`CompressedKVCache` for one transformers cache, and whether that cache only
    grew since (:class:`~sparse_attn.kv_cache_state.CacheFollower`): a cache whose tensors were
    replaced (beam search reorders rows, a crop) or changed in place gets a fresh compression."""

    def __init__(self, config: NSAConfig) -> None:
        self.store = CompressedKVCache(config)
        self.follower = CacheFollower()


def _packed_offsets(position_ids, q_shape, kv_len: int):
    """``cu_seqlens`` of sequences packed in one row (transformers' ``DataCollatorWithFlattening``:
    ``position_ids`` restart at 0 for each sequence), or None for an ordinary batch."""
    if position_ids is None or q_shape[0] != 1 or q_shape[2] != kv_len or position_ids.shape[-1] != kv_len:
        return None
    positions = position_ids.reshape(-1)
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    end = torch.tensor([kv_len], device=starts.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


class NSALlamaAttention(nn.Module):
    """A Llama attention layer whose attention is NSA: the dense layer's ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj`` (the same modules) and rotary embedding around an :class:`NSAAttention`
    (``.nsa``). Causal attention over unpadded sequences: training, prefill and decoding with a KV
    cache (``generate()``); sequences packed in one row with ``position_ids`` restarting at 0 for each
    (transformers' ``DataCollatorWithFlattening``) attend each within itself; a padding mask raises.

    Without gradients (``generate()``), the compressed keys and values are kept per transformers cache
    (:class:`CompressedKVCache`): a decode step compresses only the blocks completed since the last
    step instead of the whole cache."""

    attends_itself = True  # attention is this module's own, not a transformers attention function

    def __init__(self, dense: nn.Module, config: NSAConfig, *, backend: str = "auto",
                 kernel_options: Optional[KernelOptions] = None, gate_bias=DEFAULT_GATE_BIAS) -> None:
        super().__init__()
        model_config = dense.config
        self.config, self.layer_idx = model_config, getattr(dense, "layer_idx", None)
        self.head_dim, self.scaling = dense.head_dim, dense.scaling
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = model_config.num_key_value_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dense.q_proj, dense.k_proj, dense.v_proj, dense.o_proj
        weight = dense.q_proj.weight
        self.nsa = NSAAttention(config, self.num_heads, self.num_kv_heads, self.head_dim,
                                gate_bias=gate_bias).to(device=weight.device, dtype=weight.dtype)
        self.backend, self.kernel_options = backend, kernel_options
        self._kept = weakref.WeakKeyDictionary()  # transformers cache -> _KeptCompression

    def _compressed_kv(self, cache, keys_before, k, v):
        """``(kc, vc)`` of the cache's ``k, v`` after this step's append, from the kept compression when
        the cache only grew since the last step (``keys_before``: its key tensor before the append)."""
        kept = self._kept.get(cache)
        if kept is None or not kept.follower.follows(keys_before):
            kept = self._kept[cache] = _KeptCompression(self.nsa.config)
        compressed = kept.store.update(k, v, self.nsa.nsa_params())
        kept.follower.saw(cache_layer_keys(cache, self.layer_idx))
        return compressed

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        input_shape = hidden_states.shape[:-1]
        q, k, v = rotary_qkv(self, hidden_states, position_embeddings)
        if cache is not None:
            k, v, keys_before = append_to_cache(cache, self.layer_idx, k, v, "NSALlamaAttention")
        call = dict(scale=self.scaling, backend=self.backend, kernel_options=self.kernel_options)
        cu_seqlens = _packed_offsets(kwargs.get("position_ids"), q.shape, k.shape[2])
        if cu_seqlens is not None:  # sequences packed in one row, each from position 0 (no cache)
            _check_packed_mask(attention_mask, cu_seqlens)
            out = self.nsa.forward_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                          cu_seqlens, **call)
            out = out[None]
        else:
            check_causal_mask(attention_mask, q.shape[2], k.shape[2], "NSALlamaAttention")
            compressed = None
            if cache is not None and not torch.is_grad_enabled():
                compressed = self._compressed_kv(cache, keys_before, k, v)
            out = self.nsa(q, k, v, compressed_kv=compressed, **call).transpose(1, 2)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


def convert_llama(model: nn.Module, config: NSAConfig, *, layers: Optional[Iterable[int]] = None,
                  backend: str = "auto", kernel_options: Optional[KernelOptions] = None,
                  gate_bias=DEFAULT_GATE_BIAS) -> nn.Module:
    """Replace the attention of a transformers Llama-family model's decoder layers (``layers``: their
    indices, default all) by :class:`NSALlamaAttention`, in place; returns ``model``.

    The dense q/k/v/o projections are kept (the same modules). The new parameters start as in
    :meth:`NSAAttention.reset_parameters`: compression is mean pooling and the gates are
    ``sigmoid(gate_bias)`` per branch (compressed, selected, window), by default about 0.02, 0.98 and
    0.02, so a sequence whose blocks all fit the selection starts within a few percent of the dense
    attention. ``backend`` and ``kernel_options`` go to the attention calls. The model attends
    unpadded sequences (no padding mask), and decodes with a KV cache (``generate()``)."""
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    return replace_attention(model, layers, NSALlamaAttention,
                             lambda dense: NSALlamaAttention(dense, config, backend=backend,
                                                             kernel_options=kernel_options, gate_bias=gate_bias))


def nsa_parameters(model: nn.Module) -> list:
    """The parameters :func:`convert_llama` added (every ``NSAAttention``'s), e.g. for their own
    learning rate."""
    return [p for m in model.modules() if isinstance(m, NSAAttention) for p in m.parameters()]
