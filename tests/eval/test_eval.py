"""Evaluation harness pieces on CPU: tasks, scoring, the runner on a tiny model, the shipped canary
(its training tool is tested in tests/tools/test_canary_training.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn.eval import TASKS, make_sample, score  # noqa: E402
from sparse_attn.eval.corpus import haystack_text  # noqa: E402
from sparse_attn.eval.report import markdown_table, write_report  # noqa: E402
from sparse_attn.eval.runner import evaluate  # noqa: E402
from sparse_attn.integrations.hf.tokenizer import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_haystack_is_real_text():
    text = haystack_text()
    assert len(text) > 1_000_000 and "In the beginning" in text


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [600, 2000])
def test_samples_hit_the_length_and_hold_the_answer(tokenizer, task, length):
    sample = make_sample(task, tokenizer, length, seed=5)
    n = len(tokenizer(sample.prompt).input_ids)
    assert abs(n - length) <= 8
    for part in sample.answer.split(", "):
        assert part in sample.prompt
    assert make_sample(task, tokenizer, length, seed=5).prompt == sample.prompt  # reproducible
    assert make_sample(task, tokenizer, length, seed=6).prompt != sample.prompt


def test_too_short_lengths_are_refused(tokenizer):
    with pytest.raises(ValueError, match="too short for task 'multikey'"):
        make_sample("multikey", tokenizer, 100)


def test_scoring_counts_whole_items_in_any_order():
    sample = make_sample("passkey", byte_tokenizer(), 200, seed=1)
    assert score(sample, f" {sample.answer}. Remember") == 1.0
    assert score(sample, f" {sample.answer}1") == 0.0  # a longer number is not the answer
    assert score(sample, " 0") == 0.0
    values = make_sample("multivalue", byte_tokenizer(), 400, seed=1).references
    multivalue = make_sample("multivalue", byte_tokenizer(), 400, seed=1)
    assert len(values) == 3
    assert score(multivalue, f" {values[2]}, {values[0]}, {values[1]}.") == 1.0  # RULER: order-free
    assert score(multivalue, f" {values[1]}, {values[1]}, 000000.") == pytest.approx(1 / 3)
    names = make_sample("vartrack", byte_tokenizer(), 400, seed=2).references
    assert score(make_sample("vartrack", byte_tokenizer(), 400, seed=2), " " + ", ".join(names).lower()) == 1.0


def test_tasks_work_with_another_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(haystack_text()[:20000].split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    sample = make_sample("multikey", word_tok, 500, seed=2)
    assert abs(len(word_tok(sample.prompt).input_ids) - 500) <= 20


def _tiny_model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=1024)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_runner_records_accuracy_recall_density_and_time(tokenizer, tmp_path):
    model = _tiny_model(tokenizer)
    calls = []
    rows = evaluate(model, tokenizer, ["oracle", "sliding_window"], [256], tasks=["passkey"], samples=1,
                    block_size=32, sweeps={"oracle": [{"top_p": 0.5}, {"top_p": 0.99}],
                                           "sliding_window": [{"window": 64, "sink": 0}]},
                    progress=calls.append)
    assert [r["method"] for r in rows] == ["dense", "oracle", "oracle", "sliding_window"]
    assert len(calls) == 4
    dense, low, high, window = rows
    assert dense["density"] == 1.0 and dense["recall"] == 1.0
    assert 0 < low["density"] < high["density"] <= 1
    assert 0 < low["recall"] <= high["recall"] <= 1
    assert window["density"] < 1 and set(window["density_per_layer"]) == {0, 1}
    assert all(0 <= r["accuracy"] <= 1 and r["prefill_ms"] > 0 for r in rows)
    # Estimation cost comes from the timed prefills (recall off); dense has none.
    assert dense["estimate_ms_per_prefill"] == 0.0 and low["estimate_ms_per_prefill"] > 0
    assert not hasattr(model, "_sparse_attn_state") or model._sparse_attn_state is None or \
        model.config._attn_implementation == "sdpa"
    result = write_report(rows, {"model": "tiny"}, str(tmp_path / "eval"))
    assert "| 256 | oracle | top_p=0.5 |" in result["table"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["rows"]) == 4
    assert markdown_table(rows).count("\n") == 5
    oracle_line = result["table"].splitlines()[3]
    assert "passkey " in oracle_line and f"{low['prefill_ms'] / dense['prefill_ms']:.2f}x |" in oracle_line


def test_eval_cli_on_a_local_model(tokenizer, tmp_path):
    from click.testing import CliRunner

    from sparse_attn.cli import main

    model = _tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    result = CliRunner().invoke(main, ["eval", "--model", str(tmp_path / "m"), "--methods", "power",
                                       "--lengths", "200", "--tasks", "passkey", "--samples", "1",
                                       "--block-size", "32", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "| 200 | power |" in result.output and (tmp_path / "r.json").exists()


def test_a_profile_is_evaluated_as_a_row_of_its_own(tokenizer, tmp_path):
    """``profiles=``: a profile's per-layer choices run as one row (method "profile"), sparse at every
    length; through the CLI too, where a file that is no profile names --profiles."""
    from click.testing import CliRunner

    from sparse_attn.cli import main
    from sparse_attn.integrations.hf import profile_model, write_profile
    from sparse_attn.integrations.hf.profile import calibration_prompts

    model = _tiny_model(tokenizer)
    prompts = calibration_prompts(tokenizer, [256], 1)
    path = tmp_path / "profile.json"
    write_profile(profile_model(model, prompts=prompts, methods=["sliding_window"], target_recall=0.5,
                                block_size=32, min_kv_len=4096), path)  # min_kv_len: the row runs sparse anyway
    rows = evaluate(model, tokenizer, [], [256], tasks=["passkey"], samples=1, block_size=32, progress=False,
                    profiles=[str(path)])
    assert [r["method"] for r in rows] == ["dense", "profile"]
    assert rows[1]["knobs"] == {"profile": str(path)} and rows[1]["density"] < 1.0
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    base = ["eval", "--model", str(tmp_path / "m"), "--methods", "none", "--lengths", "256", "--tasks", "passkey",
            "--samples", "1", "--block-size", "32", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, base + ["--profiles", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"| 256 | profile | profile={path} |" in result.output
    (tmp_path / "no.json").write_text("{}")
    for bad in (tmp_path / "no.json", tmp_path / "missing.json"):
        result = CliRunner().invoke(main, base + ["--profiles", str(bad)])
        assert result.exit_code == 2 and "--profiles" in result.output, result.output


def test_missing_canary_weights_say_how_to_train_them(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sparse_attn.cli import main
    from sparse_attn.eval import canary

    monkeypatch.setattr(canary, "canary_dir", lambda: tmp_path / "no_canary")
    missing = CliRunner().invoke(main, ["eval", "--model", "canary"])
    assert missing.exit_code != 0 and "python -m tools.canary train" in missing.output


def test_shipped_canary_loads_and_retrieves_by_key():
    """The shipped weights are a byte-level Llama trained at 8K (then refined on key lookup twice) that
    answers 1K passkey prompts and picks the asked key's number among four in multikey prompts."""
    import transformers

    from sparse_attn.eval.canary import canary_dir, resolve_model

    path = resolve_model("canary")
    log = json.loads((canary_dir() / "training_log.json").read_text())
    assert log["seq_len"] == 8192 and log["refined_from"] == "canary"
    while "base" in log:  # refined (possibly more than once) from the trained canary
        log = log["base"]
    assert log["seq_len"] == 8192 and log["induction_step"] is not None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size
    for task in ("passkey", "multikey"):
        hits = 0
        for seed in range(3):
            sample = make_sample(task, tokenizer, 1024, seed=seed)
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            hits += score(sample, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        assert hits >= 2, f"the shipped canary answered {hits} of 3 {task} prompts at 1K"


def test_multikey_followups_ask_every_other_key(tokenizer):
    sample = make_sample("multikey", tokenizer, 1500, seed=2, keys=6)
    assert len(sample.followups) == 5
    asked = {sample.answer} | {answer for _, answer in sample.followups}
    assert len(asked) == 6 and all(value in sample.prompt for value in asked)
    assert make_sample("passkey", tokenizer, 500, seed=2).followups == []


@pytest.mark.parametrize("task,groups", [("multivalue", 3), ("vartrack", 2)])
def test_drill_samples_hide_several_lists_in_order_and_ask_each(tokenizer, task, groups):
    from sparse_attn.eval.tasks import make_sample

    sample = make_sample(task, tokenizer, 1500, seed=3, groups=groups)
    assert len(sample.followups) == groups - 1 and sample.prompt.endswith(sample.question)
    for question, answer in [(sample.question, sample.answer)] + sample.followups:
        items = answer.split(", ")
        assert len(items) == (3 if task == "multivalue" else 4)
        places = [sample.prompt.index(f" {item}. " if task == "multivalue" else f"VAR {item} ") for item in items]
        assert places == sorted(places)  # each list / chain keeps its order in the text
    single = make_sample(task, tokenizer, 1500, seed=3)
    assert single.followups == [] and single.prompt != sample.prompt


# --- Reports for a newcomer: progress, timing spread and backend, intervals, column definitions, plots.

def _synthetic_rows(device="cpu", backend="reference"):
    """Rows as the runner writes them, at two lengths, without running a model."""
    rows = []
    for length, dense_ms in ((512, 10.0), (1024, 30.0)):
        rows.append({"length": length, "method": "dense", "knobs": {}, "accuracy": 1.0, "samples": 4,
                     "per_task": {"passkey": 1.0}, "per_task_prompts": {"passkey": 4}, "density": 1.0,
                     "recall": 1.0, "estimate_ms_per_prefill": 0.0, "prefill_ms": dense_ms,
                     "prefill_ms_min": dense_ms - 1, "prefill_ms_max": dense_ms + 1,
                     "prefill_ms_repeats": [dense_ms - 1, dense_ms, dense_ms + 1], "timed_tokens": length,
                     "device": device, "backend": "dense (sdpa)", "forward_kernel": "sdpa", "block_size": 64})
        for method, knobs, density, ms in (("xattention", {"threshold": 0.9, "stride": 8}, 0.5, dense_ms * 1.05),
                                           ("xattention", {"threshold": 0.95, "stride": 8}, 0.6, dense_ms * 3),
                                           ("oracle", {"top_p": 0.9}, 0.5, dense_ms * 2)):
            rows.append({"length": length, "method": method, "knobs": knobs, "accuracy": 1.0, "samples": 4,
                         "per_task": {"passkey": 1.0}, "per_task_prompts": {"passkey": 4}, "density": density,
                         "recall": 0.95, "estimate_ms_per_prefill": 1.0, "prefill_ms": ms,
                         "prefill_ms_min": ms - 0.5, "prefill_ms_max": ms + 0.5,
                         "prefill_ms_repeats": [ms - 0.5, ms, ms + 0.5], "timed_tokens": length, "device": device,
                         "backend": backend, "forward_kernel": backend, "block_size": 64,
                         "backend_skipped": [] if device != "cpu" else ["triton: q is not on a CUDA device"]})
    return rows


@pytest.fixture(scope="module")
def small_run(tokenizer, tmp_path_factory):
    """One small CPU evaluation (tiny model, 1 prompt per task), its stderr and its report."""
    import contextlib
    import io

    model = _tiny_model(tokenizer)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rows = evaluate(model, tokenizer, ["oracle"], [400], tasks=["passkey", "multikey"], samples=1,
                        block_size=32, sweeps={"oracle": [{"top_p": 0.5}]}, timing_repeats=3)
    prefix = str(tmp_path_factory.mktemp("report") / "eval")
    result = write_report(rows, {"model": "tiny", "device": "cpu"}, prefix)
    return rows, err.getvalue(), result, prefix


def test_progress_goes_to_stderr_per_prompt_with_an_eta(small_run, tokenizer, capsys):
    _, err, _, _ = small_run
    assert "length 400 | dense | prompt 1/2" in err  # the first prompt logs at once
    assert "length 400 | oracle top_p=0.5 | accuracy" in err  # each configuration's end
    assert "ETA" in err and "elapsed" in err and "sparse-attn eval: done" in err
    evaluate(_tiny_model(tokenizer), tokenizer, [], [256], tasks=["passkey"], samples=1, block_size=32,
             progress=False)
    assert "sparse-attn eval" not in capsys.readouterr().err


def test_progress_bar_with_tqdm_and_plain_lines_without_it(monkeypatch):
    import io
    import sys

    from sparse_attn.eval.progress import Progress, format_seconds, step_cost

    pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = Progress(1000, stream=stream, use_tqdm=True)
    bar.update(500, "length 1024 | xattention threshold=0.9 | prompt 1/8")
    bar.close()
    assert " 50%|" in stream.getvalue() and "ETA" in stream.getvalue()
    assert "xattention threshold=0.9" in stream.getvalue()
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm missing: log lines instead
    stream = io.StringIO()
    ticks = iter([0.0, 10.0, 10.0, 30.0])
    bar = Progress(1000, stream=stream, use_tqdm=True, clock=lambda: next(ticks), intro="4 prompts")
    bar.update(250, "length 1024 | dense | prompt 1/8")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "sparse-attn eval: 4 prompts"
    assert lines[1] == "sparse-attn eval [ 25%] length 1024 | dense | prompt 1/8 | 10s elapsed, ETA 30s"
    assert lines[2] == "sparse-attn eval: done in 30s"
    assert format_seconds(75) == "1m15s" and format_seconds(4000) == "1h06m"
    assert step_cost(2048) / step_cost(1024) == pytest.approx(2.67, abs=0.01)  # longer prompts cost more per token


def test_rows_carry_timing_spread_backend_device_and_interval(small_run):
    rows, _, _, prefix = small_run
    for row in rows:
        assert len(row["prefill_ms_repeats"]) == 3
        assert row["prefill_ms_min"] <= row["prefill_ms"] <= row["prefill_ms_max"]
        assert row["prefill_ms"] == sorted(row["prefill_ms_repeats"])[1]
        assert row["device"] == "cpu" and row["samples"] == 2 and row["per_task_prompts"] == {"passkey": 1, "multikey": 1}
        lo, hi = row["accuracy_ci95"]
        assert 0 <= lo <= row["accuracy"] <= hi <= 1 and hi - lo > 0.3  # 2 prompts: a wide interval
    dense, oracle = rows
    assert dense["backend"].startswith("dense") and oracle["backend"] == "reference"
    assert any(s.startswith("triton:") for s in oracle["backend_skipped"])
    saved = json.loads(Path(prefix + ".json").read_text())
    assert saved["run"]["device"] == "cpu" and saved["run"]["sparse_backend"] == {"oracle": ["reference"]}
    assert "reference-backend timings" in saved["about"]["timings"]


def test_markdown_report_reads_without_knowing_the_project(small_run):
    from sparse_attn.eval.report import COLUMNS

    rows, _, result, prefix = small_run
    md = Path(prefix + ".md").read_text()
    assert md == result["markdown"]
    first = md.splitlines()[0]
    assert first.startswith("# ") and "{" not in first and not md.lstrip().startswith("{")
    intro = md.split("\n\n")[1]
    for fact in ("`tiny`", "400 tokens", "passkey and multikey", "1 prompt per task", "`oracle` (top_p=0.5)",
                 "cpu", "`reference` backend"):
        assert fact in intro, fact
    header = md.split("## Results")[1].strip().splitlines()[0]
    for name, _ in COLUMNS:  # every column in the table, and defined below it
        assert f"| {name} |" in header or header.startswith(f"| {name} |")
        assert f"* **{name}**: " in md.split("## Columns")[1]
    assert "string_match_all" in md and "Wilson" in md and "softmax" in md and "causally reachable" in md
    # On CPU: said plainly, with where to find GPU tables.
    assert "do not show the GPU speedups" in md and "docs/benchmarks.md" in md
    lo, hi = rows[1]["accuracy_ci95"]
    line = result["table"].splitlines()[3]
    assert f"[{lo:.2f}, {hi:.2f}] | 2 |" in line and "passkey " in line and "(1)" in line
    assert f"{rows[1]['prefill_ms']:.1f} ({rows[1]['prefill_ms_min']:.1f}-{rows[1]['prefill_ms_max']:.1f})" in line
    if importlib.util.find_spec("matplotlib") is not None:  # plots (and their links) need matplotlib
        assert "![eval_accuracy_vs_density](eval_accuracy_vs_density.png)" in md
    assert "* model: tiny" in md and "{'model'" not in md


def test_gpu_report_and_timing_noise_marker():
    from sparse_attn.eval.report import markdown_report, markdown_table

    rows = _synthetic_rows(device="cuda:0", backend="triton")
    md = markdown_report(rows, {"model": "m", "device": "NVIDIA H100"})
    assert md.startswith("# Sparse attention evaluation: `m` on NVIDIA H100 (cuda:0)")
    assert "`triton` backend" in md and "do not show the GPU speedups" not in md and "docs/benchmarks.md" in md
    assert "differ by more than" not in md  # no noisy row
    table = markdown_table(rows).splitlines()
    assert table[3].endswith("| ~1.05x |")  # ranges overlap dense's: within noise
    assert table[4].endswith("| 3.00x |") and table[2].endswith("| 1.00x |")
    rows[0]["prefill_ms_max"] = 20.0  # dense at 512: 9-20 ms around a 10 ms median
    assert "In 1 of 8 rows the repeats differ by more than 25% of their median" in markdown_report(rows, {})
    # Rows from before the spread, interval and backend were recorded still render.
    old = [{k: v for k, v in r.items() if not k.startswith(("prefill_ms_", "accuracy_ci", "backend", "device"))}
           for r in rows]
    assert "| 512 | xattention | threshold=0.9, stride=8 | 1.00 [0.51, 1.00] | 4 |" in markdown_table(old)


def test_wilson_interval():
    from sparse_attn.eval.stats import wilson_interval

    assert wilson_interval(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(1.0, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    assert wilson_interval(0.0, 4)[0] == 0.0 and wilson_interval(0.3, 0) == (0.0, 1.0)


def test_paired_difference_and_the_vs_dense_column():
    """The paired difference: mean of per-prompt differences with a normal 95% interval; the table's
    ``vs dense`` cell gives it in points for rows scored on dense's prompts, ``-`` elsewhere."""
    from sparse_attn.eval.report import markdown_table
    from sparse_attn.eval.stats import paired_difference

    assert paired_difference([1, 1, 0, 1], [1, 1, 1, 1]) == pytest.approx((-0.25, -0.74, 0.24), abs=0.01)
    assert paired_difference([0, 0, 1], [1, 1, 1])[1] == -1.0  # clipped: differences lie in [-1, 1]
    assert paired_difference([1, 0.5], [1, 0.5]) == (0.0, 0.0, 0.0)  # every prompt agrees
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 0], [1])
    rows = _synthetic_rows()
    rows[0]["scores"] = {"passkey": [1.0, 1.0, 1.0, 1.0]}
    rows[1]["scores"] = {"passkey": [1.0, 0.0, 1.0, 1.0]}
    rows[2]["scores"] = {"passkey": [1.0, 1.0]}  # other prompts: not compared
    table = markdown_table(rows).splitlines()
    assert "| 4 | - | passkey" in table[2]  # dense itself
    assert "| 4 | -25.0 [-74.0, +24.0] | passkey" in table[3]
    assert "| 4 | - | passkey" in table[4] and "| 4 | - | passkey" in table[5]


def test_each_method_keeps_one_colour_and_marker_in_every_plot_and_length():
    mpl = pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgb

    from sparse_attn.eval.report import _figure, method_color, method_marker, method_style
    from sparse_attn.eval.runner import SWEEPS

    known = ["dense", *SWEEPS]
    assert len({method_color(m) for m in known}) == len(known)  # distinct
    assert len({method_marker(m) for m in known}) == len(known)
    assert method_style(["oracle", "xattention"])["xattention"] == method_style(["xattention"])["xattention"]
    assert method_color("my_method") == method_color("my_method")  # unknown names: stable too
    rows = _synthetic_rows()
    for metric in ("accuracy", "prefill_ms"):
        fig = _figure(rows, metric)
        axes = fig.axes
        assert len(axes) == 2  # one panel per length
        for ax in axes:
            seen = set()
            for artist in ax.collections + ax.lines:
                method = artist.get_gid()
                if method is None:
                    continue
                seen.add(method)
                colors = (artist.get_facecolor() if hasattr(artist, "get_offsets") else [artist.get_color()])
                assert all(to_rgb(c) == to_rgb(method_color(method)) for c in colors), (metric, method)
                if hasattr(artist, "get_offsets"):  # the markers: per-method shape, see-through
                    assert artist.get_alpha() < 1
            assert seen == {"dense", "xattention", "oracle"}
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == ["dense (reference)", "xattention", "oracle"]
        assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
        mpl.pyplot.close(fig)
