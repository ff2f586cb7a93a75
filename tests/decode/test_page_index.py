"""PageIndex: build equals the summaries computed directly; appends equal a build of the extended
cache and touch only the new tokens' pages; memory; input checks."""

import math

import pytest
import torch

from sparse_attn.decode import PageIndex


def direct(k, lengths, page_size, capacity):
    """Per-page min / max / float64 sum of each sequence's first ``lengths[b]`` keys, page by page."""
    batch, heads, _, dim = k.shape
    pages = math.ceil(capacity / page_size)
    kmin = torch.full((batch, heads, pages, dim), float("inf"), dtype=k.dtype)
    kmax = torch.full((batch, heads, pages, dim), float("-inf"), dtype=k.dtype)
    ksum = torch.zeros(batch, heads, pages, dim, dtype=torch.float64)
    for b, length in enumerate(lengths):
        for p in range(math.ceil(length / page_size)):
            seg = k[b, :, p * page_size:min((p + 1) * page_size, length)]
            kmin[b, :, p], kmax[b, :, p] = seg.amin(1), seg.amax(1)
            ksum[b, :, p] = seg.double().sum(1)
    return kmin, kmax, ksum


def assert_matches(index, k, lengths, capacity, atol=1e-5):
    kmin, kmax, ksum = direct(k, lengths, index.page_size, capacity)
    assert index.lengths.tolist() == list(lengths)
    assert torch.equal(index.kmin, kmin)  # min and max are exact
    assert torch.equal(index.kmax, kmax)
    assert index.ksum.dtype == torch.float32
    torch.testing.assert_close(index.ksum.double(), ksum, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size,seq,lengths,capacity", [
    (16, 100, [100, 37, 0], 100),    # S not a multiple of the page; an empty sequence
    (16, 64, [64, 48, 1], 160),      # capacity past S
    (32, 70, None, 96),              # default lengths: all S
    (64, 10, [10, 3, 7], 256),       # shorter than one page
])
def test_build_equals_direct_summaries(dtype, page_size, seq, lengths, capacity):
    k = torch.randn(3, 2, seq, 8).to(dtype)
    index = PageIndex.build(k, page_size, lengths=lengths, capacity=capacity)
    assert index.kmin.shape == (3, 2, math.ceil(capacity / page_size), 8)
    assert index.kmin.dtype == dtype and index.kmax.dtype == dtype
    assert_matches(index, k, lengths if lengths is not None else [seq] * 3, capacity,
                   atol=1e-5 if dtype == torch.float32 else 1e-3)


def test_appends_equal_a_build_of_the_extended_cache():
    """Several appends, partial pages, T > page_size, ragged counts, sequences of different lengths."""
    page, capacity, dim = 16, 200, 8
    cache = torch.randn(3, 2, capacity, dim)
    lengths = [5, 40, 17]
    index = PageIndex.build(cache[:, :, :48], page, lengths=lengths, capacity=capacity)
    steps = [(1, None), (3, [3, 1, 0]), (16, None), (21, [21, 5, 17]), (1, None), (40, [40, 2, 33]), (2, None)]
    for new, counts in steps:
        counts = counts or [new] * 3
        k_new = torch.randn(3, 2, new, dim)
        for b, (start, n) in enumerate(zip(lengths, counts)):
            cache[b, :, start:start + n] = k_new[b, :, :n]
        index.append(k_new, counts=None if counts == [new] * 3 else torch.tensor(counts))
        lengths = [start + n for start, n in zip(lengths, counts)]
        assert_matches(index, cache, lengths, capacity)
        rebuilt = PageIndex.build(cache, page, lengths=lengths, capacity=capacity)
        assert torch.equal(index.kmin, rebuilt.kmin) and torch.equal(index.kmax, rebuilt.kmax)
        torch.testing.assert_close(index.ksum, rebuilt.ksum, atol=1e-5, rtol=1e-5)


def test_append_to_an_empty_index_equals_build():
    k = torch.randn(2, 1, 90, 4)
    index = PageIndex.empty(2, 1, 4, capacity=96, page_size=32, dtype=torch.float32)
    assert index.lengths.tolist() == [0, 0] and index.num_pages().tolist() == [0, 0]
    for chunk in (k[:, :, :1], k[:, :, 1:40], k[:, :, 40:90]):
        index.append(chunk)
    assert_matches(index, k, [90, 90], 96)


@pytest.mark.parametrize("lengths,new,capacity", [
    ([5, 40, 17], 1, 128),      # decode: one token, into a partial or a fresh page
    ([5, 40, 17], 21, 128),     # more than a page
    ([60, 47, 32], 2, 64),      # near the capacity: the update window reaches past the last page
    ([0, 63, 1], 1, 64),
])
def test_append_touches_only_the_new_tokens_pages(lengths, new, capacity):
    page, dim = 16, 4
    cache = torch.randn(3, 2, capacity, dim)
    index = PageIndex.build(cache[:, :, :64], page, lengths=lengths, capacity=capacity)
    touched = torch.zeros(3, index.max_pages, dtype=torch.bool)
    for b, start in enumerate(lengths):
        for pos in range(start, start + new):
            touched[b, pos // page] = True
    mask = (~touched)[:, None, :, None].expand_as(index.kmin)
    index.kmin[mask], index.kmax[mask], index.ksum[mask] = -777.0, 555.0, 333.0  # poison the others
    k_new = torch.randn(3, 2, new, dim)
    index.append(k_new)
    assert (index.kmin[mask] == -777.0).all() and (index.kmax[mask] == 555.0).all()
    assert (index.ksum[mask] == 333.0).all()
    for b, start in enumerate(lengths):
        cache[b, :, start:start + new] = k_new[b]
    kmin, kmax, ksum = direct(cache, [n + new for n in lengths], page, capacity)
    keep = touched[:, None, :, None].expand_as(kmin)
    assert torch.equal(index.kmin[keep], kmin[keep]) and torch.equal(index.kmax[keep], kmax[keep])
    torch.testing.assert_close(index.ksum[keep].double(), ksum[keep], atol=1e-5, rtol=1e-5)


def test_views_page_tokens_mean_and_num_pages():
    k = torch.randn(2, 2, 50, 4)
    index = PageIndex.build(k, 16, lengths=[50, 16], capacity=64)
    assert index.num_pages().tolist() == [4, 1]
    assert index.page_tokens().tolist() == [[16, 16, 16, 2], [16, 0, 0, 0]]
    torch.testing.assert_close(index.mean()[0, :, 3], k[0, :, 48:50].mean(1))
    assert (index.mean()[1, :, 1:] == 0).all()
    assert (index.batch, index.kv_heads, index.max_pages, index.head_dim) == (2, 2, 4, 4)
    assert "page_size=16" in repr(index)


@pytest.mark.parametrize("dtype,page_size", [(torch.float16, 64), (torch.bfloat16, 16), (torch.float32, 32)])
def test_memory_bytes(dtype, page_size):
    batch, heads, capacity, dim = 2, 4, 1024, 64
    index = PageIndex.empty(batch, heads, dim, capacity, page_size, dtype=dtype)
    e = torch.finfo(dtype).bits // 8
    pages = capacity // page_size
    assert index.memory_bytes() == batch * heads * pages * dim * (2 * e + 4) + batch * 8
    k_cache = batch * heads * capacity * dim * e
    overhead = (index.memory_bytes() - batch * 8) / k_cache
    assert overhead == pytest.approx(2 / page_size + 4 / (page_size * e))


def test_input_checks():
    k = torch.randn(2, 2, 40, 8)
    for bad in (48, 8, 512, True, 16.0, "16"):
        with pytest.raises(ValueError, match="page_size"):
            PageIndex.build(k, bad)
    with pytest.raises(ValueError, match="capacity"):
        PageIndex.build(k, 16, capacity=32)
    with pytest.raises(ValueError, match="capacity"):
        PageIndex.build(k, 16, capacity=0)
    with pytest.raises(ValueError, match="lengths"):
        PageIndex.build(k, 16, lengths=[41, 3])
    with pytest.raises(ValueError, match="lengths"):
        PageIndex.build(k, 16, lengths=[-1, 3])
    with pytest.raises(ValueError, match="lengths"):
        PageIndex.build(k, 16, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="lengths"):
        PageIndex.build(k, 16, lengths=[1.0, 2.0])
    with pytest.raises(ValueError, match="k must be"):
        PageIndex.build(k[0], 16)
    with pytest.raises(ValueError, match="floating"):
        PageIndex.build(k.long(), 16)

    index = PageIndex.build(k, 16, lengths=[40, 10], capacity=48)
    with pytest.raises(ValueError, match="k_new"):
        index.append(torch.randn(2, 1, 1, 8))
    with pytest.raises(ValueError, match="k_new"):
        index.append(torch.randn(2, 2, 1, 4))
    with pytest.raises(ValueError, match="dtype"):
        index.append(torch.randn(2, 2, 1, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="device"):
        index.append(torch.randn(2, 2, 1, 8, device="meta"))
    with pytest.raises(ValueError, match="k_new must be"):
        index.append(torch.randn(2, 2, 8))
    with pytest.raises(ValueError, match="counts"):
        index.append(torch.randn(2, 2, 2, 8), counts=[3, 0])
    with pytest.raises(ValueError, match="capacity"):
        index.append(torch.randn(2, 2, 9, 8))
    before = index.kmin.clone()
    with pytest.raises(ValueError, match="capacity"):
        index.append(torch.randn(2, 2, 9, 8), counts=[9, 0])
    assert torch.equal(index.kmin, before) and index.lengths.tolist() == [40, 10]  # refused: unchanged
    index.append(torch.randn(2, 2, 9, 8), counts=[8, 9])  # up to the capacity exactly is fine
    assert index.lengths.tolist() == [48, 19]
    with pytest.raises(ValueError, match="batch"):
        PageIndex.empty(0, 1, 8, 64, 16)
    with pytest.raises(ValueError, match="dtype"):
        PageIndex.empty(1, 1, 8, 64, 16, dtype=torch.int32)
