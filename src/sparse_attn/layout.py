"""BlockSparseLayout: the one data structure every sparsity method returns and every backend consumes.

A layout says, for every (batch, head, query block), which key blocks are attended. It is stored as
padded block-CSR in int32, the same shape of data as FlexAttention's ``kv_num_blocks`` /
``kv_indices``:

* ``kv_num_blocks``: ``(Bl, Hl, NQ)``, how many key blocks each query block keeps;
* ``kv_indices``: ``(Bl, Hl, NQ, W)``, the kept key-block indices, strictly increasing in the first
  ``kv_num_blocks`` slots of each row; the remaining slots are padding, may hold any value and are
  never read.

A layout holds contiguous tensors: strided or permuted inputs are copied once when it is built.

``Bl`` is 1 (broadcast over the batch) or the batch size. ``Hl`` is 1 (shared by all heads), the
number of KV heads (one selection per GQA group) or the number of query heads.

Geometry: ``q_len`` queries against ``kv_len`` keys, in blocks of ``q_block`` / ``kv_block`` tokens.
With ``causal=True`` query ``i`` sits at absolute position ``i + kv_len - q_len`` (bottom-right
aligned, as in chunked prefill against a KV cache) and sees keys at positions ``<=`` its own.
Nothing here ever builds a ``q_len x kv_len`` tensor except :meth:`to_token_mask`, which exists for
tests on small shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["BlockSparseLayout", "KVMajorLayout", "LayoutError"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)


class LayoutError(ValueError):
    """A layout is malformed or does not fit the tensors it is used with."""


@dataclass(frozen=True)
class KVMajorLayout:
    """The transpose of a layout: for every key block, the sorted query blocks that attend to it.

    ``q_num_blocks``: ``(Bl, Hl, NK)`` int32; ``q_indices``: ``(Bl, Hl, NK, Wq)`` int32. A backward
    kernel walks these lists to accumulate dK/dV for one key block without atomics.
    """

    q_num_blocks: Tensor
    q_indices: Tensor


def _block_bounds_of(q_len: int, kv_len: int, q_block: int, kv_block: int, causal: bool, device):
    """First/last token position of every query block (absolute, bottom-right aligned when causal)
    and key block of a geometry."""
    qb = torch.arange(-(-q_len // q_block), device=device, dtype=torch.int64)
    kb = torch.arange(-(-kv_len // kv_block), device=device, dtype=torch.int64)
    offset = kv_len - q_len if causal else 0
    q_first = qb * q_block + offset
    q_last = torch.clamp((qb + 1) * q_block, max=q_len) - 1 + offset
    k_first = kb * kv_block
    k_last = torch.clamp((kb + 1) * kv_block, max=kv_len) - 1
    return q_first, q_last, k_first, k_last


# Layouts of one geometry share these (a method's estimate builds a new layout per call, every call
# of a prefill the same geometry): a dozen small launches saved per use.
_cached_block_bounds = functools.lru_cache(maxsize=256)(_block_bounds_of)


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Block-sparse attention pattern in padded block-CSR form (see the module docstring).

    Construct with :meth:`from_dense`, :meth:`from_flex_block_mask`, a pattern in
    :mod:`sparse_attn.patterns`, or directly from index tensors (which are then validated).

    Example::

        >>> import torch
        >>> from sparse_attn import BlockSparseLayout
        >>> mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
        >>> layout = BlockSparseLayout.from_dense(mask, q_len=256, kv_len=256, block_size=64)
        >>> layout.density()
        1.0
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_len: int
    kv_len: int
    q_block: int = 64
    kv_block: int = 64
    causal: bool = True
    check: dataclasses.InitVar[bool] = True
    # Per-layout data the kernels derive once (block-list strides, tuning classes), keyed by their
    # launcher; never part of the layout's value (not compared, not copied by ``replace``).
    kernel_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self, check: bool) -> None:
        self._check_metadata()
        # The kernels index both tensors with unit strides along rows and slots: the layout owns
        # contiguous copies of strided or permuted inputs.
        for name in ("kv_num_blocks", "kv_indices"):
            tensor = getattr(self, name)
            if not tensor.is_contiguous():
                object.__setattr__(self, name, tensor.contiguous())
        if check:
            self.validate()

    # ------------------------------------------------------------------ geometry
    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.kv_len / self.kv_block)

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0 (``kv_len - q_len``); only meaningful when causal."""
        return self.kv_len - self.q_len

    @property
    def batch(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    def _block_bounds(self, device=None):
        """First/last token position of every query block (absolute) and key block (shared, read-only
        tensors: kept per geometry and device, except inside a CUDA-graph capture)."""
        device = torch.device(self.device if device is None else device)
        geometry = (self.q_len, self.kv_len, self.q_block, self.kv_block, self.causal, device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _block_bounds_of(*geometry)
        return _cached_block_bounds(*geometry)

    def causal_block_mask(self, device=None) -> Tensor:
        """``(NQ, NK)`` bool: blocks holding at least one allowed (query, key) pair."""
        q_first, q_last, k_first, _ = self._block_bounds(device)
        nq, nk = self.num_q_blocks, self.num_kv_blocks
        if not self.causal:
            return torch.ones(nq, nk, dtype=torch.bool, device=q_first.device)
        return k_first[None, :] <= q_last[:, None]

    def needs_mask_block(self, device=None) -> Tensor:
        """``(NQ, NK)`` bool: kept blocks here need a token mask (causal diagonal or key tail)."""
        q_first, _, _, k_last = self._block_bounds(device)
        nk = self.num_kv_blocks
        partial = torch.zeros(self.num_q_blocks, nk, dtype=torch.bool, device=q_first.device)
        if self.kv_len % self.kv_block:
            partial[:, nk - 1] = True
        if self.causal:
            partial |= k_last[None, :] > q_first[:, None]
        return partial

    # ------------------------------------------------------------------ checks
    def _check_metadata(self) -> None:
        for name in ("q_len", "kv_len", "q_block", "kv_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"{name} must be a positive int, got {value!r}")
        for name in ("q_block", "kv_block"):
            if getattr(self, name) not in SUPPORTED_BLOCK_SIZES:
                raise LayoutError(
                    f"{name}={getattr(self, name)} is not supported; use one of {SUPPORTED_BLOCK_SIZES}"
                )
        cnt, idx = self.kv_num_blocks, self.kv_indices
        if not isinstance(cnt, Tensor) or not isinstance(idx, Tensor):
            raise LayoutError("kv_num_blocks and kv_indices must be torch.Tensors")
        if cnt.dtype != torch.int32 or idx.dtype != torch.int32:
            raise LayoutError(
                f"kv_num_blocks and kv_indices must be int32, got {cnt.dtype} and {idx.dtype}"
            )
        if cnt.device != idx.device:
            raise LayoutError(
                f"kv_num_blocks is on {cnt.device} but kv_indices is on {idx.device}"
            )
        if cnt.dim() != 3:
            raise LayoutError(f"kv_num_blocks must be (batch, heads, q_blocks), got {tuple(cnt.shape)}")
        if idx.dim() != 4 or tuple(idx.shape[:3]) != tuple(cnt.shape) or idx.shape[3] < 1:
            raise LayoutError(
                f"kv_indices must be (batch, heads, q_blocks, width>=1) matching kv_num_blocks "
                f"{tuple(cnt.shape)}, got {tuple(idx.shape)}"
            )
        if cnt.shape[2] != self.num_q_blocks:
            raise LayoutError(
                f"kv_num_blocks has {cnt.shape[2]} query blocks but q_len={self.q_len} with "
                f"q_block={self.q_block} needs {self.num_q_blocks}"
            )

    def validate(self) -> "BlockSparseLayout":
        """Check index contents (range, sortedness, counts); raises :class:`LayoutError`."""
        cnt, idx = self.kv_num_blocks, self.kv_indices
        nk, width = self.num_kv_blocks, idx.shape[-1]
        if cnt.numel() == 0:
            return self
        bad_cnt = (cnt < 0) | (cnt > min(nk, width))
        if bool(bad_cnt.any()):
            where = tuple(int(i) for i in bad_cnt.nonzero()[0])
            raise LayoutError(
                f"kv_num_blocks{list(where)}={int(cnt[where])} is outside [0, min(num_kv_blocks={nk}, "
                f"width={width})]"
            )
        valid = torch.arange(width, device=idx.device) < cnt[..., None]
        out_of_range = valid & ((idx < 0) | (idx >= nk))
        if bool(out_of_range.any()):
            where = tuple(int(i) for i in out_of_range.nonzero()[0])
            raise LayoutError(
                f"kv_indices{list(where)}={int(idx[where])} is out of range [0, {nk}) for "
                f"kv_len={self.kv_len}, kv_block={self.kv_block}"
            )
        if width > 1:
            unsorted = valid[..., 1:] & (idx[..., 1:] <= idx[..., :-1])
            if bool(unsorted.any()):
                where = tuple(int(i) for i in unsorted.nonzero()[0])
                raise LayoutError(
                    f"kv_indices row {list(where[:3])} is not strictly increasing at slot {where[3] + 1}: "
                    f"{idx[where[:3]][: int(cnt[where[:3]])].tolist()}"
                )
        return self

    def check_compatible(self, batch: int, q_heads: int, kv_heads: int, q_len: int, kv_len: int,
                         device: torch.device) -> None:
        """Raise a clear error unless this layout can drive attention on the given shapes."""
        if self.q_len != q_len or self.kv_len != kv_len:
            raise LayoutError(
                f"layout was built for q_len={self.q_len}, kv_len={self.kv_len} but q has "
                f"{q_len} queries and k has {kv_len} keys"
            )
        if self.batch not in (1, batch):
            raise LayoutError(f"layout batch {self.batch} must be 1 or the query batch {batch}")
        if self.heads not in (1, kv_heads, q_heads):
            raise LayoutError(
                f"layout has {self.heads} heads; expected 1, the KV heads ({kv_heads}) or the "
                f"query heads ({q_heads})"
            )
        if self.device.type != torch.device(device).type or (
            self.device.index is not None and torch.device(device).index is not None
            and self.device.index != torch.device(device).index
        ):
            raise LayoutError(f"layout is on {self.device} but q is on {device}; use layout.to(q.device)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, block_mask: Tensor, q_len: int, kv_len: int, block_size: int | tuple = 64,
                   causal: bool = True) -> "BlockSparseLayout":
        """Build from a boolean block mask ``(B, H, NQ, NK)`` (or ``(NQ, NK)``)."""
        if block_mask.dtype != torch.bool:
            raise LayoutError(f"block_mask must be bool, got {block_mask.dtype}")
        if block_mask.dim() == 2:
            block_mask = block_mask[None, None]
        if block_mask.dim() != 4:
            raise LayoutError(f"block_mask must be (B, H, NQ, NK) or (NQ, NK), got {tuple(block_mask.shape)}")
        q_block, kv_block = block_size_pair(block_size)
        nq, nk = math.ceil(q_len / q_block), math.ceil(kv_len / kv_block)
        if tuple(block_mask.shape[2:]) != (nq, nk):
            raise LayoutError(
                f"block_mask has {tuple(block_mask.shape[2:])} blocks but q_len={q_len}, kv_len={kv_len} "
                f"with blocks {q_block}x{kv_block} need ({nq}, {nk})"
            )
        cnt, idx = dense_to_csr(block_mask)
        return cls(cnt, idx, q_len, kv_len, q_block, kv_block, causal, check=False)

    @classmethod
    def from_flex_block_mask(cls, block_mask, causal: bool = True) -> "BlockSparseLayout":
        """Build from a FlexAttention ``BlockMask`` (its partial and full lists are merged).

        Only the block structure is kept: a ``mask_mod`` inside partial blocks is not carried over.
        """
        cnt, idx = block_mask.kv_num_blocks, block_mask.kv_indices
        if block_mask.full_kv_num_blocks is not None:
            nk = idx.shape[-1]
            dense = csr_to_dense(cnt, idx, nk) | csr_to_dense(
                block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nk
            )
            cnt, idx = dense_to_csr(dense)
        q_len, kv_len = block_mask.seq_lengths
        q_block, kv_block = block_mask.BLOCK_SIZE
        cnt = cnt[..., : math.ceil(q_len / q_block)].to(torch.int32).contiguous()
        idx = idx[..., : cnt.shape[-1], :].to(torch.int32).contiguous()
        return cls(cnt, idx, int(q_len), int(kv_len), int(q_block), int(kv_block), causal)

    def replace(self, **changes) -> "BlockSparseLayout":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to(self, device) -> "BlockSparseLayout":
        return dataclasses.replace(
            self, kv_num_blocks=self.kv_num_blocks.to(device), kv_indices=self.kv_indices.to(device),
            check=False,
        )

    def crop(self, batch_index: int, q_len: int, kv_len: int) -> "BlockSparseLayout":
        """The layout of one sequence of a packed batch, cut to its own lengths.

        Rows past ``q_len`` and key blocks past ``kv_len`` are dropped (a varlen layout is built for
        the longest sequence; shorter ones use its top-left corner).
        """
        if q_len > self.q_len or kv_len > self.kv_len:
            raise LayoutError(
                f"cannot crop a layout of q_len={self.q_len}, kv_len={self.kv_len} to "
                f"q_len={q_len}, kv_len={kv_len}"
            )
        nq, nk = math.ceil(q_len / self.q_block), math.ceil(kv_len / self.kv_block)
        dense = self.to_dense()[min(batch_index, self.batch - 1)][None, :, :nq, :nk]
        cnt, idx = dense_to_csr(dense)
        return dataclasses.replace(self, kv_num_blocks=cnt, kv_indices=idx, q_len=q_len,
                                   kv_len=kv_len, check=False)

    def expand(self, batch: Optional[int] = None, heads: Optional[int] = None) -> "BlockSparseLayout":
        """Broadcast to ``batch`` and ``heads`` (a per-KV-group layout repeats each row ``heads/Hl`` times)."""
        cnt, idx = self.kv_num_blocks, self.kv_indices
        if heads is not None and heads != self.heads:
            if heads % self.heads:
                raise LayoutError(f"cannot expand a layout of {self.heads} heads to {heads} heads")
            rep = heads // self.heads
            cnt = cnt.repeat_interleave(rep, dim=1)
            idx = idx.repeat_interleave(rep, dim=1)
        if batch is not None and batch != self.batch:
            if self.batch != 1:
                raise LayoutError(f"cannot expand a layout of batch {self.batch} to batch {batch}")
            cnt = cnt.expand(batch, -1, -1)
            idx = idx.expand(batch, -1, -1, -1)
        return dataclasses.replace(
            self, kv_num_blocks=cnt.contiguous(), kv_indices=idx.contiguous(), check=False
        )

    def with_full_rows(self, heads: Tensor) -> "BlockSparseLayout":
        """This layout with every causally reachable block kept in the rows of the heads ``heads``
        marks: a bool ``(Hl,)`` (every sequence) or ``(B, Hl)`` (per sequence) over the layout's heads;
        the other rows unchanged. One layout, so one attention call runs full and sparse heads."""
        if not isinstance(heads, Tensor) or heads.dtype != torch.bool or heads.dim() not in (1, 2) \
                or heads.shape[-1] != self.heads or (heads.dim() == 2 and self.batch not in (1, heads.shape[0])):
            raise LayoutError(f"heads must be a bool tensor (heads,) or (batch, heads) over the layout's {self.heads} "
                              f"heads and batch {self.batch}, got "
                              f"{tuple(heads.shape) if isinstance(heads, Tensor) else type(heads).__name__}")
        heads = heads.to(self.device)
        rows = heads[None] if heads.dim() == 1 else heads
        dense = self.to_dense() | (rows[:, :, None, None] & self.causal_block_mask())
        cnt, idx = dense_to_csr(dense)
        return dataclasses.replace(self, kv_num_blocks=cnt, kv_indices=idx, check=False)

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> Tensor:
        """``(Bl, Hl, NQ, NK)`` bool block mask."""
        return csr_to_dense(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)

    def to_token_mask(self) -> Tensor:
        """``(Bl, Hl, q_len, kv_len)`` bool token mask, causal masking included. For tests only."""
        dense = self.to_dense()
        rows = torch.arange(self.q_len, device=self.device) // self.q_block
        cols = torch.arange(self.kv_len, device=self.device) // self.kv_block
        mask = dense[:, :, rows][:, :, :, cols]
        if self.causal:
            qpos = torch.arange(self.q_len, device=self.device) + self.q_offset
            mask = mask & (torch.arange(self.kv_len, device=self.device)[None, :] <= qpos[:, None])
        return mask

    def split_full_partial(self):
        """Split kept blocks into those needing a token mask and those that do not.

        Returns ``(partial_num, partial_idx, full_num, full_idx)``, each pair in this layout's CSR
        form. Partial blocks cross the causal diagonal or hold the key tail.
        """
        dense = self.to_dense()
        partial = self.needs_mask_block()
        p_cnt, p_idx = dense_to_csr(dense & partial)
        f_cnt, f_idx = dense_to_csr(dense & ~partial)
        return p_cnt, p_idx, f_cnt, f_idx

    def to_flex_block_mask(self, num_heads: Optional[int] = None, batch: Optional[int] = None,
                           block_lookup: bool = False):
        """FlexAttention ``BlockMask`` with the same kept blocks, causal and tail masking.

        Flex indexes mask heads as ``h % H_mask``, so a per-KV-group layout is expanded to
        ``num_heads`` query heads first (GQA groups are contiguous in HF and SDPA).
        Compiled Flex skips the blocks missing from the lists, but eager Flex (CPU) evaluates only
        ``mask_mod``; ``block_lookup=True`` makes ``mask_mod`` also look the block up in the layout
        so both agree.
        """
        from torch.nn.attention.flex_attention import BlockMask

        layout = self
        if num_heads is not None and layout.heads not in (1, num_heads):
            layout = layout.expand(heads=num_heads)
        if batch is not None and layout.batch not in (1, batch):
            raise LayoutError(f"layout batch {layout.batch} must be 1 or {batch}")
        nk = layout.num_kv_blocks
        p_cnt, p_idx, f_cnt, f_idx = layout.split_full_partial()
        p_idx, f_idx = pad_block_width(p_idx, nk), pad_block_width(f_idx, nk)
        offset = layout.q_offset if layout.causal else 0
        kv_len, causal = layout.kv_len, layout.causal

        dense = layout.to_dense() if block_lookup else None
        q_block, kv_block = layout.q_block, layout.kv_block

        def mask_mod(b, h, q_idx, kv_idx):
            keep = kv_idx < kv_len
            if dense is not None:
                keep = keep & dense[b % dense.shape[0], h % dense.shape[1], q_idx // q_block,
                                    kv_idx // kv_block]
            if causal:
                keep = keep & (kv_idx <= q_idx + offset)
            return keep

        return BlockMask.from_kv_blocks(
            p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=(layout.q_block, layout.kv_block),
            mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.kv_len),
        )

    @functools.cached_property
    def kv_major(self) -> KVMajorLayout:
        """:meth:`transpose`, computed once per layout (the backward kernels walk it on every call)."""
        return self.transpose()

    def transpose(self) -> KVMajorLayout:
        """Key-major form (per key block: sorted query blocks), built on the device in O(nnz log nnz).

        Never materializes the dense block mask.
        """
        cnt, idx = self.kv_num_blocks, self.kv_indices
        bl, hl, nq, width = idx.shape
        nk = self.num_kv_blocks
        device = idx.device
        valid = torch.arange(width, device=device) < cnt[..., None].long()
        bh = torch.arange(bl * hl, device=device).view(bl, hl, 1, 1).expand_as(idx)
        qb = torch.arange(nq, device=device).view(1, 1, nq, 1).expand_as(idx)
        key = (bh * nk + idx.long())[valid]
        q_of = qb[valid]
        order = torch.sort(key, stable=True).indices  # entries were (bh, qb)-ordered: qb stays sorted
        key, q_of = key[order], q_of[order]
        counts = torch.bincount(key, minlength=bl * hl * nk)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(key.numel(), device=device) - starts[key]
        width_q = max(int(counts.max()) if counts.numel() else 0, 1)
        q_indices = torch.zeros(bl * hl * nk, width_q, dtype=torch.int32, device=device)
        q_indices[key, slot] = q_of.to(torch.int32)
        return KVMajorLayout(
            counts.to(torch.int32).view(bl, hl, nk), q_indices.view(bl, hl, nk, width_q)
        )

    # ------------------------------------------------------------------ statistics
    def kept_blocks(self) -> Tensor:
        """``(Bl, Hl)`` kept blocks that hold at least one allowed pair."""
        return (self.to_dense() & self.causal_block_mask()).sum(dim=(-1, -2))

    def density_per_head(self) -> Tensor:
        """``(Bl, Hl)`` float: kept blocks over causally reachable blocks."""
        total = self.causal_block_mask().sum().clamp_min(1)
        return self.kept_blocks().double() / total

    def density(self) -> float:
        """Mean density over batch and heads, measured against the causal (or full) block count."""
        return float(self.density_per_head().mean())

    def stats(self) -> dict:
        """Summary numbers for logs and bug reports."""
        per_head = self.density_per_head()
        return {
            "q_len": self.q_len, "kv_len": self.kv_len, "blocks": (self.q_block, self.kv_block),
            "grid": (self.num_q_blocks, self.num_kv_blocks), "batch": self.batch, "heads": self.heads,
            "causal": self.causal, "density": float(per_head.mean()),
            "density_min": float(per_head.min()), "density_max": float(per_head.max()),
            "mean_blocks_per_row": float(self.kv_num_blocks.double().mean()),
        }

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"BlockSparseLayout(q_len={s['q_len']}, kv_len={s['kv_len']}, blocks={s['blocks']}, "
            f"batch={s['batch']}, heads={s['heads']}, causal={s['causal']}, density={s['density']:.3f})"
        )

    # ------------------------------------------------------------------ set operations
    def _combine(self, other: "BlockSparseLayout", op) -> "BlockSparseLayout":
        geometry = ("q_len", "kv_len", "q_block", "kv_block", "causal")
        for name in geometry:
            if getattr(self, name) != getattr(other, name):
                raise LayoutError(
                    f"cannot combine layouts with different {name}: {getattr(self, name)} vs "
                    f"{getattr(other, name)}"
                )
        a, b = self.to_dense(), other.to_dense().to(self.device)
        heads = max(a.shape[1], b.shape[1])
        if heads % a.shape[1] or heads % b.shape[1]:
            raise LayoutError(f"cannot combine layouts with {a.shape[1]} and {b.shape[1]} heads")
        a = a.repeat_interleave(heads // a.shape[1], dim=1)
        b = b.repeat_interleave(heads // b.shape[1], dim=1)
        if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
            raise LayoutError(f"cannot combine layouts of batch {a.shape[0]} and {b.shape[0]}")
        cnt, idx = dense_to_csr(op(a, b))
        return dataclasses.replace(self, kv_num_blocks=cnt, kv_indices=idx, check=False)

    def union(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        return self._combine(other, torch.logical_or)

    def intersection(self, other: "BlockSparseLayout") -> "BlockSparseLayout":
        return self._combine(other, torch.logical_and)

    __or__ = union
    __and__ = intersection

    # ------------------------------------------------------------------ display
    def to_string(self, batch: int = 0, heads: Optional[list] = None, max_cells: int = 48) -> str:
        """ASCII picture of the block mask, one panel per head.

        ``#`` kept, ``.`` reachable but skipped, blank above the causal diagonal. Grids larger than
        ``max_cells`` are pooled and drawn with a density ramp `` .:-=+*#``.
        """
        dense = self.to_dense()[min(batch, self.batch - 1)].cpu()
        reach = self.causal_block_mask(device="cpu")
        heads = list(range(min(self.heads, 4))) if heads is None else list(heads)
        nq, nk = dense.shape[-2:]
        pool = max(1, math.ceil(max(nq, nk) / max_cells))
        lines = [repr(self)]
        for h in heads:
            lines.append(f"head {h}: density {float(self.density_per_head()[min(batch, self.batch - 1), h]):.3f}")
            lines.extend(_draw(dense[h], reach, pool))
        if self.heads > len(heads):
            lines.append(f"... {self.heads - len(heads)} more heads")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()


# ---------------------------------------------------------------------- helpers
def block_size_pair(block_size) -> tuple:
    if isinstance(block_size, int):
        return block_size, block_size
    q_block, kv_block = block_size
    return int(q_block), int(kv_block)


def dense_to_csr(dense: Tensor):
    """Bool ``(B, H, NQ, NK)`` -> int32 counts and ascending padded indices (width >= 1)."""
    counts = dense.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True)
    idx = order[..., :width].to(torch.int32)
    idx = torch.where(torch.arange(width, device=dense.device) < counts[..., None], idx, 0)
    return counts.contiguous(), idx.contiguous()


def csr_to_dense(counts: Tensor, indices: Tensor, num_kv_blocks: int) -> Tensor:
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < counts[..., None]
    dense = torch.zeros(*counts.shape, num_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    target = torch.where(valid, indices.long(), num_kv_blocks)
    dense.scatter_(-1, target, True)
    return dense[..., :num_kv_blocks]


def pad_block_width(indices: Tensor, width: int) -> Tensor:
    if indices.shape[-1] >= width:
        return indices[..., :width].contiguous()
    pad = torch.zeros(*indices.shape[:-1], width - indices.shape[-1], dtype=indices.dtype,
                      device=indices.device)
    return torch.cat([indices, pad], dim=-1)


def _draw(dense: Tensor, reach: Tensor, pool: int) -> list:
    nq, nk = dense.shape
    if pool == 1:
        rows = []
        for i in range(nq):
            row = "".join("#" if dense[i, j] else ("." if reach[i, j] else " ") for j in range(nk))
            rows.append("|" + row.rstrip() + "")
        return rows
    ramp = " .:-=+*#"
    rows = []
    for i in range(0, nq, pool):
        row = []
        for j in range(0, nk, pool):
            kept = dense[i:i + pool, j:j + pool].float().sum()
            total = reach[i:i + pool, j:j + pool].float().sum()
            if total == 0:
                row.append(" ")
            else:
                frac = float(kept / total)
                row.append(ramp[min(len(ramp) - 1, math.ceil(frac * (len(ramp) - 1)))] if frac > 0 else "_")
        rows.append("|" + "".join(row).rstrip())
    return rows
