"""DeepSeek Sparse Attention in a transformers Llama-family model (:func:`convert_llama`).

Each converted layer keeps its dense q/k/v/o projections and rotary embedding and gains a
:class:`~.indexer.LightningIndexer` reading the layer's input hidden states. Two stages, as
DeepSeek-V3.2-Exp trains them:

* ``"dense"`` (warm-up): attention stays dense; in training the indexer learns to match the dense
  attention (:func:`~.indexer.indexer_kl_loss` over every causal key).
* ``"sparse"``: each query token attends its ``top_k`` keys by indexer score
  (:func:`~.attention.token_sparse_attention`); in training the indexer keeps learning on the
  selected keys only.

The indexer reads the hidden states detached, so its loss trains only the indexer and the language
loss only the rest; after a training forward each layer's loss is in ``layer.indexer_loss``
(:func:`indexer_loss` sums them). Decoding (``generate()``, a DynamicCache) keeps each layer's
indexer keys beside the cache, one new key per token.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..backends.dense import dense_causal_attention
from ..converted_checkpoint import replace_attention
from ..kv_cache_state import CacheFollower, append_to_cache, cache_layer_keys, check_causal_mask, rotary_qkv
from .attention import BACKENDS, token_sparse_attention
from .indexer import DSAConfig, LightningIndexer, indexer_kl_loss, select_tokens

__all__ = ["DSALlamaAttention", "convert_llama", "set_stage", "indexer_parameters", "indexer_loss", "STAGES"]

STAGES = ("dense", "sparse")


class _KeptIndexKeys:
    """A layer's indexer keys for one transformers cache (``(B, S, d_I)``), and whether the cache
    only grew since the last step."""

    def __init__(self) -> None:
        self.keys: Optional[Tensor] = None
        self.follower = CacheFollower()


class DSALlamaAttention(nn.Module):
    """A Llama attention layer with DeepSeek Sparse Attention: the dense layer's ``q_proj``,
    ``k_proj``, ``v_proj``, ``o_proj`` (the same modules) and rotary embedding, plus ``.indexer``
    (a :class:`LightningIndexer`). ``stage``: ``"dense"`` or ``"sparse"`` (see the module
    docstring). Causal attention over unpadded sequences: training, prefill, and decoding with a
    DynamicCache (greedy or sampled; beam search, which reorders the cache, raises)."""

    attends_itself = True  # attention is this module's own, not a transformers attention function

    def __init__(self, dense: nn.Module, config: DSAConfig, *, stage: str = "sparse", backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, DSAConfig):
            raise TypeError(f"config must be a DSAConfig, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        model_config = dense.config
        if config.rope_dim > dense.head_dim:
            raise ValueError(f"DSAConfig.rope_dim ({config.rope_dim}) must be at most the model's head_dim "
                             f"({dense.head_dim}): the indexer uses the model's rotary tables")
        self.config, self.dsa_config = model_config, config
        self.layer_idx = getattr(dense, "layer_idx", None)
        self.head_dim, self.scaling = dense.head_dim, dense.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = dense.q_proj, dense.k_proj, dense.v_proj, dense.o_proj
        weight = dense.q_proj.weight
        self.indexer = LightningIndexer(model_config.hidden_size, config).to(device=weight.device, dtype=weight.dtype)
        self.backend = backend
        self.stage = stage
        self.indexer_loss: Optional[Tensor] = None
        self._kept = weakref.WeakKeyDictionary()  # transformers cache -> _KeptIndexKeys

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        if value not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {value!r}")
        self._stage = value

    def _index_keys(self, cache, keys_before, new_keys: Tensor, kv_len: int) -> Tensor:
        """The indexer keys of the whole cache after this step's append (``new_keys``: this step's)."""
        if cache is None:
            return new_keys
        kept = self._kept.get(cache)
        if kept is None or not kept.follower.follows(keys_before):
            if new_keys.shape[1] != kv_len:
                raise ValueError("DSALlamaAttention: the KV cache was reordered or changed since the last step "
                                 "(beam search?); its indexer keys follow a cache that only grows: decode greedily "
                                 "or by sampling")
            kept = self._kept[cache] = _KeptIndexKeys()
            kept.keys = new_keys
        else:
            kept.keys = torch.cat([kept.keys, new_keys], 1)
        kept.follower.saw(cache_layer_keys(cache, self.layer_idx))
        if kept.keys.shape[1] != kv_len:
            raise ValueError(f"DSALlamaAttention: {kept.keys.shape[1]} indexer keys for a {kv_len}-token cache")
        return kept.keys

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        input_shape = hidden_states.shape[:-1]
        q, k, v = rotary_qkv(self, hidden_states, position_embeddings)
        keys_before = None
        if cache is not None:
            k, v, keys_before = append_to_cache(cache, self.layer_idx, k, v, "DSALlamaAttention")
        kv_len = k.shape[2]
        check_causal_mask(attention_mask, q.shape[2], kv_len, "DSALlamaAttention")
        learn = self.training and torch.is_grad_enabled()
        self.indexer_loss = None
        if learn or self.stage == "sparse":
            source, (cos, sin) = hidden_states.detach(), position_embeddings
            q_index, weights = self.indexer.queries(source, cos, sin)
            k_index = self._index_keys(cache, keys_before, self.indexer.keys(source, cos, sin), kv_len)
        indices = None
        if self.stage == "sparse" and self.dsa_config.top_k < kv_len:
            indices = select_tokens(q_index, weights, k_index, self.dsa_config.top_k)
            out = token_sparse_attention(q, k, v, indices, scale=self.scaling, backend=self.backend,
                                         check_values=False)
        else:  # dense, or a budget that covers every key
            out = dense_causal_attention(q, k, v, self.scaling)
        if learn:
            self.indexer_loss = indexer_kl_loss(q_index, weights, k_index, q.detach(), k.detach(),
                                                scale=self.scaling, indices=indices)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


def convert_llama(model: nn.Module, config: DSAConfig, *, layers: Optional[Iterable[int]] = None,
                  stage: str = "dense", backend: str = "auto") -> nn.Module:
    """Give a transformers Llama-family model's decoder layers (``layers``: their indices, default
    all) DeepSeek Sparse Attention (:class:`DSALlamaAttention`), in place; returns ``model``. The
    new indexers start untrained, so the default ``stage`` is ``"dense"`` (the warm-up: train the
    indexers, then :func:`set_stage` ``"sparse"``). The dense projections stay the same modules."""
    if not isinstance(config, DSAConfig):
        raise TypeError(f"config must be a DSAConfig, got {type(config).__name__}")
    return replace_attention(model, layers, DSALlamaAttention,
                             lambda dense: DSALlamaAttention(dense, config, stage=stage, backend=backend))


def _dsa_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, DSALlamaAttention)]


def set_stage(model: nn.Module, stage: str) -> nn.Module:
    """Set every DSA layer's stage (``"dense"`` or ``"sparse"``); returns ``model``."""
    layers = _dsa_layers(model)
    if not layers:
        raise ValueError("model has no DSA layers (convert it with sparse_attn.dsa.convert_llama)")
    for layer in layers:
        layer.stage = stage
    return model


def indexer_parameters(model: nn.Module) -> list:
    """The indexers' parameters (what the indexer loss trains)."""
    return [p for layer in _dsa_layers(model) for p in layer.indexer.parameters()]


def indexer_loss(model: nn.Module) -> Optional[Tensor]:
    """The sum of the DSA layers' indexer losses from the last training forward (None if none)."""
    losses = [layer.indexer_loss for layer in _dsa_layers(model) if layer.indexer_loss is not None]
    return torch.stack(losses).sum() if losses else None
