"""The evaluation harness: dense and every method over its knob range, on retrieval tasks.

For each context length and configuration it records task accuracy (greedy generation, RULER's
``string_match_all`` scoring: :func:`.tasks.score`) with the prompt count and a 95% Wilson interval,
attention recall and density per layer (from the patched model's records), estimation cost, prefill
time with its spread, and which attention backend ran. ``evaluate`` returns plain dicts;
:mod:`.report` turns them into JSON, a markdown report and plots.

Timing is separate from the accuracy pass: per (length, configuration), one untimed warm-up prefill
(compilation, autotuning, allocator), then ``timing_repeats`` prefills of the first prompt with
recall measurement off; a row keeps their median and their minimum and maximum (and every repeat),
and the estimation cost comes from those timed prefills too.

The **decode axis** (``decode_methods=``, :func:`evaluate_decode`) reads each prompt with the model's
own dense attention and generates the answer through sparse decode steps:
``patch(model, method="dense", decode={"method": m, "budget": b, "page": p, "sink": s, "recent": r})``
with every layer's prefill kept dense. The prompt's last token is held back from the prefill, so every
generated token, the first one included, comes from a decode step. Its rows (``"axis": "decode"``)
give accuracy per (length, decode method, budget), scored as the prefill axis scores, with the mean
decode density and, where the patch's records carry it, the mean decode recall; a dense-decode row
per length (the same procedure with dense decode steps) is their baseline.

Long runs show progress with an ETA on stderr (:mod:`.progress`): a tqdm bar on a terminal, plain
log lines otherwise.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence

import torch

from ..attention import which_backend
from ..integrations.hf import SparseConfig, attention_shape, patch, unpatch
from ..integrations.hf.config import DECODE_PAGE_METHODS
from ..patterns import dense_layout
from .progress import Progress, step_cost
from .stats import spread, wilson_interval
from .tasks import TASKS, make_sample, score

# Knob ranges swept per method (block size is set by the harness).
SWEEPS = {
    "xattention": [{"threshold": t, "stride": 8} for t in (0.8, 0.9, 0.95)],
    "flexprefill": [{"gamma": g, "min_budget": 256} for g in (0.8, 0.9, 0.95)],
    "vertical_slash": [{"vertical_size": v, "slash_size": s} for v, s in ((32, 128), (64, 256), (128, 512))],
    "pooled_topp": [{"top_p": p} for p in (0.8, 0.9, 0.95)],
    "oracle": [{"top_p": p} for p in (0.8, 0.9, 0.95)],
    # Gates shipped with the canary ("canary"); another model needs its own (sparse-attn train-gates).
    "seer": [{"gates": "canary", "threshold": t} for t in (0.01, 0.03, 0.1)],
    "sliding_window": [{"window": w} for w in (256, 1024)],
    "strided": [{"stride": 4, "local_blocks": 4}],
    "power": [{"local_blocks": 2}],
    # MoBA blocks of 512 tokens (its paper's size at this scale), the best 2, 3 or 4 earlier ones.
    "moba": [{"moba_block": 512, "top_k": k} for k in (2, 3, 4)],
}


# The decode axis: page-selection methods, budgets (tokens read per step and KV head), page size.
DECODE_METHODS = DECODE_PAGE_METHODS
DECODE_BUDGETS = (128, 256, 512, 1024, 2048)
DECODE_PAGE = 16
DECODE_RECALL_EVERY = 1


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_prefill_stats(model, ids, device, state, repeats: int) -> dict:
    """Prefill times after one warm-up, recall off: ``{"times_ms": [...], "median_ms", "min_ms",
    "max_ms", "estimate_ms", "precheck_outcomes"}`` (``estimate_ms``: mean estimation ms per prefill, all
    layers; ``precheck_outcomes``: how many timed layer calls had each pre-check outcome, "none"
    without a pre-check)."""
    saved = None
    if state is not None:
        saved = (state.config.record, state.config.measure_recall)
        state.config.record, state.config.measure_recall = True, False
    before_warmup = len(state.records) if state is not None else 0
    with torch.no_grad():
        model(ids)  # warm-up
        first_record = len(state.records) if state is not None else 0
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(ids)
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
    estimate_ms, outcomes = 0.0, {}
    if state is not None:
        state.config.record, state.config.measure_recall = saved
        timed = state.records[first_record:]
        estimate_ms = sum(r["estimate_ms"] for r in timed if r["sparse"]) / repeats
        for r in timed:
            outcome = (r.get("precheck") or {}).get("outcome", "none")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        del state.records[before_warmup:]  # keep the accuracy pass's records only
    stats = spread(times)
    return {"times_ms": times, "median_ms": stats["median"], "min_ms": stats["min"], "max_ms": stats["max"],
            "estimate_ms": estimate_ms, "precheck_outcomes": outcomes}


def timed_prefills(model, ids, device, state, repeats: int):
    """(median prefill ms, mean estimation ms per prefill) after one warm-up, recall off."""
    stats = timed_prefill_stats(model, ids, device, state, repeats)
    return stats["median_ms"], stats["estimate_ms"]


def greedy_score(model, tokenizer, sample) -> float:
    """RULER score (:func:`.tasks.score`) of ``model``'s greedy continuation of ``sample.prompt``,
    a few tokens longer than the answer."""
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    answer_len = len(tokenizer(" " + sample.answer, add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=answer_len + 3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return score(sample, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def attention_backend(model, length: int, block_size: int, backend: str = "auto") -> dict:
    """Which block-sparse attention backend the patched ``model``'s prefills of ``length`` tokens run:
    :func:`sparse_attn.which_backend` on a representative call (the model's head counts, head dim,
    dtype and device; q/k/v laid out as transformers passes them; a dense layout of ``block_size``)."""
    param = next(model.parameters())
    heads, kv_heads, dim = attention_shape(model)
    try:
        q = torch.empty(1, length, heads, dim, dtype=param.dtype, device=param.device).transpose(1, 2)
        k = torch.empty(1, length, kv_heads, dim, dtype=param.dtype, device=param.device).transpose(1, 2)
        choice = which_backend(q, k, k, dense_layout(length, block_size=block_size, device=param.device),
                               backend=backend)
    except (ValueError, TypeError, RuntimeError) as exc:
        return {"backend": "unknown", "forward_kernel": "unknown", "backend_skipped": [str(exc)]}
    return {"backend": choice.backend, "forward_kernel": choice.forward_kernel,
            "backend_skipped": [f"{name}: {reason}" for name, reason in choice.skipped]}


def _describe(name: str, knobs: dict) -> str:
    return f"{name} " + ", ".join(f"{k}={v}" for k, v in knobs.items()) if knobs else name


def decode_knobs(method: str, budget: int, page: int = DECODE_PAGE, sink: int | None = None,
                 recent: int | None = None, bounds: str = "exact") -> dict:
    """The page-index decode settings of one decode row: ``{"budget", "page", "sink", "recent"}``,
    plus ``"bounds"`` where it is not ``"exact"`` (``"int8"``: Quest scores from int8 bounds).

    ``sink`` defaults to one page. ``recent`` defaults to one page for the scoring methods (``quest``,
    ``pooled``: the rest of the budget goes to the best-scored pages) and, for ``sink_window`` (which
    reads only its sink and recent pages), to the largest window the budget holds after the sink
    (``(budget pages - sink pages - 1) x page`` tokens, since an unaligned window spans one page more).
    Not checked here: :func:`decode_config` checks them."""
    sink = page if sink is None else sink
    if recent is None:
        if method == "sink_window" and isinstance(budget, int) and isinstance(page, int) and page > 0:
            free = -(-budget // page) - -(-sink // page)  # budget pages left after the sink pages
            recent = max((free - 1) * page, 1)
        else:
            recent = page
    knobs = {"budget": budget, "page": page, "sink": sink, "recent": recent}
    return knobs if bounds == "exact" else {**knobs, "bounds": bounds}


def decode_config(method: str, knobs: dict | None = None, num_layers: int = 0,
                  recall_every: int | None = DECODE_RECALL_EVERY):
    """``(SparseConfig, recall_every)`` of one decode row: every layer's prefill dense (the model's own
    attention: ``method="dense"``, ``dense_first_layers=num_layers``), decode steps through the page
    index with ``knobs`` (:func:`decode_knobs`), or dense for ``method="dense"``; records kept.

    ``recall_every`` goes into the decode settings only where :class:`SparseConfig` accepts the key
    (the patch then records a decode ``recall`` on sampled steps); the second value is the one used,
    or None. A bad method, budget, page, sink or recent raises :class:`ValueError` naming it."""
    common = {"method": "dense", "dense_first_layers": num_layers, "record": True, "measure_recall": True}
    if method == "dense":
        return SparseConfig(decode="dense", **common), None
    if method not in DECODE_METHODS:
        raise ValueError(f"decode method {method!r} is not one of {list(DECODE_METHODS)}")
    decode = {"method": method, **(knobs if knobs is not None else decode_knobs(method, DECODE_BUDGETS[0]))}
    config = SparseConfig(decode=decode, **common)  # a bad knob raises here, naming it
    if recall_every:  # None or 0: recall not asked for
        try:
            return SparseConfig(decode={**decode, "recall_every": recall_every}, **common), recall_every
        except ValueError:  # this version of the patch does not measure decode recall
            pass
    return config, None


def _cache_keyword(model) -> str:
    """The name under which this transformers version takes a KV cache (``cache`` or the older
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_answer(model, tokenizer, sample) -> str:
    """``model``'s greedy continuation of ``sample.prompt`` (a few tokens longer than the answer) with
    every generated token from a decode step: the prompt but its last token is prefilled into a KV
    cache, then ``generate`` feeds that token as the first decode step."""
    from transformers import DynamicCache

    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    answer_len = len(tokenizer(" " + sample.answer, add_special_tokens=False).input_ids)
    keyword = _cache_keyword(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :-1], use_cache=True, **{keyword: cache})
        out = model.generate(ids, max_new_tokens=answer_len + 3, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **{keyword: cache})
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _num_layers(model) -> int:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(cfg.num_hidden_layers)


def decode_plan(methods: Sequence[str], budgets: Sequence[int], page: int = DECODE_PAGE,
                sink: int | None = None, recent: int | None = None, bounds: str = "exact") -> list:
    """``[(method, knobs)]`` of the decode axis: dense first, then each method at each budget; every
    setting checked (:class:`ValueError` naming the method, budget or knob) before anything runs."""
    if not methods:
        return []
    if not budgets:
        raise ValueError("the decode axis needs at least one budget (decode_budgets=)")
    unknown = [m for m in methods if m not in DECODE_METHODS]
    if unknown:
        raise ValueError(f"unknown decode method(s) {unknown}; decode methods: {list(DECODE_METHODS)}")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise ValueError(f"decode budgets {bad} are not positive token counts")
    plan = [("dense", {})]
    for method in methods:
        for budget in budgets:
            knobs = decode_knobs(method, budget, page, sink, recent, bounds)
            decode_config(method, knobs, recall_every=None)
            plan.append((method, knobs))
    return plan


def _decode_describe(name: str, knobs: dict) -> str:
    return f"decode {name} budget={knobs['budget']}" if knobs else "decode dense"


def evaluate_decode(model, tokenizer, methods, lengths, budgets=DECODE_BUDGETS, tasks=TASKS, samples: int = 4,
                    page: int = DECODE_PAGE, sink: int | None = None, recent: int | None = None,
                    recall_every: int | None = DECODE_RECALL_EVERY,
                    progress: bool | Callable | None = True, _bar: Progress | None = None,
                    bounds: str = "exact") -> list:
    """Decode-axis rows (``"axis": "decode"``): per length, dense decode, then each decode method at
    each budget (:func:`decode_plan`), on the same prompts as :func:`evaluate` (dense prefill, sparse
    decode: :func:`decode_answer`). ``progress`` as for :func:`evaluate`; ``bounds``: how the page
    index keeps Quest's bounds (``"exact"`` or ``"int8"``)."""
    plan = decode_plan(methods, budgets, page, sink, recent, bounds)
    if not plan:
        return []
    device = next(model.parameters()).device
    num_layers = _num_layers(model)
    hook = progress if callable(progress) else None
    prompts_per_length = len(tasks) * samples
    bar = _bar or Progress(sum(len(plan) * step_cost(length) * prompts_per_length for length in lengths),
                           enabled=progress is True,
                           intro=f"decode: {len(plan)} configurations x {len(lengths)} lengths x "
                                 f"{prompts_per_length} prompts")
    rows = []
    try:
        for length in lengths:
            batch = [make_sample(task, tokenizer, length, seed=i) for task in tasks for i in range(samples)]
            dense_outputs = None
            for name, knobs in plan:
                where = f"length {length} | {_decode_describe(name, knobs)}"
                config, used_every = decode_config(name, knobs, num_layers, recall_every)
                state = patch(model, config=config)
                correct, per_task, outputs = 0, {}, []
                for i, sample in enumerate(batch):
                    bar.status(f"{where} | prompt {i + 1}/{len(batch)}")
                    text = decode_answer(model, tokenizer, sample)
                    ok = score(sample, text)
                    outputs.append(text)
                    correct += ok
                    per_task.setdefault(sample.task, []).append(ok)
                    if hook:
                        hook(1)
                    bar.update(step_cost(length), f"{where} | prompt {i + 1}/{len(batch)}")
                unpatch(model)
                accuracy = correct / len(batch)
                if name == "dense":
                    dense_outputs = outputs
                row = {"axis": "decode", "length": length, "method": name, "knobs": dict(knobs),
                       "budget": knobs.get("budget"), "accuracy": accuracy,
                       "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}, "samples": len(batch),
                       "accuracy_ci95": list(wilson_interval(accuracy, len(batch))),
                       "per_task_prompts": {t: len(v) for t, v in per_task.items()}, "scores": per_task,
                       "outputs": outputs, "recall_every": used_every, "device": str(device)}
                row.update(_decode_stats(state.records, name, used_every))
                if dense_outputs is not None:
                    row["same_as_dense"] = sum(a == b for a, b in zip(outputs, dense_outputs)) / len(batch)
                rows.append(row)
                recall = "-" if row["decode_recall"] is None else f"{row['decode_recall']:.3f}"
                bar.update(0, f"{where} | accuracy {accuracy:.2f}, decode density {row['decode_density']:.3f}, "
                              f"recall {recall}", force=True)
    finally:
        unpatch(model)
        if _bar is None:
            bar.close()
    return rows


def _decode_stats(records: list, name: str, recall_every: int | None) -> dict:
    """Decode density and recall of a decode row from its patch's records (the decode steps are the
    records marked ``decode``, or the one-row calls where records carry no such mark): density is the share of the cache a step read, 1 for steps that ran dense, averaged
    over layers, steps and prompts; recall is the mean ``recall`` of the records that carry one (None
    if none does; 1 where every step ran dense and recall was measured, and for dense decode)."""
    steps = [r for r in records if r.get("decode", r["q_len"] == 1)]
    density = [r["density"] if r["sparse"] and r["density"] is not None else 1.0 for r in steps]
    layers = sorted({r["layer"] for r in steps})
    recall = _mean(r.get("recall") for r in steps)
    sparse = sum(r["sparse"] for r in steps)
    if name == "dense" or (recall is None and recall_every is not None and steps and not sparse):
        recall = 1.0
    first = layers[0] if layers else None
    return {"decode_density": _mean(density) if density else 1.0, "decode_recall": recall,
            "decode_density_per_layer": {i: _mean(d for d, r in zip(density, steps) if r["layer"] == i)
                                         for i in layers},
            "decode_steps": sum(r["layer"] == first for r in steps),
            "decode_sparse_share": sparse / len(steps) if steps else 0.0,
            "decode_select_ms": _mean(r["estimate_ms"] for r in steps if r["sparse"])}


def evaluate(model, tokenizer, methods, lengths, tasks=TASKS, samples: int = 4, block_size: int = 64,
             sweeps: dict | None = None, progress: bool | Callable | None = True,
             timing_repeats: int = 3, decode_methods: Sequence[str] = (),
             decode_budgets: Sequence[int] = DECODE_BUDGETS, decode_page: int = DECODE_PAGE,
             decode_sink: int | None = None, decode_recent: int | None = None,
             decode_recall_every: int | None = DECODE_RECALL_EVERY, decode_bounds: str = "exact",
             profiles: Sequence[str] = ()) -> list:
    """Rows of results, one per (length, configuration), then the decode axis's rows.

    ``profiles``: profile files (``sparse-attn profile``), each evaluated as a row of its own (method
    ``"profile"``, knobs ``{"profile": path}``) with the per-layer methods and knobs it chose, as
    ``patch(model, profile=path)`` runs them.

    ``progress``: True (default) shows progress per (length, method, knobs, prompt) with an ETA on
    stderr (a tqdm bar on a terminal, plain log lines otherwise: :mod:`.progress`); False or None shows
    nothing; a callable is called as ``progress(1)`` per scored prompt (and nothing is shown), for
    callers that draw their own bar.

    ``decode_methods`` (e.g. ``["quest", "pooled", "sink_window"]``; empty: no decode axis) adds the
    decode axis (:func:`evaluate_decode`): per length a dense-decode row and one row per (method,
    budget in ``decode_budgets``), with pages of ``decode_page`` tokens, ``decode_sink`` /
    ``decode_recent`` tokens always read (None: :func:`decode_knobs`' defaults) and decode recall
    sampled every ``decode_recall_every`` steps where the patch measures it, and Quest's page bounds
    kept as ``decode_bounds`` (``"exact"`` or ``"int8"``). Every decode setting is checked before
    anything runs.
    """
    sweeps = {**SWEEPS, **(sweeps or {})}
    unknown = [m for m in methods if m not in sweeps]
    if unknown:
        raise ValueError(f"no knob range for {unknown}; known: {sorted(sweeps)} (or pass sweeps=)")
    plan = decode_plan(decode_methods, decode_budgets, decode_page, decode_sink, decode_recent, decode_bounds)
    device = next(model.parameters()).device
    for path in profiles:  # a bad file raises here, before anything runs
        SparseConfig.from_profile(path)
    configs = [("dense", {})] + [(m, knobs) for m in methods for knobs in sweeps[m]]
    configs += [("profile", {"profile": str(path)}) for path in profiles]
    hook = progress if callable(progress) else None
    prompts_per_length = len(tasks) * samples
    # Weights: each scored prompt, and each timing pass (a warm-up plus the timed repeats), by length.
    total = sum(len(configs) * step_cost(length) * (prompts_per_length + 1 + timing_repeats) for length in lengths)
    total += sum(len(plan) * step_cost(length) * prompts_per_length for length in lengths)
    decode_intro = f"; decode: {len(plan)} configurations x {prompts_per_length} prompts per length" if plan else ""
    bar = Progress(total, enabled=progress is True,
                   intro=f"{len(configs)} configurations x {len(lengths)} lengths x {prompts_per_length} prompts, "
                         f"then {timing_repeats} timed prefills each{decode_intro}")
    dense_impl = getattr(model.config, "_attn_implementation", None) or "eager"
    rows = []
    try:
        for length in lengths:
            batch = [make_sample(task, tokenizer, length, seed=i) for task in tasks for i in range(samples)]
            for name, knobs in configs:
                where = f"length {length} | {_describe(name, knobs)}"
                state = None
                if name == "dense":
                    unpatch(model)
                    backend = {"backend": f"dense ({dense_impl})", "forward_kernel": dense_impl, "backend_skipped": []}
                else:
                    if name == "profile":  # its own methods and knobs per layer; sparse at every length
                        config = SparseConfig.from_profile(knobs["profile"])
                        config.min_kv_len, config.fallback = 0, "never"
                        config.record = config.measure_recall = True
                    else:
                        config = SparseConfig(method=name, knobs={"block_size": block_size, **knobs}, min_kv_len=0,
                                              fallback="never", record=True, measure_recall=True)
                    state = patch(model, config=config)
                    backend = attention_backend(model, length, block_size, config.backend)
                correct, per_task = 0, {}
                for i, sample in enumerate(batch):
                    bar.status(f"{where} | prompt {i + 1}/{len(batch)}")
                    ok = greedy_score(model, tokenizer, sample)
                    correct += ok
                    per_task.setdefault(sample.task, []).append(ok)
                    if hook:
                        hook(1)
                    bar.update(step_cost(length), f"{where} | prompt {i + 1}/{len(batch)}")
                accuracy = correct / len(batch)
                row = {"axis": "prefill", "length": length, "method": name, "knobs": knobs, "accuracy": accuracy,
                       "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
                       "samples": len(batch),
                       "accuracy_ci95": list(wilson_interval(accuracy, len(batch))),
                       "per_task_prompts": {t: len(v) for t, v in per_task.items()},
                       "scores": per_task}
                if state is not None:
                    prefills = [r for r in state.records if r["q_len"] > 1 and r["sparse"]]
                    layers = sorted({r["layer"] for r in prefills})
                    row["density"] = _mean(r["density"] for r in prefills)
                    row["recall"] = _mean(r["recall"] for r in prefills)
                    row["density_per_layer"] = {i: _mean(r["density"] for r in prefills if r["layer"] == i)
                                                for i in layers}
                    row["recall_per_layer"] = {i: _mean(r["recall"] for r in prefills if r["layer"] == i)
                                               for i in layers}
                else:
                    row.update(density=1.0, recall=1.0)
                first_ids = tokenizer(batch[0].prompt, return_tensors="pt").input_ids.to(device)
                bar.status(f"{where} | timing {timing_repeats} prefills")
                timing = timed_prefill_stats(model, first_ids, device, state, timing_repeats)
                row["prefill_ms"], row["estimate_ms_per_prefill"] = timing["median_ms"], timing["estimate_ms"]
                row.update(prefill_ms_min=timing["min_ms"], prefill_ms_max=timing["max_ms"],
                           prefill_ms_repeats=timing["times_ms"], timed_tokens=int(first_ids.shape[1]),
                           device=str(device), block_size=block_size, **backend)
                rows.append(row)
                bar.update(step_cost(length) * (1 + timing_repeats),
                           f"{where} | accuracy {accuracy:.2f}, prefill {timing['median_ms']:.1f} ms", force=True)
        unpatch(model)
        if plan:
            rows += evaluate_decode(model, tokenizer, decode_methods, lengths, decode_budgets, tasks, samples,
                                    decode_page, decode_sink, decode_recent, decode_recall_every,
                                    progress=progress, _bar=bar, bounds=decode_bounds)
    finally:
        unpatch(model)
        bar.close()
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
