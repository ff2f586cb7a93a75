"""The ``Method`` interface: one object per sparsity method, ``estimate(q, k) -> BlockSparseLayout``.

A method owns its knobs (scalars or per-head lists), per-layer overrides, and the rules every method
shares: selections are made per query head and merged per KV group (``granularity="kv"``, the
default: one layout row per GQA group, keys never repeated) or kept per query head
(``granularity="head"``); sink and diagonal blocks are kept unless told otherwise; the result is
always a valid causal layout. ``estimate(..., return_report=True)`` also returns an
:class:`EstimateReport` of the call; the method object keeps no state between calls.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence, Union

import torch
from torch import Tensor

from ..layout import BlockSparseLayout
from ..options import KernelOptions, resolve_kernel_options
from ..patterns.grid import BlockGrid
from .common import default_scale

METHODS: dict = {}
Knob = Union[float, Sequence[float]]  # a scalar knob, or one value per KV group or per query head


def register_method(cls):
    """Class decorator: make a method available to :func:`get_method` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **knobs) -> "Method":
    """Instantiate a registered method by name, e.g. ``get_method("xattention", threshold=0.9)``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    cls = METHODS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(knobs) - names
    if unknown:
        raise ValueError(f"method {name!r} has no knob(s) {sorted(unknown)}; knobs: {sorted(names)}")
    return cls(**knobs)


@dataclass
class EstimateReport:
    """What one ``estimate`` call chose and what it cost.

    ``seconds`` is the wall time of the estimate (the device synchronized before and after it when
    ``measure_cost`` is on); ``density_per_head`` is averaged over the batch; ``details`` holds what
    a method reports beyond the layout (FlexPrefill: ``"query_aware"``, ``(B, H)`` bool, True where a
    head took the query-aware pattern).
    """

    method: str
    layer_idx: Optional[int]
    seconds: float
    density: float
    density_per_head: list
    q_len: int
    kv_len: int
    details: dict = field(default_factory=dict)


@dataclass
class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`select`."""

    name: ClassVar[str] = "method"

    block_size: int = 128
    granularity: str = "kv"
    sink: int = 64
    keep_diagonal: bool = True
    per_layer: dict = field(default_factory=dict)
    measure_cost: bool = True

    def __post_init__(self):
        if self.granularity not in ("kv", "head"):
            raise ValueError(f"granularity must be 'kv' or 'head', got {self.granularity!r}")

    # -- to implement -----------------------------------------------------------------------
    def select(self, q: Tensor, k: Tensor, grid: BlockGrid, scale: float,
               kernel_options: KernelOptions) -> Union[Tensor, tuple]:
        """Bool ``(B, H, NQ, NK)`` blocks to keep, per query head (before sinks/diagonal/merging),
        or ``(blocks, details)`` with a dict for :attr:`EstimateReport.details`. ``kernel_options``
        (resolved) goes to the estimation primitives."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------
    def for_layer(self, layer_idx: Optional[int]) -> "Method":
        """This method with the overrides of ``per_layer[layer_idx]`` applied."""
        if layer_idx is None or layer_idx not in self.per_layer:
            return self
        return dataclasses.replace(self, per_layer={}, **self.per_layer[layer_idx])

    def head_values(self, value, heads: int, kv_heads: int, device) -> Tensor:
        """A knob as a float tensor ``(H,)``: scalar, per-KV-group list or per-query-head list."""
        if isinstance(value, (int, float)):  # filled on the device: no host-to-device copy, no sync
            return torch.full((heads,), float(value), dtype=torch.float32, device=device)
        t = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
        if t.numel() == 1:
            t = t.expand(heads)
        elif t.numel() == kv_heads:
            t = t.repeat_interleave(heads // kv_heads)
        elif t.numel() != heads:
            raise ValueError(
                f"{self.name}: a per-head knob has {t.numel()} values; expected 1, {kv_heads} (KV heads) "
                f"or {heads} (query heads)"
            )
        return t.contiguous()

    @staticmethod
    def knob_max(value) -> float:
        """The largest value of a knob (scalar or per-head list), read on the host."""
        return float(max(value)) if isinstance(value, (list, tuple)) else float(value)

    def row_values(self, value, scores: Tensor, kv_heads: int) -> Tensor:
        """A per-head knob broadcast to every row of ``scores (B, H, R, N)``: ``(B, H, R)``."""
        heads = scores.shape[1]
        return self.head_values(value, heads, kv_heads, scores.device).view(1, heads, 1).expand(
            scores.shape[:-1])

    def estimate(self, q: Tensor, k: Tensor, layer_idx: Optional[int] = None, *, scale: Optional[float] = None,
                 return_report: bool = False, kernel_options: Optional[KernelOptions] = None):
        """Choose the blocks for ``q (B, H, Sq, D)`` against ``k (B, Hkv, Skv, D)``.

        ``Sq <= Skv`` is chunked prefill (queries are the last ``Sq`` positions). Returns a causal
        layout with one row set per sequence (batch-aware) and per KV group or query head, or
        ``(layout, EstimateReport)`` with ``return_report=True``. ``layer_idx`` applies the overrides
        of ``per_layer``; ``kernel_options`` (None: the current default, see
        :func:`sparse_attn.options.kernel_options`) picks the estimation steps' kernels through its
        ``estimator_kernels``.
        """
        options = resolve_kernel_options(kernel_options)
        method = self.for_layer(layer_idx)
        _check_qk(q, k, method.name)
        batch, heads, q_len, _ = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        scale = default_scale(q) if scale is None else scale
        synchronize = return_report and method.measure_cost and q.is_cuda
        if synchronize:
            torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        grid = BlockGrid(q_len, kv_len, method.block_size, causal=True, device=q.device)
        with torch.no_grad():
            keep = method.select(q.detach(), k.detach(), grid, scale, kernel_options=options)
            keep, details = keep if isinstance(keep, tuple) else (keep, {})
            keep = method._finalize(keep, grid, kv_heads)
            layout = BlockSparseLayout.from_dense(keep, q_len, kv_len, method.block_size, causal=True)
        if not return_report:
            return layout
        if synchronize:
            torch.cuda.synchronize(q.device)
        seconds = time.perf_counter() - start
        per_head = layout.density_per_head()
        report = EstimateReport(method.name, layer_idx, seconds, float(per_head.mean()), per_head.mean(0).tolist(),
                                q_len, kv_len, details)
        return layout, report

    def _finalize(self, keep: Tensor, grid: BlockGrid, kv_heads: int) -> Tensor:
        batch, heads = keep.shape[:2]
        if self.granularity == "kv" and heads != kv_heads:
            keep = keep.view(batch, kv_heads, heads // kv_heads, *keep.shape[2:]).any(2)
        forced = grid.sink_blocks(self.sink)
        if self.keep_diagonal:
            forced = forced | grid.diagonal_blocks()
        return (keep | forced) & grid.reachable


def _check_qk(q: Tensor, k: Tensor, name: str) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{name}: q and k must be (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{name}: k heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{name}: q_len {q.shape[2]} exceeds kv_len {k.shape[2]} (queries must be the "
                         "last positions of the keys)")
