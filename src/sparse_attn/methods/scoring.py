"""Plain-PyTorch building blocks shared by the estimators: pooling, block scores, selection.

Everything here works on block-level tensors ``(..., NQ, NK)`` or on a bounded number of query rows,
never on a full ``q_len x kv_len`` matrix. GQA is handled by viewing queries as
``(B, Hkv, G, S, D)`` against keys ``(B, Hkv, S, D)``: keys are never repeated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..patterns._build import BlockGrid


def group_queries(q: Tensor, kv_heads: int) -> Tensor:
    """``(B, H, S, D)`` -> ``(B, Hkv, G, S, D)`` view (query head ``h`` -> KV head ``h // G``)."""
    b, h, s, d = q.shape
    return q.view(b, kv_heads, h // kv_heads, s, d)


def mean_pool(x: Tensor, block: int) -> Tensor:
    """Mean over each block of ``block`` tokens along dim -2, in float32 (the tail block averages
    its real tokens). Reference of :func:`sparse_attn.methods.kernels.block_mean_pool`; sums
    without an fp32 copy of ``x``."""
    *lead, length, dim = x.shape
    full = length // block
    parts = []
    if full:
        parts.append(x[..., :full * block, :].reshape(*lead, full, block, dim).sum(-2, dtype=torch.float32) / block)
    if length % block:
        parts.append(x[..., full * block:, :].mean(-2, dtype=torch.float32, keepdim=True))
    return torch.cat(parts, dim=-2)


def pooled_block_probs(q: Tensor, k: Tensor, grid: BlockGrid, scale: float) -> Tensor:
    """Softmax over reachable key blocks of mean-pooled query/key block scores.

    Returns ``(B, H, NQ, NK)`` float32 (per query head; 0 on unreachable blocks).
    """
    from .kernels import block_mean_pool

    kv_heads = k.shape[1]
    qp = group_queries(block_mean_pool(q, grid.q_block), kv_heads)  # (B, Hkv, G, NQ, D)
    kp = block_mean_pool(k, grid.kv_block)  # (B, Hkv, NK, D)
    scores = torch.einsum("bngqd,bnkd->bngqk", qp, kp) * scale
    scores = scores.masked_fill(~grid.reachable, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs.flatten(1, 2)


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


# The last rows' exact attention is (B, heads, rows, Skv) floats, 2 GB for 32 heads, 128 rows and
# 128K keys: wherever it is formed whole, this many KV groups at a time.
KV_GROUPS_PER_CHUNK = 2


def last_rows_line_scores(q: Tensor, k: Tensor, rows: int, scale: float, causal: bool = True):
    """Column sums and diagonal sums of the last ``rows`` queries' exact attention, each
    ``(B, H, Skv)`` float32: the vertical and slash scores of MInference / FlexPrefill. Reference of
    :func:`sparse_attn.methods.kernels.line_scores`. ``KV_GROUPS_PER_CHUNK`` KV groups at a time, so
    the attention it sums stays bounded at long context."""
    kv_heads, group, step = k.shape[1], q.shape[1] // k.shape[1], KV_GROUPS_PER_CHUNK
    vertical, slash = [], []
    for kv in range(0, kv_heads, step):
        attn = last_rows_attention(q[:, kv * group:(kv + step) * group], k[:, kv:kv + step], rows, scale, causal)
        vertical.append(attn.sum(-2))
        slash.append(diagonal_sums(attn))
    return torch.cat(vertical, 1), torch.cat(slash, 1)


def select_top_p(scores: Tensor, p, min_keep=1, valid: Tensor | None = None) -> Tensor:
    """Per row, the fewest entries (largest first) whose share of the row total reaches ``p``.

    ``scores (..., N)`` non-negative; ``p`` a float or a tensor broadcastable to ``scores[..., :1]``;
    ``min_keep`` entries are always kept (if valid). Returns a bool mask. Reference of
    :func:`sparse_attn.methods.kernels.top_p_mask`.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, 0.0)
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    total = sorted_scores.sum(-1, keepdim=True).clamp_min(1e-30)
    before = (torch.cumsum(sorted_scores, -1) - sorted_scores) / total  # mass of strictly larger ones
    p = torch.as_tensor(p, device=scores.device, dtype=scores.dtype)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = (before < p) | (rank < min_keep)
    keep_sorted &= sorted_scores > 0 if valid is None else torch.ones_like(keep_sorted)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return mask if valid is None else mask & valid


def select_top_k(scores: Tensor, k, valid: Tensor | None = None, k_max: int | None = None) -> Tensor:
    """Per row, the ``k`` largest entries (``k`` int or a per-row tensor). Returns a bool mask.

    ``k_max`` (an upper bound of ``k`` known on the host) spares reading ``k.max()`` from the
    device, a synchronization in the middle of an estimate."""
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    if isinstance(k, int):
        k_max = k
    k = torch.as_tensor(k, device=scores.device)
    if k_max is None:
        k_max = int(k.max()) if k.numel() else 0
    most = min(int(k_max), scores.shape[-1])
    if 0 < most <= scores.shape[-1] // 4:  # a partial selection: far cheaper than a full sort of long rows
        order = torch.topk(scores, most, dim=-1, sorted=True).indices
    else:
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.arange(order.shape[-1], device=scores.device)
    keep_sorted = (rank < k[..., None] if k.dim() else rank < k).expand_as(order)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, keep_sorted)
    return mask if valid is None else mask & valid


def lines_to_blocks(grid: BlockGrid, vertical: Tensor, slash: Tensor) -> Tensor:
    """Block mask ``(B, H, NQ, NK)`` covering token-level vertical columns and slash diagonals.

    ``vertical``: bool ``(B, H, Skv)`` kept key columns; ``slash``: bool ``(B, H, Skv)`` kept
    diagonals by distance ``o = query_pos - key_pos``. A block is kept when a kept line crosses it
    at an allowed (causal) position. Each test is a range query on prefix counts of the kept lines,
    so every block is answered at once: O(NQ x NK + Skv) work whatever the number of lines.
    """
    b, h, kv_len = vertical.shape
    nq, nk = grid.reachable.shape
    dev = vertical.device
    q_first, q_last = grid.q_first.to(dev)[:, None], grid.q_last.to(dev)[:, None]  # (NQ, 1)
    k_first, k_last = grid.k_first.to(dev)[None, :], grid.k_last.to(dev)[None, :]  # (1, NK)

    def any_kept(kept: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Per block, whether ``kept (B, H, Skv)`` has an entry in ``[lo, hi]`` ((NQ, NK) bounds)."""
        counts = torch.nn.functional.pad(kept.to(torch.int32).cumsum(-1), (1, 0))  # counts[i]: kept < i
        lo, hi = lo.clamp(0, kv_len), (hi + 1).clamp(0, kv_len)
        between = counts.gather(-1, hi.flatten().expand(b, h, -1)) - counts.gather(-1, lo.flatten().expand(b, h, -1))
        return (between > 0).view(b, h, nq, nk) & (hi > lo)

    # Column j meets block (qb, kb) at an allowed position iff k_first <= j <= min(k_last, q_last);
    # diagonal o iff q_first - k_last <= o <= q_last - k_first (o >= 0: causal).
    columns = any_kept(vertical, k_first.expand(nq, nk), torch.minimum(k_last, q_last))
    diagonals = any_kept(slash, (q_first - k_last).clamp(min=0), q_last - k_first)
    return (columns | diagonals) & grid.reachable


def jensen_shannon(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Jensen-Shannon divergence (natural log) between distributions along the last dim."""
    p = p / p.sum(-1, keepdim=True).clamp_min(eps)
    q = q / q.sum(-1, keepdim=True).clamp_min(eps)
    m = 0.5 * (p + q)

    def kl(a, b):
        return (a * (torch.log(a.clamp_min(eps)) - torch.log(b.clamp_min(eps)))).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def default_scale(q: Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])
