"""NSA's compressed branch and block selection without the ``Sq x Nc`` score matrix in memory.

:func:`~.reference.compressed_attention` (the reference) materializes the scores of every query
against every compressed block, ``H * Sq * S / d`` values: 17 GB in bf16 at 64K tokens with 32
heads. :func:`compressed_branch` computes the same two results in pieces:

* **The output, on the library's attention kernels.** Compressed block ``c`` (keys ``[c*d, c*d + l)``)
  is visible from position ``t`` when ``c*d + l - 1 <= t``. Writing ``t = m*d + r``, that is
  ``c <= m + floor((r + 1 - l) / d)``: the queries of one *phase* ``r`` (every ``d``-th position)
  see the compressed keys causally, with an offset that takes at most two values over the phases.
  So the queries are regrouped by phase (phases of one offset stacked along the batch) and each
  group is plain bottom-right causal attention over the compressed keys, through
  :func:`~sparse_attn.sparse_attention` (forward and backward, GQA, any backend) with its LSE.
* **A few queries** (up to :data:`DIRECT_ROWS`: a decode step, a short chunk) score every compressed
  key at once instead: the scores are only ``Sq x Nc`` per head.
* **The selection**, without gradient: on CUDA (``KernelOptions.estimator_kernels``) one Triton
  kernel (:mod:`.selection_kernels`) goes from the queries, compressed keys and LSE to each token's
  blocks; otherwise PyTorch, ``chunk_rows`` query rows at a time: each chunk's probabilities from
  its scores and the LSE, summed over the query heads of each KV group, mapped onto selection
  blocks and ranked by :func:`~.reference.rank_blocks`, as :func:`~.reference.select_blocks` ranks
  the reference's.

The results equal the reference's (tests compare both, gradients included); on a GPU the selection
may rank near-equal importances apart where the two round differently.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Optional

import torch
from torch import Tensor

from ..methods.primitives.dispatch import use_triton
from ..options import KernelOptions, resolve_kernel_options
from .config import NSAConfig
from .reference import attend_compressed, compress_kv, compressed_blocks, rank_blocks

__all__ = ["compressed_branch", "CHUNK_BYTES"]

CHUNK_BYTES = 256 * 2 ** 20  # float32 scores of one selection chunk
# The selection kernel's limits: dtypes, head dims, query heads per KV head (stacked in one tile).
SELECTION_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
SELECTION_KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
SELECTION_KERNEL_MAX_GROUP = 16
DIRECT_ROWS = 16  # up to this many queries (decode steps), scores against every compressed key at once


def compressed_branch(q: Tensor, k: Tensor, v: Tensor, params: Mapping[str, Tensor], config: NSAConfig,
                      scale: float, *, backend: str = "auto", kernel_options: Optional[KernelOptions] = None,
                      chunk_rows: Optional[int] = None, select: bool = True,
                      compressed: Optional[tuple] = None, return_blocks: bool = False):
    """``(out (B, H, Sq, D), chosen (B, Hkv, Sq, Ns) bool)``: the compressed branch's output
    (differentiable in ``q``, ``k``, ``v`` and the compression parameters) and the selection blocks
    each query token's KV group reads, for the last ``Sq`` of ``S`` tokens (``q (B, H, Sq, D)``,
    ``k, v (B, Hkv, S, D)``). ``backend`` and ``kernel_options`` go to
    :func:`~sparse_attn.sparse_attention`; ``chunk_rows``: query rows per selection chunk (None: as
    many as fit :data:`CHUNK_BYTES` of scores); ``select=False``: no selection (``chosen`` is None);
    ``compressed``: the compressed keys and values ``(kc, vc)`` of ``k`` and ``v``, each
    ``(B, Hkv, Nc, D)`` (e.g. kept with a KV cache by :class:`~.compressed_cache.CompressedKVCache`),
    instead of compressing ``k`` and ``v`` here. ``return_blocks``: a third result, the selection
    kernel's ``(B, Hkv, Sq, n)`` int32 block indices (best first, -1 where a token has fewer blocks),
    or None where the selection did not run the kernel."""
    out, chosen, blocks = _branch(q, k, v, params, config, scale, backend, kernel_options, chunk_rows, select,
                                  compressed)
    return (out, chosen, blocks) if return_blocks else (out, chosen)


def _branch(q, k, v, params, config, scale, backend, kernel_options, chunk_rows, select, compressed):
    batch, heads, q_len, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    if compressed is None:
        kc, vc = compress_kv(k, params, "k", config), compress_kv(v, params, "v", config)
    else:
        kc, vc = compressed
        expected = (batch, kv_heads, compressed_blocks(seq, config), dim)
        for name, t in (("kc", kc), ("vc", vc)):
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                raise ValueError(f"compressed {name} must have shape {expected} (batch, KV heads, compressed "
                                 f"blocks of {seq} tokens, head_dim), got {tuple(getattr(t, 'shape', ())) or t!r}")
    ns = math.ceil(seq / config.select_block)
    positions = torch.arange(seq - q_len, seq, device=q.device)
    if kc.shape[2] == 0:  # no compressed block yet: output 0, the forced blocks selected
        importance = torch.zeros(batch, kv_heads, q_len, ns, device=q.device, dtype=torch.float32)
        return q * 0.0, rank_blocks(importance, config, positions) if select else None, None
    if q_len <= DIRECT_ROWS:  # a decode step or a short chunk: the Sq x Nc scores are small
        return (*_direct(q, kc, vc, config, scale, positions, ns, select), None)
    out, lse = _phase_attention(q, kc, vc, seq, config, scale, backend, kernel_options)
    blocks = None
    if not select:
        return out, None, None
    with torch.no_grad():
        if use_triton(q, kernel_options, selection_kernel_supports(q, kv_heads)):
            from .selection_kernels import triton_select_blocks

            blocks = triton_select_blocks(q.detach(), kc.detach(), lse.detach(), config, seq, scale,
                                          fast_launch=resolve_kernel_options(kernel_options).fast_launch)
            chosen = blocks_to_mask(blocks, ns)
        else:
            chosen = _selection(q.detach(), kc.detach(), lse.detach().float(), config, scale, positions, ns,
                                chunk_rows)
    return out, chosen, blocks


def selection_kernel_supports(q: Tensor, kv_heads: int) -> bool:
    """Whether the selection kernel handles ``q (B, H, Sq, D)``'s dtype, head dim and group size."""
    return (q.dtype in SELECTION_KERNEL_DTYPES and q.shape[-1] in SELECTION_KERNEL_HEAD_DIMS
            and q.shape[1] // kv_heads <= SELECTION_KERNEL_MAX_GROUP)


def blocks_to_mask(blocks: Tensor, ns: int) -> Tensor:
    """Bool ``(..., Ns)`` from selected block indices ``(..., n)`` (-1: no block)."""
    mask = torch.zeros(*blocks.shape[:-1], ns + 1, dtype=torch.bool, device=blocks.device)
    mask.scatter_(-1, torch.where(blocks >= 0, blocks, ns).long(), True)  # -1 goes to the spare column
    return mask[..., :ns]


def _direct(q: Tensor, kc: Tensor, vc: Tensor, config: NSAConfig, scale: float, positions: Tensor, ns: int,
            select: bool):
    """The compressed branch of a few queries from their scores against every compressed key
    (:func:`~.reference.attend_compressed`, in float32 or float64), and the selection from the same
    probabilities."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        out, probs = attend_compressed(q.to(work), kc.to(work), vc.to(work), config, scale, positions)
    out = out.to(q.dtype)
    if not select:
        return out, None
    with torch.no_grad():
        targets, weights = overlap_pieces(config, kc.shape[2], ns, q.device, work)
        chosen = rank_blocks(map_to_selection_blocks(probs.detach().sum(2), targets, weights, ns), config, positions)
    return out, chosen


def _phase_attention(q: Tensor, kc: Tensor, vc: Tensor, seq: int, config: NSAConfig, scale: float, backend: str,
                     kernel_options: Optional[KernelOptions]):
    """The compressed branch's output and natural-log LSE ``(B, H, Sq)`` (``-inf`` where no block is
    visible yet) as causal attention per group of phases (see the module docstring)."""
    from ..attention import sparse_attention
    from ..patterns.dense import dense_layout

    batch, heads, q_len, dim = q.shape
    kv_heads, nc = kc.shape[1], kc.shape[2]
    stride, block = config.compress_stride, config.compress_block
    first = seq - q_len
    # Pad the queries to whole phases: positions [p0, p1), multiples of the stride.
    p0, p1 = first // stride * stride, -(-seq // stride) * stride
    rows = (p1 - p0) // stride  # queries per phase
    padded = torch.nn.functional.pad(q, (0, 0, first - p0, p1 - seq))
    phases = padded.view(batch, heads, rows, stride, dim).permute(3, 0, 1, 2, 4)  # (d, B, H, rows, D)
    offsets = [(r + 1 - block) // stride for r in range(stride)]
    outs, lses = [None] * stride, [None] * stride
    for offset in sorted(set(offsets)):
        members = [r for r in range(stride) if offsets[r] == offset]
        keys = p1 // stride + offset  # the last query of a phase sees compressed blocks 0 .. keys - 1
        n = len(members)
        if keys <= 0:  # no block visible to any query of these phases
            for r in members:
                outs[r] = phases[r] * 0.0
                lses[r] = q.new_full((batch, heads, rows), float("-inf"), dtype=torch.float32)
            continue
        kk, vv = kc[:, :, :keys], vc[:, :, :keys]
        if keys > nc:  # blocks past the sequence: seen only by padding queries
            kk, vv = (torch.nn.functional.pad(t, (0, 0, 0, keys - nc)) for t in (kk, vv))
        qb = phases[members].transpose(0, 1).reshape(batch * n, heads, rows, dim)
        kb, vb = (t[:, None].expand(batch, n, kv_heads, keys, dim).reshape(batch * n, kv_heads, keys, dim)
                  for t in (kk, vv))
        layout = dense_layout(rows, keys, block_size=64, device=q.device)
        out, lse = sparse_attention(qb, kb, vb, layout, scale=scale, return_lse=True, backend=backend,
                                    kernel_options=kernel_options)
        out, lse = out.view(batch, n, heads, rows, dim), lse.view(batch, n, heads, rows)
        for i, r in enumerate(members):
            outs[r], lses[r] = out[:, i], lse[:, i]
    start = first - p0
    out = torch.stack(outs, 3).reshape(batch, heads, rows * stride, dim)[:, :, start:start + q_len]
    lse = torch.stack(lses, 3).reshape(batch, heads, rows * stride)[:, :, start:start + q_len]
    return out, lse


def overlap_pieces(config: NSAConfig, nc: int, ns: int, device, dtype):
    """``(targets, weights)``, each ``(span, Nc)``: the selection blocks each compressed block overlaps
    (``span``: the most any one overlaps, 2 or 3 for the usual sizes) and the overlap in stride-``d``
    pieces (:func:`~.reference.block_overlap`'s nonzero entries; 0 weight where a block overlaps
    fewer). Computed from the block bounds, ``O(span x Nc)``, never the ``Nc x Ns`` matrix, and kept
    per geometry and device (read-only tensors): a decode step asks for the same ones again."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _overlap_pieces_of(config, nc, ns, device, dtype)  # nothing kept from inside a capture
    return _cached_overlap_pieces(config, nc, ns, device, dtype)


def _overlap_pieces_of(config: NSAConfig, nc: int, ns: int, device: torch.device, dtype):
    stride, block, select = config.compress_stride, config.compress_block, config.select_block
    # Every residue of c * d modulo l' shows up within the first l' compressed blocks.
    span = max(1, max(((c * stride + block - 1) // select - (c * stride) // select + 1 for c in range(min(nc, select))),
                      default=1))
    start = torch.arange(nc, device=device, dtype=torch.float64) * stride
    blocks = torch.div(start, select, rounding_mode="floor")[None, :] + torch.arange(span, device=device)[:, None]
    lo = torch.maximum(start[None, :], blocks * select)
    hi = torch.minimum(start[None, :] + block, (blocks + 1) * select)
    pieces = torch.where(blocks < ns, (hi - lo).clamp_min(0) / stride, 0.0)
    return blocks.clamp(max=ns - 1).long(), pieces.to(dtype)


_cached_overlap_pieces = functools.lru_cache(maxsize=64)(_overlap_pieces_of)


def map_to_selection_blocks(probs: Tensor, targets: Tensor, weights: Tensor, ns: int) -> Tensor:
    """``probs (..., Nc) @ block_overlap (Nc, Ns)`` through the band's few entries per compressed block
    (:func:`overlap_pieces`): ``(..., Ns)``, ``span`` scatter-adds instead of an ``Nc x Ns`` product."""
    out = probs.new_zeros(*probs.shape[:-1], ns)
    for target, weight in zip(targets, weights):
        out.scatter_add_(-1, target.expand_as(probs), probs * weight)
    return out


def _selection(q: Tensor, kc: Tensor, lse: Tensor, config: NSAConfig, scale: float, positions: Tensor, ns: int,
               chunk_rows: Optional[int]) -> Tensor:
    batch, heads, q_len, dim = q.shape
    kv_heads, nc = kc.shape[1], kc.shape[2]
    group = heads // kv_heads
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * batch * heads * nc))
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    targets, weights = overlap_pieces(config, nc, ns, q.device, work)
    ends = torch.arange(nc, device=q.device) * config.compress_stride + config.compress_block - 1
    qg = q.view(batch, kv_heads, group, q_len, dim)
    lse_g = lse.to(work).view(batch, kv_heads, group, q_len)
    chosen = torch.empty(batch, kv_heads, q_len, ns, dtype=torch.bool, device=q.device)
    for start in range(0, q_len, chunk_rows):
        rows = slice(start, min(q_len, start + chunk_rows))
        scores = torch.einsum("bngsd,bncd->bngsc", qg[:, :, :, rows], kc).to(work) * scale
        visible = ends[None, :] <= positions[rows, None]  # (rows, Nc)
        probs = torch.exp(scores - lse_g[:, :, :, rows, None]).masked_fill(~visible, 0.0)
        importance = map_to_selection_blocks(probs.sum(2), targets, weights, ns)  # (B, Hkv, rows, Ns)
        chosen[:, :, rows] = rank_blocks(importance, config, positions[rows])
    return chosen
