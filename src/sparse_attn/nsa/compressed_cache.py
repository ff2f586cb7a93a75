"""CompressedKVCache: NSA's compressed keys and values of one layer, kept beside a KV cache.

NSA's compressed branch reads ``(S - l) // d + 1`` compressed keys and values, each the compression
MLP applied to ``l`` cached tokens. Recomputing them at every decode step costs ``S / d`` MLP
evaluations per KV head and step; a new block completes only every ``d`` tokens. The cache keeps the
compressed blocks and, at each update, compresses only the blocks completed since the last one.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .config import NSAConfig
from .reference import compress_kv, compressed_blocks

__all__ = ["CompressedKVCache"]


class CompressedKVCache:
    """The compressed keys and values of one NSA layer over a KV cache that grows by appending tokens.

    ``update(k, v, params)`` takes the whole cache ``k, v (B, Hkv, S, D)`` after new tokens were
    appended and returns ``(kc, vc)``, each ``(B, Hkv, Nc, D)`` with ``Nc = (S - l) // d + 1`` (what
    :func:`~sparse_attn.nsa.reference.compress_kv` returns), compressing only the blocks that are new.
    Pass them to :class:`~sparse_attn.nsa.NSAAttention` as ``compressed_kv=(kc, vc)``.

    The kept blocks are used again while the call's shape, dtype and device match, ``S`` has not
    shrunk, and the parameters are the same tensors, unchanged in place (their version counters); any
    other change starts over from the whole cache. The cache cannot see tokens rewritten in place or
    rows reordered (beam search): call :meth:`reset` after either. ``sparse_attn.nsa.convert_llama``'s
    layers keep one per transformers cache and do this themselves. Values are computed in the inputs'
    dtype under the caller's grad mode (decode under ``torch.no_grad()``: kept blocks hold no graph).
    """

    def __init__(self, config: NSAConfig) -> None:
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the kept blocks: the next update compresses the whole cache."""
        self.kc: Optional[Tensor] = None
        self.vc: Optional[Tensor] = None
        self._signature = None

    @property
    def num_blocks(self) -> int:
        """Compressed blocks kept."""
        return 0 if self.kc is None else self.kc.shape[2]

    def _signature_of(self, k: Tensor, params: Mapping[str, Tensor]) -> tuple:
        return (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device,
                tuple((name, id(p), p._version) for name, p in sorted(params.items())))

    def update(self, k: Tensor, v: Tensor, params: Mapping[str, Tensor]) -> tuple:
        """``(kc, vc)`` of every complete compressed block of ``k, v (B, Hkv, S, D)``; ``params``: the
        layer's NSA parameters by name (:meth:`~sparse_attn.nsa.NSAAttention.nsa_params`)."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, KV heads, seq, head_dim), got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        seq, config = k.shape[2], self.config
        total = compressed_blocks(seq, config)
        signature = self._signature_of(k, params)
        if signature != self._signature or total < self.num_blocks:
            self.reset()
        self._signature = signature
        kept = self.num_blocks
        if self.kc is None or total > kept:
            cast = {name: p.to(k.dtype) for name, p in params.items()}
            # New blocks kept .. total - 1 read tokens [kept * d, (total - 1) * d + l).
            first, end = kept * config.compress_stride, (total - 1) * config.compress_stride + config.compress_block
            end = max(end, first)
            new_k = compress_kv(k[:, :, first:end], cast, "k", config)
            new_v = compress_kv(v[:, :, first:end], cast, "v", config)
            if self.kc is None:
                self.kc, self.vc = new_k, new_v
            else:
                self.kc, self.vc = torch.cat([self.kc, new_k], 2), torch.cat([self.vc, new_v], 2)
        return self.kc, self.vc
