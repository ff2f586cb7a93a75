"""NSAAttention: Native Sparse Attention as a module whose selected and window branches run on the
library's block-sparse kernels (forward and backward).

The selected branch lets every query token read its own blocks. A layout keeps blocks per query
*block*, so the queries are laid out token-major: the ``G`` query heads of a KV group at one token
form one query block (padded to 16 rows, the smallest kernel block, when ``G < 16``), and one layout
row per token and KV group lists the token's selected blocks before its own block (non-causal call,
key blocks of ``l'``). The token's own block is a second, causal call whose layout keeps the
diagonal block; the two results merge by their log-sum-exp. The window branch is one causal call
with a banded layout. The compressed branch and the selection are PyTorch (:mod:`.reference`).

Queries that are the last ``Sq < S`` positions (decoding with a KV cache, or a prefill chunk after
earlier ones) take :meth:`NSAAttention._tail`: one query token (a decode step) reads its selected
blocks and its window through :func:`~sparse_attn.decode.decode_attention` (the split-KV kernel on
CUDA, pages of ``l'`` and of ``window_block`` tokens); several read through dense ``Sq x S`` masks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..attention import sparse_attention
from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout, dense_to_csr
from ..options import KernelOptions, resolve_kernel_options
from .config import NSAConfig
from .compressed import compressed_branch
from .reference import PARAMETER_NAMES, masked_branches, nsa_gates
from .shared_reads import shared_reads_attention, shared_reads_supported, shared_tiles, tile_tokens

__all__ = ["NSAAttention"]


def _group_rows(group: int) -> int:
    """Query rows per token in the selected branch's token-major call: ``group`` padded to a kernel block."""
    for size in SUPPORTED_BLOCK_SIZES:
        if size >= group:
            return size
    raise ValueError(f"NSAAttention supports at most {SUPPORTED_BLOCK_SIZES[-1]} query heads per KV head, "
                     f"got {group}")


def _earlier_blocks(blocks: Tensor, own: Tensor):
    """``(counts, indices)`` as :func:`~sparse_attn.layout.dense_to_csr` gives them for the blocks
    before each token's own, from block indices ``(B, Hkv, S, n)`` (-1: none) and ``own (S,)``."""
    past = (blocks >= 0) & (blocks < own[:, None].to(blocks.dtype))
    ordered = torch.where(past, blocks, torch.iinfo(blocks.dtype).max).sort(-1).values
    counts = past.sum(-1, dtype=torch.int32)
    slot = torch.arange(blocks.shape[-1], device=blocks.device)
    indices = torch.where(slot < counts[..., None], ordered, 0).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


class NSAAttention(nn.Module):
    """Native Sparse Attention of ``q (B, H, Sq, D)`` over ``k, v (B, Hkv, S, D)``: causal, the queries
    the last ``Sq <= S`` positions (``Sq = S``: self-attention over a whole sequence; fewer: decoding
    with a KV cache); any ``Hkv`` dividing ``H``, up to 256 query heads per KV head.

    Args:
        config: an :class:`NSAConfig`.
        num_heads, num_kv_heads, head_dim: the shapes the parameters are made for.

    Parameters (names as in :data:`~sparse_attn.nsa.reference.PARAMETER_NAMES`): the key and value
    compression MLPs with their intra-block position embeddings, and per-head gate weights. At
    initialisation the MLPs' output layers and the gate weights are zero: compression is mean
    pooling and every gate is ``sigmoid(gate_bias)`` (:meth:`reset_parameters`).
    """

    def __init__(self, config: NSAConfig, num_heads: int, num_kv_heads: int, head_dim: int,
                 gate_bias=(0.0, 0.0, 0.0)) -> None:
        super().__init__()
        if not isinstance(config, NSAConfig):
            raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
        for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.config, self.num_heads, self.num_kv_heads, self.head_dim = config, num_heads, num_kv_heads, head_dim
        self.group_rows = _group_rows(num_heads // num_kv_heads)
        block, hidden = config.compress_block, config.hidden(head_dim)
        shapes = {"pos": (block, head_dim), "fc1_weight": (hidden, block * head_dim), "fc1_bias": (hidden,),
                  "fc2_weight": (head_dim, hidden), "fc2_bias": (head_dim,)}
        for name in PARAMETER_NAMES[:-2]:
            self.register_parameter(name, nn.Parameter(torch.empty(shapes[name[2:]])))
        self.gate_weight = nn.Parameter(torch.empty(num_heads, 3, head_dim))
        self.gate_bias = nn.Parameter(torch.empty(num_heads, 3))
        self.reset_parameters(gate_bias)

    def reset_parameters(self, gate_bias=(0.0, 0.0, 0.0)) -> None:
        """Position embeddings ``N(0, 0.02)``, first MLP layers as ``nn.Linear``, zero output layers
        and gate weights, gate biases ``gate_bias`` (compressed, selected, window)."""
        with torch.no_grad():
            for t in "kv":
                nn.init.normal_(getattr(self, f"{t}_pos"), std=0.02)
                fc1 = getattr(self, f"{t}_fc1_weight")
                nn.init.kaiming_uniform_(fc1, a=math.sqrt(5))
                bound = 1 / math.sqrt(fc1.shape[1])
                nn.init.uniform_(getattr(self, f"{t}_fc1_bias"), -bound, bound)
                nn.init.zeros_(getattr(self, f"{t}_fc2_weight"))
                nn.init.zeros_(getattr(self, f"{t}_fc2_bias"))
            nn.init.zeros_(self.gate_weight)
            self.gate_bias.copy_(torch.tensor(gate_bias, dtype=self.gate_bias.dtype).expand(self.num_heads, 3))

    def nsa_params(self) -> dict:
        """The parameters by name, as :func:`~sparse_attn.nsa.nsa_reference` takes them."""
        return {name: getattr(self, name) for name in PARAMETER_NAMES}

    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim)")
        expected = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[1] != expected[name] or t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must have {expected[name]} heads of dim {self.head_dim}, "
                                 f"got shape {tuple(t.shape)}")
        if k.shape[2] != v.shape[2] or not 0 < q.shape[2] <= k.shape[2] or k.shape[:2] != v.shape[:2] \
                or q.shape[0] != k.shape[0]:
            raise ValueError(f"q must hold 1 to S queries (the last positions) over k and v of one batch and S "
                             f"keys, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, backend: str = "auto",
                kernel_options: Optional[KernelOptions] = None, selection: Optional[Tensor] = None,
                return_selection: bool = False, compressed_kv: Optional[tuple] = None):
        """``(B, H, Sq, D)`` NSA output; with ``return_selection`` also the bool ``(B, Hkv, Sq, Ns)``
        blocks each query token's group read. ``selection`` replaces the computed choice; ``backend``
        and ``kernel_options`` go to :func:`~sparse_attn.sparse_attention` (and, for a decode step, to
        :func:`~sparse_attn.decode.decode_attention`); ``compressed_kv``: the compressed keys and values
        ``(kc, vc)`` of ``k`` and ``v`` (:class:`~sparse_attn.nsa.CompressedKVCache` keeps them with a KV
        cache), instead of compressing the whole of ``k`` and ``v`` in this call."""
        self._check(q, k, v)
        seq = k.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        params = {name: p.to(q.dtype) for name, p in self.nsa_params().items()}
        call = dict(scale=scale, backend=backend, kernel_options=kernel_options)
        out_cmp, chosen, blocks = compressed_branch(q, k, v, params, self.config, scale, backend=backend,
                                                    kernel_options=kernel_options, select=selection is None,
                                                    compressed=compressed_kv, return_blocks=True)
        if selection is not None:
            expected = (q.shape[0], self.num_kv_heads, q.shape[2], math.ceil(seq / self.config.select_block))
            if not isinstance(selection, Tensor) or selection.dtype != torch.bool or tuple(selection.shape) != expected:
                raise ValueError(f"selection must be a bool tensor of shape {expected} (batch, KV heads, tokens, "
                                 f"selection blocks), got {getattr(selection, 'shape', selection)!r}")
            chosen, blocks = selection, None
        if q.shape[2] < seq:
            out_slc, out_win = self._tail(q, k, v, chosen, call, any_count=selection is not None)
        else:
            out_slc = self._selected(q, k, v, chosen, call, blocks)
            out_win = sparse_attention(q, k, v, self._window_layout(seq, q.device), **call)
        gates = nsa_gates(q, params)
        out = gates[..., 0:1] * out_cmp + gates[..., 1:2] * out_slc + gates[..., 2:3] * out_win
        return (out, chosen) if return_selection else out

    def forward_varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, scale: Optional[float] = None,
                       backend: str = "auto", kernel_options: Optional[KernelOptions] = None) -> Tensor:
        """NSA over a packed batch of sequences (causal self-attention within each): ``q (total, H, D)``,
        ``k, v (total, Hkv, D)``, ``cu_seqlens`` int ``(num_seqs + 1,)`` offsets from 0 to ``total``
        (read on the host). Returns ``(total, H, D)``, differentiable like :meth:`forward`; each
        sequence runs as its own :meth:`forward` call (one set of kernel launches per sequence)."""
        for name, t, heads in (("q", q, self.num_heads), ("k", k, self.num_kv_heads), ("v", v, self.num_kv_heads)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[1] != heads or t.shape[2] != self.head_dim:
                raise ValueError(f"{name} must be a packed (total, {heads}, {self.head_dim}) tensor, got "
                                 f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if not q.shape[0] == k.shape[0] == v.shape[0]:
            raise ValueError(f"q, k, v must hold the same tokens, got totals {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a 1-D int tensor of num_seqs + 1 offsets")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != q.shape[0] or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the packed length {q.shape[0]}, got {offsets}")
        outs = []
        for start, end in zip(offsets, offsets[1:]):
            if end == start:
                continue
            views = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, heads, L, D)
            out = self.forward(*views, scale=scale, backend=backend, kernel_options=kernel_options)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs) if outs else q.new_zeros(q.shape)

    def _tail(self, q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, call: dict, any_count: bool = False):
        """Selected and window branches of queries that are the last ``Sq < S`` positions
        (``any_count``: ``chosen`` may hold more than ``select_blocks`` blocks, a caller's selection)."""
        seq = k.shape[2]
        config = self.config
        if q.shape[2] > 1:
            return masked_branches(q, k, v, chosen, config, call["scale"])
        from ..decode import decode_attention

        batch, kv_heads = q.shape[0], self.num_kv_heads
        k, v = k.contiguous(), v.contiguous()
        lens = torch.full((batch,), seq, dtype=torch.int32, device=q.device)
        backend = call["backend"] if call["backend"] in ("auto", "reference", "triton") else "auto"
        attend = dict(scale=call["scale"], backend=backend, check_values=False, kernel_options=call["kernel_options"])
        # Selected blocks as pages of l' tokens, in increasing order (padding repeats block 0, never read).
        blocks = torch.arange(chosen.shape[-1], device=q.device, dtype=torch.int32)
        width = chosen.shape[-1] if any_count else min(config.select_blocks, chosen.shape[-1])
        order = torch.where(chosen[:, :, 0], blocks, chosen.shape[-1]).sort(-1).values[..., :width]
        counts = chosen[:, :, 0].sum(-1).to(torch.int32)
        pages = torch.where(order < chosen.shape[-1], order, 0).to(torch.int32).contiguous()
        out_slc = decode_attention(q, k, v, pages, counts, lens, page_size=config.select_block, **attend)
        # The window: the window_blocks blocks of window_block tokens ending with the query's own.
        own = (seq - 1) // config.window_block
        first = max(0, own - config.window_blocks + 1)
        window = torch.arange(first, own + 1, device=q.device, dtype=torch.int32).expand(batch, kv_heads, -1)
        window_counts = torch.full((batch, kv_heads), own + 1 - first, dtype=torch.int32, device=q.device)
        out_win = decode_attention(q, k, v, window.contiguous(), window_counts, lens,
                                   page_size=config.window_block, **attend)
        return out_slc, out_win

    def _window_layout(self, seq: int, device) -> BlockSparseLayout:
        nb = math.ceil(seq / self.config.window_block)
        blk = torch.arange(nb, device=device)
        band = (blk[None, :] <= blk[:, None]) & (blk[None, :] > blk[:, None] - self.config.window_blocks)
        return BlockSparseLayout.from_dense(band, seq, seq, self.config.window_block, causal=True)

    def _selected_reads(self, q: Tensor, call: dict) -> str:
        """How the selected branch reads the blocks before each token's own: ``"shared_reads"``,
        ``"per_token"`` or ``"auto"`` (shared reads if they pay for this selection), from
        ``KernelOptions.nsa_selected``; ``"shared_reads"`` where they cannot run raises, naming why."""
        choice = resolve_kernel_options(call["kernel_options"]).nsa_selected
        if choice == "per_token" or call["backend"] not in ("auto", "triton"):
            return "per_token"
        reason = shared_reads_supported(q)
        if reason is None:
            return choice
        if choice == "shared_reads":
            raise ValueError(f"KernelOptions(nsa_selected='shared_reads') cannot run this call: {reason}")
        return "per_token"

    def _earlier_per_token(self, q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, call: dict,
                           blocks: Optional[Tensor]):
        """``(out, lse)`` of each token over its blocks before its own, token-major through the
        block-sparse kernels (the module docstring)."""
        batch, heads, seq, dim = q.shape
        kv_heads, rows, block = self.num_kv_heads, self.group_rows, self.config.select_block
        group = heads // kv_heads
        own = torch.arange(seq, device=q.device) // block
        if blocks is None:
            earlier = chosen & (torch.arange(chosen.shape[-1], device=q.device)[None, :] < own[:, None])
            counts, indices = dense_to_csr(earlier)  # one row per (batch, KV head, token)
        else:
            counts, indices = _earlier_blocks(blocks, own)
        layout = BlockSparseLayout(counts, indices, seq * rows, seq, rows, block, causal=False, check=False)
        qt = q.view(batch, kv_heads, group, seq, dim).transpose(2, 3)  # (B, Hkv, S, G, D)
        if rows > group:
            qt = torch.cat([qt, qt.new_zeros(batch, kv_heads, seq, rows - group, dim)], dim=3)
        out_e, lse_e = sparse_attention(qt.reshape(batch, kv_heads, seq * rows, dim), k, v, layout,
                                        return_lse=True, **call)
        out_e = out_e.view(batch, kv_heads, seq, rows, dim)[:, :, :, :group].transpose(2, 3).reshape(q.shape)
        lse_e = lse_e.view(batch, kv_heads, seq, rows)[..., :group].transpose(2, 3).reshape(batch, heads, seq)
        return out_e, lse_e

    def _selected(self, q: Tensor, k: Tensor, v: Tensor, chosen: Tensor, call: dict,
                  blocks: Optional[Tensor] = None) -> Tensor:
        """Selected-branch attention: the blocks before each token's own (shared reads or per token),
        the own block causal, merged by LSE. ``blocks``: the selection as the kernel's block indices
        (-1: none), read instead of ``chosen``."""
        seq, block = q.shape[2], self.config.select_block
        reads = self._selected_reads(q, call)
        tiles = None
        if reads != "per_token":
            tokens = tile_tokens(q.shape[1] // self.num_kv_heads, block)
            tiles = shared_tiles(chosen if blocks is None else None, blocks, seq, block, tokens)
            if reads == "auto" and not tiles.pay(q.shape[1] // self.num_kv_heads):
                tiles = None  # nearby tokens share too few blocks: per-token reads do less work
        if tiles is not None:
            out_e, lse_e = shared_reads_attention(q, k, v, tiles, block, call["scale"])
        else:
            out_e, lse_e = self._earlier_per_token(q, k, v, chosen, call, blocks)
        nb = math.ceil(seq / block)
        diagonal = BlockSparseLayout.from_dense(torch.eye(nb, dtype=torch.bool, device=q.device), seq, seq, block)
        out_o, lse_o = sparse_attention(q, k, v, diagonal, return_lse=True, **call)
        lse = torch.logaddexp(lse_e, lse_o)
        w_e, w_o = torch.exp(lse_e - lse)[..., None], torch.exp(lse_o - lse)[..., None]
        return (w_e * out_e.to(w_e.dtype) + w_o * out_o.to(w_o.dtype)).to(q.dtype)
