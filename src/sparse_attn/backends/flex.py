"""FlexAttention backend: runs a layout through ``torch.nn.attention.flex_attention``.

On CUDA the compiled Flex kernel is used; on CPU Flex runs eagerly (it then materializes the full
score matrix, so ``auto`` never picks it there; it stays available for cross-checks).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, dense_to_csr, pad_block_width

# Flex's backward on some torch versions (seen on 2.11) only handles 128-token key blocks; finer
# layouts are then run on a 128-block union with an exact token-level mask_mod.
_FLEX_BACKWARD_KV_BLOCK = 128


def flex_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        return False, f"torch.nn.attention.flex_attention cannot be imported: {exc}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """Compiled Flex (one compiled function for the process; each new length or layout geometry
    is a recompile of it)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# Past dynamo's recompile limit (8 by default) compiled Flex silently falls back to eager, which
# materializes S x S scores and runs out of memory at long context (seen at 128K on torch 2.11):
# Flex calls run with the limit raised to this, for their own compiles only.
FLEX_RECOMPILE_LIMIT = 64


def _recompile_limit():
    """A context in which dynamo allows :data:`FLEX_RECOMPILE_LIMIT` recompiles (the user's own
    setting is untouched outside it)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), FLEX_RECOMPILE_LIMIT)})


def _flex_call(q, k, v, block_mask, scale, enable_gqa):
    from torch.nn.attention import flex_attention as fa

    compiled = q.is_cuda
    fn = _compiled_flex() if compiled else fa.flex_attention
    with warnings.catch_warnings(), (_recompile_limit() if compiled else contextlib.nullcontext()):
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          return_aux=fa.AuxRequest(lse=True))
            return out, aux.lse
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=True)


def _exact_coarse_block_mask(layout: BlockSparseLayout, num_heads: int, kv_block: int):
    """A Flex BlockMask on ``kv_block``-token key blocks whose mask_mod reproduces ``layout`` exactly."""
    from torch.nn.attention.flex_attention import BlockMask

    lay = layout.expand(heads=num_heads) if layout.heads not in (1, num_heads) else layout
    fine = lay.to_dense()  # (Bl, Hl, NQ, NK): block level, small
    ratio = kv_block // lay.kv_block
    nk_coarse = -(-lay.kv_len // kv_block)
    padded = torch.nn.functional.pad(fine, (0, nk_coarse * ratio - fine.shape[-1]))
    coarse = padded.view(*fine.shape[:-1], nk_coarse, ratio).any(-1)
    cnt, idx = dense_to_csr(coarse)
    idx = pad_block_width(idx, nk_coarse)
    q_block, fine_kv, kv_len, causal = lay.q_block, lay.kv_block, lay.kv_len, lay.causal
    offset = lay.q_offset if causal else 0
    b_mod, h_mod = fine.shape[0], fine.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = fine[b % b_mod, h % h_mod, q_idx // q_block, kv_idx // fine_kv] & (kv_idx < kv_len)
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        return keep

    return BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(lay.q_len, lay.kv_len))


def flex_attention_forward(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float):
    """Returns ``(out, lse)`` like the reference backend (LSE in natural log, float32)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and layout.kv_block != _FLEX_BACKWARD_KV_BLOCK and q.is_cuda \
            and _FLEX_BACKWARD_KV_BLOCK % layout.kv_block == 0:
        block_mask = _exact_coarse_block_mask(layout, heads, _FLEX_BACKWARD_KV_BLOCK)
    else:
        block_mask = layout.to_flex_block_mask(num_heads=heads, batch=q.shape[0],
                                               block_lookup=not q.is_cuda)
    out, lse = _flex_call(q, k, v, block_mask, scale, enable_gqa=heads != kv_heads)
    return out, lse.float()
