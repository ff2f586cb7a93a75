"""The evaluation harness's decode axis on CPU: dense prefill, sparse decode per (method, budget), its
rows, report, plot and CLI options (a tiny random Llama, and the shipped canary at 512 tokens)."""

import contextlib
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn.eval import make_sample, runner
from sparse_attn.eval.report import (
    DECODE_COLUMNS,
    decode_table,
    markdown_table,
    write_report,
)
from sparse_attn.eval.runner import (
    decode_config,
    decode_knobs,
    evaluate,
    evaluate_decode,
)
from sparse_attn.integrations.hf.tokenizer import byte_tokenizer

DECODE_KEYS = {"axis", "length", "method", "knobs", "budget", "accuracy", "accuracy_ci95", "samples", "per_task",
               "per_task_prompts", "scores", "outputs", "same_as_dense", "decode_density", "decode_recall",
               "decode_density_per_layer", "decode_steps", "decode_sparse_share", "recall_every", "device"}


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _tiny_model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def decode_run(tokenizer, tmp_path_factory):
    """One CPU run with the decode axis (no prefill methods), its stderr and its report."""
    model = _tiny_model(tokenizer)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rows = evaluate(model, tokenizer, [], [256], tasks=["passkey"], samples=2, timing_repeats=1,
                        decode_methods=["quest", "pooled", "sink_window"], decode_budgets=[64, 4096])
    prefix = str(tmp_path_factory.mktemp("decode") / "eval")
    return model, rows, err.getvalue(), write_report(rows, {"model": "tiny", "device": "cpu"}, prefix), prefix


def test_decode_rows_per_method_budget_and_length_with_density(decode_run):
    model, rows, err, _, _ = decode_run
    assert [r.get("axis") for r in rows] == ["prefill"] + ["decode"] * 7
    decode = rows[1:]
    assert [(r["method"], r["budget"]) for r in decode] == [
        ("dense", None), ("quest", 64), ("quest", 4096), ("pooled", 64), ("pooled", 4096),
        ("sink_window", 64), ("sink_window", 4096)]
    for r in decode:
        assert DECODE_KEYS <= set(r), DECODE_KEYS - set(r)
        assert r["length"] == 256 and r["samples"] == 2 and len(r["outputs"]) == 2
        lo, hi = r["accuracy_ci95"]
        assert 0 <= lo <= r["accuracy"] <= hi <= 1
        assert r["decode_steps"] >= 2 * 5 and set(r["decode_density_per_layer"]) == {0, 1}
        assert r["decode_recall"] is None or 0 <= r["decode_recall"] <= 1
    for r in decode[1::2]:  # 64-token budgets: every step sparse, a quarter of the cache or less
        assert r["decode_sparse_share"] == 1.0 and 0 < r["decode_density"] < 0.3
        assert r["knobs"]["page"] == 16 and r["knobs"]["sink"] == 16
    assert decode[5]["knobs"]["recent"] == 32  # sink_window: the window fills the budget after the sink
    assert "length 256 | decode quest budget=64 | accuracy" in err and "decode density" in err
    assert not hasattr(model, "_sparse_attn_state") or model._sparse_attn_state is None


def test_a_budget_covering_the_context_gives_the_dense_answers(decode_run):
    _, rows, _, _, _ = decode_run
    dense = next(r for r in rows if r.get("axis") == "decode" and r["method"] == "dense")
    assert dense["decode_density"] == 1.0 and dense["decode_recall"] == 1.0
    for r in rows:
        if r.get("budget") == 4096:
            assert r["outputs"] == dense["outputs"] and r["scores"] == dense["scores"]
            assert r["accuracy"] == dense["accuracy"] and r["same_as_dense"] == 1.0
            assert r["decode_density"] == 1.0 and r["decode_sparse_share"] == 0.0


def test_canary_keeps_its_dense_answers_at_a_covering_budget():
    """On the shipped canary (a 512-token passkey prompt) dense decode answers and a budget covering the
    cache gives the same text; a 48-token budget (sink_window: one sink page, two recent pages) reads
    under a tenth of the cache at every step."""
    from sparse_attn.eval.canary import resolve_model

    path = resolve_model("canary")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    dense, small, covering = evaluate_decode(model, tokenizer, ["sink_window"], [512], budgets=[48, 2048],
                                             tasks=["passkey"], samples=1, progress=False)
    assert dense["accuracy"] == 1.0 and make_sample("passkey", tokenizer, 512, seed=0).answer in dense["outputs"][0]
    assert covering["outputs"] == dense["outputs"] and covering["accuracy"] == dense["accuracy"]
    assert covering["decode_density"] == 1.0 and covering["same_as_dense"] == 1.0
    assert small["decode_density"] < 0.1 and small["decode_sparse_share"] == 1.0


def test_decode_report_table_json_and_plot(decode_run):
    _, rows, _, result, prefix = decode_run
    md = Path(prefix + ".md").read_text()
    table = decode_table(rows)
    assert table in md and table in result["table"]
    header = table.splitlines()[0]
    for name, _ in DECODE_COLUMNS:
        assert f"| {name} |" in header or header.startswith(f"| {name} |")
        assert f"* **{name}**: " in md.split("### Decode columns")[1]
    assert "| 256 | dense | - | - |" in table and "| 256 | quest | 64 | page=16, sink=16, recent=16 |" in table
    assert all(line.count(" | ") == header.count(" | ") for line in table.splitlines()[2:])  # a cell per column
    quest = next(line for line in table.splitlines() if "| quest | 64 |" in line)
    assert re.search(r"\| [+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\] \|", quest)  # paired to dense decode
    assert markdown_table(rows).count("\n") == 2  # the prefill table holds the prefill rows only
    assert "## Decode: dense prefill, sparse decode" in md and "dense attention" in md
    saved = json.loads(Path(prefix + ".json").read_text())
    assert [r["axis"] for r in saved["rows"]].count("decode") == 7
    assert saved["run"]["decode"]["methods"] == ["quest", "pooled", "sink_window"]
    assert saved["run"]["decode"]["budgets"] == [64, 4096] and "decode_columns" in saved["about"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(prefix + "_decode_accuracy_vs_budget.png").exists()
        assert "![eval_decode_accuracy_vs_budget](eval_decode_accuracy_vs_budget.png)" in md


def test_recall_is_a_dash_when_the_records_do_not_carry_it(decode_run):
    _, rows, _, _, _ = decode_run
    decode = [dict(r) for r in rows if r.get("axis") == "decode"]
    decode[1]["decode_recall"], decode[3]["decode_recall"] = None, 0.875
    lines = decode_table(decode).splitlines()
    assert lines[3].endswith(" | - |") and lines[5].endswith(" | 0.875 |")


def test_recall_every_is_passed_only_where_the_config_takes_it(monkeypatch):
    knobs = decode_knobs("quest", 256)
    assert knobs == {"budget": 256, "page": 16, "sink": 16, "recent": 16}

    class NoRecall(runner.SparseConfig):
        def validate(self):
            if isinstance(self.decode, dict) and "recall_every" in self.decode:
                raise ValueError("decode: unknown key(s) ['recall_every']")
            super().validate()

    monkeypatch.setattr(runner, "SparseConfig", NoRecall)
    config, every = decode_config("quest", knobs, num_layers=2, recall_every=4)
    assert every is None and "recall_every" not in config.decode and config.dense_first_layers == 2
    monkeypatch.undo()
    try:
        runner.SparseConfig(method="dense", decode={"method": "quest", **knobs, "recall_every": 4})
    except ValueError:
        pytest.skip("this SparseConfig does not take recall_every")
    config, every = decode_config("quest", knobs, num_layers=2, recall_every=4)
    assert every == 4 and config.decode["recall_every"] == 4


def test_bad_decode_settings_are_refused_before_anything_runs(tokenizer):
    model = _tiny_model(tokenizer)
    for kwargs, match in (({"decode_methods": ["oracle"]}, "unknown decode method"),
                          ({"decode_methods": ["quest"], "decode_budgets": [0]}, "positive"),
                          ({"decode_methods": ["quest"], "decode_budgets": []}, "at least one budget"),
                          ({"decode_methods": ["quest"], "decode_page": 24}, "page=24"),
                          ({"decode_methods": ["quest"], "decode_budgets": [32]}, "budget=32")):
        with pytest.raises(ValueError, match=match):
            evaluate(model, tokenizer, [], [256], tasks=["passkey"], samples=1, progress=False, **kwargs)


@pytest.mark.parametrize("args,option", [
    (["--decode-methods", "oracle"], "--decode-methods"),
    (["--decode-methods", "quest", "--decode-budgets", "abc"], "--decode-budgets"),
    (["--decode-methods", "quest", "--decode-budgets", "128,0"], "--decode-budgets"),
    (["--decode-methods", "quest", "--decode-budgets", "32"], "--decode-budgets"),  # no room for sink + recent
    (["--decode-methods", "quest", "--decode-page", "24"], "--decode-page"),
    (["--decode-methods", "quest", "--decode-sink", "-1"], "--decode-sink"),
    (["--decode-methods", "sink_window", "--decode-recent", "500", "--decode-budgets", "128"], "--decode-budgets"),
    (["--decode-budgets", "128"], "--decode-budgets"),  # without --decode-methods
    (["--decode-bounds", "int8"], "--decode-bounds"),  # without --decode-methods
    (["--decode-methods", "quest", "--decode-bounds", "int4"], "--decode-bounds"),
])
def test_bad_decode_options_end_in_one_line_naming_the_option(args, option):
    from click.testing import CliRunner

    from sparse_attn.cli import main

    result = CliRunner().invoke(main, ["eval", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and option in lines[0], result.output


def _run_eval_cli(tokenizer, tmp_path, *args):
    """``sparse-attn eval`` on a saved tiny model, 200-token passkey prompts, one per task."""
    from click.testing import CliRunner

    from sparse_attn.cli import main

    model = _tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--lengths", "200", "--tasks", "passkey",
                                     "--samples", "1", "--out", str(tmp_path / "r"), *args])


def test_eval_cli_runs_the_decode_axis(tokenizer, tmp_path):
    result = _run_eval_cli(tokenizer, tmp_path, "--methods", "power", "--block-size", "32", "--decode-methods",
                           "quest,sink_window", "--decode-budgets", "64,1024", "--decode-page", "16")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| 200 | power |" in result.output and "| 200 | quest | 64 |" in result.output
    assert "| 200 | sink_window | 1024 |" in result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in saved["rows"] if r["axis"] == "decode"] == ["dense", "quest", "quest",
                                                                              "sink_window", "sink_window"]
    assert saved["meta"]["decode_page"] == 16 and saved["meta"]["decode_bounds"] == "exact"


def test_eval_cli_decodes_with_int8_bounds(tokenizer, tmp_path):
    result = _run_eval_cli(tokenizer, tmp_path, "--methods", "none", "--decode-methods", "quest",
                           "--decode-budgets", "64", "--decode-bounds", "int8")
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads((tmp_path / "r.json").read_text())
    quest = [r for r in saved["rows"] if r["axis"] == "decode" and r["method"] == "quest"]
    assert len(quest) == 1 and quest[0]["knobs"]["bounds"] == "int8" and quest[0]["decode_density"] < 1.0
    assert saved["meta"]["decode_bounds"] == "int8" and "bounds=int8" in result.output
