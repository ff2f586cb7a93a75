"""Plain-PyTorch reference of :func:`sparse_attn.methods.primitives.line_scores.line_scores`, and the
exact attention of the last rows it is built from (FlexPrefill's union line search uses it too)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...common import group_queries

# The last rows' exact attention is (B, heads, rows, Skv) floats, 2 GB for 32 heads, 128 rows and
# 128K keys: wherever it is formed whole, this many KV groups at a time by default.
KV_GROUPS_PER_CHUNK = 2


def last_rows_attention(q: Tensor, k: Tensor, rows: int, scale: float, causal: bool) -> Tensor:
    """Exact softmax attention of the last ``rows`` queries over all keys: ``(B, H, rows, Skv)``
    (float32; float64 for float64 inputs).

    Queries are bottom-right aligned against the keys (chunked prefill) when causal.
    """
    kv_heads, q_len, kv_len = k.shape[1], q.shape[2], k.shape[2]
    rows = min(rows, q_len)
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    q_last = group_queries(q[:, :, q_len - rows:], kv_heads).to(dtype)
    scores = torch.einsum("bngqd,bnkd->bngqk", q_last, k.to(dtype)).mul_(scale)
    if causal:  # only the last ``rows`` keys can be in a row's future: mask that tail in place
        tail = torch.arange(kv_len - rows, kv_len, device=q.device)
        scores[..., kv_len - rows:].masked_fill_(tail[None, :] > tail[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).flatten(1, 2)


def diagonal_sums(attn: Tensor) -> Tensor:
    """Sum ``attn (B, H, R, Skv)`` of the last ``R`` queries along diagonals.

    Returns ``(B, H, Skv)``: entry ``o`` is the mass at distance ``o = query_pos - key_pos``
    (entries right of a row's own position, zero under a causal mask, count at ``o = 0``).
    Skew trick: pad each row with ``R`` zeros on both sides and view the rows with a stride one
    longer than a padded row, which shifts row ``r`` by ``r`` and lines every diagonal up in one
    column; one copy and one reduction (a per-row loop was ~600 launches per call, most of
    FlexPrefill's fixed cost on a GPU) and no index tensor (8 bytes per attention entry, 2 GB at 128K).
    """
    rows, kv_len = attn.shape[-2], attn.shape[-1]
    padded = torch.nn.functional.pad(attn, (rows, rows)).contiguous()  # (..., R, Skv + 2R)
    width = kv_len + 2 * rows
    # Viewed column t of row r is padded column t + r, i.e. key t + r - R, at distance
    # o = (Skv - R + r) - (t + r - R) = Skv - t from the row's position: the same for every row.
    skewed = padded.as_strided((*padded.shape[:-2], rows, kv_len + rows), (*padded.stride()[:-2], width + 1, 1),
                               padded.storage_offset())
    summed = skewed.sum(-2)  # distance o at column Skv - o; columns past Skv are o < 0
    out = summed[..., 1: kv_len + 1].flip(-1)
    out[..., 0] += summed[..., kv_len + 1:].sum(-1)  # keys right of their row's position
    return out


def last_rows_line_scores(q: Tensor, k: Tensor, rows: int, scale: float, causal: bool = True,
                          kv_groups_per_chunk: int = KV_GROUPS_PER_CHUNK):
    """Column sums and diagonal sums of the last ``rows`` queries' exact attention, each
    ``(B, H, Skv)`` float32: the vertical and slash scores of MInference / FlexPrefill.
    ``kv_groups_per_chunk`` KV groups at a time, so the attention it sums stays bounded at long
    context."""
    kv_heads, group, step = k.shape[1], q.shape[1] // k.shape[1], kv_groups_per_chunk
    vertical, slash = [], []
    for kv in range(0, kv_heads, step):
        attn = last_rows_attention(q[:, kv * group:(kv + step) * group], k[:, kv:kv + step], rows, scale, causal)
        vertical.append(attn.sum(-2))
        slash.append(diagonal_sums(attn))
    return torch.cat(vertical, 1), torch.cat(slash, 1)
