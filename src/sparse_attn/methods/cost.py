"""When does sparse pay? A small cost model and ``attend``, which estimates, decides and runs.

Every peer is slower than dense attention below roughly 8-10K tokens. ``CostModel`` predicts dense
and sparse times from a few per-device constants and picks per call; ``attend`` says what it chose.
The defaults come from our H100 measurements (docs/benchmarks.md, 2026-11-23: dense cuDNN causal
~606 TF/s; our kernel ~1.39x cuDNN's time at density 1; ~0.1 ms fixed cost per sparse call).
:func:`calibrate` re-measures them on the current device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..attention import sparse_attention
from ..layout import BlockSparseLayout
from ..backends.dense import dense_causal_attention
from ..options import KernelOptions
from ..patterns.grid import BlockGrid
from .precheck import DecisionCache, Precheck, PrecheckReport, run_precheck


@dataclass
class CostModel:
    """Predicts prefill attention times; all times in milliseconds."""

    min_kv_len: int = 8192  # below this, dense without even estimating
    dense_tflops: float = 606.0  # dense causal attention rate (FLOPs counted over the causal half)
    sparse_slowdown: float = 1.39  # our kernel's time at density 1 over dense time
    sparse_fixed_ms: float = 0.1  # per-call overhead of the sparse path
    device_name: str = "NVIDIA H100 80GB HBM3 (defaults)"
    measured: dict = field(default_factory=dict)

    def dense_ms(self, batch: int, heads: int, q_len: int, kv_len: int, dim: int) -> float:
        causal_pairs = q_len * kv_len - q_len * (q_len - 1) / 2  # bottom-right causal
        return 4.0 * batch * heads * causal_pairs * dim / (self.dense_tflops * 1e9)

    def sparse_ms(self, density: float, dense_ms: float) -> float:
        return self.sparse_fixed_ms + self.sparse_slowdown * density * dense_ms

    def worth_estimating(self, kv_len: int) -> tuple[bool, str]:
        if kv_len < self.min_kv_len:
            return False, f"kv_len {kv_len} < min_kv_len {self.min_kv_len}: dense"
        return True, ""

    def full_head_density(self) -> float:
        """The density from which a KV group's share of a sparse call costs at least its share of dense
        attention (``1 / sparse_slowdown``, at most 1): such a group gains nothing from skipping
        blocks, so it runs full causal rows (exact) inside the sparse call."""
        return min(1.0, 1.0 / self.sparse_slowdown)

    def choose_heads(self, density_per_kv_head, estimate_ms: float, batch: int, heads: int, q_len: int,
                     kv_len: int, dim: int) -> tuple[bool, list, str]:
        """Per KV group and for the call: ``(use_sparse, full, reason)``. ``full[g]`` is True where
        group ``g``'s density is at least :meth:`full_head_density` (it runs full rows, density 1);
        the call runs sparse when the fixed cost plus the sparse time of every group at its density
        (1 for full ones) plus ``estimate_ms`` is below dense."""
        limit = self.full_head_density()
        full = [float(d) >= limit - 1e-9 for d in density_per_kv_head]
        densities = [1.0 if f else float(d) for f, d in zip(full, density_per_kv_head)]
        dense = self.dense_ms(batch, heads, q_len, kv_len, dim)
        sparse = self.sparse_ms(sum(densities) / max(len(densities), 1), dense)
        heads_text = f" ({sum(full)} of {len(full)} KV heads full)" if any(full) else ""
        if sparse + estimate_ms < dense:
            return True, full, (f"sparse: predicted {sparse:.2f} ms{heads_text} + estimate {estimate_ms:.2f} ms < "
                                f"dense {dense:.2f} ms")
        return False, full, (f"dense: predicted sparse {sparse:.2f} ms{heads_text} + estimate {estimate_ms:.2f} ms "
                             f">= dense {dense:.2f} ms")

    def choose(self, density: float, estimate_ms: float, batch: int, heads: int, q_len: int,
               kv_len: int, dim: int) -> tuple[bool, str]:
        dense = self.dense_ms(batch, heads, q_len, kv_len, dim)
        sparse = self.sparse_ms(density, dense)
        if sparse + estimate_ms < dense:
            return True, f"sparse: predicted {sparse:.2f} ms + estimate {estimate_ms:.2f} ms < dense {dense:.2f} ms"
        return False, f"dense: predicted sparse {sparse:.2f} ms + estimate {estimate_ms:.2f} ms >= dense {dense:.2f} ms"


@dataclass
class AttendReport:
    """What :func:`attend` chose: ``knob_dense`` names the knobs that made the estimate dense by
    themselves (:attr:`~.base.EstimateReport.knob_dense`); ``density_per_kv_head`` is each KV group's
    density in the layout that ran (or would have run) and ``full_heads`` the KV heads that kept
    every reachable block in it (empty when no estimate ran)."""

    used_sparse: bool
    reason: str
    density: Optional[float]
    estimate_ms: float
    layout: Optional[BlockSparseLayout]
    knob_dense: tuple = ()
    density_per_kv_head: list = field(default_factory=list)
    full_heads: tuple = ()
    precheck: Optional[PrecheckReport] = None


def _knob_dense(method, layer_idx, q_len: int, kv_len: int, device) -> tuple:
    """The knobs that keep every reachable block of the whole call by themselves (what the full
    estimate would report), for a call decided without it."""
    layer_method = method.for_layer(layer_idx)
    grid = BlockGrid(q_len, kv_len, layer_method.block_size, causal=True, device=device)
    return tuple(layer_method.dense_knobs(grid, layer_method.forced_blocks(grid) & grid.reachable))


def attend(q: Tensor, k: Tensor, v: Tensor, method, *, layer_idx: Optional[int] = None,
           cost_model: Optional[CostModel] = None, backend: str = "auto", scale=None,
           kernel_options: Optional[KernelOptions] = None, precheck: Optional[Precheck] = None,
           decisions: Optional[DecisionCache] = None):
    """Estimate with ``method``, let ``cost_model`` (None: always sparse) decide, and run.

    Returns ``(out, AttendReport)``. The dense path is exact causal attention (SDPA).
    ``kernel_options`` (None: the current default) goes to ``method.estimate`` and the attention call.
    Decisions are per KV head: the method's ``dense_heads`` and ``dense_above`` give some heads full
    causal rows in its layout, and the cost model gives them to every KV group whose density is at
    least :meth:`CostModel.full_head_density`; then it predicts the whole call (full groups at
    density 1) and runs that one layout sparse, or everything dense.

    ``precheck`` (:class:`~.precheck.Precheck`) first estimates a sample of query blocks and runs
    dense without the full estimate when the sample says the call will not pay; with
    ``precheck.cache`` and a ``decisions`` cache, each final decision is kept per layer and length
    bucket and reused by the next ``precheck.recheck_every - 1`` calls there (a cached dense decision
    skips the estimate too); the call after them decides afresh. The report's
    ``precheck`` says what happened (None without a pre-check).
    """
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    if cost_model is not None:
        ok, reason = cost_model.worth_estimating(kv_len)
        if not ok:
            out = dense_causal_attention(q, k, v, scale, kernel_options=kernel_options)
            return out, AttendReport(False, reason, None, 0.0, None)
    checked = None
    cache = decisions if precheck is not None and precheck.cache else None
    if precheck is not None:
        cached = cache.get(method, layer_idx, q_len, kv_len, max_reuses=precheck.recheck_every - 1) \
            if cache is not None else None
        if cached is None:
            checked, dense_reason = run_precheck(method, q, k, layer_idx, precheck, cost_model, scale=scale,
                                                 kernel_options=kernel_options)
        else:
            checked = PrecheckReport("cached sparse" if cached else "cached dense")
            dense_reason = None if cached else f"dense: the decision cached for layer {layer_idx} at this length"
        if dense_reason is not None:
            if cache is not None:
                cache.put(method, layer_idx, q_len, kv_len, False)
            out = dense_causal_attention(q, k, v, scale, kernel_options=kernel_options)
            return out, AttendReport(False, dense_reason, None, 0.0, None,
                                     knob_dense=_knob_dense(method, layer_idx, q_len, kv_len, q.device),
                                     precheck=checked)
    layout, report = method.estimate(q, k, layer_idx, scale=scale, return_report=True, kernel_options=kernel_options)
    estimate_ms = report.seconds * 1e3
    use_sparse, reason = True, "sparse: no cost model"
    density, per_kv, full_heads = report.density, list(report.density_per_kv_head), report.full_heads
    if cost_model is not None:
        use_sparse, full, reason = cost_model.choose_heads(per_kv, estimate_ms, batch, heads, q_len, kv_len, dim)
        if use_sparse and not set(full_heads) >= {g for g, f in enumerate(full) if f}:
            layout = _full_rows(layout, full, k.shape[1])
            per_kv = [1.0 if f else d for f, d in zip(full, per_kv)]
            full_heads = tuple(g for g, f in enumerate(full) if f or g in full_heads)
            density = sum(per_kv) / len(per_kv)
    result = AttendReport(use_sparse, reason, density, estimate_ms, layout, report.knob_dense, per_kv, full_heads,
                          checked)
    if cache is not None:
        cache.put(method, layer_idx, q_len, kv_len, use_sparse)
    if not use_sparse:
        return dense_causal_attention(q, k, v, scale, kernel_options=kernel_options), result
    return sparse_attention(q, k, v, layout, scale=scale, backend=backend, kernel_options=kernel_options), result


def _full_rows(layout: BlockSparseLayout, full: list, kv_heads: int) -> BlockSparseLayout:
    """``layout`` with full causal rows for the KV groups ``full`` marks (a bool per KV head)."""
    if layout.heads % kv_heads:
        layout = layout.expand(heads=kv_heads)
    rows = torch.tensor(full, dtype=torch.bool).repeat_interleave(layout.heads // kv_heads)
    return layout.with_full_rows(rows)


def calibrate(device="cuda", seq_len: int = 16384, heads: int = 32, kv_heads: int = 8, dim: int = 128,
              repeats: int = 5) -> CostModel:
    """Measure this device's dense rate and our sparse slowdown and overhead; returns a CostModel."""
    from ..patterns import dense_layout, random_layout

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    q = torch.randn(1, heads, seq_len, dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, seq_len, dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def timed(fn):
        fn()
        if q.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if q.is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3 / repeats

    model = CostModel(device_name=torch.cuda.get_device_name() if q.is_cuda else "cpu")
    dense_ms = timed(lambda: dense_causal_attention(q, k, v))
    block = 128 if seq_len >= 1024 else 16
    full = dense_layout(seq_len, block_size=block, device=device)
    sparse_full_ms = timed(lambda: sparse_attention(q, k, v, full))
    tenth = random_layout(seq_len, density=0.1, num_heads=heads, block_size=block, device=device)
    sparse_tenth_ms = timed(lambda: sparse_attention(q, k, v, tenth))
    model.dense_tflops = model.dense_ms(1, heads, seq_len, seq_len, dim) * model.dense_tflops / dense_ms
    slope = max((sparse_full_ms - sparse_tenth_ms) / (1.0 - tenth.density()), 1e-6)
    model.sparse_slowdown = slope / dense_ms
    model.sparse_fixed_ms = max(sparse_full_ms - slope, 0.0)
    model.measured = {"dense_ms": dense_ms, "sparse_d1_ms": sparse_full_ms, "sparse_d0.1_ms": sparse_tenth_ms,
                      "seq_len": seq_len}
    return model
