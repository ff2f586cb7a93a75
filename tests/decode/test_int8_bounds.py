"""Quest's page bounds kept as int8 with a scale per page (``PageIndex(bounds="int8")``): the
quantized bounds still bound every key of their page, stay equal to a quantization of the exact
bounds through builds and appends (PyTorch and the Triton append kernel), the Triton page scores
and top-k read them as the PyTorch reference does, a planted page is still found, and the Hugging
Face integration and the eval's decode axis take ``bounds="int8"``."""

import math
import os

import pytest
import torch

from sparse_attn.decode import PageIndex, page_mass, select_pages
from sparse_attn.decode import quantize_bounds
from sparse_attn.options import KernelOptions

TRITON = KernelOptions(estimator_kernels="triton")
TORCH = KernelOptions(estimator_kernels="torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(DEVICE != "cuda" and os.environ.get("TRITON_INTERPRET") != "1",
                                   reason="needs a GPU or TRITON_INTERPRET=1")


def keys(batch=3, heads=2, seq=200, dim=32, dtype=torch.bfloat16, seed=0, outlier=True):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, seq, dim, generator=gen)
    if outlier:  # a channel 8x larger than the rest, as rotary key channels often are
        k[..., 3] *= 8
    return k.to(DEVICE, dtype)


def assert_quantized_from_exact(index):
    qmin, qmax, scale = quantize_bounds(index.kmin, index.kmax)
    assert index.qmin.dtype == torch.int8 and index.qmax.dtype == torch.int8 and index.qscale.dtype == torch.float32
    assert torch.equal(index.qmin, qmin) and torch.equal(index.qmax, qmax)
    assert torch.equal(index.qscale, scale)


def test_quantized_bounds_hold_every_key_of_their_page():
    k = keys(dtype=torch.float32)
    index = PageIndex.build(k, 16, lengths=[200, 37, 0], capacity=208, bounds="int8")
    low, high = index.quest_bounds()
    for b, length in enumerate((200, 37, 0)):
        for p in range(math.ceil(length / 16)):
            seg = k[b, :, p * 16:min((p + 1) * 16, length)]
            step = index.qscale[b, :, p, None]
            assert (high[b, :, p] >= seg.amax(1)).all() and (low[b, :, p] <= seg.amin(1)).all()  # no tolerance
            # at most one step looser than the exact bounds
            assert (high[b, :, p] - seg.amax(1) <= step * 1.0001).all()
            assert (seg.amin(1) - low[b, :, p] <= step * 1.0001).all()
        empty = torch.arange(index.max_pages) >= math.ceil(length / 16)
        assert (index.qscale[b][:, empty] == 0).all() and (index.qmax[b][:, empty] == 0).all()


@pytest.mark.parametrize("magnitude", [1e-38, 1e-33, 1e-3, 1.0, 3e4])
def test_bounds_hold_exactly_at_every_magnitude(magnitude):
    """Float32 rounding never pulls a dequantized bound inside the keys, down to pages whose keys are
    below the scale floor, and at the +-127 levels (every page's largest |bound| sits there)."""
    gen = torch.Generator().manual_seed(7)
    kmin = torch.randn(64, 4, 32, generator=gen) * magnitude
    kmax = kmin + torch.rand(64, 4, 32, generator=gen) * magnitude
    qmin, qmax, scale = quantize_bounds(kmin, kmax)
    assert (scale > 0).all()
    assert (qmax.float() * scale[..., None] >= kmax).all()
    assert (qmin.float() * scale[..., None] <= kmin).all()
    if magnitude > 1e-29:  # above the scale floor, the page's largest |bound| sets its scale: level +-127
        assert ((qmax == 127) | (qmin == -127)).any(-1).all()


def test_an_all_zero_page_quantizes_to_zero_not_nan():
    zero = torch.zeros(1, 1, 2, 8)
    qmin, qmax, scale = quantize_bounds(zero, zero)
    assert (qmin == 0).all() and (qmax == 0).all() and (scale == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_bounds_follow_the_exact_bounds_through_build_and_appends(dtype):
    k = keys(dtype=dtype, seed=1)
    index = PageIndex.build(k[:, :, :150], 16, lengths=[150, 37, 5], capacity=208, bounds="int8")
    exact = PageIndex.build(k[:, :, :150], 16, lengths=[150, 37, 5], capacity=208)
    assert_quantized_from_exact(index)
    assert torch.equal(index.kmax, exact.kmax) and torch.equal(index.kmin, exact.kmin)
    for t in range(4):
        new = k[:, :, 150 + 7 * t:157 + 7 * t]
        index.append(new, kernel_options=TORCH)
        exact.append(new, kernel_options=TORCH)
        assert_quantized_from_exact(index)
    assert torch.equal(index.kmax, exact.kmax) and index.lengths.tolist() == [178, 65, 33]
    assert index.memory_bytes() == exact.memory_bytes() + 2 * index.qmax.numel() + 4 * index.qscale.numel()
    assert "bounds='int8'" in repr(index)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("new", [1, 5, 16])
def test_append_kernel_quantizes_as_pytorch_does(dtype, new):
    k = keys(dtype=dtype, seed=new)
    got = PageIndex.build(k[:, :, :100], 16, lengths=[100, 37, 0], capacity=208, bounds="int8")
    want = PageIndex.build(k[:, :, :100], 16, lengths=[100, 37, 0], capacity=208, bounds="int8")
    gen = torch.Generator().manual_seed(new)
    for _ in range(3):
        k_new = (torch.randn(3, 2, new, 32, generator=gen) * 3).to(DEVICE, dtype)
        counts = torch.tensor([new, max(new - 1, 0), new], device=DEVICE)
        got.append(k_new, counts, kernel_options=TRITON)
        want.append(k_new, counts, kernel_options=TORCH)
        assert torch.equal(got.lengths, want.lengths)
        assert torch.equal(got.kmax, want.kmax) and torch.equal(got.kmin, want.kmin)
        assert torch.equal(got.qmax, want.qmax) and torch.equal(got.qmin, want.qmin)
        torch.testing.assert_close(got.qscale, want.qscale, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,rows", [(4, 1), (8, 3)])
def test_kernels_score_and_select_from_int8_bounds_as_pytorch(dtype, heads, rows):
    k = keys(dtype=dtype, seed=2)
    q = torch.randn(3, heads, rows, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    index = PageIndex.build(k, 16, lengths=[200, 37, 0], capacity=208, bounds="int8")
    got = page_mass(q, index, method="quest", kernel_options=TRITON)
    want = page_mass(q, index, method="quest", kernel_options=TORCH)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
    knobs = dict(method="quest", budget=64, sink=16, recent=16)
    got = select_pages(q, index, kernel_options=TRITON, **knobs)
    want = select_pages(q, index, kernel_options=TORCH, **knobs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_int8_scores_differ_from_exact_ones_by_at_most_the_rounding():
    """Each page's int8 Quest score lies between the exact bound and the exact bound plus
    ``scale * sum |q|`` (one step per element, weighted by the query)."""
    k = keys(dtype=torch.float32, seed=4)
    q = torch.randn(3, 4, 1, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    exact = PageIndex.build(k, 16, lengths=[200, 37, 0], capacity=208)
    int8 = PageIndex.build(k, 16, lengths=[200, 37, 0], capacity=208, bounds="int8")
    qg = q.view(3, 2, 2, 32)

    def scores(index):
        low, high = index.quest_bounds()
        return qg.clamp(min=0) @ high.transpose(-1, -2) + qg.clamp(max=0) @ low.transpose(-1, -2)

    slack = (qg.abs().sum(-1, keepdim=True) * int8.qscale[:, :, None, :])
    assert (scores(int8) >= scores(exact) - 1e-5).all()
    assert (scores(int8) <= scores(exact) + slack + 1e-5).all()


def test_a_planted_page_is_found_with_int8_bounds():
    gen = torch.Generator().manual_seed(6)
    k = torch.randn(1, 2, 256, 32, generator=gen) * 0.1
    direction = torch.randn(32, generator=gen)
    k[:, :, 6 * 16:7 * 16] += 2 * direction
    k[..., 5] *= 8  # an outlier channel that sets the pages' scales
    q = (direction * 2).view(1, 1, 1, 32).expand(1, 4, 1, 32).contiguous()
    index = PageIndex.build(k, 16, bounds="int8")
    pages, counts = select_pages(q, index, method="quest", budget=48, sink=16, recent=16)
    assert 6 in pages[0, 0].tolist() and 6 in pages[0, 1].tolist()


def test_bad_bounds_are_refused_naming_them():
    k = keys(dtype=torch.float32)
    with pytest.raises(ValueError, match="bounds must be one of"):
        PageIndex.build(k, 16, bounds="int4")
    with pytest.raises(ValueError, match="bounds must be one of"):
        PageIndex.empty(1, 1, 16, 64, 16, bounds="fp8")


def test_patch_decodes_through_int8_bounds_and_refuses_bad_values():
    import transformers

    from sparse_attn import patch, unpatch
    from sparse_attn.integrations.hf import SparseConfig

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    ids = torch.randint(1, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    decode = {"method": "quest", "budget": 64, "page": 16, "sink": 16, "recent": 16}
    state = patch(model, method="dense", decode={**decode, "bounds": "int8"}, min_kv_len=0, record=True)
    try:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 206)
        assert state.page_indexes and all(i.bounds == "int8" for i in state.page_indexes.values())
        steps = [r for r in state.records if r["decode"] and r["sparse"]]
        assert steps and all(r["density"] < 1.0 for r in steps)
        assert_quantized_from_exact(state.page_indexes[0])
    finally:
        unpatch(model)
    # A layer that does not score with Quest keeps no int8 bounds.
    state = patch(model, method="dense", decode={**decode, "bounds": "int8", "per_layer": {1: {"method": "pooled"}}},
                  min_kv_len=0)
    try:
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert state.page_indexes[0].bounds == "int8" and state.page_indexes[1].bounds == "exact"
    finally:
        unpatch(model)
    with pytest.raises(ValueError, match=r"decode: bounds='int4' is not one of \['exact', 'int8'\]"):
        SparseConfig(decode={**decode, "bounds": "int4"})


def test_eval_decode_knobs_carry_int8_bounds():
    from sparse_attn.eval.runner import decode_config, decode_knobs, decode_plan

    assert "bounds" not in decode_knobs("quest", 512, 16)
    knobs = decode_knobs("quest", 512, 16, bounds="int8")
    assert knobs["bounds"] == "int8"
    config, _ = decode_config("quest", knobs)
    assert config.decode["bounds"] == "int8"
    plan = decode_plan(["quest"], [256, 512], 16, bounds="int8")
    assert [k.get("bounds") for _, k in plan] == [None, "int8", "int8"]
