"""The canary training tool (``python -m tools.canary``) on CPU: episodes, the curriculum, refine, the
recipe, the command line and its guards against writing over a model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from sparse_attn.integrations.hf.tokenizer import byte_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)
# A short CPU run of the command line: 512 tokens, no evaluation at 2K+.
FAST = ["--seq-len", "512", "--batch-size", "1", "--eval-samples", "1", "--probe-every", "0", "--device", "cpu"]
TINY_SHAPE = [arg for name, value in TINY.items() for arg in ("--shape", f"{name}={value}")]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _invoke(*args):
    from click.testing import CliRunner

    from tools.canary.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_canary_training_smoke(tmp_path):
    from tools.canary.training import train

    log = train(str(tmp_path / "canary"), seq_len=512, batch_size=2, max_steps=12, lr=3e-3, device="cpu",
                eval_lengths=(512,), eval_samples=2, repeat_share=0.3, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert log["steps"] == 12 and log["final_text_loss"] < log["first_text_loss"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "canary")
    assert saved.config.num_key_value_heads == 1
    assert (tmp_path / "canary" / "training_log.json").exists()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "canary")
    assert tok.decode(tok("abc").input_ids) == "abc"


def test_training_episodes_supervise_every_answer(tokenizer):
    """Retrieval episodes mark exactly the answers (first question, follow-ups, drills, the echoed
    first question) for the retrieval loss; the rest is text; nothing exceeds the training length."""
    import random

    from tools.canary.training import ANSWER, TEXT, _episode
    from sparse_attn.eval.corpus import haystack_text

    rng, text, seen = random.Random(0), haystack_text(), set()
    for _ in range(24):
        ids, roles = _episode(tokenizer, 2048, rng, text, task_share=1.0)
        assert len(ids) == len(roles) <= 2048 and set(roles) <= {TEXT, ANSWER}
        answers = tokenizer.decode([i for i, r in zip(ids, roles) if r == ANSWER])
        full = tokenizer.decode(ids)
        spans = [a.strip(" .") for a in answers.split(". ") if a.strip(" .")]
        assert spans and all(span in full for span in spans)
        seen.add(min(len(spans), 5))
    assert 2 in seen and max(seen) >= 4  # one question + its echo, and multi-question episodes
    plain, plain_roles = _episode(tokenizer, 512, random.Random(1), text, task_share=0.0)
    assert set(plain_roles) == {TEXT} and len(plain) == 512


def test_canary_training_probes_retrieval_while_training(tmp_path):
    from tools.canary.training import train

    seen = []
    log = train(str(tmp_path / "canary"), seq_len=512, batch_size=1, max_steps=2, device="cpu", eval_lengths=(),
                probe_every_s=1e-9, on_probe=lambda step, seconds, acc: seen.append((step, acc)),
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    assert [p["step"] for p in log["probes"]] == [1, 2] == [step for step, _ in seen]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in log["probes"])


def test_episodes_fit_every_supported_length_and_short_lengths_are_refused(tokenizer, tmp_path):
    import random

    from tools.canary.training import _episode, train
    from sparse_attn.eval.corpus import haystack_text

    rng, text = random.Random(0), haystack_text()
    for length in (512, 1024):
        for _ in range(40):  # every task kind, drills from 1024 on
            ids, roles = _episode(tokenizer, length, rng, text, task_share=1.0)
            assert len(ids) == len(roles) <= length
    with pytest.raises(ValueError, match="seq_len must be at least 512"):
        train(str(tmp_path / "x"), seq_len=256, max_steps=1, device="cpu")


def test_copy_episodes_mark_only_repeats_of_earlier_codes(tokenizer):
    import random

    from tools.canary.training import COPY, _copy_episode, _episode
    from sparse_attn.eval.corpus import haystack_text

    text = haystack_text()
    ids, roles = _copy_episode(tokenizer, 1024, random.Random(4), text)
    assert len(ids) == len(roles) <= 1024 and roles.count(COPY) > 0
    runs, start = [], None  # contiguous COPY spans
    for i, role in enumerate(roles + [None]):
        if role == COPY and start is None:
            start = i
        elif role != COPY and start is not None:
            runs.append((start, i))
            start = None
    def occurs_in(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    for a, b in runs:  # each span, with the byte before it, repeats a code seen earlier
        assert b - a >= 7 and occurs_in(ids[:a - 1], ids[a - 1:b])
    rng = random.Random(4)
    copy_ids, _ = _episode(tokenizer, 1024, rng, text, task_share=0.0, copy_share=1.0)  # one draw picks the kind
    rng = random.Random(4)
    rng.random()
    assert copy_ids == _copy_episode(tokenizer, 1024, rng, text)[0]


def test_repeat_episodes_are_a_code_followed_by_itself_at_a_varying_distance(tokenizer):
    import random

    from tools.canary.training import COPY, PAD, _episode

    distances = set()
    rng = random.Random(0)
    for _ in range(5):
        ids, roles = _episode(tokenizer, 256, rng, "", task_share=1.0, repeat=True)
        assert len(ids) == len(roles) == 256 and set(roles) == {PAD, COPY}
        first = roles.index(COPY)  # the copy's second byte
        length = roles.count(COPY) + 1
        assert roles[first:first + length - 1] == [COPY] * (length - 1)
        start = first - 1 - length  # where the original code begins
        assert ids[start:start + length] == ids[start + length:start + 2 * length]
        distances.add(length)
    assert len(distances) > 1  # the copy distance (= code length) varies: no positional shortcut


def test_induction_warmup_doubles_the_length_up_to_the_training_length():
    from tools.canary.training import INDUCTION_LEN, induction_lengths

    assert induction_lengths(8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert induction_lengths(3000) == [128, 256, 512, 1024, 2048, 3000]
    assert induction_lengths(INDUCTION_LEN) == [INDUCTION_LEN]


def test_lookup_episodes_ask_keys_whose_answers_follow_them(tokenizer):
    """The lookup warm-up's episodes: key -> number lines, text, then questions whose answer digits
    (the only targets) are the number on that key's line; lengths double from 512."""
    import random
    import re

    from tools.canary.training import ANSWER, LOOKUP_MAX_KEYS, _episode, lookup_lengths
    from sparse_attn.eval.corpus import haystack_text

    assert lookup_lengths(8192) == [512, 1024, 2048, 4096, 8192] and lookup_lengths(256) == []
    rng = random.Random(3)
    for length in (512, 8192):
        ids, roles = _episode(tokenizer, length, rng, haystack_text(), task_share=1.0, lookup=True)
        assert len(ids) == len(roles) == length
        full = tokenizer.decode(ids)
        lines = re.findall(r"The number for (\w+) is: (\d+)\.", full)
        table = dict(lines[:len(set(k for k, _ in lines))])
        questions = lines[len(table):]
        assert 4 <= len(table) <= LOOKUP_MAX_KEYS and len(questions) >= 4
        assert all(table[key] == value for key, value in questions)
        digits = tokenizer.decode([i for i, r in zip(ids, roles) if r == ANSWER])
        assert digits == "".join(value for _, value in questions)


def test_warmup_stages_run_in_order_and_are_logged(tmp_path, monkeypatch):
    """With thresholds every stage meets, each stage lasts its 20-step window: induction at 128,
    256, 512, 1024, then lookup at 512 and 1024, then the mix."""
    from tools.canary import training as canary

    monkeypatch.setattr(canary, "INDUCTION_COPY_LOSS", 100.0)
    monkeypatch.setattr(canary, "LOOKUP_ANSWER_LOSS", 100.0)
    log = canary.train(str(tmp_path / "c"), seq_len=1024, batch_size=1, max_steps=124, device="cpu",
                       eval_lengths=(), warmup_share=1.0, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert log["induction_steps"] == {128: 20, 256: 40, 512: 60, 1024: 80}
    assert log["induction_step"] == 80 and log["lookup_steps"] == {512: 100, 1024: 120}


def test_hard_lookup_keys_differ_from_an_earlier_key_in_one_syllable(tokenizer):
    import random
    import re

    from tools.canary.training import _lookup_episode
    from sparse_attn.eval.corpus import haystack_text
    from sparse_attn.eval.tasks import _SYLLABLES

    syllable = "|".join(sorted(_SYLLABLES, key=len, reverse=True))
    ids, _ = _lookup_episode(tokenizer, 2048, random.Random(5), haystack_text(), hard_key_share=1.0)
    keys = list(dict.fromkeys(re.findall(r"The number for (\w+) is: \d+\.", tokenizer.decode(ids))))
    assert len(keys) >= 8
    parts = [re.findall(syllable, key) for key in keys]
    assert all(len(p) == 3 for p in parts)
    for i in range(1, len(parts)):
        assert any(sum(a != b for a, b in zip(parts[i], parts[j])) == 1 for j in range(i)), keys[i]


def test_episode_mix_draws_only_the_named_tasks_and_lookup_share(tokenizer):
    import random

    from tools.canary.training import _episode
    from sparse_attn.eval.corpus import haystack_text

    rng, text = random.Random(2), haystack_text()
    for _ in range(4):
        ids, _ = _episode(tokenizer, 1024, rng, text, task_share=1.0, tasks=("vartrack",))
        assert "VAR " in tokenizer.decode(ids) and "special magic" not in tokenizer.decode(ids)
        ids, _ = _episode(tokenizer, 1024, rng, text, task_share=1.0, lookup_share=1.0)
        assert "The number for " in tokenizer.decode(ids)


def test_refine_runs_lookup_stages_then_the_mix_and_logs_accuracy(tmp_path, monkeypatch):
    """With a threshold every stage meets, lookup at 512 then 1024 (20 steps each), then the mix;
    per-task accuracy is measured before and after and the model is saved."""
    from tools.canary import training as canary

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    canary.train(str(tmp_path / "base"), seq_len=1024, batch_size=1, max_steps=2, device="cpu", eval_lengths=(),
                 **shape)
    monkeypatch.setattr(canary, "REFINE_FIRST_DIGIT_LOSS", 100.0)
    log = canary.refine(str(tmp_path / "base"), str(tmp_path / "refined"), batch_size=1, max_steps=44,
                        lookup_phase_share=1.0, device="cpu", eval_lengths=(512,), eval_samples_per_task=1)
    assert [(s["length"], s["step"], s["passed"]) for s in log["lookup_stages"]] == [(512, 20, True), (1024, 40, True)]
    assert log["steps"] == 44 and log["seq_len"] == 1024 and log["base"]["steps"] == 2
    for measured in (log["before"], log["after"]):
        assert set(measured["tasks"][512]) == {"passkey", "multikey", "multivalue", "vartrack", "mean"}
        assert 0.0 <= measured["lookup_1024"]["hard"] <= 1.0
    assert (tmp_path / "refined" / "model.safetensors").exists()


def test_list_and_chain_drill_episodes_supervise_every_answer(tokenizer):
    import random

    from tools.canary.training import ANSWER, _episode
    from sparse_attn.eval.corpus import haystack_text

    rng = random.Random(7)
    for task in ("multivalue_drill", "vartrack_drill"):
        for length in (1024, 8192):
            ids, roles = _episode(tokenizer, length, rng, haystack_text(), task_share=1.0, tasks=(task,))
            assert len(ids) <= length
            answers = tokenizer.decode([i for i, r in zip(ids, roles) if r == ANSWER])
            assert answers.count(".") >= 3  # >= 2 groups asked, plus the echo of the first


def test_multi_value_lookup_keys_are_asked_for_every_value_in_order(tokenizer):
    import random
    import re

    from tools.canary.training import ANSWER, _lookup_episode
    from sparse_attn.eval.corpus import haystack_text

    ids, roles = _lookup_episode(tokenizer, 4096, random.Random(8), haystack_text(), multi_value_share=0.5)
    full = tokenizer.decode(ids)
    table = re.match(r"(?: The number for \w+ is: \d+\.)+", full)
    values = {}
    for key, value in re.findall(r"The number for (\w+) is: (\d+)\.", table.group(0)):
        values.setdefault(key, []).append(value)
    assert any(len(v) > 1 for v in values.values()) and any(len(v) == 1 for v in values.values())
    asked = re.findall(r"The numbers? for (\w+) (?:is|are): ([\d, ]+)\.", full[table.end():])
    assert len(asked) >= 8
    for key, answer in asked:
        assert answer.split(", ") == values[key]  # every value, in order of appearance
    digits = tokenizer.decode([i for i, r in zip(ids, roles) if r == ANSWER])
    assert digits == "".join(answer for _, answer in asked)


def test_train_recipe_chains_the_base_and_both_refines_with_their_settings(tmp_path):
    """The shipped recipe: the base, then one refine per RECIPE_REFINES entry, steps split by share."""
    from tools.canary import training as canary

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    log = canary.train_recipe(str(tmp_path / "c"), max_steps=9, device="cpu", eval_lengths=(), seq_len=1024,
                              batch_size=1, **shape)
    chain = [log, log["base"], log["base"]["base"]]
    assert [entry["steps"] for entry in chain] == [2, 2, 5]
    assert [(entry["seed"], entry["multi_value_share"]) for entry in chain[:2]][::-1] == \
        [(r["seed"], r["multi_value_share"]) for r in canary.RECIPE_REFINES]
    assert "refined_from" not in chain[2] and chain[2]["seq_len"] == 1024
    assert (tmp_path / "c" / "model.safetensors").exists() and (tmp_path / "c" / "training_log.json").exists()


def test_train_canary_cli_without_refine_trains_the_base_only(tmp_path):
    from click.testing import CliRunner

    from tools.canary.cli import main

    result = CliRunner().invoke(main, ["train", "--no-refine", "--out", str(tmp_path / "b"), "--seq-len", "512",
                                       "--max-steps", "2", "--batch-size", "1", "--eval-samples", "1",
                                       "--probe-every", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log["steps"] == 2 and "refined_from" not in log



@pytest.mark.parametrize("command", ["train", "refine"])
def test_the_tool_refuses_to_run_without_out(command):
    result = _invoke(command, "--max-steps", "1")
    assert result.exit_code == 2 and "Missing option '--out'" in result.output


def test_the_tool_runs_as_a_module_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "tools.canary", "train", "--max-steps", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Missing option '--out'" in result.stderr
    assert "python -m tools.canary train" in result.stderr  # the usage line names the tool


@pytest.mark.parametrize("marker", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("command", ["train", "refine"])
def test_an_existing_model_is_refused_without_force(tmp_path, command, marker):
    out = tmp_path / "m"
    out.mkdir()
    (out / marker).write_text("{}")
    result = _invoke(command, "--out", out, "--max-steps", "1", "--device", "cpu")
    assert result.exit_code == 1
    error = result.output.strip()
    assert error.count("\n") == 0 and error.startswith(f"Error: --out {out} already holds a model")
    assert marker in error and "--force" in error
    assert sorted(p.name for p in out.iterdir()) == [marker] and (out / marker).read_text() == "{}"


def test_an_empty_or_unrelated_directory_is_written_without_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    result = _invoke("train", "--no-refine", "--out", out, "--max-steps", "1", *FAST)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists() and (out / "notes.txt").read_text() == "kept"


def test_force_overwrites_an_existing_model_with_a_loadable_one(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = _invoke("train", "--no-refine", "--out", out, "--force", "--max-steps", "2", *FAST)
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and json.loads((out / "training_log.json").read_text())["steps"] == 2


@pytest.mark.parametrize("command", ["train", "refine"])
def test_the_shipped_canary_is_never_written_even_with_force(command):
    from sparse_attn.eval.canary import canary_dir

    shipped = canary_dir()
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    for out in (shipped, ROOT / "src" / "sparse_attn" / "eval" / "canary"):
        result = _invoke(command, "--out", out, "--force", "--max-steps", "1", "--device", "cpu")
        assert result.exit_code == 1 and "is the shipped canary model" in result.output
        assert result.output.strip().count("\n") == 0
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before


def test_training_functions_refuse_an_existing_model_unless_forced(tmp_path):
    from tools.canary import training

    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_text("")
    for run in (lambda force: training.train(str(out), seq_len=512, max_steps=1, device="cpu", eval_lengths=(),
                                             force=force, **TINY),
                lambda force: training.train_recipe(str(out), max_steps=3, seq_len=512, device="cpu",
                                                    eval_lengths=(), force=force, **TINY),
                lambda force: training.refine("canary", str(out), max_steps=1, device="cpu", force=force)):
        with pytest.raises(FileExistsError, match="already holds a model"):
            run(False)
    training.train(str(out), seq_len=512, batch_size=1, max_steps=1, device="cpu", eval_lengths=(), force=True,
                   **TINY)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


def test_a_short_timed_recipe_run_logs_progress_and_saves_a_loadable_model(tmp_path):
    """``--minutes 0.02``: the base and both refines, log lines with elapsed, total and ETA in minutes,
    no NaN losses (``-`` until a batch had such tokens), the last refine's log on stdout."""
    result = _invoke("train", "--out", tmp_path / "c", "--minutes", "0.02", "--log-every", "0", *FAST, *TINY_SHAPE)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("[elapsed")]
    assert any(" base step 1" in line for line in lines)
    assert any(" refine 1/2 step 1 " in line for line in lines) and any(" refine 2/2 step" in line for line in lines)
    assert all("min, ETA " in line and " / " in line for line in lines)
    assert "nan" not in result.stderr.lower()
    log = json.loads(result.stdout)
    assert log["base"]["base"]["seq_len"] == 512 and "refined_from" in log
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "c")
    assert model.config.hidden_size == 32 and tok.decode(tok("abc").input_ids) == "abc"


def test_shape_overrides_are_checked():
    result = _invoke("train", "--out", "unused", "--shape", "width=3", "--max-steps", "1")
    assert result.exit_code == 2 and "--shape" in result.output and "hidden_size" in result.output


def test_refine_command_continues_a_model_given_by_model_or_init(tmp_path):
    from tools.canary import training

    training.train(str(tmp_path / "base"), seq_len=512, batch_size=1, max_steps=1, device="cpu", eval_lengths=(),
                   **TINY)
    for flag, out in (("--model", "r1"), ("--init", "r2")):
        result = _invoke("refine", flag, tmp_path / "base", "--out", tmp_path / out, "--max-steps", "2",
                         "--no-eval-before", "--eval-samples", "1", "--log-every", "0", "--device", "cpu")
        assert result.exit_code == 0, result.output
        log = json.loads(result.stdout)
        assert log["steps"] == 2 and log["refined_from"] == str(tmp_path / "base")
        assert "nan" not in result.stderr.lower() and "ETA" in result.stderr
        assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out).config.hidden_size == 32


def test_progress_lines_show_minutes_and_dashes_for_losses_not_seen_yet():
    from tools.canary.cli import Progress

    lines = []
    timed = Progress(["base", "refine 1/1"], [(None, 2.0), (None, 1.0)], every=1e9, echo=lines.append)
    timed.step(1, {"text": 2.5, "answer": math.nan, "copy": math.nan})
    timed.step(2, {"text": 1.5, "answer": 0.5, "copy": math.nan})  # within `every`: no line
    timed.step(1, {"text": 1.0, "answer": math.nan})  # a new phase logs its first step
    assert len(lines) == 2
    assert lines[0].startswith("[elapsed 0.0 / 3.0 min, ETA 3.0 min] base step 1: text 2.500 answer - copy -")
    assert lines[1].startswith("[elapsed 0.0 / 1.0 min, ETA 1.0 min] refine 1/1 step 1: text 1.000 answer -")
    counted = Progress(["base"], [(10, 1.0)], every=0, echo=lines.append)
    assert counted.clock() == "[elapsed 0.0 min, ETA -]"
    counted.step(1, {"text": math.nan})
    assert " ETA " in lines[-1] and "/ ~" in lines[-1] and lines[-1].endswith("base step 1: text -")


def test_the_library_cli_no_longer_trains_the_canary():
    from click.testing import CliRunner

    from sparse_attn.cli import main

    assert "train-canary" not in main.commands and "refine-canary" not in main.commands
    for command in ("train-canary", "refine-canary"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 2 and "No such command" in result.output


def test_the_installed_package_keeps_only_the_canary_loader():
    import sparse_attn.eval.canary as runtime

    assert not hasattr(runtime, "train") and not hasattr(runtime, "refine")
    assert runtime.canary_config(1024, 259).max_position_embeddings == 1088


def test_share_options_are_checked_to_lie_in_0_1():
    from click.testing import CliRunner

    from tools.canary.cli import main

    result = CliRunner().invoke(main, ["train", "--out", "unused", "--task-share", "2"])
    assert result.exit_code == 2 and "--task-share" in result.output


@pytest.mark.parametrize("attention", ["moba", "nsa"])
def test_training_with_moba_or_nsa_saves_a_model_that_loads_with_its_attention(tmp_path, attention):
    """A short CPU run from scratch with each attention, then continued training of that model: the
    saved models load (NSA with its NSA layers and parameters, MoBA as a plain Llama) and the log
    names the attention."""
    from sparse_attn.nsa import NSALlamaAttention, is_nsa_model, load_nsa_model
    from tools.canary.training import refine, train

    out = tmp_path / attention
    log = train(str(out), seq_len=512, batch_size=1, max_steps=3, device="cpu", eval_lengths=(512,),
                eval_samples=1, attention=attention, **TINY)
    assert log["attention"] == attention and log["steps"] == 3
    assert is_nsa_model(out) == (attention == "nsa")
    if attention == "nsa":
        model = load_nsa_model(out)
        assert all(isinstance(layer.self_attn, NSALlamaAttention) for layer in model.model.layers)
        _eval_own_attention_model(out, tmp_path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.config._attn_implementation != "sparse_attn"
    if attention == "nsa":
        with pytest.raises(ValueError, match="attends with NSA layers: continue it with attention='nsa'"):
            refine(str(out), str(tmp_path / "as_dense"), max_steps=1, device="cpu")
    refined = refine(str(out), str(tmp_path / "refined"), max_steps=2, batch_size=1, device="cpu",
                     eval_lengths=(512,), eval_samples_per_task=1, eval_before=False, attention=attention)
    assert refined["attention"] == attention
    assert is_nsa_model(tmp_path / "refined") == (attention == "nsa")


def _eval_own_attention_model(path, tmp_path, kind="NSA"):
    """sparse-attn eval runs a model's own NSA or DSA attention (--methods none) and refuses methods."""
    from click.testing import CliRunner

    from sparse_attn.cli import main

    common = ["eval", "--model", str(path), "--lengths", "512", "--tasks", "passkey", "--samples", "1",
              "--device", "cpu", "--out", str(tmp_path / f"eval_{kind}")]
    result = CliRunner().invoke(main, [*common, "--methods", "none"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / f"eval_{kind}.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense"]
    result = CliRunner().invoke(main, [*common, "--methods", "xattention"])
    assert result.exit_code != 0 and f"attends with its own {kind} layers" in result.output


def test_an_unknown_attention_is_refused(tmp_path):
    from tools.canary.training import train

    with pytest.raises(ValueError, match=r"attention must be one of \('dense', 'moba', 'nsa'\)"):
        train(str(tmp_path / "x"), seq_len=512, max_steps=1, device="cpu", attention="flash")
    result = _invoke("train", "--out", tmp_path / "y", "--attention", "flash", *FAST)
    assert result.exit_code != 0 and "flash" in result.output


def test_dsa_on_a_dense_canary_warms_up_the_indexers_then_trains_sparse(tmp_path):
    """A tiny dense base, then the DSA recipe (2 warm-up steps, 2 sparse steps, 64 keys per token at
    512 tokens): the warm-up trains only the indexers, the saved model loads with its DSA layers in the
    sparse stage, sparse-attn eval runs it, and the command line runs the same."""
    import torch
    from click.testing import CliRunner

    from sparse_attn.dsa import DSALlamaAttention, load_dsa_model
    from tools.canary.cli import main as tool
    from tools.canary.training import train, train_dsa

    train(str(tmp_path / "base"), seq_len=512, batch_size=1, max_steps=2, device="cpu", eval_lengths=(),
          eval_samples=1, **TINY)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    log = train_dsa(str(tmp_path / "base"), str(tmp_path / "dsa"), warmup_steps=2, max_steps=2, top_k=64,
                    batch_size=1, device="cpu", eval_lengths=(512,), eval_samples_per_task=1)
    assert log["attention"] == "dsa" and log["warmup_steps"] == 2 and log["steps"] == 2
    assert log["warmup_indexer_loss"]["first"] > 0 and log["sparse_indexer_loss"] > 0
    assert set(log["after"]["tasks"]) and set(log["before"]["tasks"])
    model = load_dsa_model(tmp_path / "dsa")
    layers = [layer.self_attn for layer in model.model.layers]
    assert all(isinstance(layer, DSALlamaAttention) and layer.stage == "sparse" for layer in layers)
    assert layers[0].dsa_config.top_k == 64
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)  # sparse stage trained
    _eval_own_attention_model(tmp_path / "dsa", tmp_path, "DSA")
    result = CliRunner().invoke(tool, ["dsa", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "cli"),
                                       "--warmup-steps", "1", "--max-steps", "1", "--top-k", "64", "--batch-size", "1",
                                       "--eval-samples", "1", "--no-eval-before", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "training_log.json").read_text())["steps"] == 1
