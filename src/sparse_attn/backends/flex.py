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

# Compiled Flex on some torch versions (seen on 2.11 with an H100) only takes blocks of 128 tokens:
# finer query or key blocks fail to compile ("Q and KV block size must be divisible by BLOCK_M and
# BLOCK_N"), forward and backward. Finer layouts then run on a 128-token block union with an exact
# token-level mask_mod.
_FLEX_CUDA_BLOCK = 128


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


def _exact_coarse_block_mask(layout: BlockSparseLayout, num_heads: int, q_block: int, kv_block: int):
    """A Flex BlockMask on ``q_block`` x ``kv_block`` token blocks (multiples of the layout's) whose
    mask_mod reproduces ``layout`` exactly."""
    from torch.nn.attention.flex_attention import BlockMask

    lay = layout.expand(heads=num_heads) if layout.heads not in (1, num_heads) else layout
    fine = lay.to_dense()  # (Bl, Hl, NQ, NK): block level, small
    q_ratio, kv_ratio = q_block // lay.q_block, kv_block // lay.kv_block
    nq_coarse, nk_coarse = -(-lay.q_len // q_block), -(-lay.kv_len // kv_block)
    padded = torch.nn.functional.pad(fine, (0, nk_coarse * kv_ratio - fine.shape[-1],
                                            0, nq_coarse * q_ratio - fine.shape[-2]))
    coarse = padded.view(*fine.shape[:-2], nq_coarse, q_ratio, nk_coarse, kv_ratio).any(-1).any(-2)
    cnt, idx = dense_to_csr(coarse)
    idx = pad_block_width(idx, nk_coarse)
    fine_q, fine_kv, kv_len, causal = lay.q_block, lay.kv_block, lay.kv_len, lay.causal
    offset = lay.q_offset if causal else 0
    b_mod, h_mod = fine.shape[0], fine.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = fine[b % b_mod, h % h_mod, q_idx // fine_q, kv_idx // fine_kv] & (kv_idx < kv_len)
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        return keep

    return BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=(q_block, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(lay.q_len, lay.kv_len))


def _needs_coarse_blocks(layout: BlockSparseLayout, cuda: bool) -> bool:
    """Whether compiled Flex gets the layout on 128-token blocks (finer blocks that divide 128)."""
    blocks = (layout.q_block, layout.kv_block)
    return cuda and blocks != (_FLEX_CUDA_BLOCK,) * 2 and all(_FLEX_CUDA_BLOCK % b == 0 for b in blocks)


def flex_attention_forward(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, scale: float):
    """Returns ``(out, lse)`` like the reference backend (LSE in natural log, float32)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if _needs_coarse_blocks(layout, q.is_cuda):
        block_mask = _exact_coarse_block_mask(layout, heads, _FLEX_CUDA_BLOCK, _FLEX_CUDA_BLOCK)
    else:
        block_mask = layout.to_flex_block_mask(num_heads=heads, batch=q.shape[0],
                                               block_lookup=not q.is_cuda)
    out, lse = _flex_call(q, k, v, block_mask, scale, enable_gqa=heads != kv_heads)
    return out, lse.float()
