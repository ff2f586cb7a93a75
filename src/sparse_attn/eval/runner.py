"""The evaluation harness: dense and every method over its knob range, on retrieval tasks.

For each context length and configuration it records task accuracy (greedy generation, RULER's
``string_match_all`` scoring: :func:`.tasks.score`), attention recall and density per layer (from
the patched model's records), estimation cost, and prefill time. ``evaluate`` returns plain dicts;
:mod:`.report` turns them into JSON, a markdown table and plots.

Timing is separate from the accuracy pass: per (length, configuration), one untimed warm-up prefill
(compilation, autotuning, allocator), then the median of ``timing_repeats`` prefills of the first
prompt with recall measurement off; the estimation cost comes from those timed prefills too.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..integrations.hf import SparseConfig, patch, unpatch
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


def timed_prefills(model, ids, device, state, repeats: int):
    """(median prefill ms, mean estimation ms per prefill) after one warm-up, recall off."""
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
    return sorted(times)[len(times) // 2], estimate_ms


def greedy_score(model, tokenizer, sample) -> float:
    """RULER score (:func:`.tasks.score`) of ``model``'s greedy continuation of ``sample.prompt``,
    a few tokens longer than the answer."""
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    answer_len = len(tokenizer(" " + sample.answer, add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=answer_len + 3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return score(sample, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def evaluate(model, tokenizer, methods, lengths, tasks=TASKS, samples: int = 4, block_size: int = 64,
             sweeps: Optional[dict] = None, progress=None, timing_repeats: int = 3) -> list:
    """Rows of results, one per (length, configuration); ``progress(advance)`` is called per sample."""
    sweeps = {**SWEEPS, **(sweeps or {})}
    unknown = [m for m in methods if m not in sweeps]
    if unknown:
        raise ValueError(f"no knob range for {unknown}; known: {sorted(sweeps)} (or pass sweeps=)")
    device = next(model.parameters()).device
    configs = [("dense", {})] + [(m, knobs) for m in methods for knobs in sweeps[m]]
    rows = []
    for length in lengths:
        batch = [make_sample(task, tokenizer, length, seed=i) for task in tasks for i in range(samples)]
        for name, knobs in configs:
            state = None
            if name == "dense":
                unpatch(model)
            else:
                state = patch(model, config=SparseConfig(
                    method=name, knobs={"block_size": block_size, **knobs}, min_kv_len=0,
                    fallback="never", record=True, measure_recall=True))
            correct, per_task = 0, {}
            for sample in batch:
                ok = greedy_score(model, tokenizer, sample)
                correct += ok
                per_task.setdefault(sample.task, []).append(ok)
                if progress:
                    progress(1)
            row = {"length": length, "method": name, "knobs": knobs, "accuracy": correct / len(batch),
                   "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
                   "samples": len(batch)}
            if state is not None:
                prefills = [r for r in state.records if r["q_len"] > 1 and r["sparse"]]
                layers = sorted({r["layer"] for r in prefills})
                row["density"] = _mean(r["density"] for r in prefills)
                row["recall"] = _mean(r["recall"] for r in prefills)
                row["density_per_layer"] = {i: _mean(r["density"] for r in prefills if r["layer"] == i) for i in layers}
                row["recall_per_layer"] = {i: _mean(r["recall"] for r in prefills if r["layer"] == i) for i in layers}
            else:
                row.update(density=1.0, recall=1.0)
            first_ids = tokenizer(batch[0].prompt, return_tensors="pt").input_ids.to(device)
            row["prefill_ms"], row["estimate_ms_per_prefill"] = timed_prefills(model, first_ids, device, state,
                                                                                timing_repeats)
            rows.append(row)
    unpatch(model)
    return rows


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
