"""Turn harness rows into JSON, a markdown table and PNG plots (accuracy and speed vs density)."""

from __future__ import annotations

import json
from pathlib import Path


def _knobs(knobs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "-"


def markdown_table(rows: list) -> str:
    """One line per row: accuracy (and per task), recall, density, estimation and prefill time, and
    prefill time as a ratio to dense at the same length (where the rows have a dense one)."""
    dense_ms = {r["length"]: r["prefill_ms"] for r in rows if r["method"] == "dense"}
    lines = ["| length | method | knobs | accuracy | per task | recall | density | estimate ms | prefill ms "
             "| vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recall = "n/a" if r.get("recall") is None else f"{r['recall']:.3f}"
        density = "n/a" if r.get("density") is None else f"{r['density']:.3f}"
        per_task = ", ".join(f"{task} {acc:.2f}" for task, acc in r.get("per_task", {}).items()) or "-"
        ratio = f"{r['prefill_ms'] / dense_ms[r['length']]:.2f}x" if dense_ms.get(r["length"]) else "-"
        lines.append(f"| {r['length']} | {r['method']} | {_knobs(r['knobs'])} | {r['accuracy']:.2f} | {per_task} | "
                     f"{recall} | {density} | {r['estimate_ms_per_prefill']:.1f} | {r['prefill_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list, out_prefix: str) -> list:
    """Accuracy vs density and prefill time vs density, one line per method and length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for metric, label in (("accuracy", "task accuracy"), ("prefill_ms", "prefill time (ms)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for length in sorted({r["length"] for r in rows}):
            dense = [r for r in rows if r["length"] == length and r["method"] == "dense"]
            for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
                pts = sorted((r["density"], r[metric]) for r in rows
                             if r["length"] == length and r["method"] == method and r.get("density") is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{method} @ {length}")
            if dense:
                ax.axhline(dense[0][metric], linestyle="--", linewidth=0.8, color="gray")
        ax.set_xlabel("density (kept blocks / causal blocks)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs density (dashed: dense)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = f"{out_prefix}_{metric}_vs_density.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(rows: list, meta: dict, out_prefix: str) -> dict:
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    with open(out_prefix + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1, default=str)
    table = markdown_table(rows)
    with open(out_prefix + ".md", "w") as fh:
        fh.write(f"{meta}\n\n{table}\n")
    return {"table": table, "plots": plot(rows, out_prefix)}
