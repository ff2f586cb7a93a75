"""Evaluation harness pieces on CPU: tasks, scoring, the runner on a tiny model, canary training."""

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


def test_canary_training_smoke(tmp_path):
    from sparse_attn.eval.canary import train

    log = train(str(tmp_path / "canary"), seq_len=512, batch_size=2, max_steps=12, lr=3e-3, device="cpu",
                eval_lengths=(512,), eval_samples=2, repeat_share=0.3, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    assert log["steps"] == 12 and log["final_text_loss"] < log["first_text_loss"]
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "canary")
    assert saved.config.num_key_value_heads == 1
    assert (tmp_path / "canary" / "training_log.json").exists()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "canary")
    assert tok.decode(tok("abc").input_ids) == "abc"


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
    assert missing.exit_code != 0 and "train-canary" in missing.output


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


def test_training_episodes_supervise_every_answer(tokenizer):
    """Retrieval episodes mark exactly the answers (first question, follow-ups, drills, the echoed
    first question) for the retrieval loss; the rest is text; nothing exceeds the training length."""
    import random

    from sparse_attn.eval.canary import ANSWER, TEXT, _episode
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


def test_multikey_followups_ask_every_other_key(tokenizer):
    sample = make_sample("multikey", tokenizer, 1500, seed=2, keys=6)
    assert len(sample.followups) == 5
    asked = {sample.answer} | {answer for _, answer in sample.followups}
    assert len(asked) == 6 and all(value in sample.prompt for value in asked)
    assert make_sample("passkey", tokenizer, 500, seed=2).followups == []


def test_canary_training_probes_retrieval_while_training(tmp_path):
    from sparse_attn.eval.canary import train

    seen = []
    log = train(str(tmp_path / "canary"), seq_len=512, batch_size=1, max_steps=2, device="cpu", eval_lengths=(),
                probe_every_s=1e-9, on_probe=lambda step, seconds, acc: seen.append((step, acc)),
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    assert [p["step"] for p in log["probes"]] == [1, 2] == [step for step, _ in seen]
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in log["probes"])


def test_episodes_fit_every_supported_length_and_short_lengths_are_refused(tokenizer, tmp_path):
    import random

    from sparse_attn.eval.canary import _episode, train
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

    from sparse_attn.eval.canary import COPY, _copy_episode, _episode
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

    from sparse_attn.eval.canary import COPY, PAD, _episode

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
    from sparse_attn.eval.canary import INDUCTION_LEN, induction_lengths

    assert induction_lengths(8192) == [128, 256, 512, 1024, 2048, 4096, 8192]
    assert induction_lengths(3000) == [128, 256, 512, 1024, 2048, 3000]
    assert induction_lengths(INDUCTION_LEN) == [INDUCTION_LEN]


def test_lookup_episodes_ask_keys_whose_answers_follow_them(tokenizer):
    """The lookup warm-up's episodes: key -> number lines, text, then questions whose answer digits
    (the only targets) are the number on that key's line; lengths double from 512."""
    import random
    import re

    from sparse_attn.eval.canary import ANSWER, LOOKUP_MAX_KEYS, _episode, lookup_lengths
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
    from sparse_attn.eval import canary

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

    from sparse_attn.eval.canary import _lookup_episode
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

    from sparse_attn.eval.canary import _episode
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
    from sparse_attn.eval import canary

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


def test_list_and_chain_drill_episodes_supervise_every_answer(tokenizer):
    import random

    from sparse_attn.eval.canary import ANSWER, _episode
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

    from sparse_attn.eval.canary import ANSWER, _lookup_episode
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
    from sparse_attn.eval import canary

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

    from sparse_attn.cli import main

    result = CliRunner().invoke(main, ["train-canary", "--no-refine", "--out", str(tmp_path / "b"), "--seq-len", "512",
                                       "--max-steps", "2", "--batch-size", "1", "--eval-samples", "1",
                                       "--probe-every", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log["steps"] == 2 and "refined_from" not in log
