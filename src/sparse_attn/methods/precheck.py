"""Finding out cheaply whether a call pays: a pre-check on sampled query blocks before the full
estimate, and a cache of decisions per layer and length bucket.

:func:`~.cost.attend` with ``precheck=Precheck(...)`` first estimates only a few runs of query blocks
spread over the call (``share`` of the query blocks, at least one per run), each as a chunked
prefill against the keys up to its last row, with count knobs given as shares resolved against the
whole call: for the methods that choose each query block from its own row (XAttention, the pooled
methods, the oracle, Quest, the static patterns but ``random``, which draws its layout per shape)
the sampled rows are exactly the rows the full estimate would give. When the sampled density per KV
group says the call will not pay (every group at least the method's ``dense_above``, or, with a cost
model, the whole call predicted no faster than dense even with an estimate that costs nothing), the
call runs dense without the full estimate. Otherwise the full estimate runs and decides as usual.

A :class:`DecisionCache` keeps each call's final decision (sparse or dense) per layer and length
bucket (the powers of two of the query and key lengths) for the method it was made with; the next
``recheck_every - 1`` calls in the same bucket reuse it and skip the pre-check (and, for a dense
decision, the estimate), and the call after them decides afresh. A dense decision costs no accuracy
(dense is exact), and a cached sparse one still estimates every call, so what reuse risks is speed
only: a layer decided dense by one prompt stays dense for the next ones of its bucket until the
re-check, however sparse they are. On by default (``Precheck(cache=False)`` turns it off;
``recheck_every=1`` checks every call).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .common import WorkTimer, per_kv_head
from .knobs import CheckedOnAssignment, KnobError, KnobSpec, resolve_count

OWNER = "precheck"
OUTCOMES = ("dense", "estimate", "short", "cached dense", "cached sparse")


@dataclass
class Precheck(CheckedOnAssignment):
    """Settings of the pre-check: ``share`` of the call's query blocks sampled (in (0, 1); at least
    ``runs`` blocks), in ``runs`` runs of consecutive query blocks whose ends are spread evenly over
    the call (the last one ends at the call's last query); ``cache``: reuse decisions through a
    :class:`DecisionCache` where the caller keeps one (``patch`` does, per model), each by at most
    ``recheck_every - 1`` later calls of its layer and length bucket before one decides afresh.
    Checked when built and when a field is assigned (:class:`~.knobs.KnobError` naming the field)."""

    KNOBS = {"share": KnobSpec.real(0.0, 1.0, low_open=True, high_open=True), "runs": KnobSpec.integer(1),
             "cache": KnobSpec.boolean(), "recheck_every": KnobSpec.integer(1)}

    share: float = 1 / 32
    runs: int = 4
    cache: bool = True
    recheck_every: int = 16

    def __post_init__(self):
        self.validate()
        self._start_checking()

    def checked_fields(self):
        return set(self.KNOBS)

    def validate(self) -> None:
        for name, spec in self.KNOBS.items():
            spec.check(OWNER, name, getattr(self, name))

    @classmethod
    def from_dict(cls, data) -> "Precheck":
        """From ``{"share": ..., "runs": ..., "cache": ..., "recheck_every": ...}`` (any of them); an unknown key is a
        :class:`~.knobs.KnobError` naming it."""
        unknown = sorted(set(data) - set(cls.KNOBS), key=str)
        if unknown:
            detail = f"unknown key(s) {unknown}; keys: {sorted(cls.KNOBS)}"
            raise KnobError(f"{OWNER}: {detail}", owner=OWNER, detail=detail)
        return cls(**data)

    def spans(self, num_q_blocks: int) -> Optional[list]:
        """The sampled runs ``[(first, end), ...]`` of query blocks (``end`` excluded) of a call with
        ``num_q_blocks`` query blocks; None when the sample would be the whole call."""
        total = max(self.runs, math.ceil(self.share * num_q_blocks))
        if total >= num_q_blocks:
            return None
        runs = min(self.runs, total)
        length = -(-total // runs)
        spans, previous = [], 0
        for i in range(runs):
            end = round((i + 1) * num_q_blocks / runs)
            start = max(end - length, previous)
            if end > start:
                spans.append((start, end))
            previous = end
        return spans


@dataclass
class PrecheckReport:
    """What the pre-check did in one call. ``outcome``: ``"dense"`` (the sample said dense: the call
    ran dense, the estimate skipped), ``"estimate"`` (the sample said sparse may pay: the full
    estimate ran), ``"short"`` (the sample would be the whole call: the estimate ran, nothing
    sampled), ``"cached dense"`` / ``"cached sparse"`` (a cached decision: no pre-check; dense ran
    without an estimate, or the estimate ran). ``ms``: its time (as an estimate's, see
    :class:`~.base.EstimateReport`); ``share``: the sampled rows'
    share of the call's reachable blocks (0 when nothing was sampled); ``density_per_kv_head``: the
    sampled density of each KV group (empty when nothing was sampled)."""

    outcome: str
    ms: float = 0.0
    share: float = 0.0
    density_per_kv_head: list = field(default_factory=list)

    @property
    def skipped_estimate(self) -> bool:
        return self.outcome in ("dense", "cached dense")

    def as_record(self) -> dict:
        return {"outcome": self.outcome, "skipped_estimate": self.skipped_estimate, "ms": self.ms,
                "share": self.share, "density_per_kv_head": list(self.density_per_kv_head)}


class DecisionCache:
    """Decisions per ``(layer, q_len bucket, kv_len bucket)`` (buckets: ``n.bit_length()``, the power
    of two below ``n``), each kept with the method it was made for (its ``repr``: name and every
    knob) and the number of calls that reused it; an entry for another method or other knobs is not
    used. ``hits`` counts the decisions reused."""

    def __init__(self):
        self._entries: dict = {}
        self.hits = 0

    @staticmethod
    def key(layer_idx, q_len: int, kv_len: int) -> tuple:
        return layer_idx, int(q_len).bit_length(), int(kv_len).bit_length()

    def get(self, method, layer_idx, q_len: int, kv_len: int, max_reuses: Optional[int] = None) -> Optional[bool]:
        """True (sparse), False (dense), or None: no decision for this method and bucket, or it was
        already reused ``max_reuses`` times (None: no limit), and the caller decides afresh."""
        key = self.key(layer_idx, q_len, kv_len)
        entry = self._entries.get(key)
        if entry is None or entry[0] != repr(method):
            return None
        if max_reuses is not None and entry[2] >= max_reuses:
            del self._entries[key]
            return None
        self._entries[key] = (entry[0], entry[1], entry[2] + 1)
        self.hits += 1
        return entry[1]

    def put(self, method, layer_idx, q_len: int, kv_len: int, sparse: bool) -> None:
        """Keep a fresh decision (its reuse count starts at 0); a decision that was reused keeps its count."""
        key = self.key(layer_idx, q_len, kv_len)
        entry = self._entries.get(key)
        reuses = entry[2] if entry is not None and entry[0] == repr(method) and entry[1] == bool(sparse) else 0
        self._entries[key] = (repr(method), bool(sparse), reuses)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)


def _reachable(q_len: int, kv_len: int, q_block: int, kv_block: int, first: int, end: int) -> int:
    """Causally reachable key blocks of query blocks ``first..end-1`` (bottom-right aligned)."""
    offset, nk = kv_len - q_len, -(-kv_len // kv_block)
    return sum(min(nk, (min((j + 1) * q_block, q_len) - 1 + offset) // kv_block + 1) for j in range(first, end))


def counts_of_the_call(method, kv_len: int):
    """``method`` with each count knob given as a share resolved against a call of ``kv_len`` keys
    (or its key blocks), so that estimating a shorter sample keeps the call's counts."""
    changes = {}
    for name, spec in method.knob_specs().items():
        value = getattr(method, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if spec.share_of is None or not any(isinstance(v, float) for v in values):
            continue
        total = kv_len if spec.share_of == "the key length" else -(-kv_len // method.block_size)
        changes[name] = resolve_count(value, total)
    return dataclasses.replace(method, per_layer={}, **changes) if changes else method


def sample_density(method, q, k, layer_idx, spans: list, *, scale=None, kernel_options=None):
    """Estimate the query-block runs ``spans`` of the call ``q``, ``k`` with ``method``, each as a
    chunked prefill against the keys up to its last row. Returns ``(density (Hkv,), share)``: each KV
    group's density over the sampled rows and their share of the call's reachable blocks."""
    q_len, kv_len, kv_heads = q.shape[2], k.shape[2], k.shape[1]
    method = counts_of_the_call(method.for_layer(layer_idx), kv_len)
    block = method.block_size
    offset = kv_len - q_len
    kept, reach = None, 0
    for first, end in spans:
        rows_end = min(end * block, q_len)
        # The estimate's block mask, counted on the device: no layout is built, and nothing is read
        # back between the runs (the reachable blocks are counted on the host).
        keep = method.keep_mask(q[:, :, first * block:rows_end], k[:, :, :offset + rows_end], scale=scale,
                                kernel_options=kernel_options)
        blocks = keep.sum((-1, -2), dtype=torch.float64)
        kept = blocks if kept is None else kept + blocks
        reach += _reachable(rows_end - first * block, offset + rows_end, block, block, 0,
                            -(-(rows_end - first * block) // block))
    total = _reachable(q_len, kv_len, block, block, 0, -(-q_len // block))
    return per_kv_head(kept / max(reach, 1), kv_heads), reach / max(total, 1)


def run_precheck(method, q, k, layer_idx, precheck: Precheck, cost_model=None, *, scale=None,
                 kernel_options=None):
    """The pre-check of one call: ``(report, reason)``, ``reason`` a string when the call should run
    dense (the estimate skipped), else None. Without a cost model the call is dense when every KV
    group's sampled density is at least the layer's ``dense_above``; with one, when
    ``cost_model.choose_heads`` on the sampled densities predicts no gain even with an estimate that
    costs nothing (the pre-check's own time says little about the full estimate's: each sampled run
    pays the estimate's fixed costs)."""
    layer_method = method.for_layer(layer_idx)
    spans = precheck.spans(-(-q.shape[2] // layer_method.block_size))
    if spans is None:
        return PrecheckReport("short"), None
    # Timed with CUDA events on a GPU: the earlier queued work is not drained first, so the host's
    # launches of the sample overlap it; the one device sync is reading the densities.
    timer = WorkTimer(q.device) if layer_method.measure_cost else None
    start = time.perf_counter()
    with torch.no_grad():
        density, share = sample_density(method, q.detach(), k.detach(), layer_idx, spans, scale=scale,
                                        kernel_options=kernel_options)
        if timer is not None:
            timer.stop()
        density = density.tolist()
    ms = (timer.seconds() if timer is not None else time.perf_counter() - start) * 1e3
    sampled = f"pre-check on {share:.1%} of the blocks"
    if cost_model is None:
        dense = all(d >= layer_method.dense_above - 1e-9 for d in density)
        reason = (f"dense: {sampled}: every KV group at density >= dense_above {layer_method.dense_above:g} "
                  f"(sampled {min(density):.2f}-{max(density):.2f})") if dense else None
    else:
        batch, heads, q_len, dim = q.shape
        use, _, why = cost_model.choose_heads(density, 0.0, batch, heads, q_len, k.shape[2], dim)
        reason = None if use else f"dense: {sampled}: {why.removeprefix('dense: ')}"
    return PrecheckReport("dense" if reason else "estimate", ms, share, density), reason
