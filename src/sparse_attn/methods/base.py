"""The ``Method`` interface: one object per sparsity method, ``estimate(q, k) -> BlockSparseLayout``.

A method owns its knobs (scalars or per-head lists), per-layer overrides, and the rules every method
shares: selections are made per query head and merged per KV group (``granularity="kv"``, the
default: one layout row per GQA group, keys never repeated) or kept per query head
(``granularity="head"``); sink and diagonal blocks are kept unless told otherwise; the result is
always a valid causal layout. ``estimate(..., return_report=True)`` also returns an
:class:`EstimateReport` of the call; the method object keeps no state between calls.

Every knob has a declared type and range (a :class:`~.knobs.KnobSpec` in the class's ``KNOBS``),
checked whenever a method is built or a knob assigned; ``per_layer`` overrides are checked too.
Count knobs take an int (a count) or a float in (0, 1) (a share of the call's keys or key blocks),
resolved per call by :meth:`Method.count`. A method whose count knobs keep every block of a call
whatever the attention names them in its report (:attr:`EstimateReport.knob_dense`).

Decisions are per KV head: ``dense_heads`` names KV heads that keep every reachable block (full
causal rows) whatever the scores, and a KV group whose estimated density reaches ``dense_above``
does too; the others keep their selection, all in the one layout the call returns.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..layout import SUPPORTED_BLOCK_SIZES, BlockSparseLayout
from ..options import KernelOptions, resolve_kernel_options
from ..patterns.grid import BlockGrid, shared_block_grid
from .common import WorkTimer, default_scale, head_mask, index_list, per_kv_head
from .knobs import CheckedOnAssignment, KnobError, KnobSpec, resolve_count

METHODS: dict = {}
Knob = Union[float, Sequence[float]]  # a scalar knob, or one value per KV group or per query head


def register_method(cls):
    """Class decorator: make a method available to :func:`get_method` under ``cls.name``.

    Every knob (dataclass field) of the class needs a :class:`~.knobs.KnobSpec` in ``KNOBS`` (its
    own or a base class's); ``per_layer`` is checked by the base class."""
    specs = cls.knob_specs()
    missing = [f.name for f in dataclasses.fields(cls) if f.name != "per_layer" and f.name not in specs]
    if missing:
        raise TypeError(f"method {cls.name!r}: knob(s) {missing} have no KnobSpec; declare them in "
                        f"{cls.__name__}.KNOBS")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **knobs) -> "Method":
    """Instantiate a registered method by name, e.g. ``get_method("xattention", threshold=0.9)``.

    Raises ValueError on an unknown name, and :class:`~.knobs.KnobError` (a ValueError) on an
    unknown knob or a knob outside its declared type or range."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    cls = METHODS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(knobs) - names
    if unknown:
        detail = f"no knob(s) {sorted(unknown)}; knobs: {sorted(names)}"
        raise KnobError(f"method {name!r} has {detail}", owner=name, detail=detail)
    return cls(**knobs)


@dataclass
class EstimateReport:
    """What one ``estimate`` call chose and what it cost.

    ``seconds`` is the time of the estimate: with ``measure_cost`` on, its GPU time between CUDA
    events recorded around it (the queue is not drained first; wall time on CPU), else the host's
    wall time; ``density_per_head`` is averaged over the batch; ``details`` holds what
    a method reports beyond the layout (FlexPrefill: ``"query_aware"``, ``(B, H)`` bool, True where a
    head took the query-aware pattern). ``knob_dense`` names the knobs that made the call dense by
    themselves: their counts at this length keep every reachable block whatever the scores (e.g.
    ``("top_k",)`` when ``top_k`` is at least the key blocks of a row); empty otherwise.
    ``density_per_kv_head`` is the density of each KV group (the mean over its query heads and the
    batch); ``full_heads`` the KV heads that keep every reachable block in every sequence (those of
    ``dense_heads``, those that reached ``dense_above`` and those the scores made dense).
    """

    method: str
    layer_idx: Optional[int]
    seconds: float
    density: float
    density_per_head: list
    q_len: int
    kv_len: int
    details: dict = field(default_factory=dict)
    knob_dense: tuple = ()
    density_per_kv_head: list = field(default_factory=list)
    full_heads: tuple = ()


@dataclass
class Method(CheckedOnAssignment):
    """Base class. Subclasses set ``name`` and implement :meth:`select`."""

    name: ClassVar[str] = "method"
    # The declared type and range of each knob (merged along the class hierarchy by knob_specs()).
    KNOBS: ClassVar[dict] = {
        "block_size": KnobSpec.choice(*SUPPORTED_BLOCK_SIZES),
        "granularity": KnobSpec.choice("kv", "head"),
        "sink": KnobSpec.integer(0),
        "keep_diagonal": KnobSpec.boolean(),
        "measure_cost": KnobSpec.boolean(),
        "dense_heads": KnobSpec.indices("KV head"),  # checked against the call's KV heads by estimate
        "dense_above": KnobSpec.fraction(per_head=False),
    }

    block_size: int = 128
    granularity: str = "kv"
    sink: int = 64
    keep_diagonal: bool = True
    per_layer: dict = field(default_factory=dict)
    measure_cost: bool = True
    dense_heads: Union[int, Sequence[int]] = ()
    dense_above: float = 1.0

    def __post_init__(self):
        self.validate()
        self._start_checking()  # from here on, assigning a knob checks it (and the knobs it constrains) again

    def checked_fields(self):
        return self.knob_names()

    # -- knob checking ----------------------------------------------------------------------
    @classmethod
    def knob_specs(cls) -> dict:
        """``{knob: KnobSpec}`` of this class (a subclass's spec replaces its base's)."""
        specs: dict = {}
        for klass in reversed(cls.__mro__):
            specs.update(vars(klass).get("KNOBS", {}))
        return specs

    @classmethod
    def knob_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Check every knob against its spec, the constraints between knobs (:meth:`check_knobs`)
        and every ``per_layer`` override; raise :class:`~.knobs.KnobError` (a ValueError) on the
        first problem. Run when the method is built and when a knob is assigned."""
        specs = self.knob_specs()
        for f in dataclasses.fields(self):
            if f.name in specs:
                specs[f.name].check(self.name, f.name, getattr(self, f.name))
        self.check_knobs()
        self._check_per_layer()

    def check_knobs(self) -> None:
        """Constraints between knobs (each knob alone is already checked); subclasses add theirs."""

    def knob_error(self, knob: str, value, problem: str) -> KnobError:
        """``KnobError("<method>: <knob>=<value> <problem>")``, for :meth:`check_knobs`."""
        return self._error(f"{knob}={value!r} {problem}")

    def _error(self, detail: str) -> KnobError:
        return KnobError(f"{self.name}: {detail}", owner=self.name, detail=detail)

    def _check_per_layer(self) -> None:
        per_layer = self.per_layer
        if not isinstance(per_layer, Mapping):
            raise self.knob_error("per_layer", per_layer, "is not a dict {layer_idx: {knob: value}}")
        names = sorted(self.knob_names() - {"per_layer"})
        normalized = {}
        for key, override in per_layer.items():
            idx = key
            if isinstance(key, str) and key.strip().isdigit():  # JSON object keys are strings
                idx = int(key)
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise self.knob_error("per_layer", per_layer, f"has key {key!r}, not a layer index (an int >= 0)")
            where = f"per_layer[{idx}]"
            if not isinstance(override, Mapping):
                raise self.knob_error(where, override, "is not a dict {knob: value}")
            unknown = sorted(set(override) - set(names), key=str)
            if unknown:
                raise self._error(f"{where} has no knob(s) {unknown}; knobs: {names}")
            try:  # the method this layer gets, built once now so its knobs are checked now
                dataclasses.replace(self, per_layer={}, **override)
            except KnobError as err:
                raise self._error(f"{where}: {err.detail}") from None
            normalized[idx] = dict(override)
        if any(type(k) is not int for k in per_layer):
            object.__setattr__(self, "per_layer", normalized)

    # -- to implement -----------------------------------------------------------------------
    def select(self, q: Tensor, k: Tensor, grid: BlockGrid, scale: float,
               kernel_options: KernelOptions) -> Union[Tensor, tuple]:
        """Bool ``(B, H, NQ, NK)`` blocks to keep, per query head (before sinks/diagonal/merging),
        or ``(blocks, details)`` with a dict for :attr:`EstimateReport.details`. ``kernel_options``
        (resolved) goes to the estimation primitives."""
        raise NotImplementedError

    def dense_knobs(self, grid: BlockGrid, forced: Tensor) -> tuple:
        """The knobs whose values alone keep every reachable block of ``grid`` (beyond the
        ``forced`` sink and diagonal blocks), whatever the scores; ``()`` when none does. Methods
        with count knobs implement it; :meth:`estimate` puts it in the report."""
        return ()

    # -- shared machinery -------------------------------------------------------------------
    @staticmethod
    def count(value, total: int):
        """A count knob for a call with ``total`` of its unit: an int as is, a float share in
        (0, 1) as ``round(share * total)`` (at least 1); per-head lists entry by entry."""
        return resolve_count(value, total)

    def forced_blocks(self, grid: BlockGrid) -> Tensor:
        """``(NQ, NK)`` blocks kept whatever the scores: the sink blocks and (``keep_diagonal``) the
        diagonal ones."""
        forced = grid.sink_blocks(self.sink)
        return forced | grid.diagonal_blocks() if self.keep_diagonal else forced

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
        timer = WorkTimer(q.device) if return_report and method.measure_cost else None
        start = time.perf_counter()
        keep, details, grid = method._keep(q, k, scale, options)
        with torch.no_grad():
            layout = BlockSparseLayout.from_dense(keep, q_len, kv_len, method.block_size, causal=True)
        if not return_report:
            return layout
        seconds = timer.stop().seconds() if timer is not None else time.perf_counter() - start
        per_head = layout.density_per_head()
        knob_dense = ()
        if float(per_head.min()) >= 1.0 - 1e-9:  # every reachable block kept: was it the knobs?
            knob_dense = method.dense_knobs(grid, method.forced_blocks(grid) & grid.reachable)
        full = (per_head.view(per_head.shape[0], kv_heads, -1) >= 1.0 - 1e-9).all(2).all(0)
        report = EstimateReport(method.name, layer_idx, seconds, float(per_head.mean()), per_head.mean(0).tolist(),
                                q_len, kv_len, details, tuple(knob_dense), per_kv_head(per_head, kv_heads).tolist(),
                                tuple(int(h) for h in full.nonzero().flatten()))
        return layout, report

    def keep_mask(self, q: Tensor, k: Tensor, layer_idx: Optional[int] = None, *, scale: Optional[float] = None,
                  kernel_options: Optional[KernelOptions] = None) -> Tensor:
        """The blocks :meth:`estimate` keeps, as the bool ``(B, Hl, NQ, NK)`` block mask it builds its
        layout from (causally reachable blocks only; forced blocks and dense heads filled in), without
        building the layout: no host sync, for callers that only count blocks."""
        method = self.for_layer(layer_idx)
        _check_qk(q, k, method.name)
        return method._keep(q, k, default_scale(q) if scale is None else scale,
                            resolve_kernel_options(kernel_options))[0]

    def _keep(self, q: Tensor, k: Tensor, scale: float, options: KernelOptions):
        """``(keep, details, grid)``: the finalized block mask, the method's details, its block grid."""
        grid = shared_block_grid(q.shape[2], k.shape[2], self.block_size, causal=True, device=q.device)
        with torch.no_grad():
            keep = self.select(q.detach(), k.detach(), grid, scale, kernel_options=options)
            keep, details = keep if isinstance(keep, tuple) else (keep, {})
            keep = self._finalize(keep, grid, k.shape[1])
            keep = self._fill_heads(keep, grid, k.shape[1])
        return keep, details, grid

    def dense_head_mask(self, kv_heads: int, device=None, holder: str = "the call") -> Tensor:
        """Bool ``(Hkv,)``: the KV heads of ``dense_heads``; ValueError naming the knob when one of them
        is not one of the ``kv_heads`` KV heads ``holder`` has."""
        heads = index_list(self.dense_heads)
        bad = [h for h in heads if h >= kv_heads]
        if bad:
            raise ValueError(f"{self.name}: dense_heads={self.dense_heads!r} names KV head(s) {bad}; {holder} has "
                             f"{kv_heads} KV heads (0..{kv_heads - 1})")
        return head_mask(heads, kv_heads, device)

    def _fill_heads(self, keep: Tensor, grid: BlockGrid, kv_heads: int) -> Tensor:
        """``keep (B, Hl, NQ, NK)`` (Hl: KV or query heads) with full causal rows for the KV groups of
        ``dense_heads`` and those whose density (mean over the group and the batch) reaches
        ``dense_above``."""
        if self.dense_above >= 1.0 and not index_list(self.dense_heads):
            return keep
        full = self.dense_head_mask(kv_heads, keep.device)
        if self.dense_above < 1.0:
            density = keep.sum((-1, -2), dtype=torch.float32) / grid.reachable.sum().clamp_min(1)
            full = full | (per_kv_head(density, kv_heads) >= self.dense_above)
        rows = full.repeat_interleave(keep.shape[1] // kv_heads)
        return keep | (rows[None, :, None, None] & grid.reachable)

    def _finalize(self, keep: Tensor, grid: BlockGrid, kv_heads: int) -> Tensor:
        batch, heads = keep.shape[:2]
        if self.granularity == "kv" and heads != kv_heads:
            keep = keep.view(batch, kv_heads, heads // kv_heads, *keep.shape[2:]).any(2)
        return (keep | self.forced_blocks(grid)) & grid.reachable


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
