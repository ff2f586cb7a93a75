"""Page-index decode inside a compiled decoding forward (static cache, torch.compile), on CPU.

The compiled forward uses the ``aot_eager`` backend with ``fullgraph=True``: a graph break (the
general attention path) would raise, so these tests show the decode step stays in the graph.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import patch, unpatch  # noqa: E402
from sparse_attn.decode import PageIndex, PageSelection, decode_attention  # noqa: E402
from sparse_attn.integrations.hf.graph_decode import graph_decode_plans, page_decode_step  # noqa: E402

from utils import tiny_llama  # noqa: E402

VOCAB = 96
GEN = dict(do_sample=False, pad_token_id=0)
PREFILL = dict(method="dense", block_size=16, min_kv_len=0, fallback="never")
SMALL = {"page": 16, "sink": 16, "recent": 16}  # a budget of a few pages (the default sink and recent take 8)


def _ids(length=150, batch=1, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _compiled_config(fullgraph=True):
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=fullgraph, backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB)


@pytest.mark.parametrize("decode", [
    {"method": "quest", "budget": 48, **SMALL},
    {"method": "quest", "budget": 64, "bounds": "int8", **SMALL},
    {"method": "pooled", "budget": 48, **SMALL},
    {"method": "quest", "budget": 48, "streaming_heads": {0: [1]}, "full_heads": {1: [0]}, **SMALL},
], ids=["quest", "quest-int8", "pooled", "head-policies"])
def test_compiled_static_generate_gives_the_eager_tokens(model, decode):
    torch._dynamo.reset()
    ids = _ids()
    state = patch(model, decode=decode, **PREFILL)
    try:
        assert sorted(state.graph_plans) == [0, 1]
        eager = model.generate(ids, max_new_tokens=10, cache_implementation="static", disable_compile=True, **GEN)
        compiled = model.generate(ids, max_new_tokens=10, cache_implementation="static",
                                  compile_config=_compiled_config(), **GEN)
        # Compiled steps left the host's count of the index's tokens unknown (the general path would rebuild).
        assert all(state.index_lengths[layer] == -1 for layer in (0, 1))
        assert torch.equal(compiled, eager)
        # A second generate() (new prefill, same static cache shape) reuses the index's tensors.
        kmin = state.page_indexes[0].kmin
        again = model.generate(_ids(seed=5), max_new_tokens=6, cache_implementation="static",
                               compile_config=_compiled_config(), **GEN)
        assert state.page_indexes[0].kmin is kmin
        # The prefill set the host's count again; the compiled steps that followed marked it unknown.
        assert all(state.index_lengths[layer] == -1 for layer in (0, 1))
        want = model.generate(_ids(seed=5), max_new_tokens=6, cache_implementation="static", disable_compile=True,
                              **GEN)
        assert torch.equal(again, want)
    finally:
        unpatch(model)
        torch._dynamo.reset()


def test_compiled_batch_of_two_gives_the_eager_tokens(model):
    """Two prompts of one length in one static cache (no padding): each sequence appends and selects
    on its own in the compiled step."""
    torch._dynamo.reset()
    ids = _ids(160, batch=2, seed=7)
    patch(model, decode={"method": "quest", "budget": 48, **SMALL}, **PREFILL)
    try:
        eager = model.generate(ids, max_new_tokens=8, cache_implementation="static", disable_compile=True, **GEN)
        compiled = model.generate(ids, max_new_tokens=8, cache_implementation="static",
                                  compile_config=_compiled_config(), **GEN)
        assert torch.equal(compiled, eager)
    finally:
        unpatch(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("short", [1, 5])
def test_short_prompt_through_a_forward_compiled_by_hand_starts_the_index_afresh(model, short):
    """The forward compiled by hand (as transformers' docs show for static caches), then a short
    prompt after a longer sequence: a one-token prompt prefills through the compiled step, whose
    position (0) sets the index back; a longer one runs the general path. Either way the tokens
    equal the uncompiled ones."""
    torch._dynamo.reset()
    state = patch(model, decode={"method": "quest", "budget": 48, **SMALL}, **PREFILL)
    forward = model.forward
    try:
        long_ids, short_ids = _ids(150), _ids(short, seed=9)
        want_long = model.generate(long_ids, max_new_tokens=6, cache_implementation="static", **GEN)
        want_short = model.generate(short_ids, max_new_tokens=40, cache_implementation="static", **GEN)
        model.forward = torch.compile(forward, backend="aot_eager")
        got_long = model.generate(long_ids, max_new_tokens=6, cache_implementation="static", disable_compile=True,
                                  **GEN)
        index = state.page_indexes[0]
        got_short = model.generate(short_ids, max_new_tokens=40, cache_implementation="static",
                                   disable_compile=True, **GEN)
        assert torch.equal(got_long, want_long) and torch.equal(got_short, want_short)
        if short == 1:
            assert state.page_indexes[0] is index  # the prompt ran through the compiled step
    finally:
        model.forward = forward
        unpatch(model)
        torch._dynamo.reset()


def test_assisted_decoding_that_sets_the_cache_back_gives_the_eager_tokens(model):
    """Prompt-lookup decoding with a static cache: transformers verifies several candidate tokens
    per forward and crops the cache back (often within a page); the compiled one-token steps that
    follow rebuild the page from the cache (PageIndex.append_at), so the tokens equal the eager ones."""
    from transformers import StaticCache

    torch._dynamo.reset()
    patch(model, decode={"method": "pooled", "budget": 80, **SMALL}, **PREFILL)
    try:
        ids = torch.randint(1, 24, (1, 12), generator=torch.Generator().manual_seed(2)).repeat(1, 13)[:, :150]
        run = dict(max_new_tokens=40, prompt_lookup_num_tokens=4, **GEN)
        eager = model.generate(ids, disable_compile=True,
                               past_key_values=StaticCache(config=model.config, max_cache_len=256), **run)
        compiled = model.generate(ids, compile_config=_compiled_config(fullgraph=False),
                                  past_key_values=StaticCache(config=model.config, max_cache_len=256), **run)
        assert torch.equal(compiled, eager)
    finally:
        unpatch(model)
        torch._dynamo.reset()


def test_compiled_steps_match_sparse_decode_and_differ_from_dense(model):
    """A budget far below the cache: the compiled sparse tokens equal the eager sparse ones, and the
    logits differ from dense decode's (the selection really drops pages)."""
    torch._dynamo.reset()
    ids = _ids(300)
    dense = model.generate(ids, max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GEN)
    state = patch(model, decode={"method": "quest", "budget": 32, "page": 16, "sink": 0, "recent": 16},
                  **PREFILL)
    try:
        eager = model.generate(ids, max_new_tokens=6, cache_implementation="static", disable_compile=True,
                               output_logits=True, return_dict_in_generate=True, **GEN)
        compiled = model.generate(ids, max_new_tokens=6, cache_implementation="static",
                                  compile_config=_compiled_config(), output_logits=True,
                                  return_dict_in_generate=True, **GEN)
        for got, want in zip(compiled.logits[1:], eager.logits[1:]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(compiled.logits[1:], dense.logits[1:]))
        assert state.graph_plans
    finally:
        unpatch(model)
        torch._dynamo.reset()


def test_general_path_after_compiled_steps_rebuilds_the_index(model):
    torch._dynamo.reset()
    ids = _ids()
    state = patch(model, decode={"method": "quest", "budget": 48, **SMALL}, **PREFILL)
    try:
        out = model.generate(ids, max_new_tokens=5, cache_implementation="static", compile_config=_compiled_config(),
                             return_dict_in_generate=True, **GEN)
        builds = dict(state.index_builds)
        cache = out.past_key_values
        token = out.sequences[:, -1:]
        position = torch.tensor([out.sequences.shape[1] - 1])
        eager_logits = model(token, past_key_values=cache, cache_position=position).logits
        assert all(state.index_builds[layer] == builds[layer] + 1 for layer in (0, 1))
        assert all(state.index_lengths[layer] == out.sequences.shape[1] for layer in (0, 1))
        # The rebuilt index equals one built from the cache's keys.
        keys = cache.layers[0].keys[:, :, :out.sequences.shape[1]]
        fresh = PageIndex.build(keys, page_size=16)
        index = state.page_indexes[0]
        pages = fresh.max_pages
        assert torch.equal(index.lengths, fresh.lengths)
        assert torch.equal(index.kmin[:, :, :pages], fresh.kmin) and torch.equal(index.kmax[:, :, :pages], fresh.kmax)
        assert torch.isfinite(eager_logits).all()
    finally:
        unpatch(model)
        torch._dynamo.reset()


@pytest.mark.parametrize("bounds", ["exact", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_page_decode_step_appends_at_each_sequence_length(bounds, rows):
    """Two sequences of different lengths in one static cache: the op appends each one's new keys at
    its own length, then selects and attends as the public calls do."""
    torch.manual_seed(3)
    batch, heads, kv_heads, positions, dim, page = 2, 4, 2, 160, 16, 16
    lengths = torch.tensor([37, 121])
    k = torch.randn(batch, kv_heads, positions, dim)
    v = torch.randn(batch, kv_heads, positions, dim)
    q = torch.randn(batch, heads, rows, dim)
    index = PageIndex.build(k, page_size=page, lengths=lengths, capacity=positions, bounds=bounds)
    want_index = PageIndex.build(k, page_size=page, lengths=lengths, capacity=positions, bounds=bounds)
    new = torch.stack([k[b, :, int(lengths[b]):int(lengths[b]) + rows] for b in range(batch)])
    want_index.append(new)
    selection = PageSelection(method="quest", budget=64, sink=16, recent=16, scale=dim ** -0.5)
    pages, counts = selection(q, want_index)
    want = decode_attention(q, k, v, pages, counts, want_index.lengths, page_size=page, scale=dim ** -0.5)

    got = page_decode_step(q, k, v, index.kmin, index.kmax, index.ksum, index.lengths, index.qmin, index.qmax,
                           index.qscale, None, page, positions, "quest", 64, 16, 16, dim ** -0.5, [], [])
    assert torch.equal(index.lengths, lengths + rows)
    for name in ("kmin", "kmax", "ksum", "qmin", "qmax", "qscale"):
        if getattr(index, name) is not None:
            assert torch.equal(getattr(index, name), getattr(want_index, name)), name
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_plans_cover_only_what_the_compiled_path_runs(model):
    cases = [
        (dict(decode={"method": "quest", "budget": 48, **SMALL}), [0, 1]),
        (dict(decode={"method": "quest", "budget": 48, **SMALL}, record=True), []),  # records read the device
        (dict(decode={"method": "sink_window", "budget": 48, **SMALL}), [0, 1]),
        (dict(decode={"method": "quest", "budget": 48, "select_layers": [0], **SMALL}), []),
        (dict(decode={"method": "quest", "budget": 48, "streaming_heads": {1: [0]}, **SMALL}), [0, 1]),
        (dict(decode={"method": "quest", "budget": 48, "per_layer": {0: {"method": "dense"}}, **SMALL}), [1]),
    ]
    for settings, layers in cases:
        state = patch(model, **{**PREFILL, **settings})
        try:
            assert sorted(state.graph_plans) == layers, settings
            assert graph_decode_plans(state.config, 2) == state.graph_plans
        finally:
            unpatch(model)
    state = patch(model, **PREFILL)  # no sparse decode: no plans
    unpatch(model)
    assert state.graph_plans == {}


def test_index_copy_keeps_tensors_and_checks_geometry():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 80, 16)
    index = PageIndex.build(k[:, :, :40], page_size=16, capacity=80, bounds="int8")
    kmin = index.kmin
    other = PageIndex.build(k, page_size=16, capacity=80, bounds="int8")
    assert index.copy_(other) is index and index.kmin is kmin
    for name in ("kmin", "kmax", "ksum", "lengths", "qmin", "qmax", "qscale"):
        assert torch.equal(getattr(index, name), getattr(other, name))
    with pytest.raises(ValueError, match="geometry"):
        index.copy_(PageIndex.build(k, page_size=16, capacity=96, bounds="int8"))
    with pytest.raises(ValueError, match="geometry"):
        index.copy_(PageIndex.build(k, page_size=16, capacity=80))  # exact bounds into an int8 index


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bounds", ["exact", "int8"])
def test_gpu_compiled_generate_runs_the_decode_step_in_the_graph(bounds):
    """transformers' own compile of a static cache's decoding forward (inductor, CUDA graphs) with the
    Triton decode kernels (head dim 64, bfloat16): every decode step goes through the compiled path,
    and the tokens agree with the same patched model decoding uncompiled (rounding may flip a random
    model's near-uniform logits)."""
    torch._dynamo.reset()
    model = tiny_llama(VOCAB, hidden_size=256, intermediate_size=384).to("cuda", torch.bfloat16)
    ids = _ids(600).to("cuda")
    state = patch(model, decode={"method": "quest", "budget": 128, "bounds": bounds, **SMALL}, **PREFILL)
    try:
        eager = model.generate(ids, max_new_tokens=16, cache_implementation="static", disable_compile=True, **GEN)
        compiled = model.generate(ids, max_new_tokens=16, cache_implementation="static", **GEN)
        assert all(state.index_lengths[layer] == -1 for layer in (0, 1))
        assert compiled.shape == eager.shape
        assert (compiled == eager).float().mean() > 0.9
    finally:
        unpatch(model)
        torch._dynamo.reset()
