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

Long runs show progress with an ETA on stderr (:mod:`.progress`): a tqdm bar on a terminal, plain
log lines otherwise.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Union

import torch

from ..attention import which_backend
from ..integrations.hf import SparseConfig, patch, unpatch
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
    "sliding_window": [{"window": w} for w in (256, 1024)],
    "strided": [{"stride": 4, "local_blocks": 4}],
    "power": [{"local_blocks": 2}],
}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_prefill_stats(model, ids, device, state, repeats: int) -> dict:
    """Prefill times after one warm-up, recall off: ``{"times_ms": [...], "median_ms", "min_ms",
    "max_ms", "estimate_ms"}`` (``estimate_ms``: mean estimation ms per prefill, all layers)."""
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
    estimate_ms = 0.0
    if state is not None:
        state.config.record, state.config.measure_recall = saved
        timed = state.records[first_record:]
        estimate_ms = sum(r["estimate_ms"] for r in timed if r["sparse"]) / repeats
        del state.records[before_warmup:]  # keep the accuracy pass's records only
    stats = spread(times)
    return {"times_ms": times, "median_ms": stats["median"], "min_ms": stats["min"], "max_ms": stats["max"],
            "estimate_ms": estimate_ms}


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
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
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


def evaluate(model, tokenizer, methods, lengths, tasks=TASKS, samples: int = 4, block_size: int = 64,
             sweeps: Optional[dict] = None, progress: Union[bool, Callable, None] = True,
             timing_repeats: int = 3) -> list:
    """Rows of results, one per (length, configuration).

    ``progress``: True (default) shows progress per (length, method, knobs, prompt) with an ETA on
    stderr (a tqdm bar on a terminal, plain log lines otherwise: :mod:`.progress`); False or None shows
    nothing; a callable is called as ``progress(1)`` per scored prompt (and nothing is shown), for
    callers that draw their own bar.
    """
    sweeps = {**SWEEPS, **(sweeps or {})}
    unknown = [m for m in methods if m not in sweeps]
    if unknown:
        raise ValueError(f"no knob range for {unknown}; known: {sorted(sweeps)} (or pass sweeps=)")
    device = next(model.parameters()).device
    configs = [("dense", {})] + [(m, knobs) for m in methods for knobs in sweeps[m]]
    hook = progress if callable(progress) else None
    prompts_per_length = len(tasks) * samples
    # Weights: each scored prompt, and each timing pass (a warm-up plus the timed repeats), by length.
    total = sum(len(configs) * step_cost(length) * (prompts_per_length + 1 + timing_repeats) for length in lengths)
    bar = Progress(total, enabled=progress is True,
                   intro=f"{len(configs)} configurations x {len(lengths)} lengths x {prompts_per_length} prompts, "
                         f"then {timing_repeats} timed prefills each")
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
                row = {"length": length, "method": name, "knobs": knobs, "accuracy": accuracy,
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
    finally:
        unpatch(model)
        bar.close()
    return rows


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
