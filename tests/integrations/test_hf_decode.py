"""Page-index decode through the transformers integration (tiny random-weight Llama, CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import patch, unpatch  # noqa: E402
from sparse_attn.integrations.hf import SparseConfig  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
PREFILL = dict(method="dense", block_size=16, min_kv_len=0, fallback="never", record=True)
GEN = dict(do_sample=False, pad_token_id=0)


def _tiny():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON),
                                                          attn_implementation="sdpa")
    return model.float().eval()


def _ids(length=200, batch=1, seed=1):
    return torch.randint(1, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode_records(state):
    return [r for r in state.records if r["q_len"] == 1]


@pytest.fixture(scope="module")
def model_and_dense():
    model = _tiny()
    ids = _ids()
    return model, ids, model.generate(ids, max_new_tokens=8, **GEN)


def test_budget_covering_the_cache_matches_dense_tokens(model_and_dense):
    model, ids, want = model_and_dense
    state = patch(model, decode={"method": "quest", "budget": 2048}, **PREFILL)
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=8, **GEN), want)
        decode = _decode_records(state)
        assert decode and all(not r["sparse"] and "covers" in r["reason"] for r in decode)
        # Every page selected (193 tokens round up to 13 pages = 208 >= every cache length here):
        # the page path itself runs and must give the dense tokens.
        state = patch(model, decode={"method": "quest", "budget": 193, "page": 16, "sink": 16, "recent": 16},
                      **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=8, **GEN), want)
        decode = _decode_records(state)
        assert decode and all(r["sparse"] and r["density"] == 1.0 for r in decode)
    finally:
        unpatch(model)


@pytest.mark.parametrize("method", ["quest", "pooled", "sink_window"])
def test_small_budget_decodes_sparse_and_the_index_grows_by_appends(model_and_dense, method):
    model, ids, want = model_and_dense
    new = 8
    state = patch(model, decode={"method": method, "budget": 64, "page": 16, "sink": 16, "recent": 16}, **PREFILL)
    try:
        got = model.generate(ids, max_new_tokens=new, **GEN)
        assert got.shape == want.shape
        decode = _decode_records(state)
        assert len(decode) == COMMON["num_hidden_layers"] * (new - 1)
        assert all(r["sparse"] and 0 < r["density"] < 1 and r["estimate_ms"] >= 0 for r in decode)
        assert sorted({r["kv_len"] for r in decode}) == list(range(201, 200 + new))
        final = ids.shape[1] + new - 1  # the last generated token is never fed back
        for layer in range(COMMON["num_hidden_layers"]):
            index = state.page_indexes[layer]
            assert state.index_builds[layer] == 1  # built once at prefill, appended at every step
            assert index.lengths.tolist() == [final] and index.page_size == 16
        summary = state.summary()
        assert all(s["density"] < 1 for s in summary)
    finally:
        unpatch(model)


def _tiny_gpt_neox():
    """A GPT-NeoX, whose attention takes the cache as ``layer_past``."""
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=1024)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def _assert_indexes_describe(state, cache, layers, length):
    """Every layer's page index holds the summaries of the cache's own keys, ``length`` of them."""
    from sparse_attn.decode import PageIndex

    for layer in layers:
        index = state.page_indexes[layer]
        keys = cache.layers[layer].keys
        own = PageIndex.build(keys[:, :, :length], index.page_size, capacity=index.capacity)
        pages = -(-length // index.page_size)
        assert index.lengths.tolist() == [length] * keys.shape[0]
        for name in ("kmax", "kmin", "ksum"):
            torch.testing.assert_close(getattr(index, name)[:, :, :pages], getattr(own, name)[:, :, :pages],
                                       msg=f"layer {layer} {name}")


DECODE = dict(decode={"method": "quest", "budget": 48, "page": 16, "sink": 16, "recent": 16}, **PREFILL)


@pytest.mark.parametrize("make", [_tiny, _tiny_gpt_neox], ids=["llama", "gpt_neox"])
def test_two_caches_decoded_in_turn_keep_their_own_page_indexes(make):
    """Two conversations through one patched model, each with its own DynamicCache: after B's
    prefill, a decode step of A (11 tokens longer than B, near enough to have been appended to B's
    index) rebuilds A's index from A's cache and gives the logits of a model that saw only A; also
    where the model passes the cache as ``layer_past`` (GPT-NeoX)."""
    model = make()
    ids_a, ids_b = _ids(210, seed=2), _ids(199, seed=3)
    layers = range(model.config.num_hidden_layers)
    try:
        patch(model, **DECODE)
        alone = transformers.DynamicCache()
        with torch.no_grad():
            token = model(ids_a, past_key_values=alone, use_cache=True).logits[:, -1:].argmax(-1)
            want = model(token, past_key_values=alone, use_cache=True).logits

        state = patch(model, **DECODE)
        cache_a, cache_b = transformers.DynamicCache(), transformers.DynamicCache()
        with torch.no_grad():
            model(ids_a, past_key_values=cache_a, use_cache=True)
            model(ids_b, past_key_values=cache_b, use_cache=True)
            assert all(state.index_lengths[layer] == 199 for layer in layers)
            got = model(token, past_key_values=cache_a, use_cache=True).logits
        torch.testing.assert_close(got, want)
        assert all(state.index_builds[layer] == 3 for layer in layers)  # A, B, A again
        _assert_indexes_describe(state, cache_a, layers, 211)
        decode = _decode_records(state)
        assert decode and all(r["sparse"] and r["density"] < 1 for r in decode)
    finally:
        unpatch(model)
    assert not any(module._forward_pre_hooks for module in model.modules())  # unpatch removes the hooks


def _patched_after_prefill(batch: int):
    """A tiny Llama patched with DECODE after a 200-token prefill of ``batch`` rows into a
    DynamicCache: ``(model, layers, state, cache)``."""
    model = _tiny()
    state = patch(model, **DECODE)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(_ids(200, batch=batch), past_key_values=cache, use_cache=True)
    return model, range(COMMON["num_hidden_layers"]), state, cache


def test_assisted_decoding_crops_set_the_index_back():
    """Verification steps of several candidate tokens, the cache cropped after each to the accepted
    ones (as assisted and prompt-lookup decoding do): the next step, whether it ends at, below or past
    the index's old length, leaves every layer's index equal to one built from the cache, with no
    summary of a rejected candidate's key, and no rebuild of the whole index."""
    model, layers, state, cache = _patched_after_prefill(batch=1)
    try:
        with torch.no_grad():
            length = 200
            for candidates, accepted in ((4, 1), (3, 0), (2, 0), (6, 2), (1, 0), (5, 1)):
                model(_ids(candidates, seed=length), past_key_values=cache, use_cache=True)
                _assert_indexes_describe(state, cache, layers, length + candidates)
                rejected = candidates - accepted - 1  # kept: the accepted ones and the model's own next token
                length += accepted + 1
                if rejected:
                    cache.crop(-rejected)  # a negative crop removes that many tokens (every transformers 5)
        assert all(state.index_builds[layer] == 1 for layer in layers)
    finally:
        unpatch(model)


def test_beam_search_reordering_rebuilds_the_index_from_the_reordered_rows():
    """A cache whose rows were reordered (beam search) between steps: the next step's index describes
    the reordered rows, and generate() with beams runs."""
    model, layers, state, cache = _patched_after_prefill(batch=3)
    try:
        with torch.no_grad():
            cache.reorder_cache(torch.tensor([2, 2, 0]))
            model(_ids(1, batch=3, seed=9), past_key_values=cache, use_cache=True)
        _assert_indexes_describe(state, cache, layers, 201)
        assert all(state.index_builds[layer] == 2 for layer in layers)
        out = model.generate(_ids(200), max_new_tokens=6, num_beams=3, **GEN)
        assert out.shape == (1, 206)
    finally:
        unpatch(model)


def test_planted_page_gives_the_dense_next_token():
    # One page of keys equal to a planted direction the queries share: attention concentrates there.
    torch.manual_seed(0)
    from sparse_attn.integrations.hf.patching import sparse_attention_forward

    model = _tiny()
    attn = model.model.layers[0].self_attn
    B, H, Hkv, D, S = 1, 4, 2, 16, 256
    k = torch.randn(B, Hkv, S, D) * 0.1
    v = torch.randn(B, Hkv, S, D)
    q = torch.randn(B, H, 1, D) * 0.1
    direction = torch.randn(D)
    q[..., :] += 4 * direction
    k[:, :, 96:112] += 4 * direction
    state = patch(model, decode={"method": "quest", "budget": 48, "page": 16, "sink": 16, "recent": 16}, **PREFILL)
    try:
        got, _ = sparse_attention_forward(attn, q, k, v, None, scaling=D ** -0.5)
        assert state.records[-1]["sparse"] and state.records[-1]["density"] < 0.2
        unpatch(model)
        scores = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * D ** -0.5, -1)
        want = (scores @ v.repeat_interleave(2, 1)).transpose(1, 2)
        assert torch.allclose(got, want, atol=1e-2), (got - want).abs().max()
    finally:
        unpatch(model)


def test_padded_batch_falls_back_to_dense_with_the_reason():
    model = _tiny()
    ids = _ids(length=100, batch=2)
    ids[0, :6] = 0
    kwargs = dict(attention_mask=(ids != 0).long(), max_new_tokens=4, **GEN)
    want = model.generate(ids, **kwargs)
    state = patch(model, decode={"method": "quest", "budget": 32, "page": 16, "sink": 0, "recent": 16}, **PREFILL)
    assert torch.equal(model.generate(ids, **kwargs), want)
    decode = _decode_records(state)
    assert decode and all(not r["sparse"] and "not plain causal" in r["reason"] for r in decode)
    assert not state.page_indexes


@pytest.mark.parametrize("decode,knob", [
    ({"method": "quest", "budget": 8, "page": 16}, "budget=8"),
    ({"method": "quest", "budget": 2048, "page": 24}, "page=24"),
    ({"method": "quest", "budget": 2048, "page": 512}, "page=512"),
    ({"method": "nope", "budget": 2048}, "method='nope'"),
    ({"method": "quest", "budget": 2048, "sink": -1}, "sink=-1"),
    ({"method": "quest", "budget": 2048, "recent": -4}, "recent=-4"),
    ({"method": "quest", "budget": 2048, "pages": 16}, "'pages'"),
])
def test_bad_knobs_raise_naming_the_knob(decode, knob):
    with pytest.raises(ValueError, match="decode") as err:
        SparseConfig(decode=decode)
    assert knob in str(err.value)
    with pytest.raises(ValueError) as err:
        patch(_tiny(), decode=decode, **PREFILL)
    assert knob in str(err.value)


def test_the_old_decode_method_form_still_works():
    config = SparseConfig(decode={"method": "quest", "top_k": 32})
    assert config._decode_method.name == "quest" and config._decode_pages is None


def test_unpatch_drops_the_indexes_and_restores_dense_decoding(model_and_dense):
    model, ids, want = model_and_dense
    state = patch(model, decode={"method": "sink_window", "budget": 48, "page": 16, "sink": 16, "recent": 16},
                  **PREFILL)
    model.generate(ids, max_new_tokens=8, **GEN)
    assert state.page_indexes
    unpatch(model)
    assert not state.page_indexes and model.config._attn_implementation == "sdpa"
    assert torch.equal(model.generate(ids, max_new_tokens=8, **GEN), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_static_cache_generate_compiles_around_the_sparse_decode():
    """On a GPU, generate() with a static cache compiles the decoding forward (transformers'
    automatic torch.compile); with records on, the sparse attention runs outside the compiled graphs
    (the compiled path, without records, is tested in test_graph_decode.py). In float32
    (decode through the PyTorch reference) it gives the tokens of the same patched model decoding
    with a dynamic cache, uncompiled; in bfloat16 (the Triton kernels) every decode step runs
    sparse and the tokens agree but for rounding flips of a random model's near-uniform logits."""
    ids = _ids(length=600).to("cuda")
    decode = {"method": "quest", "budget": 128, "page": 16, "sink": 16, "recent": 16}
    for dtype in (torch.float32, torch.bfloat16):
        model = _tiny().to("cuda", dtype)
        state = patch(model, decode=decode, **PREFILL)
        try:
            dynamic = model.generate(ids, max_new_tokens=12, **GEN)
            state.records.clear()
            static = model.generate(ids, max_new_tokens=12, cache_implementation="static", **GEN)
            decode_steps = [r for r in state.records if r["q_len"] == 1]
            assert len(decode_steps) == 11 * COMMON["num_hidden_layers"] and all(r["sparse"] for r in decode_steps)
            assert static.shape == dynamic.shape
            if dtype == torch.float32:
                assert torch.equal(static, dynamic)
            else:
                assert (static == dynamic).float().mean() > 0.9
        finally:
            unpatch(model)
