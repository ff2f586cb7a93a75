"""Evaluation harness pieces on CPU: tasks, scoring, the runner on a tiny model, the shipped canary
(its training tool is tested in tests/tools/test_canary_training.py)."""

import json

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
