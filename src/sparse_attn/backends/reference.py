"""Exact block-sparse attention in plain PyTorch: the reference every kernel is tested against.

Works on CPU and GPU, supports autograd, and keeps memory at O(rows x kept keys) by walking the
query blocks in chunks and gathering only the kept key blocks of each chunk. Softmax runs in
float32 (float64 for float64 inputs); rows with nothing to attend give output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..layout import BlockSparseLayout

# Upper bound on gathered key elements per chunk (chunk rows x kept keys x head dim).
_CHUNK_ELEMENTS = 1 << 25


def reference_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float,
                        chunk_elements: int = _CHUNK_ELEMENTS):
    """Block-sparse attention; returns ``(out (B, H, Sq, D), lse (B, H, Sq) float32, natural log)``.

    ``q``: ``(B, H, Sq, D)``; ``k``, ``v``: ``(B, Hkv, Skv, D)`` with ``Hkv`` dividing ``H``. K/V are
    gathered per kept block through flat indices, never repeated per query head.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    group = heads // kv_heads
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lay = layout.expand(batch=batch, heads=heads)  # broadcast views of the small index tensors
    counts, indices = lay.kv_num_blocks, lay.kv_indices
    bq, bk, nq, width = layout.q_block, layout.kv_block, layout.num_q_blocks, indices.shape[-1]
    device = q.device
    offset = layout.q_offset if layout.causal else 0

    # Inputs are cast to the compute dtype before gathering, so the backward sums the gradients of
    # every (query chunk, GQA head) that reads a key into a float32 (float64) buffer and rounds to
    # the input dtype once.
    q_pad = torch.nn.functional.pad(q.to(compute_dtype), (0, 0, 0, nq * bq - q_len)).view(batch, heads, nq, bq, dim)
    k_flat = k.to(compute_dtype).reshape(batch * kv_heads * kv_len, dim)
    v_flat = v.to(compute_dtype).reshape(batch * kv_heads * kv_len, dim_v)
    # Row of (b, h) in the flat K/V for the kv head serving query head h.
    base = (torch.arange(batch, device=device)[:, None] * kv_heads
            + torch.arange(heads, device=device)[None, :] // group) * kv_len  # (B, H)
    key_in_block = torch.arange(bk, device=device)
    slot = torch.arange(width, device=device)

    per_block = batch * heads * width * bk * (dim + bq)
    step = max(1, min(nq, chunk_elements // max(per_block, 1)))
    outs, lses = [], []
    for start in range(0, nq, step):
        stop = min(nq, start + step)
        kept = slot < counts[:, :, start:stop, None]  # (B, H, C, W)
        idx = torch.where(kept, indices[:, :, start:stop].long(), 0)  # padding slots are never read
        kpos = (idx[..., None] * bk + key_in_block).flatten(-2)  # (B, H, C, W*bk)
        kvalid = (kept[..., None] & (idx[..., None] * bk + key_in_block < kv_len)).flatten(-2)
        flat = (base[:, :, None, None] + kpos.clamp(max=kv_len - 1)).reshape(-1)
        # index_select's backward (index_add_) sums in a fixed order: gradients are bitwise
        # reproducible (advanced indexing's accumulating backward is not, on multi-threaded CPUs).
        k_blk = k_flat.index_select(0, flat).view(*kpos.shape, dim)  # (B, H, C, W*bk, D)
        v_blk = v_flat.index_select(0, flat).view(*kpos.shape, dim_v)
        q_blk = q_pad[:, :, start:stop]  # (B, H, C, bq, D)
        scores = torch.einsum("bhcqd,bhckd->bhcqk", q_blk, k_blk) * scale
        allowed = kvalid[:, :, :, None, :]
        if layout.causal:
            qpos = (torch.arange(start, stop, device=device)[:, None] * bq
                    + torch.arange(bq, device=device)[None, :] + offset)  # (C, bq)
            allowed = allowed & (kpos[:, :, :, None, :] <= qpos[None, None, :, :, None])
        probs, norm, lse = masked_softmax(scores.masked_fill(~allowed, float("-inf")))
        out = torch.einsum("bhcqk,bhckd->bhcqd", probs, v_blk) / norm
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(batch, heads, nq * bq, dim_v)[:, :, :q_len]
    lse = torch.cat(lses, dim=2).reshape(batch, heads, nq * bq)[:, :, :q_len]
    return out.to(q.dtype), lse.float()


def masked_softmax(scores: Tensor):
    """Softmax over the last dim of ``scores`` where ``-inf`` marks masked keys, safe for rows with
    no key: ``(probs, norm, lse)`` with unnormalized ``probs`` (``probs / norm`` is the softmax; 0
    for empty rows), ``norm`` the row sums (1 for empty rows) and the natural-log ``lse`` (``-inf``
    for empty rows)."""
    if scores.shape[-1]:
        row_max = scores.amax(-1, keepdim=True).detach()
    else:
        row_max = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(-1, keepdim=True)
    norm = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    lse = torch.where(row_sum > 0, row_max + torch.log(norm), float("-inf")).squeeze(-1)
    return probs, norm, lse


def naive_masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None):
    """Dense softmax attention under a token mask ``(B|1, H|Hkv|1, Sq, Skv)``, in the inputs' dtype.

    O(Sq x Skv) memory: the golden model for tests on small shapes (call it on float64 inputs).
    Fully masked rows give output 0 and LSE ``-inf``.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if mask.shape[1] not in (1, heads):
        mask = mask.repeat_interleave(heads // mask.shape[1], dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    return out, lse


def sequence_loop_varlen(run, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                         layout: BlockSparseLayout, scale: float):
    """A packed batch (q ``(T, H, D)``, k/v ``(Tk, Hkv, D)``) through ``run`` (a padded-batch
    forward such as :func:`reference_attention`), one sequence at a time on its own cropped layout.
    Sequences without keys give 0 and LSE ``-inf``; returns ``(out (T, H, D), lse (H, T))`` in the
    autograd graph of q, k, v even when nothing is attended (zero gradients)."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for i in range(len(starts_q) - 1):
        len_q, len_k = starts_q[i + 1] - starts_q[i], starts_k[i + 1] - starts_k[i]
        if len_q == 0:
            continue
        qi = q[starts_q[i]:starts_q[i + 1]].transpose(0, 1)[None]
        if len_k == 0:
            outs.append(q.new_zeros(len_q, q.shape[1], v.shape[-1]))
            lses.append(torch.full((q.shape[1], len_q), float("-inf"), device=q.device))
            continue
        ki = k[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        vi = v[starts_k[i]:starts_k[i + 1]].transpose(0, 1)[None]
        o, l_ = run(qi, ki, vi, layout.crop(i, len_q, len_k), scale)
        outs.append(o[0].transpose(0, 1))
        lses.append(l_[0])
    if not outs:
        out, lse = q.new_zeros(0, q.shape[1], v.shape[-1]), torch.zeros(q.shape[1], 0, device=q.device)
    else:
        out, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    if not out.requires_grad:  # no sequence has both queries and keys
        out, lse = with_zero_gradients(out, lse, q, k, v)
    return out, lse


class _ZeroGradients(torch.autograd.Function):
    """Passes ``(out, lse)`` through and gives q, k, v zero gradients: attention in which no query
    sees a key still joins the graph, as the kernels' outputs do."""

    @staticmethod
    def forward(ctx, out, lse, q, k, v):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in (q, k, v)]
        return out.clone(), lse.clone()

    @staticmethod
    def backward(ctx, dout, dlse):
        return (None, None, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))


def with_zero_gradients(out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor):
    """``(out, lse)`` joined to the graph of q, k, v with zero gradients (when any needs one)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _ZeroGradients.apply(out, lse, q, k, v)
    return out, lse
