"""convert_llama: a tiny random Llama with NSA attention starts near the dense model when every block
fits the selection, keeps the dense projections, trains (the loss falls on a repeated batch and every
NSA parameter gets a gradient), decodes through the KV cache exactly as full passes do, refuses
padding masks and bad layer indices."""

import copy

import pytest
import torch

from sparse_attn.nsa import NSAConfig, NSALlamaAttention, convert_llama, nsa_parameters
from utils import tiny_llama

CONFIG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32,
                   window_block=16)


def test_starts_near_dense_and_keeps_projections():
    model = tiny_llama(64)
    ids = torch.randint(0, 64, (2, 60))  # 4 selection blocks: the selected branch reads every key
    with torch.no_grad():
        dense = model(ids).logits
        converted = convert_llama(copy.deepcopy(model), CONFIG, backend="reference")
        logits = converted(ids).logits
    assert float((logits - dense).norm() / dense.norm()) < 0.03
    layer = converted.model.layers[0].self_attn
    assert isinstance(layer, NSALlamaAttention)
    torch.testing.assert_close(layer.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_training_steps_lower_the_loss():
    model = convert_llama(tiny_llama(64), CONFIG.replace(select_blocks=3), layers=[1], backend="reference")
    assert not isinstance(model.model.layers[0].self_attn, NSALlamaAttention)
    model.train()
    ids = torch.randint(0, 64, (2, 90))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < losses[0] - 0.1
    params = nsa_parameters(model)
    assert len(params) == 12 and all(p.grad is not None and p.grad.norm() > 0 for p in params)


def _randomized(model):
    """NSA parameters made random (the default init zeroes the compression MLPs' outputs and the gate
    weights), so every branch and the selection matter."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in nsa_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_generate_with_the_kv_cache_equals_recomputing_the_whole_sequence():
    """Greedy decoding through the KV cache (one query per step, past a few selection blocks) picks
    the tokens that full forward passes over the growing sequence pick, with the same logits."""
    model = _randomized(convert_llama(tiny_llama(64), CONFIG, backend="reference"))
    ids = torch.randint(1, 64, (2, 37), generator=torch.Generator().manual_seed(0))  # no pad token (0)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
        uncached = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0,
                                  use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)


def test_sequences_packed_in_one_row_attend_each_within_itself():
    """position_ids restarting at 0 (transformers' DataCollatorWithFlattening) split the row into
    sequences: the packed logits equal each sequence's own, and the loss trains through them."""
    model = _randomized(convert_llama(tiny_llama(64), CONFIG, backend="reference"))
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randint(1, 64, (1, 40), generator=gen), torch.randint(1, 64, (1, 27), generator=gen)
    packed = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(40), torch.arange(27)])[None]
    with torch.no_grad():
        got = model(packed, position_ids=positions).logits
        want = torch.cat([model(first).logits, model(second).logits], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    model(packed, position_ids=positions, labels=packed).loss.backward()
    assert all(p.grad is not None for p in nsa_parameters(model))
    padded = torch.ones_like(packed)
    padded[0, :3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="mask of a packed row"):
        model(packed, position_ids=positions, attention_mask=padded)


def test_padding_masks_and_bad_layers_raise():
    model = convert_llama(tiny_llama(64), CONFIG, backend="reference")
    ids = torch.randint(0, 64, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="attention mask with padding"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="layers must hold layer indices"):
        convert_llama(tiny_llama(64), CONFIG, layers=[5])


def test_a_saved_nsa_model_loads_with_its_nsa_parameters(tmp_path):
    from sparse_attn.nsa import is_nsa_model, load_nsa_model, save_nsa_model

    model = _randomized(convert_llama(tiny_llama(64), CONFIG, layers=[1], backend="reference"))
    ids = torch.randint(1, 64, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    save_nsa_model(model, tmp_path / "nsa")
    assert is_nsa_model(tmp_path / "nsa") and not is_nsa_model(tmp_path)
    loaded = load_nsa_model(tmp_path / "nsa", backend="reference")
    assert isinstance(loaded.model.layers[1].self_attn, NSALlamaAttention)
    assert not isinstance(loaded.model.layers[0].self_attn, NSALlamaAttention)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want)
    with pytest.raises(ValueError, match="no NSA attention layer"):
        save_nsa_model(tiny_llama(64), tmp_path / "dense")
    with pytest.raises(ValueError, match="has no nsa.json"):
        load_nsa_model(tmp_path)


def test_static_caches_and_patching_an_nsa_model_are_refused():
    import sparse_attn
    from transformers import StaticCache

    model = convert_llama(tiny_llama(64), CONFIG, backend="reference")
    ids = torch.randint(1, 64, (1, 20))
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad(), pytest.raises(ValueError, match="decodes with a DynamicCache"):
        model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="attend with their own module .*NSALlamaAttention"):
        sparse_attn.patch(model, method="xattention")
