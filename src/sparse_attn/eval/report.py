"""Turn harness rows into JSON, a markdown report and PNG plots (accuracy and speed vs density).

The markdown is written for a reader who has never seen the project: a title, a paragraph saying
what ran (model, lengths, tasks, prompts, methods and knob values, device, backend) and how to read
the table, what the timings mean (on CPU: reference-backend timings that do not show the GPU
speedups), the table, a definition of every column, the plots and the run's details. The JSON holds
the same explanations next to the rows.

Every plot draws a method in the same colour and marker (:func:`method_style`), whatever else the
run holds, and dense as labelled reference lines.

Rows of the decode axis (``"axis": "decode"``: dense prefill, sparse decode at a token budget) get
their own table (:func:`decode_table`, :data:`DECODE_COLUMNS`), section and plot of accuracy vs
budget; every other function here reads the prefill rows only.
"""

from __future__ import annotations

import json
import textwrap
import zlib
from pathlib import Path

from .stats import paired_difference, wilson_interval

BENCHMARKS_DOC = "docs/benchmarks.md"
NOISY = 0.25  # a row whose timed repeats spread over more than this share of their median is flagged

# Fixed method -> (colour, marker): one look per method across lengths, plots and runs.
METHOD_STYLES = {
    "dense": ("#000000", "_"),
    "xattention": ("#1f77b4", "o"),
    "flexprefill": ("#ff7f0e", "s"),
    "vertical_slash": ("#2ca02c", "^"),
    "pooled_topp": ("#d62728", "D"),
    "oracle": ("#9467bd", "v"),
    "sliding_window": ("#8c564b", "P"),
    "strided": ("#e377c2", "X"),
    "power": ("#bcbd22", "*"),
    "quest": ("#17becf", "h"),
    "pooled": ("#393b79", "p"),
    "sink_window": ("#637939", "<"),
}
_SPARE_COLORS = ["#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                 "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
_SPARE_MARKERS = ["p", "<", ">", "8", "H", "d"]

# Column -> definition, in table order.
COLUMNS = [
    ("length", "prompt length in tokens (of the model's tokenizer)."),
    ("method", ("`dense` is the model's own full attention, the reference every other row is compared with; "
                "any other name is a block-sparse method replacing attention in every layer during the "
                "prompt's prefill (generation after the prompt stays dense).")),
    ("knobs", "the method's settings for this row (its block size is the run's block size); `-` for dense."),
    ("accuracy [95% CI]", ("task accuracy: the mean over this row's prompts of RULER's `string_match_all` score, "
                           "the share of the expected answers (numbers or variable names) found, each as a whole "
                           "word in any order, in the model's greedy continuation. In brackets, the 95% Wilson "
                           "score interval over the prompt count (fractional scores count as fractional "
                           "successes): with few prompts accuracy moves in large steps, and rows whose intervals "
                           "overlap are not shown to differ.")),
    ("prompts", "the number of prompts behind the accuracy (tasks x prompts per task)."),
    ("vs dense [95% CI]", ("accuracy minus dense's on the same prompts (the mean of the per-prompt score "
                           "differences, in points of accuracy x 100), with its 95% interval: paired, so it is "
                           "much narrower than the accuracies' own intervals when most prompts score alike; `-` "
                           "for dense and where the row has no per-prompt scores.")),
    ("per task", ("accuracy on each task's prompts alone (the prompts per task in brackets); these rest on "
                  "fewer prompts still, so their intervals are wider.")),
    ("recall", ("attention recall: the share of the exact softmax attention mass that the kept blocks hold, "
                "computed exactly on 32 evenly spaced query rows per layer and head, averaged over layers, heads "
                "and prompts; 1 for dense by definition.")),
    ("density", ("kept blocks over causally reachable blocks (the blocks a causal query can attend to), "
                 "averaged over layers, heads and prompts; 1 for dense. Lower means less attention computed.")),
    ("estimate ms", ("time the method spends choosing blocks, summed over layers, per prefill (mean over the "
                     "timed prefills); 0 for dense.")),
    ("prefill ms", ("wall time of one forward pass of the whole model (embeddings, attention, MLPs, LM head) "
                    "over the row's first prompt: the median of the timed repeats, their minimum-maximum in "
                    "brackets. The spread shows the timing noise.")),
    ("vs dense", ("prefill time ratio: this row's median prefill time over dense's at the same length; below "
                  "1.00x is faster than dense, above is slower. `~` marks a ratio whose min-max range overlaps "
                  "dense's, i.e. a difference within the timing noise.")),
]


# Decode-axis column -> definition, in table order.
DECODE_COLUMNS = [
    ("length", "prompt length in tokens (of the model's tokenizer)."),
    ("decode method", ("how each generated token's attention reads the KV cache: `dense` reads all of it (the "
                       "baseline); `quest` (Quest's upper bound of the query-key product over a page), `pooled` "
                       "(the query against a page's mean key) and `sink_window` (no scoring: the first and the "
                       "most recent tokens only, StreamingLLM) read the pages they select within the budget. "
                       "The prompt itself is always read with dense attention.")),
    ("budget", ("tokens each decode step reads per KV head, in whole pages (the always-kept sink and recent "
                "pages included); a budget at or above the cache length reads everything (the step runs "
                "dense). `-` for dense.")),
    ("settings", "the page size, the `sink` tokens at the start and the `recent` last tokens always read; "
                 "`bounds=int8`: Quest scored pages from int8 bounds (`--decode-bounds int8`)."),
    ("accuracy [95% CI]", ("task accuracy, scored as in the prefill table (RULER's `string_match_all` over the "
                           "greedy continuation), with its 95% Wilson score interval over the prompt count.")),
    ("prompts", "the number of prompts behind the accuracy (tasks x prompts per task)."),
    ("vs dense [95% CI]", ("accuracy minus dense's on the same prompts (the mean of the per-prompt score "
                           "differences, in points of accuracy x 100), with its 95% interval: paired, so it is "
                           "much narrower than the accuracies' own intervals when most prompts score alike; `-` "
                           "for dense and where the row has no per-prompt scores.")),
    ("per task", "accuracy on each task's prompts alone (the prompts per task in brackets)."),
    ("same as dense", ("the share of prompts whose generated text equals the dense-decode row's at the same "
                       "length, character for character.")),
    ("decode density", ("the share of the cached tokens a decode step read, averaged over layers, KV heads, "
                        "steps and prompts; a step that ran dense counts as 1. Lower means less of the cache "
                        "read per generated token.")),
    ("decode recall", ("the share of the exact softmax attention mass of a decode step that the selected pages "
                       "hold, averaged over the sampled steps; 1 for dense (and for a row whose steps all ran dense). `-` where "
                       "it was not measured.")),
]


def _prefill_rows(rows: list) -> list:
    """The rows of the prefill axis (rows without an ``axis`` key are prefill rows)."""
    return [r for r in rows if r.get("axis", "prefill") != "decode"]


def decode_rows(rows: list) -> list:
    """The rows of the decode axis."""
    return [r for r in rows if r.get("axis") == "decode"]


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


def _style(table: dict, method: str, index: int, spare: list) -> str:
    return table[method][index] if method in table else spare[zlib.crc32(method.encode()) % len(spare)]


def method_color(method: str) -> str:
    """The colour of ``method`` in every plot: fixed for known methods, a stable hash otherwise."""
    return _style(METHOD_STYLES, method, 0, _SPARE_COLORS)


def method_marker(method: str) -> str:
    """The marker shape of ``method`` in every plot (fixed like its colour)."""
    return _style(METHOD_STYLES, method, 1, _SPARE_MARKERS)


def method_style(methods) -> dict:
    """``{method: (colour, marker)}`` for ``methods``; a method's style never depends on the others."""
    return {m: (method_color(m), method_marker(m)) for m in methods}


def _interval(row: dict) -> tuple:
    if row.get("accuracy_ci95"):
        return tuple(row["accuracy_ci95"])
    return wilson_interval(row["accuracy"], row.get("samples", 0))


def _spread(row: dict) -> tuple:
    return row.get("prefill_ms_min", row["prefill_ms"]), row.get("prefill_ms_max", row["prefill_ms"])


def _order(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def markdown_table(rows: list) -> str:
    """One line per row: accuracy with its 95% interval, the prompts behind it, per-task accuracy,
    recall, density, estimation and prefill time (median and min-max), and prefill time as a ratio
    to dense at the same length (where the rows have a dense one). :data:`COLUMNS` defines them.
    Decode-axis rows are left out (:func:`decode_table`)."""
    rows = _prefill_rows(rows)
    dense = {r["length"]: r for r in rows if r["method"] == "dense"}
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        recall = "n/a" if r.get("recall") is None else f"{r['recall']:.3f}"
        density = "n/a" if r.get("density") is None else f"{r['density']:.3f}"
        per_task_n = r.get("per_task_prompts", {})
        per_task = ", ".join(f"{task} {acc:.2f}" + (f" ({per_task_n[task]})" if task in per_task_n else "")
                             for task, acc in r.get("per_task", {}).items()) or "-"
        lo, hi = _interval(r)
        low_ms, high_ms = _spread(r)
        prefill = f"{r['prefill_ms']:.1f} ({low_ms:.1f}-{high_ms:.1f})"
        ratio = "-"
        ref = dense.get(r["length"])
        if ref and ref.get("prefill_ms"):
            ref_low, ref_high = _spread(ref)
            noise = "~" if r is not ref and low_ms <= ref_high and ref_low <= high_ms else ""
            ratio = f"{noise}{r['prefill_ms'] / ref['prefill_ms']:.2f}x"
        lines.append(f"| {r['length']} | {r['method']} | {_knobs(r['knobs'])} | {r['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] "
                     f"| {r.get('samples', '?')} | {_versus(r, ref)} | {per_task} | {recall} | {density} | "
                     f"{r['estimate_ms_per_prefill']:.1f} | {prefill} | {ratio} |")
    return "\n".join(lines)


def _prompt_scores(row: dict) -> list | None:
    scores = row.get("scores")
    return [v for task in sorted(scores) for v in scores[task]] if scores else None


def _versus(row: dict, dense: dict | None) -> str:
    """The ``vs dense`` cell: the paired accuracy difference to ``dense`` in points, or ``-``."""
    mine, theirs = _prompt_scores(row), _prompt_scores(dense) if dense else None
    if dense is None or row is dense or mine is None or theirs is None or len(mine) != len(theirs) \
            or {t: len(v) for t, v in row["scores"].items()} != {t: len(v) for t, v in dense["scores"].items()}:
        return "-"
    mean, low, high = paired_difference(mine, theirs)
    return f"{100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def _device(rows: list, meta: dict) -> str:
    devices = _order(r["device"] for r in rows if r.get("device"))
    named = meta.get("device")
    if named and devices and named not in devices:
        return f"{named} ({', '.join(devices)})"
    return named or ", ".join(devices) or "unknown device"


def _on_cpu(rows: list, meta: dict) -> bool:
    devices = [r["device"] for r in rows if r.get("device")] or [str(meta.get("device", ""))]
    return all(str(d).startswith("cpu") for d in devices)


def describe_run(rows: list, meta: dict) -> dict:
    """What the rows measured, for the report's introduction (and the JSON's ``run``); ``decode``
    describes the decode axis (None without decode rows)."""
    decode = decode_rows(rows)
    rows = _prefill_rows(rows)
    sparse = [r for r in rows if r["method"] != "dense"]
    methods = {}
    for r in sparse:
        methods.setdefault(r["method"], [])
        if r["knobs"] not in methods[r["method"]]:
            methods[r["method"]].append(r["knobs"])
    backends = {}
    for r in sparse:
        if r.get("backend"):
            backends.setdefault(r["method"], [])
            label = r["backend"] + (f" ({r['forward_kernel']} forward kernel)"
                                    if r.get("forward_kernel") not in (None, r["backend"]) else "")
            if label not in backends[r["method"]]:
                backends[r["method"]].append(label)
    skipped = _order(s for r in sparse for s in r.get("backend_skipped", []))
    dense_backend = _order(r.get("backend") for r in rows if r["method"] == "dense" and r.get("backend"))
    per_task = _order(n for r in rows for n in r.get("per_task_prompts", {}).values())
    tasks = _order(t for r in rows for t in r.get("per_task", {}))
    samples = meta.get("samples_per_task") or (per_task[0] if len(per_task) == 1 else None)
    repeats = _order(len(r["prefill_ms_repeats"]) for r in rows if r.get("prefill_ms_repeats"))
    return {
        "model": meta.get("model", "unknown model"),
        "device": _device(rows, meta),
        "on_cpu": _on_cpu(rows, meta),
        "lengths": _order(r["length"] for r in rows),
        "tasks": tasks,
        "samples_per_task": samples,
        "prompts_per_row": _order(r.get("samples") for r in rows),
        "methods": methods,
        "block_size": meta.get("block_size") or next((r["block_size"] for r in rows if r.get("block_size")), None),
        "sparse_backend": backends,
        "sparse_backend_skipped": skipped,
        "dense_backend": dense_backend,
        "timing_repeats": repeats,
        "timed_tokens": _order(r.get("timed_tokens") for r in rows if r.get("timed_tokens")),
        "decode": _describe_decode(decode),
    }


def _describe_decode(rows: list) -> dict | None:
    if not rows:
        return None
    sparse = [r for r in rows if r["method"] != "dense"]
    settings = {}
    for r in sparse:
        knobs = {k: v for k, v in r["knobs"].items() if k != "budget"}
        settings.setdefault(r["method"], [])
        if knobs not in settings[r["method"]]:
            settings[r["method"]].append(knobs)
    return {"lengths": _order(r["length"] for r in rows), "methods": _order(r["method"] for r in sparse),
            "budgets": sorted(_order(r["budget"] for r in sparse)), "settings": settings,
            "recall_measured": any(r.get("decode_recall") is not None and r.get("decode_sparse_share", 1) > 0
                                   for r in sparse),
            "prompts_per_row": _order(r.get("samples") for r in rows)}


def _methods_text(methods: dict) -> str:
    parts = []
    for method, settings in methods.items():
        keys = _order(k for s in settings for k in s)
        varying = [k for k in keys if len(_order(s.get(k) for s in settings)) > 1]
        fixed = [k for k in keys if k not in varying]
        if len(varying) == 1:
            text = f"{varying[0]} " + ", ".join(str(s.get(varying[0])) for s in settings)
        elif varying:
            text = "; ".join("(" + ", ".join(f"{k}={s.get(k)}" for k in varying) + ")" for s in settings)
        else:
            text = ""
        fixed_text = ", ".join(f"{k}={settings[0][k]}" for k in fixed)
        inner = "; ".join(t for t in (text, fixed_text) if t)
        parts.append(f"`{method}` ({inner})" if inner else f"`{method}`")
    return ", ".join(parts)


def _backend_text(run: dict) -> str:
    labels = _order(label for labels in run["sparse_backend"].values() for label in labels)
    if not labels:
        return "no sparse rows"
    if len(labels) == 1:
        return f"the `{labels[0]}` backend"
    return "backends " + "; ".join(f"{m}: " + ", ".join(f"`{b}`" for b in bs) for m, bs in run["sparse_backend"].items())


def _list(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def introduction(rows: list, meta: dict) -> str:
    """The paragraph saying what ran and how to read the table."""
    rows = _prefill_rows(rows)
    run = describe_run(rows, meta)
    block = f"{run['block_size']}-token" if run["block_size"] else "fixed-size"
    samples = run["samples_per_task"]
    per_row = _list(run["prompts_per_row"])
    prompts = (f"{samples} prompt{'s' if samples != 1 else ''} per task and length, {per_row} per row"
               if samples else f"{per_row} prompts per row")
    methods = _methods_text(run["methods"]) or "none"
    dense = _list(run["dense_backend"]).replace("dense (", "").rstrip(")") if run["dense_backend"] else "its own"
    return (
        f"This report compares dense attention with {len(run['methods'])} block-sparse attention "
        f"method{'s' if len(run['methods']) != 1 else ''} on the model `{run['model']}`. Each method replaces "
        f"the model's attention in every layer while it reads the prompt (prefill), computing only the "
        f"{block} blocks of the attention matrix it estimates to matter, and runs at each of its knob "
        f"settings: {methods}. Prompts of {_list(run['lengths'])} tokens hide facts in long real text and ask "
        f"for them (retrieval tasks: {_list(run['tasks']) if run['tasks'] else 'none'}; {prompts}). "
        f"It ran on {run['device']}; sparse attention ran on {_backend_text(run)}, dense attention through "
        f"the model's own `{dense}` attention. Each table row is one (length, configuration). Read a sparse row "
        f"against the `dense` row of the same length: a good method keeps accuracy and attention recall "
        f"close to dense's at a low density, and a `vs dense` below 1.00x means a faster prefill "
        f"(see [what the timings mean](#what-the-timings-mean) first)."
    )


def timing_note(rows: list, meta: dict) -> str:
    """What the prefill times mean, from the device and backend that produced them."""
    rows = _prefill_rows(rows)
    run = describe_run(rows, meta)
    backend = _backend_text(run)
    repeats = _list(run["timing_repeats"]) if run["timing_repeats"] else "several"
    tokens = _list(run["timed_tokens"]) if run["timed_tokens"] else "the row's length in"
    if run["on_cpu"]:
        head = (
            "**These are reference-backend timings on CPU: they do not show the GPU speedups.** On CPU the "
            f"sparse path runs {backend}: the exact PyTorch implementation (the Triton and Gluon kernels need "
            "a CUDA GPU), which gathers the kept blocks in plain PyTorch and is slower than the dense SDPA "
            "kernel it is compared with; the block estimators also run their PyTorch versions. So sparse rows "
            "are usually slower than dense here (`vs dense` above 1x), whatever their density. Speed "
            f"is a GPU property: for GPU timings see `{BENCHMARKS_DOC}` in the sparse_attn repository (for "
            "example the canary model's prefill at 32K-128K tokens on an H100). Read a CPU report for "
            "accuracy, attention recall and density."
        )
    else:
        head = (
            f"Sparse prefills ran on {backend} on {run['device']}. At short contexts and on small models the "
            "estimation cost and kernel overheads can outweigh the attention saved, so sparse rows may be "
            "slower than dense; the saving grows with context length (GPU tables at 32K-128K tokens: "
            f"`{BENCHMARKS_DOC}` in the sparse_attn repository)."
        )
    skipped = run["sparse_backend_skipped"]
    why = (" Faster backends were skipped because: " + "; ".join(skipped) + ".") if skipped else ""
    noisy = [r for r in rows if r.get("prefill_ms") and (_spread(r)[1] - _spread(r)[0]) > NOISY * r["prefill_ms"]]
    warning = (f" In {len(noisy)} of {len(rows)} rows the repeats differ by more than {NOISY:.0%} of their median "
               "(other work on the machine, frequency scaling): take their times and ratios as rough, or rerun "
               "on a quiet machine." if noisy else "")
    return (
        f"{head}{why}\n\nEach prefill time is the wall time of one forward pass of the whole model over the "
        f"row's first prompt ({tokens} tokens), after one untimed warm-up pass and with attention recall "
        f"measurement off. The table gives the median of {repeats} timed repeats with their minimum-maximum "
        f"in brackets: differences inside those ranges are timing noise (`~` in `vs dense`).{warning}"
    )


def columns_text() -> str:
    return "\n".join(f"* **{name}**: {definition}" for name, definition in COLUMNS)


def decode_table(rows: list) -> str:
    """The decode axis's table (:data:`DECODE_COLUMNS`): one line per (length, decode method, budget),
    the dense-decode row first at each length; empty without decode rows."""
    rows = decode_rows(rows)
    if not rows:
        return ""
    lines = ["| " + " | ".join(name for name, _ in DECODE_COLUMNS) + " |", "|" + "---|" * len(DECODE_COLUMNS)]
    dense = {r["length"]: r for r in rows if r["method"] == "dense"}
    for r in rows:
        lo, hi = _interval(r)
        per_task_n = r.get("per_task_prompts", {})
        per_task = ", ".join(f"{task} {acc:.2f}" + (f" ({per_task_n[task]})" if task in per_task_n else "")
                             for task, acc in r.get("per_task", {}).items()) or "-"
        settings = _knobs({k: v for k, v in r["knobs"].items() if k != "budget"})
        same = "-" if r.get("same_as_dense") is None else f"{r['same_as_dense']:.2f}"
        density = "-" if r.get("decode_density") is None else f"{r['decode_density']:.3f}"
        recall = "-" if r.get("decode_recall") is None else f"{r['decode_recall']:.3f}"
        budget = "-" if r.get("budget") is None else str(r["budget"])
        lines.append(f"| {r['length']} | {r['method']} | {budget} | {settings} | {r['accuracy']:.2f} [{lo:.2f}, "
                     f"{hi:.2f}] | {r.get('samples', '?')} | {_versus(r, dense.get(r['length']))} | {per_task} | "
                     f"{same} | {density} | {recall} |")
    return "\n".join(lines)


def decode_introduction(rows: list) -> str:
    """The paragraph introducing the decode table (empty without decode rows)."""
    run = _describe_decode(decode_rows(rows))
    if run is None:
        return ""
    methods = ", ".join(f"`{m}`" for m in run["methods"]) or "none"
    budgets = _list(run["budgets"]) if run["budgets"] else "none"
    recall = ("Decode recall was measured on sampled steps." if run["recall_measured"] else
              "Decode recall was not measured in this run (`-`).")
    return (
        f"The decode axis measures sparse attention while the answer is generated. The prompt is read with the "
        f"model's own dense attention, except its last token; that token and every generated one then go through "
        f"a decode step that reads only some pages of the KV cache, chosen by the decode method ({methods}) "
        f"within a budget of {budgets} tokens per step and KV head. So every answer token comes from a sparse "
        f"decode step, and a row's accuracy shows what the decode method costs. The `dense` row of each length "
        f"runs the same procedure with dense decode steps: compare a row with it (`same as dense`: the share of "
        f"identical answers). A budget at or above the cache length reads the whole cache, so that row "
        f"matches dense. {recall}"
    )


def decode_columns_text() -> str:
    return "\n".join(f"* **{name}**: {definition}" for name, definition in DECODE_COLUMNS)


def _details(meta: dict) -> str:
    return "\n".join(f"* {key}: {value}" for key, value in meta.items()) or "* (none given)"


def markdown_report(rows: list, meta: dict, plots=()) -> str:
    """The whole markdown report: title, introduction, timing note, table, columns, the decode axis
    (its introduction, table and columns, where the rows have one), plots, details."""
    run = describe_run(rows, meta)
    title = f"# Sparse attention evaluation: `{run['model']}` on {run['device']}"
    parts = [title, introduction(rows, meta), "## What the timings mean", timing_note(rows, meta),
             "## Results", markdown_table(rows), "## Columns", columns_text()]
    if decode_rows(rows):
        parts += ["## Decode: dense prefill, sparse decode", decode_introduction(rows), decode_table(rows),
                  "### Decode columns", decode_columns_text()]
    if plots:
        parts.append("## Plots")
        parts.append("Each panel is one prompt length; each method has one colour and marker in every panel "
                     "and plot, dense is the labelled black dashed line (its band: its 95% interval or its "
                     "timing range). Error bars: the 95% Wilson interval of accuracy, the min-max of prefill "
                     "time. Accuracy points of different methods are nudged apart vertically by at most "
                     "0.02 so that equal values stay visible." + (
                         " The decode plot draws accuracy against the decode budget (log scale), one line "
                         "per decode method, with the dense-decode row as the dashed line."
                         if any(str(p).endswith("_decode_accuracy_vs_budget.png") for p in plots) else ""))
        parts.extend(f"![{Path(p).stem}]({Path(p).name})" for p in plots)
    parts += ["## Run details", _details(meta)]
    return "\n\n".join(parts) + "\n"


def _figure(rows: list, metric: str, meta: dict | None = None):
    """The figure of ``metric`` ("accuracy" or "prefill_ms") vs density: one panel per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _prefill_rows(rows)
    run = describe_run(rows, meta or {})
    lengths = sorted({r["length"] for r in rows})
    methods = _order(r["method"] for r in rows if r["method"] != "dense")
    styles = method_style(methods)
    width = max(7.0, 4.6 * len(lengths) + 0.6)
    fig, axes = plt.subplots(1, len(lengths), figsize=(width, 4.8), squeeze=False,
                             sharey=metric == "accuracy")
    accuracy = metric == "accuracy"
    handles = {}
    for ax, length in zip(axes[0], lengths):
        here = [r for r in rows if r["length"] == length]
        for index, method in enumerate(methods):
            pts = sorted((r for r in here if r["method"] == method and r.get("density") is not None),
                         key=lambda r: r["density"])
            if not pts:
                continue
            color, marker = styles[method]
            nudge = 0.02 * (index - (len(methods) - 1) / 2) / max(len(methods) - 1, 1) * 2 if accuracy else 0.0
            xs = [r["density"] for r in pts]
            ys = [r[metric] + nudge for r in pts]
            if accuracy:
                lows = [y - (_interval(r)[0] + nudge) for r, y in zip(pts, ys)]
                highs = [(_interval(r)[1] + nudge) - y for r, y in zip(pts, ys)]
            else:
                lows = [r[metric] - _spread(r)[0] for r in pts]
                highs = [_spread(r)[1] - r[metric] for r in pts]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", color=color, ecolor=color, alpha=0.35, capsize=2,
                        linewidth=1, gid=method)
            ax.plot(xs, ys, color=color, alpha=0.45, linewidth=1, gid=method)
            handles[method] = ax.scatter(xs, ys, color=color, marker=marker, s=46, alpha=0.75,
                                         edgecolors="white", linewidths=0.6, zorder=3, gid=method,
                                         label=method)
        dense = [r for r in here if r["method"] == "dense"]
        if dense:
            ref = dense[0]
            low, high = _interval(ref) if accuracy else _spread(ref)
            text = (f"dense {ref['accuracy']:.2f}" if accuracy else f"dense {ref['prefill_ms']:.0f} ms")
            handles["dense"] = ax.axhline(ref[metric], color=method_color("dense"), linestyle="--", linewidth=1.2,
                                          gid="dense", label="dense (reference)")
            ax.axhspan(low, high, color=method_color("dense"), alpha=0.07, linewidth=0)
            ax.annotate(text, xy=(0.01, ref[metric]), xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", fontsize=9, color=method_color("dense"))
        ax.set_title(f"{length} tokens", fontsize=11)
        ax.set_xlabel("density (kept / causal blocks)", fontsize=10)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.25)
        if accuracy:
            ax.set_ylim(-0.05, 1.08)
        else:
            ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("task accuracy (RULER string_match_all)" if accuracy else "prefill time, ms (median)",
                          fontsize=10)
    if accuracy:
        counts = _list(run["prompts_per_row"])
        title = f"Task accuracy vs density: {counts} prompts per point, bars: 95% Wilson interval"
    else:
        backend = _backend_text(run).replace("`", "").replace("the ", "", 1)
        title = f"Prefill time vs density ({run['device']}, sparse attention on {backend}): median of timed " \
                "repeats, bars: min-max"
        if run["on_cpu"]:
            title += ". CPU reference-backend timings: they do not show the GPU speedups"
    fig.suptitle("\n".join(textwrap.wrap(title, int(width * 12))), fontsize=11)
    order = [m for m in ["dense", *methods] if m in handles]
    fig.legend([handles[m] for m in order], [handles[m].get_label() for m in order], loc="lower center",
               ncol=min(len(order), 5), fontsize=10, frameon=False, markerscale=1.2)
    rows_of_legend = (len(order) + 4) // 5
    fig.tight_layout(rect=(0, 0.07 * rows_of_legend + 0.02, 1, 1))
    return fig


def _decode_figure(rows: list):
    """Decode accuracy vs budget: one panel per length, one line per decode method (95% Wilson bars),
    dense decode as the labelled reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = decode_rows(rows)
    lengths = _order(r["length"] for r in rows)
    methods = _order(r["method"] for r in rows if r["method"] != "dense")
    styles = method_style(methods)
    budgets = sorted(_order(r["budget"] for r in rows if r["method"] != "dense"))
    width = max(7.0, 4.6 * len(lengths) + 0.6)
    fig, axes = plt.subplots(1, len(lengths), figsize=(width, 4.8), squeeze=False, sharey=True)
    handles = {}
    for ax, length in zip(axes[0], lengths):
        here = [r for r in rows if r["length"] == length]
        for index, method in enumerate(methods):
            pts = sorted((r for r in here if r["method"] == method), key=lambda r: r["budget"])
            if not pts:
                continue
            color, marker = styles[method]
            offset = (index - (len(methods) - 1) / 2) / max(len(methods) - 1, 1) * 2  # -1 .. 1
            nudge = 0.02 * offset
            xs = [r["budget"] * 2 ** (0.06 * offset) for r in pts]  # apart on the log axis too
            ys = [r["accuracy"] + nudge for r in pts]
            lows = [y - (_interval(r)[0] + nudge) for r, y in zip(pts, ys)]
            highs = [(_interval(r)[1] + nudge) - y for r, y in zip(pts, ys)]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="none", color=color, ecolor=color, alpha=0.35, capsize=2,
                        linewidth=1, gid=method)
            ax.plot(xs, ys, color=color, alpha=0.45, linewidth=1, gid=method)
            handles[method] = ax.scatter(xs, ys, color=color, marker=marker, s=46, alpha=0.75, edgecolors="white",
                                         linewidths=0.6, zorder=3, gid=method, label=method)
        dense = [r for r in here if r["method"] == "dense"]
        if dense:
            ref = dense[0]
            low, high = _interval(ref)
            handles["dense"] = ax.axhline(ref["accuracy"], color=method_color("dense"), linestyle="--",
                                          linewidth=1.2, gid="dense", label="dense decode (reference)")
            ax.axhspan(low, high, color=method_color("dense"), alpha=0.07, linewidth=0)
            ax.annotate(f"dense {ref['accuracy']:.2f}", xy=(0.01, ref["accuracy"]), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=9, color=method_color("dense"))
        ax.set_title(f"{length} tokens", fontsize=11)
        ax.set_xlabel("decode budget (tokens read per step and KV head)", fontsize=10)
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets)
            ax.set_xticklabels([str(b) for b in budgets], fontsize=9)
            ax.minorticks_off()
        ax.set_ylim(-0.05, 1.08)
        ax.grid(alpha=0.25)
    axes[0][0].set_ylabel("task accuracy (RULER string_match_all)", fontsize=10)
    counts = _list(_order(r.get("samples") for r in rows))
    title = (f"Decode accuracy vs budget (dense prefill, sparse decode): {counts} prompts per point, "
             "bars: 95% Wilson interval")
    fig.suptitle("\n".join(textwrap.wrap(title, int(width * 12))), fontsize=11)
    order = [m for m in ["dense", *methods] if m in handles]
    fig.legend([handles[m] for m in order], [handles[m].get_label() for m in order], loc="lower center",
               ncol=min(len(order), 5), fontsize=10, frameon=False, markerscale=1.2)
    rows_of_legend = (len(order) + 4) // 5
    fig.tight_layout(rect=(0, 0.07 * rows_of_legend + 0.02, 1, 1))
    return fig


def plot(rows: list, out_prefix: str, meta: dict | None = None) -> list:
    """Accuracy vs density and prefill time vs density, one panel per length, and with decode rows
    decode accuracy vs budget (needs matplotlib); ``meta`` (as for :func:`write_report`) names the
    device in the titles where rows do not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    if _prefill_rows(rows):
        for metric in ("accuracy", "prefill_ms"):
            fig = _figure(rows, metric, meta)
            path = f"{out_prefix}_{metric}_vs_density.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            paths.append(path)
    if decode_rows(rows):
        fig = _decode_figure(rows)
        path = f"{out_prefix}_decode_accuracy_vs_budget.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: list, meta: dict, out_prefix: str) -> dict:
    """Write ``out_prefix``.json, .md and the plots; returns ``{"table", "plots", "markdown",
    "summary"}`` (``summary``: the introduction and the timing note, for a console)."""
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, out_prefix, meta)
    run = describe_run(rows, meta)
    about = {"introduction": introduction(rows, meta), "timings": timing_note(rows, meta),
             "columns": dict(COLUMNS), "accuracy_interval": "95% Wilson score interval over the prompt count"}
    if decode_rows(rows):
        about.update(decode=decode_introduction(rows), decode_columns=dict(DECODE_COLUMNS))
    with open(out_prefix + ".json", "w") as fh:
        json.dump({"meta": meta, "run": run, "about": about, "rows": rows}, fh, indent=1, default=str)
    table = markdown_table(rows)
    if decode_rows(rows):
        table += "\n\n" + decode_table(rows)
    markdown = markdown_report(rows, meta, plots)
    with open(out_prefix + ".md", "w") as fh:
        fh.write(markdown)
    return {"table": table, "plots": plots, "markdown": markdown,
            "summary": about["introduction"] + "\n\n" + about["timings"]}
