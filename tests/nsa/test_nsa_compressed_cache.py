"""CompressedKVCache: NSA's compressed keys and values kept beside a growing KV cache equal compressing
the whole cache at every length, compress only the new blocks, start over when the parameters, shapes
or length say the kept blocks are stale; convert_llama's layers keep one per transformers cache and
decode (greedy and beam search, which reorders the cache) as full passes do."""

import pytest
import torch

from sparse_attn.nsa import CompressedKVCache, NSAAttention, NSAConfig, convert_llama, nsa_parameters
from sparse_attn.nsa import compressed_cache as compressed_cache_module
from sparse_attn.nsa.compressed import compressed_branch
from sparse_attn.nsa.reference import compress_kv
from utils import tiny_llama

CONFIG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32,
                   window_block=16)


def _attention(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    attn = NSAAttention(CONFIG, num_heads=4, num_kv_heads=2, head_dim=8).to(dtype)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return attn


def _compressed_calls(monkeypatch):
    """Token counts of every compress_kv call the cache makes."""
    calls = []

    def counting(x, params, which, config):
        calls.append(x.shape[2])
        return compress_kv(x, params, which, config)

    monkeypatch.setattr(compressed_cache_module, "compress_kv", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_growing_one_token_at_a_time_equals_compressing_the_whole_cache(dtype, monkeypatch):
    attn = _attention(dtype=dtype)
    params = attn.nsa_params()
    k, v = (torch.randn(2, 2, 70, 8, dtype=dtype) for _ in range(2))
    cache = CompressedKVCache(CONFIG)
    calls = _compressed_calls(monkeypatch)
    for seq in [20, *range(21, 71)]:  # a prefill of 20 tokens, then one token per step
        kc, vc = cache.update(k[:, :, :seq], v[:, :, :seq], params)
        cast = {name: p.to(dtype) for name, p in params.items()}
        torch.testing.assert_close(kc, compress_kv(k[:, :, :seq], cast, "k", CONFIG), rtol=0, atol=0)
        torch.testing.assert_close(vc, compress_kv(v[:, :, :seq], cast, "v", CONFIG), rtol=0, atol=0)
    assert cache.num_blocks == (70 - 16) // 8 + 1
    # Only new blocks are compressed: the prefill's one block, then one block (l = 16 tokens) for k and
    # v whenever a step completes one (every d = 8 tokens: at 24, 32, ..., 64 tokens).
    assert calls == [16] * 2 * (1 + 6)


def test_changed_parameters_shrunk_caches_and_new_shapes_start_over():
    attn = _attention()
    k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64) for _ in range(2))
    cache = CompressedKVCache(CONFIG)
    cache.update(k[:, :, :48], v[:, :, :48], attn.nsa_params())
    with torch.no_grad():  # an optimizer step changes the parameters in place
        attn.k_fc2_weight.add_(1.0)
    kc, _ = cache.update(k[:, :, :56], v[:, :, :56], attn.nsa_params())
    torch.testing.assert_close(kc, compress_kv(k[:, :, :56], attn.nsa_params(), "k", CONFIG))
    k2, v2 = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(2))
    kc, vc = cache.update(k2, v2, attn.nsa_params())  # shorter than what was kept: a new sequence
    torch.testing.assert_close(vc, compress_kv(v2, attn.nsa_params(), "v", CONFIG))
    k3, v3 = (torch.randn(3, 2, 40, 8, dtype=torch.float64) for _ in range(2))
    kc, _ = cache.update(k3, v3, attn.nsa_params())  # another batch size
    torch.testing.assert_close(kc, compress_kv(k3, attn.nsa_params(), "k", CONFIG))
    cache.reset()
    assert cache.num_blocks == 0
    kc, _ = cache.update(k[:, :, :10], v[:, :, :10], attn.nsa_params())  # shorter than one block
    assert kc.shape == (1, 2, 0, 8)


def test_bad_inputs_raise_naming_the_argument():
    cache = CompressedKVCache(CONFIG)
    params = _attention().nsa_params()
    with pytest.raises(ValueError, match="k must be a 4-D tensor"):
        cache.update(torch.zeros(2, 16, 8), torch.zeros(2, 16, 8), params)
    with pytest.raises(ValueError, match="k and v must have one shape"):
        cache.update(torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 24, 8), params)
    with pytest.raises(TypeError, match="config must be an NSAConfig"):
        CompressedKVCache({"compress_block": 16})
    q, k, v = torch.zeros(1, 4, 1, 8), torch.zeros(1, 2, 40, 8), torch.zeros(1, 2, 40, 8)
    with pytest.raises(ValueError, match=r"compressed kc must have shape \(1, 2, 4, 8\)"):
        compressed_branch(q, k, v, params, CONFIG, 1.0, compressed=(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 4, 8)))


def test_module_decode_steps_with_kept_compression_equal_recomputing():
    attn = _attention()
    q = torch.randn(1, 4, 90, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 90, 8, dtype=torch.float64) for _ in range(2))
    cache = CompressedKVCache(CONFIG)
    for seq in range(60, 90):
        args = (q[:, :, seq - 1:seq], k[:, :, :seq], v[:, :, :seq])
        kept = attn(*args, backend="reference", compressed_kv=cache.update(k[:, :, :seq], v[:, :, :seq],
                                                                             attn.nsa_params()))
        torch.testing.assert_close(kept, attn(*args, backend="reference"))


def _randomized(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in nsa_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_keeps_the_compression_and_equals_full_passes(beams, monkeypatch):
    """Greedy and beam-search decoding (beam search reorders the cache's rows every step) through the
    kept compression pick the tokens full passes pick; decode steps compress only new blocks."""
    model = _randomized(convert_llama(tiny_llama(64), CONFIG, backend="reference"))
    ids = torch.randint(1, 64, (2, 37), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, num_beams=beams,
                   output_scores=True, return_dict_in_generate=True)
    calls = _compressed_calls(monkeypatch)
    with torch.no_grad():
        cached = model.generate(ids, **options)
        decode_calls = list(calls)
        uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)
    layers = len(model.model.layers)
    if beams == 1:
        # k and v of every layer: the prefill's 3 blocks (32 tokens), then one block (16 tokens) at 40,
        # 48 and 56 tokens.
        assert decode_calls == [32] * 2 * layers + [16] * 2 * layers * 3
    else:  # the reordered cache is compressed again
        assert max(decode_calls[2 * layers:]) > CONFIG.compress_block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_steps_with_kept_compression_equal_recomputing_at_a_long_cache():
    """32 query heads, 8 KV heads, head dim 128, bf16, a cache growing from 4090 to 4130 tokens: the
    kept compression matches compressing the whole cache (to bf16 rounding: the MLP's matrix products
    run on other shapes) and, on the same selection, the decode steps' outputs agree."""
    config = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_blocks=8, window=256)
    torch.manual_seed(0)
    attn = NSAAttention(config, num_heads=32, num_kv_heads=8, head_dim=128)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    attn = attn.to("cuda", torch.bfloat16)
    q = torch.randn(2, 32, 4130, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 4130, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cache = CompressedKVCache(config)
    with torch.no_grad():
        for seq in range(4090, 4131, 5):
            kc, vc = cache.update(k[:, :, :seq], v[:, :, :seq], attn.nsa_params())
            whole = compress_kv(k[:, :, :seq], attn.nsa_params(), "k", config)
            torch.testing.assert_close(kc, whole, rtol=2e-2, atol=2e-2)
            args = (q[:, :, seq - 1:seq], k[:, :, :seq], v[:, :, :seq])
            want, chosen = attn(*args, return_selection=True)
            got = attn(*args, compressed_kv=(kc, vc), selection=chosen)
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
