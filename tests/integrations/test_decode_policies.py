"""Page-index decode policies through the transformers integration (tiny random-weight Llama, CPU):
a static cache, streaming and full KV heads, per-layer knobs, selections shared across layers and
sampled oracle recall."""

import inspect
import os
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import patch, unpatch
from sparse_attn.integrations.hf import SparseConfig
from sparse_attn.integrations.hf.patching import sparse_attention_forward

COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
PREFILL = {"method": "dense", "block_size": 16, "min_kv_len": 0, "fallback": "never", "record": True}
GEN = {"do_sample": False, "pad_token_id": 0}
SMALL = {"method": "quest", "budget": 64, "page": 16, "sink": 16, "recent": 16}
NEW = 8  # new tokens per generate(); the last one is never fed back, so NEW - 1 decode steps


def _tiny(layers=2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": layers})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


def _ids(length=200, batch=1, seed=1):
    return torch.randint(1, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _decode_records(state, layer=None):
    return [r for r in state.records if r["decode"] and (layer is None or r["layer"] == layer)]


@pytest.fixture(scope="module")
def model_and_dense():
    model = _tiny()
    ids = _ids()
    return model, ids, model.generate(ids, max_new_tokens=NEW, **GEN)


# ---------------------------------------------------------------- planted single steps

B, H, HKV, D, S, P = 1, 4, 2, 16, 256, 16


def _planted(planted_pages=(6, 6), seed=0):
    """One decode step whose queries share a direction that the keys of one page per KV head carry:
    attention concentrates on that page."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, HKV, S, D, generator=gen) * 0.1
    v = torch.randn(B, HKV, S, D, generator=gen)
    q = torch.randn(B, H, 1, D, generator=gen) * 0.1
    direction = torch.randn(D, generator=torch.Generator().manual_seed(100))  # shared by every seed
    q += 4 * direction
    for head, page in enumerate(planted_pages):
        k[:, head, page * P:(page + 1) * P] += 4 * direction
    return q, k, v


def _masked_attention(q, k, v, pages_per_kv_head, length=None):
    """Reference: each query head attends to the tokens of its KV head's pages (below ``length``)."""
    length = k.shape[2] if length is None else length
    k, v = k[:, :, :length], v[:, :, :length]
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
    logits = (q.float() @ kk.transpose(-1, -2)) * D ** -0.5
    keep = torch.zeros(q.shape[1], k.shape[2], dtype=torch.bool)
    for kv_head, pages in enumerate(pages_per_kv_head):
        for page in pages:
            keep[kv_head * group:(kv_head + 1) * group, page * P:(page + 1) * P] = True
    probs = torch.softmax(logits.masked_fill(~keep[None, :, None, :], float("-inf")), -1)
    return (probs @ vv).transpose(1, 2)  # (B, Sq, H, D) like the attention function


ALL = tuple(range(S // P))
SINK_RECENT = (0, S // P - 1)  # sink=16 and recent=16 of 256 tokens: pages 0 and 15


def _step(model, layer, q, k, v, mask=None):
    attn = model.model.layers[layer].self_attn
    return sparse_attention_forward(attn, q, k, v, mask, scaling=D ** -0.5)[0]


@pytest.mark.parametrize("streaming,full,want_pages", [
    ({}, {}, [(0, 6, 15), (0, 6, 15)]),                                 # top-k on both heads
    ({0: [0]}, {}, [SINK_RECENT, (0, 6, 15)]),                          # KV head 0 streaming
    ({}, {0: [1]}, [(0, 6, 15), ALL]),                                   # KV head 1 reads every page
    ({0: [1]}, {0: [0]}, [ALL, SINK_RECENT]),                           # one of each
])
def test_head_policies_read_the_right_pages(streaming, full, want_pages):
    model = _tiny()
    q, k, v = _planted()
    state = patch(model, decode={**SMALL, "budget": 48, "streaming_heads": streaming, "full_heads": full}, **PREFILL)
    try:
        got = _step(model, 0, q, k, v)
        want = _masked_attention(q, k, v, want_pages)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        tokens = sum(len(p) * P for p in want_pages)
        assert state.records[-1]["sparse"] and state.records[-1]["density"] == pytest.approx(tokens / (HKV * S))
    finally:
        unpatch(model)


def test_the_planted_page_is_what_the_streaming_head_misses():
    # The same step with the planted page read (top-k) and not read (streaming) differs on that head.
    model = _tiny()
    q, k, v = _planted()
    patch(model, decode={**SMALL, "budget": 48}, **PREFILL)
    topk = _step(model, 0, q, k, v)
    patch(model, decode={**SMALL, "budget": 48, "streaming_heads": {0: [0, 1]}}, **PREFILL)
    streaming = _step(model, 0, q, k, v)
    unpatch(model)
    dense = _masked_attention(q, k, v, [ALL, ALL])
    assert (topk - dense).abs().max() < 0.05 < (streaming - dense).abs().max()


def test_a_later_layer_reuses_the_selecting_layers_pages():
    # Layer 0's keys carry the planted direction on page 6, layer 1's on page 9. With select_layers=[0]
    # layer 1 reads page 6 (layer 0's selection) of its own cache; without, page 9.
    model = _tiny()
    q, k0, v0 = _planted((6, 6))
    _, k1, v1 = _planted((9, 9), seed=1)
    for select, layer1_pages in (([0], (0, 6, 15)), ([], (0, 9, 15))):
        state = patch(model, decode={**SMALL, "budget": 48, "select_layers": select}, **PREFILL)
        _step(model, 0, q, k0, v0)
        got = _step(model, 1, q, k1, v1)
        want = _masked_attention(q, k1, v1, [layer1_pages] * HKV)
        assert torch.allclose(got, want, atol=1e-5), (select, (got - want).abs().max())
        assert [r["select_layer"] for r in state.records] == [0, 0 if select else 1]
        if select:
            assert state.records[-1]["reason"] == "decode pages: the pages layer 0 selected"
    unpatch(model)


def test_a_reusing_layer_selects_itself_when_its_source_has_no_selection_this_step():
    model = _tiny()
    q, k, v = _planted((9, 9))
    state = patch(model, decode={**SMALL, "budget": 48, "select_layers": [0]}, **PREFILL)
    try:
        _step(model, 0, q, k[:, :, :40], v[:, :, :40])  # layer 0: budget covers 40 tokens, runs dense
        got = _step(model, 1, q, k, v)
        assert torch.allclose(got, _masked_attention(q, k, v, [(0, 9, 15)] * HKV), atol=1e-5)
        assert state.records[-1]["select_layer"] == 1 and not state.records[0]["sparse"]
    finally:
        unpatch(model)


def test_recall_is_the_oracle_mass_of_the_selected_pages():
    model = _tiny()
    q, k, v = _planted()
    state = patch(model, decode={**SMALL, "budget": 48, "streaming_heads": {0: [0]}, "recall_every": 1}, **PREFILL)
    try:
        _step(model, 0, q, k, v)
    finally:
        unpatch(model)
    probs = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * D ** -0.5, -1)[0, :, 0]  # (H, S)
    pages = [SINK_RECENT, (0, 6, 15)]
    held = [sum(float(probs[h, p * P:(p + 1) * P].sum()) for p in pages[h // 2]) for h in range(H)]
    recall = state.records[-1]["recall"]
    assert recall == pytest.approx(sum(held) / H, abs=1e-5)
    assert held[2] > 0.9 and held[0] < 0.5  # the top-k head holds the planted page's mass, streaming misses it
    assert state.summary()[0]["decode_recall"] == pytest.approx(recall)


def test_static_cache_tail_is_never_read():
    # A static cache of 256 positions filled to 200: the mask hides the tail, which holds NaNs here.
    model = _tiny()
    q, k, v = _planted()
    filled = 200
    k[:, :, filled:] = float("nan")
    v[:, :, filled:] = float("nan")
    mask = (torch.arange(S) < filled)[None, None, None, :]
    state = patch(model, decode=SMALL, **PREFILL)  # 4 pages: the sink, the planted and 2 recent ones
    try:
        got = _step(model, 0, q, k, v, mask)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, _masked_attention(q, k, v, [(0, 6, 11, 12)] * HKV, length=filled), atol=1e-5)
        record = state.records[-1]
        assert record["sparse"] and record["kv_len"] == filled
        assert state.page_indexes[0].lengths.tolist() == [filled]
    finally:
        unpatch(model)


# ---------------------------------------------------------------- generate()

def test_static_cache_with_every_page_kept_gives_the_dense_tokens(model_and_dense):
    model, ids, want = model_and_dense
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, cache_implementation="static", **GEN), want)
    try:
        # Prefill through the patch against a static cache reads only the filled keys.
        patch(model, **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, cache_implementation="static", **GEN), want)
        # 193 tokens round up to 13 pages = 208 >= every filled length: the page path keeps every page.
        state = patch(model, decode={**SMALL, "budget": 193}, **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, cache_implementation="static", **GEN), want)
        decode = _decode_records(state)
        assert len(decode) == COMMON["num_hidden_layers"] * (NEW - 1)
        assert all(r["sparse"] and r["density"] == 1.0 for r in decode)
        assert sorted({r["kv_len"] for r in decode}) == list(range(201, 200 + NEW))  # filled, not 208
        # A budget covering the filled cache runs dense.
        state = patch(model, decode={**SMALL, "budget": 2048}, **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, cache_implementation="static", **GEN), want)
        assert all(not r["sparse"] and "covers the 20" in r["reason"] for r in _decode_records(state))
    finally:
        unpatch(model)


def test_static_cache_passed_in_decodes_sparse_and_keeps_the_index_by_filled_length(model_and_dense):
    model, ids, want = model_and_dense
    state = patch(model, decode=SMALL, **PREFILL)
    try:
        cache = transformers.StaticCache(config=model.config, max_cache_len=256)
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        got = model.generate(ids, max_new_tokens=NEW, **{keyword: cache}, **GEN)
        assert got.shape == want.shape
        decode = _decode_records(state)
        assert len(decode) == COMMON["num_hidden_layers"] * (NEW - 1)
        assert all(r["sparse"] and 0 < r["density"] < 1 for r in decode)
        assert sorted({r["kv_len"] for r in decode}) == list(range(201, 200 + NEW))
        for layer in range(COMMON["num_hidden_layers"]):
            index = state.page_indexes[layer]
            assert state.index_builds[layer] == 1 and index.capacity == 256  # the cache's size: never rebuilt
            assert index.lengths.tolist() == [ids.shape[1] + NEW - 1]
    finally:
        unpatch(model)


def test_a_static_cache_forward_reads_its_mask_once_not_once_per_layer(monkeypatch):
    """Reading a mask waits for the device: every layer of a forward gets the same mask tensor, so
    its filled length is worked out once per forward (and again for a new or changed mask)."""
    import sparse_attn.integrations.hf.patching as patching

    calls = []
    real = patching._filled_length
    monkeypatch.setattr(patching, "_filled_length",
                        lambda mask, *a: (mask is not None and calls.append(a)) or real(mask, *a))
    model = _tiny(layers=4)
    ids = _ids()
    state = patch(model, decode=SMALL, **PREFILL)
    try:
        model.generate(ids, max_new_tokens=NEW, cache_implementation="static", **GEN)
        # The prefill comes without a mask (nothing to read); each of the NEW - 1 decode steps with one.
        assert len(_decode_records(state)) == 4 * (NEW - 1)
        assert len(calls) == NEW - 1 and all(q_len == 1 for q_len, _ in calls), calls
        # The same tensor changed in place is read again.
        mask = (torch.arange(S) < 200)[None, None, None, :].clone()
        facts = patching._mask_facts(state, mask, 1, S)
        assert patching._mask_facts(state, mask, 1, S) is facts
        mask[..., 200] = True
        assert patching._mask_facts(state, mask, 1, S)[0] == 201
    finally:
        unpatch(model)


def test_static_cache_with_padding_runs_dense_and_matches():
    model = _tiny()
    ids = _ids(length=100, batch=2)
    ids[0, :6] = 0
    kwargs = dict(attention_mask=(ids != 0).long(), max_new_tokens=4, cache_implementation="static", **GEN)
    want = model.generate(ids, **kwargs)
    state = patch(model, decode={**SMALL, "budget": 32, "sink": 0}, **PREFILL)
    assert torch.equal(model.generate(ids, **kwargs), want)
    decode = _decode_records(state)
    assert decode and all(not r["sparse"] and "not plain causal" in r["reason"] for r in decode)
    prefill = [r for r in state.records if not r["decode"]]
    assert sorted(r["q_len"] for r in prefill) == [94, 94, 100, 100]  # each sequence on its own span


def test_full_heads_everywhere_give_the_dense_tokens_under_a_small_budget(model_and_dense):
    model, ids, want = model_and_dense
    every = {layer: [0, 1] for layer in range(COMMON["num_hidden_layers"])}
    state = patch(model, decode={**SMALL, "full_heads": every}, **PREFILL)
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, **GEN), want)
        decode = _decode_records(state)
        assert decode and all(r["sparse"] and r["density"] == 1.0 for r in decode)
    finally:
        unpatch(model)


def test_streaming_heads_everywhere_match_sink_window(model_and_dense):
    model, ids, _ = model_and_dense
    every = {layer: [0, 1] for layer in range(COMMON["num_hidden_layers"])}
    try:
        patch(model, decode={**SMALL, "method": "sink_window"}, **PREFILL)
        want = model.generate(ids, max_new_tokens=NEW, **GEN)
        state = patch(model, decode={**SMALL, "streaming_heads": every}, **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, **GEN), want)
        mixed = patch(model, decode={**SMALL, "streaming_heads": {0: [0]}}, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
    finally:
        unpatch(model)
    # sink 16 + recent 16 read 2-3 pages; quest fills the 4-page budget: the mixed layer reads more.
    streaming = [r["density"] for r in _decode_records(state, 0)]
    mixed_0 = [r["density"] for r in _decode_records(mixed, 0)]
    assert all(m > s for m, s in zip(mixed_0, streaming))


def test_per_layer_knobs_apply_to_their_layer_only(model_and_dense):
    model, ids, _ = model_and_dense
    state = patch(model, decode={**SMALL, "per_layer": {1: {"method": "dense"}}}, **PREFILL)
    try:
        model.generate(ids, max_new_tokens=NEW, **GEN)
        assert all(r["sparse"] for r in _decode_records(state, 0))
        assert all(not r["sparse"] and "layer configured dense" in r["reason"] for r in _decode_records(state, 1))
        assert 1 not in state.page_indexes
        state = patch(model, decode={**SMALL, "per_layer": {1: {"budget": 128, "page": 32, "sink": 32,
                                                                  "recent": 32}}}, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
        assert state.page_indexes[0].page_size == 16 and state.page_indexes[1].page_size == 32
        assert all(r["reason"] == "decode pages: quest budget 64" for r in _decode_records(state, 0))
        assert all(r["reason"] == "decode pages: quest budget 128" for r in _decode_records(state, 1))
        d0 = [r["density"] for r in _decode_records(state, 0)]
        d1 = [r["density"] for r in _decode_records(state, 1)]
        assert all(b > a for a, b in zip(d0, d1))
        # A per-layer budget covering the cache: that layer runs dense, the other stays sparse.
        state = patch(model, decode={**SMALL, "per_layer": {0: {"budget": 4096}}}, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
        assert all("covers" in r["reason"] for r in _decode_records(state, 0))
        assert all(r["sparse"] for r in _decode_records(state, 1))
    finally:
        unpatch(model)


def test_select_layers_are_recorded_and_reuse_keeps_dense_tokens_when_every_page_fits():
    model = _tiny(layers=4)
    ids = _ids()
    want = model.generate(ids, max_new_tokens=NEW, **GEN)
    try:
        state = patch(model, decode={**SMALL, "select_layers": [1, 3]}, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
        by_layer = {layer: {r["select_layer"] for r in _decode_records(state, layer)} for layer in range(4)}
        assert by_layer == {0: {0}, 1: {1}, 2: {1}, 3: {3}}  # layer 0 precedes the first selecting layer
        assert {r["reason"] for r in _decode_records(state, 2)} == {"decode pages: the pages layer 1 selected"}
        state = patch(model, decode={**SMALL, "budget": 193, "select_layers": [0]}, **PREFILL)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, **GEN), want)
        assert {r["select_layer"] for r in _decode_records(state)} == {0}
    finally:
        unpatch(model)


def test_recall_every_samples_steps_and_the_summary_averages_them(model_and_dense):
    model, ids, _ = model_and_dense
    state = patch(model, decode={**SMALL, "recall_every": 3}, **PREFILL)
    try:
        model.generate(ids, max_new_tokens=NEW, **GEN)
        for layer in range(COMMON["num_hidden_layers"]):
            recalls = [r["recall"] for r in _decode_records(state, layer)]
            assert [i for i, x in enumerate(recalls) if x is not None] == [0, 3, 6]
            sampled = [x for x in recalls if x is not None]
            assert all(0 < x < 1 for x in sampled)
            assert state.summary()[layer]["decode_recall"] == pytest.approx(sum(sampled) / len(sampled))
        # Every head reading every page holds all the mass; off by default.
        every = {layer: [0, 1] for layer in range(COMMON["num_hidden_layers"])}
        state = patch(model, decode={**SMALL, "full_heads": every, "recall_every": 1}, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
        assert all(r["recall"] == pytest.approx(1.0, abs=1e-5) for r in _decode_records(state))
        state = patch(model, decode=SMALL, **PREFILL)
        model.generate(ids, max_new_tokens=NEW, **GEN)
        assert all(r["recall"] is None for r in _decode_records(state))
        assert all(s["decode_recall"] is None for s in state.summary())
    finally:
        unpatch(model)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("extra,message", [
    ({"streaming_heads": [0]}, "decode: streaming_heads=[0] is not a dict {layer_idx: ...}"),
    ({"streaming_heads": {"x": [0]}}, "decode: streaming_heads has key 'x', not a layer index"),
    ({"streaming_heads": {-1: [0]}}, "decode: streaming_heads has key -1, not a layer index"),
    ({"streaming_heads": {0: [0, -1]}}, "decode: streaming_heads[0]=[0, -1] is not a list of KV head indices"),
    ({"full_heads": {0: "01"}}, "decode: full_heads[0]='01' is not a list of KV head indices"),
    ({"full_heads": {0: [1, 1]}}, "decode: full_heads[0]=[1, 1] names a KV head twice"),
    ({"streaming_heads": {0: [0, 1]}, "full_heads": {0: [1]}},
     "decode: KV head(s) [1] of layer 0 are in both streaming_heads and full_heads"),
    ({"per_layer": [1]}, "decode: per_layer=[1] is not a dict"),
    ({"per_layer": {1: 64}}, "decode: per_layer[1]=64 is not a dict {knob: value}"),
    ({"per_layer": {1: {"top_k": 4}}}, "decode: per_layer[1]: unknown key(s) ['top_k']"),
    ({"per_layer": {1: {"budget": 8}}}, "decode: per_layer[1]: budget=8 is smaller than page=16"),
    ({"per_layer": {1: {"page": 24}}}, "decode: per_layer[1]: page=24 is not a power of two"),
    ({"per_layer": {1: {"method": "oracle"}}}, "decode: per_layer[1]: method='oracle' is not a page-selection"),
    ({"per_layer": {1: {"recent": 256}}}, "decode: per_layer[1]: budget=64 holds 4 page(s)"),
    ({"select_layers": 0}, "decode: select_layers=0 is not a list of layer indices"),
    ({"select_layers": [0, True]}, "decode: select_layers=[0, True] is not a list of layer indices"),
    ({"select_layers": [2, 2]}, "decode: select_layers=[2, 2] names a layer twice"),
    ({"select_layers": [1], "per_layer": {1: {"method": "dense"}}},
     "decode: select_layers: layer 1 decodes dense (per_layer[1])"),
    ({"recall_every": -1}, "decode: recall_every=-1 is not an int >= 0"),
    ({"recall_every": 1.5}, "decode: recall_every=1.5 is not an int >= 0"),
    ({"recall_every": True}, "decode: recall_every=True is not an int >= 0"),
    ({"heads": {}}, "decode: unknown key(s) ['heads'] for page-index decode"),
])
def test_bad_policy_keys_raise_naming_the_key(extra, message):
    with pytest.raises(ValueError) as err:
        SparseConfig(decode={**SMALL, **extra})
    assert message in str(err.value)


@pytest.mark.parametrize("extra,message", [
    ({"streaming_heads": {2: [0]}}, "decode: streaming_heads names layer(s) [2], which do not exist"),
    ({"per_layer": {5: {"budget": 128}}}, "decode: per_layer names layer(s) [5]"),
    ({"select_layers": [0, 7]}, "decode: select_layers names layer(s) [7]"),
    ({"full_heads": {1: [2]}}, "decode: full_heads[1] names KV head(s) [2]; the model has 2 KV heads"),
    ({"select_layers": [0], "per_layer": {1: {"page": 32, "sink": 32, "recent": 32, "budget": 128}}},
     "decode: select_layers: layer 1 reads the pages layer 0 selects, but its page=32 differs"),
])
def test_policies_that_do_not_fit_the_model_fail_at_patch_time(extra, message):
    SparseConfig(decode={**SMALL, **extra})  # fine on its own
    with pytest.raises(ValueError) as err:
        patch(_tiny(), decode={**SMALL, **extra}, **PREFILL)
    assert message in str(err.value)


def test_policies_survive_a_json_round_trip(tmp_path):
    decode = {**SMALL, "streaming_heads": {1: [1, 0]}, "full_heads": {0: [1]}, "per_layer": {1: {"budget": 128}},
              "select_layers": [1, 0], "recall_every": 4}
    config = SparseConfig(decode=decode)
    config.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["decode"]["per_layer"] == {"1": {"budget": 128}}
    loaded = SparseConfig.from_file(tmp_path / "c.json")
    assert loaded._decode_pages == config._decode_pages
    pages = config._decode_pages
    assert pages["streaming_heads"] == {1: (0, 1)} and pages["select_layers"] == (0, 1)
    assert pages["per_layer"][1] == {**SMALL, "budget": 128} and pages["recall_every"] == 4
    assert math.isclose(SparseConfig(decode=SMALL)._decode_pages["recall_every"], 0)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_the_kernel_path_of_a_decode_step_matches_the_public_call(scaling):
    """A patched layer launches the decode kernel without the public call's checks (its own inputs
    are consistent by construction): same output as ``decode_attention``, into the layer's layout."""
    from sparse_attn.decode import PageIndex, select_pages
    from sparse_attn.decode.reference import reference_decode_attention
    from sparse_attn.integrations.hf.page_steps import attend_pages

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 200, 32, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(2, 2, 200, 32, generator=gen).to(device, torch.bfloat16)
    q = torch.randn(2, 8, 1, 32, generator=gen).to(device, torch.bfloat16)
    index = PageIndex.build(k, 16, lengths=[200, 131], capacity=208)
    pages, counts = select_pages(q, index, method="quest", budget=64, sink=16, recent=16)
    want = reference_decode_attention(q, k, v, pages, counts, index.lengths, 16,
                                      32 ** -0.5 if scaling is None else scaling)[0]
    for kernel in (True, False):
        out = torch.full((2, 1, 8, 32), float("nan"), dtype=torch.bfloat16, device=device)  # the layer's layout
        attend_pages(q, k, v, pages, counts, index.lengths, 16, scaling, out.transpose(1, 2), kernel=kernel)
        torch.testing.assert_close(out.transpose(1, 2), want, atol=2e-2, rtol=2e-2)
