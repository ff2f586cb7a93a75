"""transformers integration on tiny random-weight models built from local configs (CPU)."""

import inspect
import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import patch, unpatch  # noqa: E402
from sparse_attn.integrations.hf import SparseConfig, is_patched  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def _tiny(family):
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**COMMON)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**COMMON)
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, **COMMON)
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, **COMMON)
    else:
        raise ValueError(family)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


def _ids(length=100, batch=1, seed=1):
    # Token 0 is the pad id given to generate(), so prompts never contain it.
    return torch.randint(1, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
EXACT = dict(block_size=16, min_kv_len=0, fallback="never")


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layout_reproduces_the_model_exactly(family):
    model = _tiny(family)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        state = patch(model, method="dense", record=True, **EXACT)
        got = model(ids).logits
    assert model.config._attn_implementation == "sparse_attn"
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert len(state.records) == COMMON["num_hidden_layers"] and all(r["sparse"] for r in state.records)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method,knobs", [
    ("xattention", {"threshold": 0.999, "stride": 4}),
    ("flexprefill", {"gamma": 0.999, "min_budget": 32}),
    ("vertical_slash", {"vertical_size": 64, "slash_size": 64}),
    ("pooled_topp", {"top_p": 0.999}),
    ("oracle", {"top_p": 0.999}),
    ("sliding_window", {"window": 128}),
])
def test_methods_give_finite_logits_close_to_dense(family, method, knobs):
    model = _tiny(family)
    ids = _ids(length=160)
    with torch.no_grad():
        want = model(ids).logits
        state = patch(model, method=method, record=True, sink=16, **knobs, **EXACT)
        got = model(ids).logits
    assert torch.isfinite(got).all()
    rel = float((got - want).norm() / want.norm())
    densities = [r["density"] for r in state.records]
    assert rel < 0.05, (rel, densities)
    assert all(0 < d <= 1 for d in densities)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_dense_layout_matches_dense_tokens(family):
    model = _tiny(family)
    ids = _ids(length=40)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    state = patch(model, method="dense", record=True, **EXACT)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    decode = [r for r in state.records if r["q_len"] == 1]
    assert decode and all(r["reason"] == "decode: dense" for r in decode)
    prefill = [r for r in state.records if r["q_len"] > 1]
    assert prefill and all(r["sparse"] for r in prefill)


def test_chunked_prefill_against_a_cache_matches_dense():
    model = _tiny("llama")
    ids = _ids(length=120)
    with torch.no_grad():
        want = model(ids).logits[:, 64:]
        state = patch(model, method="dense", record=True, **EXACT)
        # transformers 5.2x renamed the forward's ``past_key_values`` to ``cache`` (the old name warns,
        # and goes in 5.40); earlier 5.x releases (5.17 on the GPU machine) know only the old one.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = transformers.DynamicCache()
        model(ids[:, :64], use_cache=True, **{cache_arg: cache})
        got = model(ids[:, 64:], use_cache=True, **{cache_arg: cache}).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    chunk = [r for r in state.records if r["q_len"] == 56]
    assert chunk and all(r["kv_len"] == 120 and r["sparse"] for r in chunk)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_runs_sparse_per_sequence(side):
    model = _tiny("llama")
    ids = _ids(length=50, batch=2)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :10] = 0
    else:
        mask[0, -10:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        state = patch(model, method="dense", record=True, **EXACT)
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(got[valid], want[valid], atol=1e-5)
    assert all(r["sparse"] for r in state.records)
    assert sorted({r["q_len"] for r in state.records}) == [40, 50]  # each sequence on its own span


def test_sliding_window_masks_run_dense_with_a_reason():
    torch.manual_seed(0)
    config = transformers.MistralConfig(sliding_window=16, **COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    ids = _ids(length=48)
    with torch.no_grad():
        want = model(ids).logits
        state = patch(model, method="oracle", record=True, top_p=0.5, **EXACT)
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert all(not r["sparse"] and "sliding window" in r["reason"] for r in state.records)


def test_unpatch_restores_the_original_behaviour():
    model = _tiny("qwen2")
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        patch(model, method="sliding_window", window=16, **EXACT)
        sparse = model(ids).logits
        unpatch(model)
        got = model(ids).logits
    assert not torch.allclose(sparse, want, atol=1e-4)  # the patch really changed attention
    assert torch.equal(got, want)
    assert model.config._attn_implementation == "sdpa" and not is_patched(model)
    assert not any(hasattr(m, "_sparse_attn_state") for m in model.modules())


def test_per_layer_config_dense_first_layers_and_min_length(tmp_path):
    model = _tiny("llama")
    ids = _ids(length=64)
    path = tmp_path / "sparse.json"
    path.write_text(json.dumps({"method": "sliding_window", "knobs": {"window": 16, "block_size": 16, "sink": 0},
                                "dense_first_layers": 1, "min_kv_len": 0, "fallback": "never",
                                "record": True}))
    state = patch(model, config=str(path))
    with torch.no_grad():
        model(ids)
    by_layer = {r["layer"]: r for r in state.records}
    assert not by_layer[0]["sparse"] and by_layer[0]["reason"] == "layer configured dense"
    assert by_layer[1]["sparse"] and by_layer[1]["density"] < 1
    summary = state.summary()
    assert summary[1]["sparse_calls"] == 1 and summary[0]["sparse_calls"] == 0

    state = patch(model, method="sliding_window", window=16, block_size=16, min_kv_len=1000, record=True)
    with torch.no_grad():
        model(ids)
    assert all("min_kv_len" in r["reason"] for r in state.records)

    state = patch(model, config=SparseConfig(method="oracle", knobs={"block_size": 16}, min_kv_len=0,
                                             layers={1: {"method": "dense"}}, record=True))
    with torch.no_grad():
        model(ids)
    assert [r["sparse"] for r in sorted(state.records, key=lambda r: r["layer"])] == [True, False]


def test_wrong_configs_raise_clear_errors():
    model = _tiny("llama")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        patch(model, method="nope")
    with pytest.raises(ValueError, match="no knob"):
        patch(model, method="xattention", gamma=0.2)
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        patch(model, config=SparseConfig(layers={7: {"method": "dense"}}))
    with pytest.raises(ValueError, match="fallback"):
        SparseConfig(fallback="sometimes")
    with pytest.raises(ValueError, match=re.escape("SparseConfig: knobs: xattention: threshold=2 is outside (0, 1]")):
        patch(model, method="xattention", threshold=2)
    with pytest.raises(ValueError, match=re.escape("SparseConfig: min_kv_len=-1 is not >= 0")):
        patch(model, method="xattention", min_kv_len=-1)
    with pytest.raises(ValueError, match="unknown SparseConfig field"):
        SparseConfig.from_dict({"methd": "oracle"})
    with pytest.raises(ValueError, match="either config"):
        patch(model, method="oracle", config=SparseConfig())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(torch.nn.Linear(2, 2), method="oracle")
    assert model.config._attn_implementation == "sdpa"  # failed patches leave the model alone


def test_config_round_trips_through_json(tmp_path):
    config = SparseConfig(method="xattention", knobs={"threshold": [0.9, 0.95]}, layers={3: {"method": "dense"}},
                          dense_first_layers=2, min_kv_len=4096)
    config.save(tmp_path / "c.json")
    back = SparseConfig.from_file(tmp_path / "c.json")
    assert back.to_dict() == config.to_dict()


def test_cli_generate_on_a_local_model(tmp_path):
    from click.testing import CliRunner

    from sparse_attn.cli import main
    from sparse_attn.integrations.hf.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    result = CliRunner().invoke(main, [
        "generate", "--model", str(tmp_path / "model"), "--method", "oracle", "--knob", "top_p=0.9",
        "--knob", "block_size=16", "--prompt-file", str(prompt), "--max-new-tokens", "5", "--min-kv-len", "0",
    ])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "prefill dense" in result.output and "layer 0: density" in result.output
    assert "output:" in result.output

    bad = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "model"), "--method", "nope",
                                    "--prompt-file", str(prompt)])
    assert bad.exit_code == 2 and "unknown method 'nope'" in bad.output  # one line, no traceback


def test_cli_generate_refuses_bad_settings_like_the_api(tmp_path):
    """The CLI builds a SparseConfig and assigns --min-kv-len to it: SparseConfig refuses a bad value
    (and a bad knob) there, the same way as the API."""
    from click.testing import CliRunner

    from sparse_attn.cli import main
    from sparse_attn.integrations.hf.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog.")
    base = ["generate", "--model", str(tmp_path / "model"), "--method", "oracle", "--prompt-file", str(prompt),
            "--max-new-tokens", "1"]
    # (cli.py may also refuse --min-kv-len -1 itself, as an option out of range.)
    for extra, messages in [(["--knob", "block_size=16", "--min-kv-len", "-1"],
                             ("SparseConfig: min_kv_len=-1 is not >= 0", "'--min-kv-len': -1")),
                            (["--knob", "top_p=2"], ("SparseConfig: knobs: oracle: top_p=2 is outside (0, 1]",)),
                            (["--knob", "top_p=high"], ("SparseConfig: knobs: oracle: top_p='high' is not a number",))]:
        result = CliRunner().invoke(main, base + extra)
        said = result.output + str(result.exception)
        assert any(message in said for message in messages), (extra, said)
        assert result.exit_code != 0, (extra, said)


def test_byte_tokenizer_round_trips_text():
    from sparse_attn.integrations.hf.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    text = "héllo, wörld! 123\n\ttabs"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text


def test_decode_hook_routes_single_token_steps_to_a_method():
    model = _tiny("llama")
    ids = _ids(length=40)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    state = patch(model, config=SparseConfig(method="dense", knobs={"block_size": 16}, decode="dense",
                                             min_kv_len=0, fallback="never", record=True))
    assert torch.equal(model.generate(ids, **kwargs), want)
    state = patch(model, config=SparseConfig(method="dense", knobs={"block_size": 16}, min_kv_len=0,
                                             fallback="never", record=True, decode="oracle"))
    got = model.generate(ids, **kwargs)
    decode = [r for r in state.records if r["q_len"] == 1]
    assert decode and all(r["sparse"] for r in decode), {r["reason"] for r in decode}  # the hook ran the method
    assert got.shape == want.shape
    state = patch(model, config=SparseConfig(method="dense", knobs={"block_size": 16}, min_kv_len=0,
                                             fallback="never", record=True,
                                             decode={"method": "quest", "top_k": 1, "block_size": 16, "sink": 0,
                                                     "granularity": "head"}))
    model.generate(ids, **kwargs)
    decode = [r for r in state.records if r["q_len"] == 1]
    assert all(r["sparse"] and r["density"] < 1 for r in decode), \
        [(r["sparse"], r["density"], r["kv_len"]) for r in decode]


def test_training_through_the_patch_matches_dense_gradients():
    model = _tiny("qwen2").train()
    ids = _ids(length=80)
    loss = model(ids, labels=ids).loss
    want = torch.autograd.grad(loss, [p for p in model.parameters()])
    patch(model, method="dense", **EXACT)
    loss_sparse = model(ids, labels=ids).loss
    got = torch.autograd.grad(loss_sparse, [p for p in model.parameters()])
    assert torch.allclose(loss_sparse, loss, atol=1e-6)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
    patch(model, method="sliding_window", window=32, sink=0, **EXACT)
    model(ids, labels=ids).loss.backward()  # a sparse layout trains too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_batched_generate_with_left_padding_matches_dense():
    model = _tiny("qwen3")
    ids = _ids(length=30, batch=2)
    ids[0, :6] = 0  # pad id
    mask = (ids != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    state = patch(model, method="dense", record=True, **EXACT)
    assert torch.equal(model.generate(ids, **kwargs), want)
    assert any(r["sparse"] and r["q_len"] == 24 for r in state.records)


def test_records_name_the_knob_that_made_a_call_dense():
    model = _tiny("llama")
    ids = _ids(length=96)
    with torch.no_grad():
        state = patch(model, method="pooled_topk", top_k=100, record=True, **EXACT)  # 6 key blocks of 16
        model(ids)
        assert [r["knob_dense"] for r in state.records] == [("top_k",)] * COMMON["num_hidden_layers"]
        assert all("dense by knob: top_k" in r["reason"] and r["density"] == 1.0 for r in state.records)
        assert [s["knob_dense"] for s in state.summary()] == [["top_k"]] * COMMON["num_hidden_layers"]
        state = patch(model, method="pooled_topk", top_k=0.34, record=True, **EXACT)  # 2 of 6 key blocks
        model(ids)
    assert all(r["knob_dense"] == () and r["density"] < 1.0 for r in state.records)
    assert [s["knob_dense"] for s in state.summary()] == [[]] * COMMON["num_hidden_layers"]


def test_dense_heads_run_full_rows_inside_the_sparse_call_and_are_recorded():
    model = _tiny("llama")
    ids = _ids(length=160)
    with torch.no_grad():
        want = model(ids).logits
        state = patch(model, method="pooled_topk", top_k=1, sink=16, record=True, dense_heads=[0, 1], **EXACT)
        got = model(ids).logits  # every KV head full: the model's own attention, through the sparse kernels
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert all(r["sparse"] and r["full_heads"] == (0, 1) and r["kv_head_density"] == [1.0, 1.0]
                   for r in state.records)
        state = patch(model, method="pooled_topk", top_k=1, sink=16, record=True,
                      layers={1: {"method": "pooled_topk", "dense_heads": [1]}}, **EXACT)
        model(ids)
    first, second = state.records
    assert first["sparse"] and first["full_heads"] == () and max(first["kv_head_density"]) < 1.0
    assert second["sparse"] and second["full_heads"] == (1,)
    assert second["kv_head_density"][1] == 1.0 and second["kv_head_density"][0] < 1.0
    assert second["density"] == pytest.approx(sum(second["kv_head_density"]) / 2)
    assert [s["full_heads"] for s in state.summary()] == [[], [1]]
    with pytest.raises(ValueError, match=re.escape("SparseConfig: layers[1]: pooled_topk: dense_heads=[2] names KV "
                                                   "head(s) [2]; the model has 2 KV heads (0..1)")):
        patch(model, method="pooled_topk", layers={1: {"method": "pooled_topk", "dense_heads": [2]}})


def test_precheck_skips_the_estimate_of_diffuse_layers_and_reuses_the_decision(monkeypatch):
    from sparse_attn.methods.base import Method

    rows = []  # the query rows of every block selection (estimates and pre-check runs)
    real = Method._keep
    monkeypatch.setattr(Method, "_keep", lambda self, q, k, *a, **kw: rows.append(q.shape[2]) or real(
        self, q, k, *a, **kw))
    model = _tiny("llama")
    ids = _ids(length=512)
    settings = dict(method="xattention", stride=4, block_size=16, min_kv_len=0, fallback="length", record=True)
    with torch.no_grad():
        want = model(ids).logits
        state = patch(model, dense_above=0.5, precheck={"share": 0.1, "cache": True}, **settings)
        got = model(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        assert 512 not in rows and rows  # sampled rows only
        for r in state.records:
            assert not r["sparse"] and r["reason"].startswith("dense: pre-check on")
            assert r["precheck"]["outcome"] == "dense" and r["precheck"]["skipped_estimate"]
            assert 0 < r["precheck"]["share"] < 0.2 and len(r["precheck"]["density_per_kv_head"]) == 2
        rows.clear()
        model(ids)
        assert rows == [] and [r["precheck"]["outcome"] for r in state.records[2:]] == ["cached dense"] * 2
        assert [s["skipped_estimates"] for s in state.summary()] == [2, 2] and len(state.decisions) == 2
        unpatch(model)
        assert len(state.decisions) == 0
        window = {**settings, "method": "sliding_window", "window": 64}
        window.pop("stride")
        state = patch(model, precheck={"share": 0.1, "cache": True}, **window)  # a new config: a new cache
        model(ids)
        model(ids)
    assert [r["precheck"]["outcome"] for r in state.records] == ["estimate"] * 2 + ["cached sparse"] * 2
    assert all(r["sparse"] for r in state.records) and rows.count(512) == 4
    state = patch(model, **settings)  # "auto": on CPU no cost model decides, so no pre-check
    with torch.no_grad():
        model(ids)
    assert all(r["precheck"] is None and r["sparse"] for r in state.records)


def test_precheck_setting_is_checked_naming_it():
    assert SparseConfig().precheck == "auto" and SparseConfig().precheck_for(cuda=False) is None
    assert SparseConfig().precheck_for(cuda=True).share == pytest.approx(1 / 32)
    assert SparseConfig(fallback="length").precheck_for(cuda=True) is None
    assert SparseConfig(precheck={"runs": 2}).precheck_for(cuda=False).runs == 2
    assert SparseConfig(precheck=False).precheck_for(cuda=True) is None
    for kwargs, message in (
            ({"precheck": "yes"}, "SparseConfig: precheck='yes' is not 'auto', True, False or a dict"),
            ({"precheck": {"share": 2}}, "SparseConfig: precheck: share=2 is outside (0, 1)"),
            ({"precheck": {"rows": 2}}, "SparseConfig: precheck: unknown key(s) ['rows']"),
            ({"precheck": True, "fallback": "never"}, "SparseConfig: precheck=True with fallback='never'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            SparseConfig(**kwargs)
    config = SparseConfig(precheck=True)
    with pytest.raises(ValueError, match="fallback='never'"):
        config.fallback = "never"
    assert config.fallback == "auto"
