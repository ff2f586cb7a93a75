"""DeepSeek Sparse Attention's lightning indexer: a few small heads score every earlier key token per
query token, and each query token keeps its ``top_k`` best keys.

``I[t, s] = sum_j w[t, j] * relu(q_I[t, j] . k_I[s])`` with ``H_I`` indexer query heads
``q_I[t, j]`` and one indexer key ``k_I[s]`` per token, both of width ``d_I`` with RoPE on their first
``rope_dim`` dims (DeepSeek-V3.2-Exp's indexer: ``k_I`` layer-normed, ``w`` scaled by
``H_I^-1/2 * d_I^-1/2``). Scores and selection run ``chunk_rows`` query rows at a time, never an
``S x S`` tensor; the distillation loss (:func:`indexer_kl_loss`) compares ``softmax(I[t])`` with the
main attention's distribution summed over heads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends.reference import masked_softmax
from ..ranking import top_k_ties_to_earlier

__all__ = ["DSAConfig", "LightningIndexer", "index_scores", "select_tokens", "indexer_kl_loss", "attention_target"]

# Bytes of the intermediates of one chunk of query rows: large on a GPU, where each chunk costs a
# dozen launches and small chunks leave it launch-bound (at 64K tokens, 256 MB would be 450 chunks).
SCORE_CHUNK_BYTES = {"cuda": 2 ** 30, "cpu": 256 * 2 ** 20}


@dataclass(frozen=True)
class DSAConfig:
    """Sizes of the lightning indexer and the token budget (DeepSeek-V3.2-Exp's values in brackets).

    Attributes:
        index_heads: indexer query heads ``H_I`` [64].
        index_head_dim: indexer head width ``d_I`` [128].
        rope_dim: leading dims of ``q_I`` and ``k_I`` that get RoPE [64]; 0: none. Even, at most
            ``index_head_dim``.
        top_k: key tokens each query token attends [2048].
    """

    index_heads: int = 4
    index_head_dim: int = 64
    rope_dim: int = 32
    top_k: int = 2048

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "rope_dim" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"DSAConfig.{f.name} must be an int >= {low}, got {value!r}")
        if self.rope_dim % 2 or self.rope_dim > self.index_head_dim:
            raise ValueError(f"DSAConfig.rope_dim must be even and at most index_head_dim={self.index_head_dim}, "
                             f"got {self.rope_dim}")

    def replace(self, **changes) -> "DSAConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def _rope(x: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], rope_dim: int) -> Tensor:
    """RoPE (rotate-half layout) on the first ``rope_dim`` dims of ``x (B, S, ..., d)`` with the
    lowest ``rope_dim / 2`` frequencies' columns of a model's ``cos, sin (B, S, D)`` (their first
    and second halves repeat the same frequencies, as transformers' rotary embeddings do)."""
    if cos is None or rope_dim == 0:
        return x
    half = cos.shape[-1] // 2
    if rope_dim // 2 > half:
        raise ValueError(f"DSAConfig.rope_dim ({rope_dim}) needs rotary tables of at least {rope_dim} dims, "
                         f"got {cos.shape[-1]}")
    cols = torch.cat([torch.arange(rope_dim // 2), half + torch.arange(rope_dim // 2)]).to(cos.device)
    c, s = cos[..., cols], sin[..., cols]
    while c.dim() < x.dim():
        c, s = c.unsqueeze(-2), s.unsqueeze(-2)
    pe, rest = x[..., :rope_dim], x[..., rope_dim:]
    first, second = pe[..., :rope_dim // 2], pe[..., rope_dim // 2:]
    rotated = torch.cat([-second, first], -1)
    return torch.cat([pe * c.to(x.dtype) + rotated * s.to(x.dtype), rest], -1)


class LightningIndexer(nn.Module):
    """The indexer's projections for one layer, from the layer's input hidden states.

    Args:
        hidden_size: the width of the hidden states it reads.
        config: a :class:`DSAConfig`.

    ``queries(hidden, cos, sin)`` -> ``(q_I (B, S, H_I, d_I), w (B, S, H_I))`` and ``keys(hidden,
    cos, sin)`` -> ``k_I (B, S, d_I)``; ``cos, sin``: the model's rotary tables for these positions
    (``(B, S, D)``), or None for no RoPE.
    """

    def __init__(self, hidden_size: int, config: DSAConfig) -> None:
        super().__init__()
        if not isinstance(config, DSAConfig):
            raise TypeError(f"config must be a DSAConfig, got {type(config).__name__}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.config = config
        heads, dim = config.index_heads, config.index_head_dim
        self.wq = nn.Linear(hidden_size, heads * dim, bias=False)
        self.wk = nn.Linear(hidden_size, dim, bias=False)
        self.k_norm = nn.LayerNorm(dim)
        self.weights_proj = nn.Linear(hidden_size, heads, bias=False)

    def queries(self, hidden: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None):
        config = self.config
        q = self.wq(hidden).unflatten(-1, (config.index_heads, config.index_head_dim))
        w = self.weights_proj(hidden) * (config.index_heads ** -0.5 * config.index_head_dim ** -0.5)
        return _rope(q, cos, sin, config.rope_dim), w

    def keys(self, hidden: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None) -> Tensor:
        return _rope(self.k_norm(self.wk(hidden)), cos, sin, self.config.rope_dim)


def _chunk(rows_total: int, batch: int, seq: int, per_row: int, chunk_rows: Optional[int], device) -> int:
    if chunk_rows is not None:
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        return chunk_rows
    budget = SCORE_CHUNK_BYTES.get(torch.device(device).type, SCORE_CHUNK_BYTES["cpu"])
    return max(1, min(rows_total, budget // max(1, 4 * batch * seq * per_row)))


def index_scores(q_index: Tensor, weights: Tensor, k_index: Tensor) -> Tensor:
    """``I (B, Sq, S)`` float32 (unmasked) for ``q_index (B, Sq, H_I, d_I)``, ``weights (B, Sq, H_I)``
    and ``k_index (B, S, d_I)``; differentiable; float32 under autocast too."""
    with torch.autocast(q_index.device.type, enabled=False):
        dots = torch.einsum("bqjd,bsd->bqjs", q_index.float(), k_index.float())
        return torch.einsum("bqjs,bqj->bqs", F.relu(dots), weights.float())


def _check_index(q_index: Tensor, weights: Tensor, k_index: Tensor) -> None:
    if not isinstance(q_index, Tensor) or q_index.dim() != 4:
        raise ValueError(f"q_index must be (batch, Sq, index_heads, index_head_dim), got "
                         f"{tuple(getattr(q_index, 'shape', ())) or type(q_index).__name__}")
    batch, q_len, heads, dim = q_index.shape
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (batch, q_len, heads):
        raise ValueError(f"weights must have shape {(batch, q_len, heads)}, got {tuple(getattr(weights, 'shape', ()))}")
    if not isinstance(k_index, Tensor) or k_index.dim() != 3 or k_index.shape[0] != batch \
            or k_index.shape[2] != dim or k_index.shape[1] < q_len:
        raise ValueError(f"k_index must have shape ({batch}, S >= {q_len}, {dim}), got "
                         f"{tuple(getattr(k_index, 'shape', ()))}")


@torch.no_grad()
def select_tokens(q_index: Tensor, weights: Tensor, k_index: Tensor, top_k: int, *,
                  chunk_rows: Optional[int] = None) -> Tensor:
    """The ``top_k`` key tokens of each of the last ``Sq`` of ``S`` query tokens by indexer score:
    int32 ``(B, Sq, min(top_k, S))``, ascending, -1 in unused entries (a query at position ``p``
    has ``p + 1`` keys to choose from; all of them when ``top_k > p``). Ties go to the earlier key.
    Runs ``chunk_rows`` query rows at a time (None: as many as fit :data:`SCORE_CHUNK_BYTES` of
    intermediates: 1 GiB on CUDA, 256 MB elsewhere)."""
    _check_index(q_index, weights, k_index)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    batch, q_len, heads, _ = q_index.shape
    seq = k_index.shape[1]
    width = min(top_k, seq)
    rows = _chunk(q_len, batch, seq, heads + 3, chunk_rows, q_index.device)
    out = torch.empty(batch, q_len, width, dtype=torch.int32, device=q_index.device)
    keys = torch.arange(seq, device=q_index.device)
    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        scores = index_scores(q_index[:, start:end], weights[:, start:end], k_index)
        positions = torch.arange(seq - q_len + start, seq - q_len + end, device=q_index.device)
        scores = scores.masked_fill(keys[None, :] > positions[:, None], float("-inf"))
        # Equal scores go to the earlier key (relu makes exact ties at 0 common).
        values, order = top_k_ties_to_earlier(scores, width)
        chosen = torch.where(values > float("-inf"), order, seq)
        chosen = torch.sort(chosen, dim=-1).values
        out[:, start:end] = torch.where(chosen < seq, chosen, -1).to(torch.int32)
    return out


def attention_target(q: Tensor, k: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """``(B, Sq, S)`` float32: the main attention's probabilities of ``q (B, H, Sq, D)`` over
    ``k (B, Hkv, S, D)`` where ``allowed (B, Sq, S)`` (every head alike), summed over heads and
    divided by ``H`` (each row sums to 1; rows allowing nothing are 0). No gradient; float32 under
    autocast too."""
    batch, heads, q_len, dim = q.shape
    kv_heads = k.shape[1]
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        qg = q.float().view(batch, kv_heads, heads // kv_heads, q_len, dim)
        scores = torch.einsum("bngsd,bntd->bngst", qg, k.float()) * scale
        probs, norm, _ = masked_softmax(scores.masked_fill(~allowed[:, None, None], float("-inf")))
        return (probs / norm).sum((1, 2)) / heads


def indexer_kl_loss(q_index: Tensor, weights: Tensor, k_index: Tensor, q: Tensor, k: Tensor, *,
                    scale: Optional[float] = None, indices: Optional[Tensor] = None,
                    chunk_rows: Optional[int] = None) -> Tensor:
    """DSA's indexer distillation loss, the mean over query tokens of ``KL(p_t || softmax(I_t))``.

    ``p_t``: the main attention of query token ``t`` (the last ``Sq`` of ``S`` positions of
    ``q (B, H, Sq, D)`` over ``k (B, Hkv, S, D)``), summed over heads and normalized, without
    gradient. Dense warm-up (``indices`` None): over every causal key. Sparse training
    (``indices (B, Sq, K)`` from :func:`select_tokens`): over each token's selected keys only, both
    distributions renormalized there. Differentiable in the indexer inputs; computed ``chunk_rows``
    query rows at a time, each chunk's scores recomputed in the backward (checkpointed) so only one
    chunk's ``(H_I, S)`` intermediates are alive at a time."""
    from torch.utils.checkpoint import checkpoint

    from .attention import token_mask

    _check_index(q_index, weights, k_index)
    batch, q_len, heads, _ = q_index.shape
    seq = k_index.shape[1]
    if q.shape[0] != batch or q.shape[2] != q_len or k.shape[2] != seq:
        raise ValueError(f"q must hold the indexer's {q_len} query tokens and k its {seq} keys, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    if indices is not None and (not isinstance(indices, Tensor) or indices.dim() != 3
                                or tuple(indices.shape[:2]) != (batch, q_len)):
        raise ValueError(f"indices must have shape ({batch}, {q_len}, K), got {tuple(getattr(indices, 'shape', ()))}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rows = _chunk(q_len, batch, seq, max(heads, q.shape[1]) + 2, chunk_rows, q.device)
    keys = torch.arange(seq, device=q.device)
    total = q_index.new_zeros((), dtype=torch.float32)

    def chunk_loss(qi, wi, ki, target, allowed):
        logits = index_scores(qi, wi, ki).masked_fill(~allowed, float("-inf"))
        log_q = torch.log_softmax(logits, -1)
        terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0)
        return terms.sum()

    for start in range(0, q_len, rows):
        end = min(q_len, start + rows)
        positions = torch.arange(seq - q_len + start, seq - q_len + end, device=q.device)
        if indices is None:
            allowed = (keys[None, :] <= positions[:, None]).expand(batch, -1, -1)
        else:
            allowed = token_mask(indices[:, start:end], seq, positions)
        target = attention_target(q[:, :, start:end], k, scale, allowed)
        args = (q_index[:, start:end], weights[:, start:end], k_index, target, allowed)
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[:3]):
            total = total + checkpoint(chunk_loss, *args, use_reentrant=False)
        else:
            total = total + chunk_loss(*args)
    return total / (batch * q_len)
