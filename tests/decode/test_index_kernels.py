"""The page-index append kernel (Triton, run by the CPU interpreter here) against the PyTorch
update: the same summaries and lengths after several appends, across dtypes, page sizes, new-token
counts that cross pages, ragged counts, an empty sequence and an append that reaches the capacity;
the cases it leaves to PyTorch."""

import os

import pytest
import torch

from sparse_attn.decode import PageIndex
from sparse_attn.options import KernelOptions

TRITON = KernelOptions(estimator_kernels="triton")
TORCH = KernelOptions(estimator_kernels="torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(DEVICE != "cuda" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")


def twins(k, page, lengths, capacity):
    return (PageIndex.build(k, page, lengths=lengths, capacity=capacity),
            PageIndex.build(k, page, lengths=lengths, capacity=capacity))


def assert_same(got, want):
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.kmin, want.kmin) and torch.equal(got.kmax, want.kmax)  # min and max are exact
    torch.testing.assert_close(got.ksum, want.ksum, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("page", [16, 32])
@pytest.mark.parametrize("new", [1, 3, 16])
def test_appends_match_pytorch(dtype, page, new):
    gen = torch.Generator().manual_seed(new + page)
    k = torch.randn(3, 3, 100, 32, generator=gen).to(DEVICE, dtype)
    got, want = twins(k, page, [100, 37, 0], 160)
    for _ in range(3):
        k_new = torch.randn(3, 3, new, 32, generator=gen).to(DEVICE, dtype)
        counts = torch.tensor([new, new - 1, new], device=DEVICE)
        got.append(k_new, counts, kernel_options=TRITON)
        want.append(k_new, counts, kernel_options=TORCH)
        assert_same(got, want)


def test_append_up_to_the_capacity():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 31, 16, generator=gen).to(DEVICE, torch.float16)
    got, want = twins(k, 16, [30, 31], 32)
    k_new = torch.randn(2, 2, 2, 16, generator=gen).to(DEVICE, torch.float16)
    counts = torch.tensor([2, 1], device=DEVICE)
    got.append(k_new, counts, kernel_options=TRITON)
    want.append(k_new, counts, kernel_options=TORCH)
    assert_same(got, want)
    assert got.lengths.tolist() == [32, 32]


def test_more_new_tokens_than_the_kernel_takes_run_pytorch(monkeypatch):
    import sparse_attn.decode.index_kernels as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the append kernel ran on more tokens than it takes")

    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 2, 40, 16, generator=gen).to(DEVICE, torch.float16)
    got, want = twins(k, 16, [40], 80)
    monkeypatch.setattr(kernels, "triton_append", refuse)
    k_new = torch.randn(1, 2, 17, 16, generator=gen).to(DEVICE, torch.float16)  # 17 > KERNEL_MAX_NEW
    got.append(k_new, kernel_options=TRITON)
    want.append(k_new, kernel_options=TORCH)
    assert_same(got, want)


@pytest.mark.parametrize("options", [TRITON, TORCH], ids=["triton", "torch"])
@pytest.mark.parametrize("bounds", ["exact", "int8"])
def test_lengths_set_back_to_a_page_boundary_rebuild_by_appends(options, bounds):
    """An index that followed another sequence, its lengths set back to a page boundary (0: a new
    sequence), then appended token by token, equals the index built from the new keys: each page
    starts afresh when its first token arrives."""
    gen = torch.Generator().manual_seed(5)
    old = torch.randn(2, 2, 90, 16, generator=gen).to(DEVICE, torch.float16)
    new = torch.randn(2, 2, 70, 16, generator=gen).to(DEVICE, torch.float16)
    for restart in (0, 32):
        got = PageIndex.build(old, 16, capacity=96, bounds=bounds)
        got.lengths.fill_(restart)
        keys = torch.cat([old[:, :, :restart], new[:, :, restart:]], 2)
        for t in range(restart, 70, 3):
            got.append(keys[:, :, t:min(t + 3, 70)], kernel_options=options)
        want = PageIndex.build(keys, 16, capacity=96, bounds=bounds)
        assert torch.equal(got.lengths, want.lengths)
        pages = 70 // 16 + 1  # the pages holding tokens; pages past them still hold the old sequence's
        assert torch.equal(got.kmin[:, :, :pages], want.kmin[:, :, :pages])
        assert torch.equal(got.kmax[:, :, :pages], want.kmax[:, :, :pages])
        torch.testing.assert_close(got.ksum[:, :, :pages], want.ksum[:, :, :pages], atol=1e-4, rtol=1e-4)
        if bounds == "int8":
            assert torch.equal(got.qmin[:, :, :pages], want.qmin[:, :, :pages])
            assert torch.equal(got.qscale[:, :, :pages], want.qscale[:, :, :pages])


@pytest.mark.parametrize("options", [TRITON, TORCH], ids=["triton", "torch"])
@pytest.mark.parametrize("bounds", ["exact", "int8"])
def test_append_at_positions_rebuilds_the_page_a_set_back_lands_in(options, bounds):
    """append_at with positions behind the lengths (a cache set back within a page, or to another
    sequence's start) or equal to them (a plain step): the pages up to the new length equal an
    index built from the cache as it now is."""
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(3, 2, 96, 16, generator=gen).to(DEVICE, torch.float16)
    for held, start in (([70, 70, 40], [53, 70, 0]), ([33, 64, 90], [32, 50, 89])):
        # The index followed the cache as it was: the same keys before each start, others after it.
        before = cache.clone()
        for b, s in enumerate(start):
            before[b, :, s:] = torch.randn(2, 96 - s, 16, generator=gen).to(DEVICE, torch.float16)
        got = PageIndex.build(before, 16, lengths=held, capacity=96, bounds=bounds)
        positions = torch.tensor(start, device=DEVICE)
        got.append_at(cache, positions, 1, kernel_options=options)
        want = PageIndex.build(cache, 16, lengths=[s + 1 for s in start], capacity=96, bounds=bounds)
        assert got.lengths.tolist() == [s + 1 for s in start]
        for b, s in enumerate(start):
            pages = s // 16 + 1
            assert torch.equal(got.kmin[b, :, :pages], want.kmin[b, :, :pages])
            assert torch.equal(got.kmax[b, :, :pages], want.kmax[b, :, :pages])
            torch.testing.assert_close(got.ksum[b, :, :pages], want.ksum[b, :, :pages], atol=1e-3, rtol=1e-3)
            if bounds == "int8":
                assert torch.equal(got.qmax[b, :, :pages], want.qmax[b, :, :pages])
                assert torch.equal(got.qscale[b, :, :pages], want.qscale[b, :, :pages])


def test_append_at_checks_its_arguments():
    index = PageIndex.empty(2, 2, 16, 64, 16, device=DEVICE)
    cache = torch.zeros(2, 2, 64, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="positions"):
        index.append_at(cache, torch.zeros(2, dtype=torch.int32, device=DEVICE), 1)
    with pytest.raises(ValueError, match="rows"):
        index.append_at(cache, torch.zeros(2, dtype=torch.int64, device=DEVICE), 0)
    with pytest.raises(ValueError, match="k_cache"):
        index.append_at(cache[:, :1], torch.zeros(2, dtype=torch.int64, device=DEVICE), 1)
    index.append_at(cache, torch.zeros(2, dtype=torch.int64, device=DEVICE), 20)  # lengths 20
    for positions, rows in (([-1, 0], 1), ([21, 0], 1), ([20, 20], 50)):  # below 0, a gap, past the cache
        with pytest.raises(ValueError, match=r"positions\[[01]\] = "):
            index.append_at(cache, torch.tensor(positions, device=DEVICE), rows)
    assert index.lengths.tolist() == [20, 20]
    with pytest.raises(TypeError, match="copy_ takes a PageIndex"):
        index.copy_(cache)
