"""The profile step: per-layer / per-KV-head measurements on calibration prompts, the choice that meets
a target recall at the lowest density, the JSON profile, patch(model, profile=...) and the CLI."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn.cli import main  # noqa: E402
from sparse_attn.integrations.hf import SparseConfig, patch, profile_model, unpatch, write_profile  # noqa: E402
from sparse_attn.integrations.hf.config import SparseConfigError  # noqa: E402
from sparse_attn.integrations.hf.profile import (  # noqa: E402
    PROFILE_FORMAT, PROFILE_SWEEPS, calibration_prompts, choose_layer)
from sparse_attn.integrations.hf.tokenizer import byte_tokenizer  # noqa: E402
from utils import tiny_llama  # noqa: E402

LAYERS, KV_HEADS = 2, 2
FAST = dict(lengths=[256], samples=1, block_size=32, min_kv_len=0)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _tiny(tokenizer):
    return tiny_llama(len(tokenizer), layers=LAYERS, kv_heads=KV_HEADS)


def test_choose_layer_takes_the_cheapest_setting_per_kv_head_meeting_the_target():
    sweeps = {"xattention": [{"threshold": 0.8}, {"threshold": 0.9}],
              "sliding_window": [{"window": 0.1}, {"window": 0.5}]}
    t = torch.tensor
    density = {("xattention", 0): t([0.2, 0.3]), ("xattention", 1): t([0.4, 0.5]),
               ("sliding_window", 0): t([0.1, 0.1]), ("sliding_window", 1): t([0.5, 0.5])}
    recall = {("xattention", 0): t([0.97, 0.90]), ("xattention", 1): t([0.99, 0.96]),
              ("sliding_window", 0): t([0.99, 0.50]), ("sliding_window", 1): t([0.99, 0.97])}
    choice = choose_layer(["xattention", "sliding_window"], sweeps, density, recall, 0.95)
    # xattention: head 0 takes 0.8 (0.2), head 1 needs 0.9 (0.5): mean 0.35 < sliding_window's 0.5
    # (a window is one value per layer: 0.1 misses head 1)
    assert choice["method"] == "xattention" and choice["knobs"] == {"threshold": [0.8, 0.9]}
    assert choice["density"] == pytest.approx(0.35)
    assert choice["kv_head_recall"] == pytest.approx([0.97, 0.96])
    choice = choose_layer(["sliding_window"], sweeps, density, recall, 0.95)
    assert choice["knobs"] == {"window": 0.5} and choice["density"] == pytest.approx(0.5)
    same = choose_layer(["xattention"], sweeps, density, recall, 0.9)
    assert same["knobs"] == {"threshold": 0.8}  # one value for every KV head collapses to a scalar
    dense = choose_layer(["xattention", "sliding_window"], sweeps, density, recall, 0.999)
    assert dense == {"method": "dense", "knobs": {}, "dense_heads": [0, 1], "density": 1.0,
                     "kv_head_density": [1.0, 1.0], "kv_head_recall": [1.0, 1.0]}


def test_choose_layer_sends_kv_heads_no_setting_serves_to_dense_heads():
    sweeps = {"xattention": [{"threshold": 0.8}, {"threshold": 0.9}],
              "sliding_window": [{"window": 0.1}, {"window": 0.5}]}
    t = torch.tensor
    density = {("xattention", 0): t([0.2, 0.3, 0.4]), ("xattention", 1): t([0.4, 0.5, 0.6]),
               ("sliding_window", 0): t([0.1, 0.1, 0.1]), ("sliding_window", 1): t([0.5, 0.5, 0.5])}
    recall = {("xattention", 0): t([0.97, 0.90, 0.5]), ("xattention", 1): t([0.99, 0.96, 0.6]),
              ("sliding_window", 0): t([0.99, 0.5, 0.5]), ("sliding_window", 1): t([0.99, 0.97, 0.5])}
    choice = choose_layer(["xattention", "sliding_window"], sweeps, density, recall, 0.95)
    # xattention: head 0 at 0.8 (0.2), head 1 at 0.9 (0.5), head 2 served by neither: dense (1.0)
    assert choice["method"] == "xattention" and choice["dense_heads"] == [2]
    assert choice["knobs"] == {"threshold": [0.8, 0.9, 0.8]}  # a dense head's value is never used
    assert choice["kv_head_density"] == pytest.approx([0.2, 0.5, 1.0])
    assert choice["kv_head_recall"] == pytest.approx([0.97, 0.96, 1.0])
    assert choice["density"] == pytest.approx(1.7 / 3)
    window = choose_layer(["sliding_window"], sweeps, density, recall, 0.95)
    # one window for the layer: 0.1 serves head 0 only (0.1 + 1 + 1), 0.5 heads 0 and 1 (0.5 + 0.5 + 1)
    assert window["knobs"] == {"window": 0.5} and window["dense_heads"] == [2]
    assert window["density"] == pytest.approx(2.0 / 3)


def test_a_profile_with_dense_kv_heads_patches_them_as_full_rows(tokenizer, tmp_path):
    from sparse_attn.integrations.hf.profile import _build_profile

    sweeps = {"pooled_topk": [{"top_k": 0.1}, {"top_k": 0.4}]}
    t = torch.tensor
    # per layer: KV head 1 never reaches the target on layer 1; every head does on layer 0
    layer_data = {0: {("pooled_topk", 0): ([t([0.2, 0.2])], [t([0.99, 0.99])]),
                      ("pooled_topk", 1): ([t([0.5, 0.5])], [t([1.0, 1.0])])},
                  1: {("pooled_topk", 0): ([t([0.2, 0.2])], [t([0.99, 0.5])]),
                      ("pooled_topk", 1): ([t([0.5, 0.5])], [t([1.0, 0.6])])}}
    profile = _build_profile({256: layer_data}, {0: KV_HEADS, 1: KV_HEADS}, ["pooled_topk"], sweeps, [256],
                             {256: [None]}, 0.95, 32, 0, "tiny")
    assert [layer["dense_heads"] for layer in profile["layers"]] == [[], [1]]
    assert profile["config"]["layers"]["1"] == {"method": "pooled_topk", "block_size": 32, "top_k": 0.1,
                                                "dense_heads": [1]}
    assert "dense_heads" not in profile["config"]["layers"]["0"]
    path = tmp_path / "profile.json"
    write_profile(profile, path)
    config = SparseConfig.from_profile(path)
    assert config.method_for(1).dense_heads == [1] and config.method_for(0).dense_heads == ()
    config.record = True
    model = _tiny(tokenizer)
    state = patch(model, config=config)
    with torch.no_grad():
        model(calibration_prompts(tokenizer, [256], 1)[256][0])
    assert [r["full_heads"] for r in state.records] == [(), (1,)]
    assert state.records[1]["kv_head_density"][1] == 1.0 and state.records[1]["kv_head_density"][0] < 1.0


def test_profile_json_schema_and_the_patch_round_trip(tokenizer, tmp_path):
    model = _tiny(tokenizer)
    prompts = calibration_prompts(tokenizer, [256], 1)
    profile = profile_model(model, prompts=prompts, methods=["xattention", "vertical_slash", "pooled_topp"],
                            target_recall=0.9, block_size=32, min_kv_len=0, model_name="tiny")
    path = tmp_path / "profile.json"
    write_profile(profile, path)
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT and data["version"] == 1 and data["model"] == "tiny"
    assert data["target_recall"] == 0.9 and data["lengths"] == [256] and data["prompts"] == {"256": 1}
    assert data["methods"]["xattention"] == PROFILE_SWEEPS["xattention"]
    assert [layer["layer"] for layer in data["layers"]] == list(range(LAYERS))
    for layer in data["layers"]:
        assert set(layer) == {"layer", "method", "knobs", "dense_heads", "density", "kv_head_density",
                              "kv_head_recall", "measurements"}
        assert len(layer["measurements"]) == 12  # 3 methods x 4 settings
        for row in layer["measurements"]:
            assert len(row["kv_head_density"]) == KV_HEADS and len(row["kv_head_recall"]) == KV_HEADS
            assert all(0 < d <= 1 for d in row["kv_head_density"]) and all(0 <= r <= 1 + 1e-6
                                                                           for r in row["kv_head_recall"])
        assert min(layer["kv_head_recall"]) >= 0.9
        cheaper = [row for row in layer["measurements"] if min(row["kv_head_recall"]) >= 0.9
                   and sum(row["kv_head_density"]) / KV_HEADS < layer["density"] - 1e-9]
        assert not cheaper, cheaper  # no single setting meeting the target is cheaper than the choice
    assert any(layer["method"] != "dense" for layer in data["layers"])

    config = SparseConfig.from_profile(path)
    assert SparseConfig.from_file(path).to_dict() == config.to_dict()  # config=path reads a profile too
    for layer in data["layers"]:
        method = config.method_for(layer["layer"])
        if layer["method"] == "dense":
            assert method is None
            continue
        assert method.name == layer["method"] and method.block_size == 32
        assert {k: getattr(method, k) for k in layer["knobs"]} == layer["knobs"]

    ids = prompts[256][0]
    with torch.no_grad():
        want = model(ids).logits
        state = sparse_attn.patch(model, profile=str(path))
        assert state.config.to_dict() == config.to_dict()
        state.config.record = True
        got = model(ids).logits
    unpatch(model)
    first = next(layer for layer in data["layers"])
    record = state.records[0]
    assert record["layer"] == 0
    if first["method"] != "dense":  # layer 0 sees the calibration prompt's own q and k: the profiled density
        assert record["sparse"] and record["density"] == pytest.approx(first["density"], abs=1e-6)
    assert torch.isfinite(got).all()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_a_target_only_dense_attention_meets_gives_dense_layers(tokenizer, tmp_path):
    model = _tiny(tokenizer)
    profile = profile_model(model, tokenizer, methods=["sliding_window"], target_recall=1.0, **FAST)
    assert [layer["method"] for layer in profile["layers"]] == ["dense"] * LAYERS
    assert profile["config"]["layers"] == {str(i): {"method": "dense"} for i in range(LAYERS)}
    path = tmp_path / "dense.json"
    write_profile(profile, path)
    config = SparseConfig.from_profile(path)
    config.record = True
    state = patch(model, config=config)
    with torch.no_grad():
        model(calibration_prompts(tokenizer, [256], 1)[256][0])
    assert [r["reason"] for r in state.records] == ["layer configured dense"] * LAYERS


def test_calibration_prompts_from_tasks_or_a_text(tokenizer):
    prompts = calibration_prompts(tokenizer, [256, 512], 2)
    assert sorted(prompts) == [256, 512] and all(len(ps) == 2 for ps in prompts.values())
    assert all(p.shape[0] == 1 and n - 1 <= p.shape[1] <= n for n, ps in prompts.items() for p in ps)
    assert not torch.equal(prompts[512][0], prompts[512][1])
    text = "In the beginning was the word. " * 40  # 1240 bytes
    windows = calibration_prompts(tokenizer, [300], 3, text=text)[300]
    assert [w.shape for w in windows] == [(1, 300)] * 3
    with pytest.raises(ValueError, match="text has 1240 tokens; the longest length, 2000, needs that many"):
        calibration_prompts(tokenizer, [2000], 1, text=text)
    with pytest.raises(ValueError, match="lengths: 40 tokens is too short"):
        calibration_prompts(tokenizer, [40], 1)


@pytest.mark.parametrize("kwargs,message", [
    ({"methods": ["nope"]}, r"methods: \['nope'\] given"),
    ({"methods": ["oracle"]}, r"methods: \['oracle'\] given"),
    ({"target_recall": 0}, r"target_recall=0 is outside \(0, 1\]"),
    ({"target_recall": 1.5}, r"target_recall=1.5 is outside \(0, 1\]"),
    ({"samples": 0}, "samples=0 is not an int >= 1"),
    ({"lengths": [0]}, "lengths=.0.: give positive token counts"),
    ({"block_size": 48}, "block_size=48 is not one of"),
])
def test_bad_profile_arguments_raise_naming_them(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile_model(_tiny(tokenizer), tokenizer, **{**FAST, **kwargs})


def test_profile_refuses_a_patched_model_and_patch_refuses_mixed_arguments(tokenizer, tmp_path):
    model = _tiny(tokenizer)
    patch(model, method="dense")
    with pytest.raises(ValueError, match="profile an unpatched model"):
        profile_model(model, tokenizer, **FAST)
    unpatch(model)
    with pytest.raises(ValueError, match="either profile=... or config="):
        patch(model, method="xattention", profile=str(tmp_path / "p.json"))


def test_from_profile_refuses_what_is_not_a_profile(tmp_path):
    plain = tmp_path / "config.json"
    SparseConfig().save(plain)
    with pytest.raises(SparseConfigError, match="config.json: not a profile"):
        SparseConfig.from_profile(plain)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SparseConfigError, match="broken.json: not valid JSON"):
        SparseConfig.from_profile(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": PROFILE_FORMAT, "config": {"layers": {"0": {"method": "nope"}}}}))
    with pytest.raises(SparseConfigError, match=r"bad.json: .*layers\[0\]: unknown method 'nope'"):
        SparseConfig.from_profile(bad)


def _saved(tokenizer, tmp_path):
    model = _tiny(tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_cli_profile_writes_a_profile_patch_reads(tokenizer, tmp_path):
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["profile", "--model", _saved(tokenizer, tmp_path), "--out", str(out),
                                       "--methods", "pooled_topp,sliding_window", "--lengths", "256",
                                       "--samples", "1", "--block-size", "32", "--target-recall", "0.9",
                                       "--min-kv-len", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "layer 0:" in result.output and "layer 1:" in result.output and f"wrote {out}" in result.output
    config = SparseConfig.from_profile(out)
    assert config.min_kv_len == 0 and set(config.layers) == {0, 1}
    assert {spec["method"] for spec in config.layers.values()} <= {"pooled_topp", "sliding_window", "dense"}


@pytest.mark.parametrize("args,option", [
    (["--methods", "nope"], "--methods"),
    (["--methods", "oracle"], "--methods"),
    (["--lengths", "0"], "--lengths"),
    (["--lengths", "100000"], "--lengths"),
    (["--lengths", "40"], "--lengths"),
    (["--target-recall", "0"], "--target-recall"),
    (["--target-recall", "1.5"], "--target-recall"),
    (["--samples", "0"], "--samples"),
    (["--block-size", "48"], "--block-size"),
    (["--min-kv-len", "-1"], "--min-kv-len"),
    (["--prompt-file", "EMPTY"], "--prompt-file"),
    (["--prompt-file", "SHORT", "--lengths", "512"], "--prompt-file"),
    (["--prompt-file", "MISSING"], "--prompt-file"),
    (["--out", "NODIR"], "--out"),
    (["--methods", "seer"], "--gates"),
    (["--methods", "seer", "--gates", "canary"], "--gates"),  # the canary's gates, another model
])
def test_cli_profile_errors_name_the_option(tokenizer, tmp_path, args, option):
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "short.txt").write_text("A short text.")
    names = {"EMPTY": tmp_path / "empty.txt", "SHORT": tmp_path / "short.txt", "MISSING": tmp_path / "missing.txt",
             "NODIR": tmp_path / "no" / "such" / "p.json"}
    args = [str(names.get(a, a)) for a in args]
    base = ["profile", "--model", _saved(tokenizer, tmp_path), "--lengths", "256", "--device", "cpu"]
    if "--out" not in args:
        base += ["--out", str(tmp_path / "p.json")]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and option in lines[0], result.output


def test_cli_profile_needs_a_model_and_an_out(tmp_path):
    for args, option in ((["--out", str(tmp_path / "p.json")], "--model"), (["--model", "canary"], "--out")):
        result = CliRunner().invoke(main, ["profile", *args])
        assert result.exit_code == 2 and option in result.output, result.output


def test_profile_on_the_shipped_canary(tmp_path):
    from sparse_attn.eval.canary import resolve_model

    path = resolve_model("canary")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    profile = profile_model(model, tokenizer, methods=["pooled_topp", "xattention"], target_recall=0.9,
                            lengths=[512], samples=1, block_size=64, min_kv_len=0)
    assert len(profile["layers"]) == model.config.num_hidden_layers
    assert all(min(layer["kv_head_recall"]) >= 0.9 for layer in profile["layers"])
    write_profile(profile, tmp_path / "canary.json")
    state = patch(model, profile=tmp_path / "canary.json")
    assert state.config.to_dict()["layers"] == {int(k): v for k, v in profile["config"]["layers"].items()}


def test_seer_profile_picks_a_threshold_per_kv_head_and_patches_it(tmp_path):
    """``seer`` in the profile (its gates fixed, the threshold swept): per layer and KV head the
    cheapest threshold meeting the target, which the patched model runs; gates of another model are
    refused before anything runs."""
    from sparse_attn.eval.canary import resolve_model
    from sparse_attn.eval.tasks import make_sample
    from sparse_attn.integrations.hf.profile import SEER_THRESHOLDS, seer_sweep
    from sparse_attn.methods.seer_gate import GatesError

    path = resolve_model("canary")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sweeps = {"seer": seer_sweep("canary")}
    profile = profile_model(model, tokenizer, methods=["seer"], sweeps=sweeps, target_recall=0.9,
                            lengths=[1024], samples=1, block_size=64, min_kv_len=0)
    assert profile["methods"]["seer"] == [{"gates": "canary", "threshold": t} for t in SEER_THRESHOLDS]
    for layer in profile["layers"]:
        assert min(layer["kv_head_recall"]) >= 0.9
        if layer["method"] == "seer":
            assert layer["knobs"]["gates"] == "canary"
            thresholds = layer["knobs"]["threshold"]
            per_head = thresholds if isinstance(thresholds, list) else [thresholds] * len(layer["kv_head_recall"])
            rows = {row["knobs"]["threshold"]: row for row in layer["measurements"]}
            for head, t in enumerate(per_head):  # each KV head: the sparsest threshold meeting the target
                if head in layer["dense_heads"]:
                    continue
                assert rows[t]["kv_head_recall"][head] >= 0.9
                sparser = [u for u in SEER_THRESHOLDS if u > t]
                assert all(rows[u]["kv_head_recall"][head] < 0.9 or rows[u]["kv_head_density"][head]
                           >= rows[t]["kv_head_density"][head] for u in sparser)
    assert any(layer["method"] == "seer" for layer in profile["layers"])
    write_profile(profile, tmp_path / "seer.json")
    state = patch(model, profile=tmp_path / "seer.json")
    state.config.record = True
    ids = tokenizer(make_sample("passkey", tokenizer, 1024).prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids)
    unpatch(model)
    profiled = {layer["layer"]: layer for layer in profile["layers"]}
    for record in state.records:
        if profiled[record["layer"]]["method"] == "seer":
            assert record["sparse"] and record["density"] < 1.0
    with pytest.raises((GatesError, ValueError), match="gates"):
        profile_model(tiny_llama(300, hidden_size=96, heads=6, kv_heads=2), tokenizer, methods=["seer"], sweeps=sweeps,
                      lengths=[256], samples=1, block_size=64)


def test_cli_profile_with_seer_on_the_canary(tmp_path):
    out = tmp_path / "seer.json"
    result = CliRunner().invoke(main, ["profile", "--model", "canary", "--out", str(out), "--methods", "seer",
                                       "--gates", "canary", "--lengths", "512", "--samples", "1",
                                       "--target-recall", "0.9", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    config = SparseConfig.from_profile(out)
    assert {spec["method"] for spec in config.layers.values()} <= {"seer", "dense"}
    assert all(spec.get("gates") == "canary" for spec in config.layers.values() if spec["method"] == "seer")
