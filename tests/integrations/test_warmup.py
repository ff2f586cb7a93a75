"""sparse_attn.warmup: runs a patched model's sparse prefill (and decode) paths once per length on
random tokens, returns a row per length, and leaves no trace in the patch state, so later calls
give what they give without it; clear errors for an unpatched model and bad arguments."""

import pytest
import torch

import sparse_attn
from utils import tiny_llama

KNOBS = dict(method="xattention", min_kv_len=0, block_size=16)


def patched(decode="dense"):
    model = tiny_llama(vocab_size=64, layers=2)
    state = sparse_attn.patch(model, **KNOBS, decode=decode, record=True)
    return model, state


def test_warmup_runs_every_length_and_forgets_it():
    model, state = patched(decode={"method": "quest", "budget": 32, "page": 16, "sink": 0, "recent": 16})
    rows = sparse_attn.warmup(model, [96, 130], batch_size=2)
    assert [(r["length"], r["batch_size"], r["decode_steps"]) for r in rows] == [(96, 2, 2), (130, 2, 2)]
    assert all(r["seconds"] > 0 for r in rows)
    assert state.records == [] and state.page_indexes == {} and state.decode_steps == {}
    assert state.decisions.hits == 0


def test_outputs_after_warmup_equal_outputs_without_it():
    ids = torch.randint(0, 64, (1, 120), generator=torch.Generator().manual_seed(3))
    warm, warm_state = patched()
    sparse_attn.warmup(warm, [120])
    cold, cold_state = patched()
    with torch.no_grad():
        torch.testing.assert_close(warm(ids).logits, cold(ids).logits, rtol=0, atol=0)
    assert [r["sparse"] for r in warm_state.records] == [r["sparse"] for r in cold_state.records]


def test_prefill_only_without_decode_settings():
    model, _ = patched()
    assert sparse_attn.warmup(model, [64])[0]["decode_steps"] == 0


def test_short_prompt_warning_is_kept_for_the_first_real_request():
    model = tiny_llama(vocab_size=64, layers=2)
    state = sparse_attn.patch(model, method="xattention", min_kv_len=1000)
    sparse_attn.warmup(model, [32])
    assert state.warned_short is False
    with pytest.warns(UserWarning, match="min_kv_len"):
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 32)))


def test_errors_name_the_argument():
    model = tiny_llama(vocab_size=64, layers=1)
    with pytest.raises(RuntimeError, match="not patched"):
        sparse_attn.warmup(model, [32])
    sparse_attn.patch(model, **KNOBS)
    for bad in (0, [0], [], [32.0], "64"):
        with pytest.raises(ValueError, match="lengths"):
            sparse_attn.warmup(model, bad)
    with pytest.raises(ValueError, match="batch_size"):
        sparse_attn.warmup(model, [32], batch_size=0)
    with pytest.raises(ValueError, match="decode_steps"):
        sparse_attn.warmup(model, [32], decode_steps=-1)


def test_warmup_runs_the_full_estimate_where_the_config_would_go_dense(monkeypatch):
    """A pre-check (or the length rule) would send random prompts dense before the full estimate
    and the sparse kernels ran; the warm-up runs them, then gives the config back."""
    from sparse_attn.methods.xattention import XAttention

    model = tiny_llama(vocab_size=64, layers=2)
    state = sparse_attn.patch(model, method="xattention", block_size=16, min_kv_len=4096, fallback="length",
                              precheck=True, dense_above=0.5)
    lengths = []
    real = XAttention.estimate

    def spy(self, q, k, *args, **kwargs):
        lengths.append(q.shape[2])
        return real(self, q, k, *args, **kwargs)

    monkeypatch.setattr(XAttention, "estimate", spy)
    sparse_attn.warmup(model, [256])
    assert 256 in lengths  # the full estimate of the whole prompt ran
    assert state.config.fallback == "length" and state.config.precheck is True and state.config.min_kv_len == 4096


def test_warmup_also_runs_the_configs_own_precheck(monkeypatch):
    """After the sparse pass, the prompt runs once more as the config runs it, so the pre-check's
    kernels (and the dense fallback) are compiled before the first request too."""
    import sparse_attn.methods.cost as cost

    model = tiny_llama(vocab_size=64, layers=2)
    state = sparse_attn.patch(model, method="xattention", block_size=16, min_kv_len=0, fallback="auto",
                              precheck=True)
    calls = []
    real = cost.run_precheck

    def spy(method, q, k, *args, **kwargs):
        calls.append(q.shape[2])
        return real(method, q, k, *args, **kwargs)

    monkeypatch.setattr(cost, "run_precheck", spy)
    sparse_attn.warmup(model, [256])
    assert calls == [256, 256]  # both layers, in the second pass
    assert state.config.fallback == "auto" and state.config.precheck is True
    assert len(state.decisions) == 0 and state.records == []
    calls.clear()
    sparse_attn.patch(model, method="xattention", block_size=16, min_kv_len=0, fallback="never")
    sparse_attn.warmup(model, [256])
    assert calls == []  # fallback="never": the sparse pass is the config's own
