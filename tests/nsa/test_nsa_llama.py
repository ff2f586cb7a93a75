"""convert_llama: a tiny random Llama with NSA attention starts near the dense model when every block
fits the selection, keeps the dense projections, trains (the loss falls on a repeated batch and every
NSA parameter gets a gradient), refuses decoding with a filled KV cache and bad layer indices."""

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


def test_decoding_with_cache_and_bad_layers_raise():
    model = convert_llama(tiny_llama(64), CONFIG, backend="reference")
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="decoding"):
            model(ids[:, :1], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="layers must hold layer indices"):
        convert_llama(tiny_llama(64), CONFIG, layers=[5])
