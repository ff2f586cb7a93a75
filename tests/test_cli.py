"""The command line: bad options end in one line naming the option (exit code 2), --debug shows the
traceback, --version, and generate on the shipped canary."""

import pytest
from click.testing import CliRunner

from sparse_attn import __version__
from sparse_attn.cli import main

pytest.importorskip("transformers")


def run(*args):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args,option", [
    (["eval", "--model", "/nonexistent"], "--model"),
    (["eval", "--samples", "0"], "--samples"),
    (["eval", "--device", "cuda:99"], "--device"),
    (["eval", "--device", "tpu"], "--device"),
    (["eval", "--lengths", "abc"], "--lengths"),
    (["eval", "--lengths", "0,1024"], "--lengths"),
    (["eval", "--methods", "nope"], "--methods"),
    (["eval", "--tasks", "sudoku"], "--tasks"),
    (["eval", "--block-size", "0"], "--block-size"),
    (["eval", "--lengths", "100000"], "--lengths"),  # over the canary's 8,256 positions
    (["eval", "--methods", "seer", "--sweep", "seer:threshold"], "--sweep"),
    (["eval", "--methods", "seer", "--sweep", "xattention:threshold=0.9"], "--sweep"),  # not among --methods
    (["eval", "--methods", "seer", "--sweep", "seer:thresh=0.1"], "--sweep"),
    (["eval", "--methods", "seer", "--sweep", "seer:threshold=-1"], "--sweep"),
    (["generate", "--model", "canary", "--prompt-file", "EMPTY"], "--prompt-file"),
    (["generate", "--model", "canary", "--prompt-file", "PROMPT", "--min-kv-len", "-1"], "--min-kv-len"),
    (["generate", "--model", "canary", "--prompt-file", "PROMPT", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "canary", "--prompt-file", "PROMPT", "--max-new-tokens", "9000"], "--prompt-file"),
    (["demo", "--kv-heads", "3"], "--kv-heads"),
])
def test_bad_options_end_in_one_line_naming_the_option(args, option, tmp_path):
    empty, prompt = tmp_path / "empty.txt", tmp_path / "prompt.txt"
    empty.write_text("  \n")
    prompt.write_text("The pass key is 123. What is the pass key? The pass key is")
    args = [str(empty) if a == "EMPTY" else str(prompt) if a == "PROMPT" else a for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and option in lines[0], result.output
    assert "Traceback" not in result.output


def test_errors_inside_a_command_are_one_line_unless_debug(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The pass key is 123. What is the pass key? The pass key is")
    args = ["generate", "--model", "canary", "--prompt-file", str(prompt), "--knob", "bogus=1"]
    result = run(*args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "bogus" in lines[0] and "--debug" in lines[0]
    result = run("--debug", *args)
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


def test_sweep_replaces_one_knob_of_a_method_keeping_its_other_knobs():
    from sparse_attn.cli import _sweeps
    from sparse_attn.eval.runner import SWEEPS

    sweeps = _sweeps(["seer:threshold=0.005,0.002"], ["seer", "xattention"], SWEEPS, 64)
    assert sweeps["seer"] == [{"gates": "canary", "threshold": 0.005}, {"gates": "canary", "threshold": 0.002}]
    assert sweeps["xattention"] == SWEEPS["xattention"]


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_generate_runs_on_the_shipped_canary(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The pass key is 123. Remember it. What is the pass key? The pass key is")
    result = run("generate", "--model", "canary", "--prompt-file", str(prompt), "--max-new-tokens", "4",
                 "--min-kv-len", "16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "prompt tokens:" in result.output and "output:" in result.output
