"""attention_hook: a function runs in place of a model's attention inside the block, for that
model only, and everything is restored after it (also when the block raises)."""

import pytest
import torch
import utils

from sparse_attn.integrations.hf.attention_hook import attention_hook


def _model(seed):
    torch.manual_seed(seed)
    return utils.tiny_llama(vocab_size=64).eval()


def test_the_hook_sees_every_layer_of_its_model_only_and_attends_as_returned():
    first, second = _model(0), _model(1)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        want_first, want_second = first(ids).logits, second(ids).logits
    seen = {"first": [], "second": []}

    def watcher(name):
        def hook(module, query, key, value, attention_mask, **kwargs):
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            seen[name].append((int(module.layer_idx), tuple(query.shape), tuple(key.shape)))
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return hook

    with torch.no_grad(), attention_hook(first, watcher("first")), attention_hook(second, watcher("second")):
        got_first, got_second = first(ids).logits, second(ids).logits
    heads, kv_heads = first.config.num_attention_heads, first.config.num_key_value_heads
    dim = first.config.hidden_size // heads
    assert seen["first"] == [(i, (1, heads, 12, dim), (1, kv_heads, 12, dim)) for i in range(2)]
    assert seen["second"] == seen["first"]
    torch.testing.assert_close(got_first, want_first)
    torch.testing.assert_close(got_second, want_second)
    for model in (first, second):
        assert model.config._attn_implementation == "sdpa"
        assert not any(hasattr(m, "_sparse_attn_hook") for m in model.modules())


def test_a_hook_that_raises_leaves_the_model_as_it_was():
    model = _model(0)

    def broken(module, *args, **kwargs):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"), attention_hook(model, broken):
        model(torch.randint(0, 64, (1, 8)))
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_sparse_attn_hook") for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 8))).logits).all()


def test_a_model_without_attention_layers_is_refused():
    with pytest.raises(ValueError, match="Linear has no attention module with a layer_idx"):
        with attention_hook(torch.nn.Linear(2, 2), lambda *a, **k: None):
            pass


def test_hooks_on_one_model_do_not_nest():
    model = _model(0)
    with attention_hook(model, lambda *a, **k: None):
        with pytest.raises(RuntimeError, match="already inside an attention_hook block"):
            with attention_hook(model, lambda *a, **k: None):
                pass
    assert not any(hasattr(m, "_sparse_attn_hook") for m in model.modules())
