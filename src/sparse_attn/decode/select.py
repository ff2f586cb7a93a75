"""Per-step page selection for decode: which pages of the KV cache each KV group reads.

:func:`select_pages` scores the pages of a :class:`~.page_index.PageIndex` against the step's queries
and keeps, per (sequence, KV head), at most ``ceil(budget / page_size)`` pages: the sink pages, the
recent pages and the best-scored others. Output shapes depend only on the budget and the index, so a
step can be captured in a CUDA graph.

**One selection per KV group.** The ``G = H / Hkv`` query heads of a group and the ``Sq`` query rows
pick their pages together, so every head of a group reads the same pages (keys are read once per
group). Each (query head, row) first turns its page scores into an estimated share of its attention
mass per page, ``softmax over pages of (scale * score + log(tokens in the page))``; the group's score
of a page is then the **sum** of these shares over heads and rows (``group_score="mass"``, the default:
the pages that hold the most attention mass summed over the group) or their **max**
(``group_score="max"``: a page that matters to any one head ranks high). Normalizing per head first
keeps a head with large logits from outvoting the others.

**Methods** (the per-head page score):

* ``"quest"``: Quest's upper bound of ``q . k`` over the page, ``sum_d max(q_d * min_d, q_d * max_d)``.
* ``"pooled"``: ``q . mean key`` of the page.
* ``"sink_window"``: StreamingLLM, no scoring: only the sink and recent pages.
* ``"oracle"``: the exact attention mass of each page, from the full K cache passed as ``k_cache=``
  (reads the whole cache: for evaluation, as the upper bound of the estimators).

**Budget accounting.** ``budget`` is in tokens and rounded up to whole pages: at most
``ceil(budget / page_size)`` pages are read (the output width is that, capped at the index's
``max_pages``). The pages holding the first ``sink`` tokens and the last ``recent`` tokens of each
sequence are always kept and count inside the budget; the budget must hold them in the worst
alignment (``ceil(sink / P)`` sink pages, up to ``(recent + 2P - 2) // P`` recent pages). The other
slots go to the best-scored pages, compared at a bfloat16's precision (:func:`compared_key`; pages
tied at the budget's edge are taken in page order). A sequence whose pages all fit in the budget gets all of them (the
caller may then run dense); a page past a sequence's length is never selected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

import torch
from torch import Tensor

from ..methods.knobs import KnobError, KnobSpec
from ..methods.primitives.dispatch import use_triton
from ..options import KernelOptions, resolve_kernel_options
from .page_index import PageIndex, _capturing

__all__ = ["PageSelection", "select_pages", "select_pages_by_score", "page_mass", "SELECT_METHODS",
           "MAX_QUERY_ROWS"]

SELECT_METHODS = ("quest", "pooled", "sink_window", "oracle")
MAX_QUERY_ROWS = 16  # query rows per step (decode: 1; speculative or chunked steps: up to 16)
OWNER = "select_pages"


@dataclass(frozen=True)
class PageSelection:
    """The knobs of a page selection, checked when built; call it as ``selection(q, index)``.

    Knobs (declared with :class:`~sparse_attn.methods.knobs.KnobSpec`; a bad value raises
    :class:`~sparse_attn.methods.knobs.KnobError`, a ValueError naming the knob):
        method: one of :data:`SELECT_METHODS`.
        budget: tokens read per (sequence, KV head), rounded up to whole pages (an int >= 1, and at
            least the index's ``page_size``).
        sink: the first ``sink`` tokens' pages are always kept (an int >= 0).
        recent: the last ``recent`` tokens' pages are always kept (an int >= 0).
        group_score: how a KV group's heads and rows combine their per-head page shares: ``"mass"``
            (sum) or ``"max"`` (see the module docstring).
        scale: the softmax scale of ``q . k`` (None: ``1 / sqrt(head_dim)``; else a number > 0).
    """

    method: str
    budget: int
    sink: int = 64
    recent: int = 64
    group_score: str = "mass"
    scale: Optional[float] = None

    KNOBS: ClassVar[dict] = {
        "method": KnobSpec.choice(*SELECT_METHODS),
        "budget": KnobSpec.integer(1),
        "sink": KnobSpec.integer(0),
        "recent": KnobSpec.integer(0),
        "group_score": KnobSpec.choice("mass", "max"),
        "scale": KnobSpec.real(0.0, low_open=True),
    }

    def __post_init__(self):
        for name, spec in self.KNOBS.items():
            value = getattr(self, name)
            if name == "scale" and value is None:
                continue
            spec.check(OWNER, name, value)
            if spec.kind == "float" and math.isinf(value):
                raise KnobError(f"{OWNER}: {name}={value!r} is not finite", owner=OWNER,
                                detail=f"{name}={value!r} is not finite")

    # ------------------------------------------------------------------ budget
    def budget_pages(self, page_size: int) -> int:
        """Pages the budget holds: ``ceil(budget / page_size)``."""
        return -(-self.budget // page_size)

    def sink_pages(self, page_size: int) -> int:
        """Pages holding the first ``sink`` tokens: ``ceil(sink / page_size)``."""
        return -(-self.sink // page_size)

    def recent_pages_max(self, page_size: int) -> int:
        """The most pages the last ``recent`` tokens can span (when not page-aligned)."""
        return 0 if self.recent == 0 else (self.recent + 2 * page_size - 2) // page_size

    def check_budget(self, page_size: int) -> None:
        """ValueError unless the budget holds at least one page and every sink and recent page."""
        if self.budget < page_size:
            raise ValueError(f"{OWNER}: budget={self.budget} is smaller than the index's page_size="
                             f"{page_size} (the budget is read in whole pages)")
        pages, sink = self.budget_pages(page_size), self.sink_pages(page_size)
        recent = self.recent_pages_max(page_size)
        if sink + recent > pages:
            raise ValueError(f"{OWNER}: budget={self.budget} holds {pages} page(s) of {page_size} tokens, but "
                             f"sink={self.sink} ({sink} page(s)) and recent={self.recent} (up to {recent} "
                             f"page(s)) are always kept; raise the budget or lower sink/recent")

    # ------------------------------------------------------------------ selection
    def __call__(self, q: Tensor, index: PageIndex, k_cache: Optional[Tensor] = None,
                 kernel_options: Optional[KernelOptions] = None) -> Tuple[Tensor, Tensor]:
        """``(pages, page_counts)`` for the queries ``q (B, H, Sq, D)`` (see :func:`select_pages`)."""
        _check_inputs(q, index, k_cache, self.method)
        page = index.page_size
        self.check_budget(page)
        width = min(self.budget_pages(page), index.max_pages)
        if self._kernel_runs(q, index, kernel_options):
            from .select_kernels import triton_page_logits, triton_select_pages

            options = resolve_kernel_options(kernel_options)
            fast, dependent = options.fast_launch, options.dependent_launch_on(q.device)
            scores = None
            if self.method != "sink_window":
                scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else float(self.scale)
                scores = triton_page_logits(q, index, self.method, scale, with_stats=True, fast_launch=fast,
                                            dependent_launch=dependent)
            return triton_select_pages(scores, index, width, self.sink_pages(page), self.recent,
                                       group_max=self.group_score == "max", fast_launch=fast,
                                       dependent_launch=dependent)

        score = None
        if self.method != "sink_window":
            share = _page_mass(q, index, self.method, self.scale, k_cache, kernel_options)
            share = share.flatten(2, 3)  # (B, Hkv, G * Sq, Np)
            score = share.sum(2) if self.group_score == "mass" else share.amax(2)
            score = score.nan_to_num(nan=0.0)
        return self._top_pages(score, index)

    def append_and_select(self, q: Tensor, index: PageIndex, k_new: Tensor, counts=None,
                          kernel_options: Optional[KernelOptions] = None) -> Tuple[Tensor, Tensor]:
        """A decode step's index update and selection: appends the new tokens' keys ``k_new (B, Hkv,
        T, D)`` to ``index`` (``counts`` as for :meth:`PageIndex.append`), then returns ``(pages,
        page_counts)`` for ``q`` at the lengths after it; the index and the result are those of
        ``index.append(k_new, counts)`` followed by ``self(q, index)`` (but for the float32 key sums
        of a step of 3 or more tokens, which may differ in their last bit: the new keys are added in
        another order; pooled scores read those sums).

        Where the Triton kernels score the pages (``quest`` or ``pooled``, within the kernels'
        limits), the append runs inside the page-scoring kernel: one kernel launch fewer per step.
        Elsewhere (``sink_window``, the PyTorch path) it is the two calls. ``oracle`` is refused (it
        reads the K cache: append, then call the selection with ``k_cache=``). Bad input is refused
        before the index changes."""
        if self.method == "oracle":
            raise ValueError(f"{OWNER}: the oracle selection reads the K cache: append the keys, then call the "
                             f"selection with k_cache=")
        _check_inputs(q, index, None, self.method)
        page = index.page_size
        self.check_budget(page)
        counts_t, bound = index.check_append(k_new, counts)
        if not (self.method != "sink_window" and k_new.shape[2] > 0 and self._kernel_runs(q, index, kernel_options)
                and index._append_kernel_supports(k_new, one_kv_head=True)):
            index.append(k_new, counts_t, kernel_options=kernel_options)
            return self(q, index, kernel_options=kernel_options)
        options = resolve_kernel_options(kernel_options)
        from .select_kernels import triton_page_logits, triton_select_pages

        fast, dependent = options.fast_launch, options.dependent_launch_on(q.device)
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else float(self.scale)
        logits, stats, next_lengths = triton_page_logits(q, index, self.method, scale, with_stats=True,
                                                         fast_launch=fast, dependent_launch=dependent,
                                                         k_new=k_new, counts=counts_t)
        index._length_bound = min(bound, index.capacity)
        width = min(self.budget_pages(page), index.max_pages)
        return triton_select_pages((logits, stats), index, width, self.sink_pages(page), self.recent,
                                   group_max=self.group_score == "max", fast_launch=fast,
                                   dependent_launch=dependent, next_lengths=next_lengths)

    def by_score(self, score: Tensor, index: PageIndex) -> Tuple[Tensor, Tensor]:
        """``(pages, page_counts)`` from given page scores ``score (B, Hkv, max_pages)`` (higher is
        better, e.g. a learned gate's share of attention mass per page) instead of the method's:
        the budget, sink and recent pages as for :meth:`__call__` (``method`` is not used)."""
        if not isinstance(index, PageIndex):
            raise TypeError(f"{OWNER}: index must be a PageIndex, got {type(index).__name__}")
        shape = (index.batch, index.kv_heads, index.max_pages)
        if not isinstance(score, Tensor) or tuple(score.shape) != shape or not score.is_floating_point():
            got = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
            raise ValueError(f"{OWNER}: score must be a float (B, Hkv, max_pages) = {shape} tensor, got {got}")
        if score.device != index.device:
            raise ValueError(f"{OWNER}: score is on device {score.device}, the index on device {index.device}")
        self.check_budget(index.page_size)
        return self._top_pages(score.float().nan_to_num(nan=0.0), index)

    def _top_pages(self, score: Optional[Tensor], index: PageIndex) -> Tuple[Tensor, Tensor]:
        """The selection from page scores ``(B, Hkv, Np)`` (None: none, the sink_window rule)."""
        page = index.page_size
        batch, kv_heads, max_pages = index.batch, index.kv_heads, index.max_pages
        width = min(self.budget_pages(page), max_pages)
        device = index.device
        lengths = index.lengths
        num_pages = index.num_pages()  # (B,)
        page_ids = torch.arange(max_pages, device=device)
        valid = page_ids[None, :] < num_pages[:, None]  # (B, Np)
        forced = page_ids[None, :] < self.sink_pages(page)
        if self.recent:
            recent_first = torch.div((lengths - self.recent).clamp(min=0), page, rounding_mode="floor")
            forced = forced | (page_ids[None, :] >= recent_first[:, None])
        forced = forced & valid

        if score is None:
            candidates = forced | (valid & (num_pages <= width)[:, None])
            score = torch.zeros(batch, kv_heads, max_pages, device=device)
        else:
            candidates = valid
        key = torch.where(forced[:, None, :], torch.full_like(score, float("inf")), score)
        # A page that is no candidate (or scored -inf) gets a key below every score's.
        no_key = -(1 << 15) - 1
        key = torch.where(candidates[:, None, :] & (key > float("-inf")), compared_key(key), no_key)
        # The best `width` keys, ties at the edge in page order: rank by (key, -page).
        ranked = key * (1 << 32) + (max_pages - 1 - torch.arange(max_pages, device=device))
        top = ranked.topk(width, dim=-1, sorted=False)
        chosen = top.values >= (no_key + 1) * (1 << 32)
        counts = chosen.sum(-1)
        ordered = torch.where(chosen, top.indices, torch.full_like(top.indices, max_pages)).sort(-1).values
        last = ordered.gather(-1, (counts - 1).clamp(min=0)[..., None])
        last = torch.where(counts[..., None] > 0, last, torch.zeros_like(last))
        slot = torch.arange(width, device=device)
        pages = torch.where(slot < counts[..., None], ordered, last)
        return pages.to(torch.int32), counts.to(torch.int32)


    def _kernel_runs(self, q: Tensor, index: PageIndex, kernel_options: Optional[KernelOptions]) -> bool:
        """Whether the Triton kernels score and select (``estimator_kernels``; quest, pooled and
        sink_window within the kernels' limits), else PyTorch (the reference)."""
        if self.method == "oracle":
            return False
        supported = index.max_pages <= KERNEL_MAX_PAGES and (
            self.method == "sink_window" or _score_kernel_supports(q, index))
        return use_triton(q, kernel_options, supported)


def compared_key(score: Tensor) -> Tensor:
    """The key a page's score is ranked by: the top 16 bits of its float32 bit pattern, mapped so that
    the keys (int64, from ``-2**15`` to ``2**15 - 1``; +inf is 32640) order as the scores do: scores
    are compared at a bfloat16's precision, and pages whose scores agree to it tie (a tie at the
    budget's edge goes to the lower page). The Triton top-k kernel compares the same keys."""
    bits = score.float().view(torch.int32).long()
    ordered = torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)  # negative floats: reversed
    return torch.div(ordered, 1 << 16, rounding_mode="floor")


def select_pages(q: Tensor, index: PageIndex, *, method: str, budget: int, sink: int = 64, recent: int = 64,
                 k_cache: Optional[Tensor] = None, kernel_options: Optional[KernelOptions] = None,
                 **knobs) -> Tuple[Tensor, Tensor]:
    """The pages each KV group of each sequence reads this step.

    Args:
        q: ``(B, H, Sq, D)`` queries of the step (``1 <= Sq <= 16``, ``H`` a multiple of the index's
            KV heads, the dtype and device of the index); row ``i`` sits at position
            ``lengths[b] - Sq + i`` (the step's keys are already appended to the index).
        index: the :class:`~.page_index.PageIndex` of the layer's K cache.
        method, budget, sink, recent: see :class:`PageSelection` and the module docstring.
        k_cache: ``(B, Hkv, S, D)``, the K cache with ``S >= lengths``; read by ``method="oracle"``
            only (ignored otherwise).
        kernel_options: a :class:`~sparse_attn.options.KernelOptions` (None: the current default);
            its ``estimator_kernels`` picks how ``quest`` and ``pooled`` score the pages: a Triton
            kernel that reads the page summaries once per KV group in their stored dtype
            (``"auto"`` on CUDA tensors) or PyTorch (the reference).
        knobs: ``group_score`` and ``scale`` (:class:`PageSelection`).

    Returns:
        ``pages``: ``(B, Hkv, W)`` int32 with ``W = min(ceil(budget / page_size), index.max_pages)``:
        the selected page indices, strictly increasing in the first ``page_counts`` slots; the padding
        slots after them repeat the last selected page (0 where none is), so every entry is a valid page.
        ``page_counts``: ``(B, Hkv)`` int32, at most ``W``.

    Raises:
        ValueError (:class:`~sparse_attn.methods.knobs.KnobError` for a knob outside its range),
        naming the argument, on a bad knob, a budget below the page size or too small for sink and
        recent, or inputs whose shape, dtype or device do not fit the index.
    """
    names = {f.name for f in dataclasses.fields(PageSelection)}
    unknown = sorted(set(knobs) - names)
    if unknown:
        detail = f"no knob(s) {unknown}; knobs: {sorted(names)}"
        raise KnobError(f"{OWNER}: {detail}", owner=OWNER, detail=detail)
    selection = PageSelection(method=method, budget=budget, sink=sink, recent=recent, **knobs)
    return selection(q, index, k_cache=k_cache, kernel_options=kernel_options)


def select_pages_by_score(score: Tensor, index: PageIndex, *, budget: int, sink: int = 64,
                          recent: int = 64) -> Tuple[Tensor, Tensor]:
    """:func:`select_pages` with given page scores ``score (B, Hkv, max_pages)`` (higher is better; e.g.
    :func:`sparse_attn.methods.seer.decode_page_shares`, a learned gate's share of the step's attention
    mass per page) in place of a method's: the same budget, sink and recent pages and output."""
    return PageSelection(method="quest", budget=budget, sink=sink, recent=recent).by_score(score, index)


def page_mass(q: Tensor, index: PageIndex, *, method: str, scale: Optional[float] = None,
              k_cache: Optional[Tensor] = None, kernel_options: Optional[KernelOptions] = None) -> Tensor:
    """``(B, Hkv, G, Sq, max_pages)`` float32: each query head's and row's share of attention mass per
    page, as ``method`` estimates it (``"quest"``, ``"pooled"``) or exactly (``"oracle"``, from
    ``k_cache``). Shares sum to 1 over a row's pages (0 for a sequence with no token); a page past the
    length gets 0. The oracle masks causally (row ``i`` sees positions up to ``lengths - Sq + i``); the
    estimators score every page of the sequence for every row. ``kernel_options``: as in
    :func:`select_pages`."""
    if method not in ("quest", "pooled", "oracle"):
        raise ValueError(f"page_mass: method must be 'quest', 'pooled' or 'oracle', got {method!r}")
    _check_inputs(q, index, k_cache, method)
    if scale is not None:
        PageSelection(method=method, budget=1, sink=0, recent=0, scale=scale)  # checks the scale
    return _page_mass(q, index, method, scale, k_cache, kernel_options)


# The page-score kernel's limits: dtypes, head dims, and query rows of one KV group (G * Sq); the
# top-k kernel's: pages per sequence.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_MAX_ROWS = 128
KERNEL_MAX_PAGES = 16384  # the top-k kernel holds a sequence's page scores in registers


def _score_kernel_supports(q: Tensor, index: PageIndex) -> bool:
    heads, rows, dim = q.shape[1:]
    return q.dtype in KERNEL_DTYPES and dim in KERNEL_HEAD_DIMS and (heads // index.kv_heads) * rows <= KERNEL_MAX_ROWS


def _page_mass(q: Tensor, index: PageIndex, method: str, scale: Optional[float],
               k_cache: Optional[Tensor], kernel_options: Optional[KernelOptions] = None) -> Tensor:
    batch, heads, rows, dim = q.shape
    kv_heads, max_pages, page = index.kv_heads, index.max_pages, index.page_size
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if method in ("quest", "pooled") and use_triton(q, kernel_options, _score_kernel_supports(q, index)):
        from .select_kernels import triton_page_logits

        options = resolve_kernel_options(kernel_options)
        logw = triton_page_logits(q, index, method, scale, fast_launch=options.fast_launch,
                                  dependent_launch=options.dependent_launch_on(q.device))
        share = torch.softmax(logw, dim=-1).nan_to_num(nan=0.0)
        return share.view(batch, kv_heads, heads // kv_heads, rows, max_pages)
    qg = q.reshape(batch, kv_heads, (heads // kv_heads) * rows, dim).float()  # head-major, then row

    if method == "oracle":
        span = min(k_cache.shape[2], max_pages * page)
        logits = torch.matmul(qg, k_cache[:, :, :span].float().transpose(-1, -2)) * scale  # (B, Hkv, G*Sq, S)
        logits = logits.view(batch, kv_heads, heads // kv_heads, rows, span)
        last = index.lengths[:, None] - rows + torch.arange(rows, device=q.device)[None, :]  # (B, Sq)
        seen = torch.arange(span, device=q.device)[None, None, :] <= last[:, :, None]  # (B, Sq, S)
        logits = logits.masked_fill(~seen[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
        probs = torch.nn.functional.pad(probs, (0, max_pages * page - span))
        return probs.view(*probs.shape[:-1], max_pages, page).sum(-1)

    tokens = index.page_tokens()  # (B, Np)
    if method == "quest":
        kmin, kmax = index.quest_bounds()
        score = torch.matmul(qg.clamp(min=0), kmax.transpose(-1, -2)) + \
            torch.matmul(qg.clamp(max=0), kmin.transpose(-1, -2))
    else:
        score = torch.matmul(qg, index.mean().transpose(-1, -2))
    logw = score * scale + tokens.float().log()[:, None, None, :]  # log 0 = -inf: empty pages get 0
    share = torch.softmax(logw, dim=-1).nan_to_num(nan=0.0)
    return share.view(batch, kv_heads, heads // kv_heads, rows, max_pages)


def _check_inputs(q, index, k_cache, method: str) -> None:
    if not isinstance(index, PageIndex):
        raise TypeError(f"{OWNER}: index must be a PageIndex, got {type(index).__name__}")
    if not isinstance(q, Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"{OWNER}: q must be a (B, H, Sq, D) tensor, got {shape}")
    batch, heads, rows, dim = q.shape
    if batch != index.batch or dim != index.head_dim:
        raise ValueError(f"{OWNER}: q {tuple(q.shape)} does not fit the index (batch {index.batch}, "
                         f"head_dim {index.head_dim})")
    if heads < index.kv_heads or heads % index.kv_heads:
        raise ValueError(f"{OWNER}: q's {heads} heads are not a multiple of the index's {index.kv_heads} KV heads")
    if not 1 <= rows <= MAX_QUERY_ROWS:
        raise ValueError(f"{OWNER}: q has {rows} query rows (Sq); expected 1 to {MAX_QUERY_ROWS}")
    if q.dtype != index.dtype:
        raise ValueError(f"{OWNER}: q has dtype {q.dtype}, the index holds {index.dtype} keys")
    if q.device != index.device:
        raise ValueError(f"{OWNER}: q is on device {q.device}, the index on device {index.device}")
    if method != "oracle":
        return
    if k_cache is None:
        raise ValueError(f"{OWNER}: method='oracle' needs the K cache as k_cache=")
    if not isinstance(k_cache, Tensor) or k_cache.dim() != 4 or k_cache.shape[0] != batch \
            or k_cache.shape[1] != index.kv_heads or k_cache.shape[3] != dim:
        shape = tuple(k_cache.shape) if isinstance(k_cache, Tensor) else type(k_cache).__name__
        raise ValueError(f"{OWNER}: k_cache must be ({batch}, {index.kv_heads}, S, {dim}), got {shape}")
    if k_cache.dtype != index.dtype:
        raise ValueError(f"{OWNER}: k_cache has dtype {k_cache.dtype}, the index holds {index.dtype} keys")
    if k_cache.device != index.device:
        raise ValueError(f"{OWNER}: k_cache is on device {k_cache.device}, the index on device {index.device}")
    if not _capturing(index.device):
        longest = int(index.lengths.max())
        if k_cache.shape[2] < longest:
            raise ValueError(f"{OWNER}: k_cache holds {k_cache.shape[2]} positions, a sequence has "
                             f"{longest} tokens")
