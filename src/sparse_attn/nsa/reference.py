"""Native Sparse Attention in plain PyTorch: the compression, the block selection and the reference.

Causal attention of queries ``(B, H, Sq, D)`` over keys and values ``(B, Hkv, S, D)``, ``Sq <= S``:
the queries are the last ``Sq`` positions (``Sq = S``: self-attention over the sequence; fewer:
decoding or a chunk of a prefill with the earlier tokens in the KV cache). Query head ``h`` reads KV
head ``h // (H / Hkv)``. Three branches, mixed by per-head gates:

* compressed: compressed block ``i`` holds the keys ``[i*d, i*d + l)``; ``phi(block) = mean(block) +
  MLP(flatten(block + intra-block position embedding))`` (separate MLPs and embeddings for keys and
  values); a query at position ``t`` attends the compressed blocks that end at or before ``t``
  (none before ``t = l - 1``: output 0).
* selected: the compressed attention probabilities, mapped onto selection blocks of ``l'`` tokens
  by how many stride-``d`` pieces a compressed block shares with a selection block (the paper's
  eq. 9) and summed over the query heads of a KV group, rank the blocks up to the query's own
  block; the first ``forced_initial`` and the last ``forced_local`` of them always count. Every
  query token attends its ``n`` best blocks (causally inside its own block); all heads of a group
  read the same blocks.
* window: the keys of the ``w / window_block`` blocks of ``window_block`` tokens ending with the
  query's own block (causal).

``out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` with ``g = sigmoid(W_h q + b_h)`` per
query head ``h``. The parameters are the tensors named in :data:`PARAMETER_NAMES`.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ranking import top_k_ties_to_earlier
from .config import NSAConfig

__all__ = ["nsa_reference", "compress_kv", "compressed_blocks", "compressed_attention", "attend_compressed",
           "select_blocks", "rank_blocks", "nsa_gates", "query_positions", "masked_branches", "PARAMETER_NAMES"]

# Per tensor ("k" and "v"): pos (l, D), fc1_weight (hidden, l*D), fc1_bias (hidden,), fc2_weight
# (D, hidden), fc2_bias (D,); gates: gate_weight (H, 3, D), gate_bias (H, 3) (compressed, selected, window).
PARAMETER_NAMES = tuple(f"{t}_{p}" for t in "kv" for p in ("pos", "fc1_weight", "fc1_bias", "fc2_weight",
                                                             "fc2_bias")) + ("gate_weight", "gate_bias")


def compressed_blocks(seq: int, config: NSAConfig) -> int:
    """Complete compressed blocks of ``seq`` tokens: ``(seq - l) // d + 1``, 0 when ``seq < l``."""
    return 0 if seq < config.compress_block else (seq - config.compress_block) // config.compress_stride + 1


def compress_kv(x: Tensor, params: Mapping[str, Tensor], which: str, config: NSAConfig) -> Tensor:
    """``(B, Hkv, S, D)`` -> ``(B, Hkv, Nc, D)``, one vector per compressed block (``which``: "k" or
    "v" picks the MLP); ``Nc = (S - l) // d + 1`` complete blocks, 0 when ``S < l``."""
    block, stride = config.compress_block, config.compress_stride
    if x.shape[2] < block:
        return x.new_zeros(*x.shape[:2], 0, x.shape[-1])
    blocks = x.unfold(2, block, stride).transpose(-1, -2)  # (B, Hkv, Nc, l, D)
    flat = (blocks + params[f"{which}_pos"]).flatten(-2)
    hidden = F.gelu(F.linear(flat, params[f"{which}_fc1_weight"], params[f"{which}_fc1_bias"]))
    return blocks.mean(-2) + F.linear(hidden, params[f"{which}_fc2_weight"], params[f"{which}_fc2_bias"])


def query_positions(q: Tensor, k: Tensor) -> Tensor:
    """Positions of the ``Sq`` queries: the last ``Sq`` of the ``S`` keys."""
    return torch.arange(k.shape[2] - q.shape[2], k.shape[2], device=q.device)


def compressed_attention(q: Tensor, k: Tensor, v: Tensor, params: Mapping[str, Tensor], config: NSAConfig,
                         scale: float):
    """The compressed branch: its output ``(B, H, Sq, D)`` and its attention probabilities
    ``(B, Hkv, G, Sq, Nc)`` (a row with no visible compressed block is all zero)."""
    kc, vc = compress_kv(k, params, "k", config), compress_kv(v, params, "v", config)
    return attend_compressed(q, kc, vc, config, scale, query_positions(q, k))


def attend_compressed(q: Tensor, kc: Tensor, vc: Tensor, config: NSAConfig, scale: float, positions: Tensor):
    """Attention of ``q (B, H, Sq, D)`` at ``positions (Sq,)`` over the compressed keys and values
    ``kc, vc (B, Hkv, Nc, D)``, each query over the blocks that end at or before it: the output
    ``(B, H, Sq, D)`` and the probabilities ``(B, Hkv, G, Sq, Nc)``, in q's dtype."""
    batch, heads, q_len, dim = q.shape
    kv_heads, nc = kc.shape[1], kc.shape[2]
    qg = q.view(batch, kv_heads, heads // kv_heads, q_len, dim)
    scores = torch.einsum("bngsd,bncd->bngsc", qg, kc) * scale
    ends = torch.arange(nc, device=q.device) * config.compress_stride + config.compress_block - 1
    visible = ends[None, :] <= positions[:, None]  # (Sq, Nc)
    any_visible = visible.any(-1, keepdim=True)
    # Rows without a visible block are softmaxed over zeros, then zeroed (no NaN in either direction).
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    out = torch.einsum("bngsc,bncd->bngsd", probs, vc).reshape(batch, heads, q_len, dim)
    return out, probs


def block_overlap(config: NSAConfig, num_compressed: int, num_select: int, device=None) -> Tensor:
    """``(Nc, Ns)`` float64: stride-``d`` pieces compressed block ``i`` shares with selection block ``j``
    (tokens in common / d)."""
    start = torch.arange(num_compressed, device=device, dtype=torch.float64) * config.compress_stride
    first = torch.arange(num_select, device=device, dtype=torch.float64) * config.select_block
    lo = torch.maximum(start[:, None], first[None, :])
    hi = torch.minimum(start[:, None] + config.compress_block, first[None, :] + config.select_block)
    return (hi - lo).clamp_min(0) / config.compress_stride


def select_blocks(probs: Tensor, config: NSAConfig, seq: int) -> Tensor:
    """The selected branch's choice from the compressed probabilities ``(B, Hkv, G, Sq, Nc)`` of the
    last ``Sq`` of ``seq`` tokens: bool ``(B, Hkv, Sq, Ns)``, the selection blocks
    (``Ns = ceil(seq / l')``) each query token reads (:func:`rank_blocks` of the blocks' importance).
    """
    ns = math.ceil(seq / config.select_block)
    probs = probs.detach()
    overlap = block_overlap(config, probs.shape[-1], ns, probs.device).to(probs.dtype)
    importance = torch.matmul(probs.sum(2), overlap)  # (B, Hkv, Sq, Ns)
    return rank_blocks(importance, config, torch.arange(seq - probs.shape[-2], seq, device=probs.device))


def rank_blocks(importance: Tensor, config: NSAConfig, positions: Tensor) -> Tensor:
    """Bool ``(B, Hkv, Sq, Ns)``: the ``select_blocks`` selection blocks each query (at ``positions``
    ``(Sq,)``) reads, by ``importance (B, Hkv, Sq, Ns)``: the blocks ``0 .. own`` ranked by importance
    (ties: the earlier block), the forced blocks (the first ``forced_initial``, the last
    ``forced_local`` up to the own block) first."""
    ns = importance.shape[-1]
    own = (positions // config.select_block)[:, None]
    blocks = torch.arange(ns, device=importance.device)[None, :]
    forced = (blocks < config.forced_initial) | (blocks > own - config.forced_local)
    importance = importance.masked_fill(forced, float("inf")).masked_fill(blocks > own, float("-inf"))
    take = min(config.select_blocks, ns)
    values, order = top_k_ties_to_earlier(importance, take)
    chosen = torch.zeros(importance.shape, dtype=torch.bool, device=importance.device)
    chosen.scatter_(-1, order, values > float("-inf"))
    return chosen


def nsa_gates(q: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """``(B, H, S, 3)`` sigmoid gates of the compressed, selected and window branches."""
    logits = torch.einsum("bhsd,hcd->bhsc", q, params["gate_weight"].to(q.dtype))
    return torch.sigmoid(logits + params["gate_bias"].to(q.dtype)[None, :, None, :])


def window_token_mask(config: NSAConfig, seq: int, device=None, queries: Optional[int] = None) -> Tensor:
    """``(Sq, S)`` bool: the keys the window branch of each of the last ``queries`` (default ``seq``)
    tokens reads."""
    pos = torch.arange(seq, device=device)
    q_pos = pos[seq - (seq if queries is None else queries):]
    blk, q_blk = pos // config.window_block, q_pos // config.window_block
    return (pos[None, :] <= q_pos[:, None]) & (blk[None, :] > q_blk[:, None] - config.window_blocks)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Dense attention of ``q (B, H, Sq, D)`` on ``k, v (B, Hkv, S, D)`` where ``mask`` (broadcast to
    ``(B, Hkv, G, Sq, S)``) allows; every row must allow a key."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(batch, kv_heads, heads // kv_heads, seq, dim)
    scores = torch.einsum("bngsd,bntd->bngst", qg, k) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bngst,bntd->bngsd", probs, v).reshape(batch, heads, seq, dim)


def masked_branches(q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, config: NSAConfig, scale: float):
    """The selected and window branches' outputs ``(B, H, Sq, D)`` through dense ``Sq x S`` masks:
    each query reads the keys of its ``chosen`` blocks ``(B, Hkv, Sq, Ns)`` (causally) and of its
    window."""
    seq = k.shape[2]
    pos = torch.arange(seq, device=q.device)
    causal = pos[None, :] <= query_positions(q, k)[:, None]
    slc_mask = chosen[..., pos // config.select_block] & causal  # (B, Hkv, Sq, S)
    return (_masked_attention(q, k, v, slc_mask[:, :, None], scale),
            _masked_attention(q, k, v, window_token_mask(config, seq, q.device, q.shape[2]), scale))


def nsa_reference(q: Tensor, k: Tensor, v: Tensor, params: Mapping[str, Tensor], config: NSAConfig, *,
                  scale: Optional[float] = None, selection: Optional[Tensor] = None) -> Tensor:
    """NSA attention (see the module docstring) of the last ``Sq`` of ``S`` tokens in ``q``'s dtype with
    dense ``Sq x S`` masks (for tests and short inputs): ``(B, H, Sq, D)``. ``selection``: a bool
    ``(B, Hkv, Sq, Ns)`` choice to use instead of :func:`select_blocks`'s (to compare paths whose
    rounding could rank near-equal blocks apart)."""
    seq = k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    params = {name: p.to(q.dtype) for name, p in params.items()}
    out_cmp, probs = compressed_attention(q, k, v, params, config, scale)
    chosen = select_blocks(probs, config, seq) if selection is None else selection
    out_slc, out_win = masked_branches(q, k, v, chosen, config, scale)
    gates = nsa_gates(q, params)
    return gates[..., 0:1] * out_cmp + gates[..., 1:2] * out_slc + gates[..., 2:3] * out_win
