"""PageSelection.append_and_select: the page-score kernel that appends the step's keys first (Triton,
run by the CPU interpreter here) leaves the index and selects the pages exactly as ``index.append``
followed by the selection does, for quest and pooled scores, exact and int8 bounds, GQA ratios,
steps of 1 to 16 tokens that cross page boundaries, per-sequence counts (0 included) and a sequence
that reaches the capacity; elsewhere it is those two calls; bad input is refused before the index
changes."""

import os

import pytest
import torch

from sparse_attn.decode import PageIndex, PageSelection
from sparse_attn.options import KernelOptions

TRITON = KernelOptions(estimator_kernels="triton")
TORCH = KernelOptions(estimator_kernels="torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _index(lengths, kv_heads, dim, page, dtype, bounds, capacity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(lengths), kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)
    return PageIndex.build(k, page, lengths=list(lengths), capacity=capacity, bounds=bounds)


def _clone(index):
    return PageIndex.empty(index.batch, index.kv_heads, index.head_dim, index.capacity, index.page_size,
                           dtype=index.dtype, device=index.device, bounds=index.bounds).copy_(index)


def _assert_same_index(got, want, exact_sums=True):
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.kmin, want.kmin) and torch.equal(got.kmax, want.kmax)
    if exact_sums:
        assert torch.equal(got.ksum, want.ksum)
    else:
        torch.testing.assert_close(got.ksum, want.ksum, atol=1e-5, rtol=1e-5)
    if want.bounds == "int8":
        assert torch.equal(got.qmin, want.qmin) and torch.equal(got.qmax, want.qmax)
        assert torch.equal(got.qscale, want.qscale)


CASES = [  # (lengths, heads, kv_heads, new, dim, page, counts)
    ((47, 16, 63), 4, 2, 1, 32, 16, None),
    ((30, 64, 1), 8, 2, 3, 32, 16, (3, 1, 0)),
    ((15, 100), 2, 1, 16, 16, 16, None),
    ((64, 33), 8, 8, 5, 64, 32, (5, 2)),
]


@pytest.mark.skipif(not KERNELS, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("method", ["quest", "pooled"])
@pytest.mark.parametrize("bounds", ["exact", "int8"])
@pytest.mark.parametrize("lengths,heads,kv_heads,new,dim,page,counts", CASES)
def test_fused_append_equals_append_then_select(method, bounds, lengths, heads, kv_heads, new, dim, page, counts):
    dtype = torch.bfloat16 if bounds == "int8" else torch.float16
    capacity = 128
    index = _index(lengths, kv_heads, dim, page, dtype, bounds, capacity)
    gen = torch.Generator().manual_seed(1)
    k_new = torch.randn(len(lengths), kv_heads, new, dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(len(lengths), heads, min(new, 4), dim, generator=gen).to(DEVICE, dtype)
    counts_arg = None if counts is None else torch.tensor(counts, device=DEVICE)
    selection = PageSelection(method=method, budget=3 * page, sink=page, recent=page)
    fused_index, split_index = _clone(index), _clone(index)
    pages, page_counts = selection.append_and_select(q, fused_index, k_new, counts_arg, kernel_options=TRITON)
    split_index.append(k_new, counts_arg, kernel_options=TRITON)
    want_pages, want_counts = selection(q, split_index, kernel_options=TRITON)
    _assert_same_index(fused_index, split_index, exact_sums=new <= 2)
    assert torch.equal(page_counts, want_counts)
    assert torch.equal(pages, want_pages)
    # The PyTorch append (the reference) gives the same index.
    torch_index = _clone(index).append(k_new, counts_arg, kernel_options=TORCH)
    _assert_same_index(fused_index, torch_index, exact_sums=False)


@pytest.mark.skipif(not KERNELS, reason="needs a GPU or TRITON_INTERPRET=1")
def test_fused_append_up_to_the_capacity_and_successive_steps():
    """Steps that fill the last page of the capacity drop the tokens past it, as append does; a run
    of fused steps keeps the index equal to a run of appends."""
    index = _index((90, 122), 2, 32, 16, torch.float16, "exact", capacity=128)
    fused, split = _clone(index), _clone(index)
    selection = PageSelection(method="quest", budget=48, sink=16, recent=16)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        k_new = torch.randn(2, 2, 2, 32, generator=gen).to(DEVICE, torch.float16)
        q = torch.randn(2, 4, 1, 32, generator=gen).to(DEVICE, torch.float16)
        got = selection.append_and_select(q, fused, k_new, kernel_options=TRITON)
        split.append(k_new, kernel_options=TRITON)
        want = selection(q, split, kernel_options=TRITON)
        _assert_same_index(fused, split)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fused.lengths.tolist() == [96, 128]  # the second one reaches the capacity
    with pytest.raises(ValueError, match="capacity"):
        selection.append_and_select(q, fused, torch.zeros(2, 2, 3, 32, device=DEVICE, dtype=torch.float16),
                                    kernel_options=TRITON)
    _assert_same_index(fused, split)  # refused before anything changed


@pytest.mark.skipif(not KERNELS, reason="needs a GPU or TRITON_INTERPRET=1")
def test_fused_append_takes_steps_the_append_kernel_does_not(monkeypatch):
    """32 KV heads x 16 tokens x 128 dims is past the append kernel's size (every KV head in one
    program) but not the page-score kernel's (one KV head per program): the fused path runs, never
    calling PageIndex.append, and matches the PyTorch append then the selection."""
    from sparse_attn.decode.select_kernels import triton_page_logits

    index = _index((20,), 32, 128, 16, torch.float16, "exact", capacity=64)
    gen = torch.Generator().manual_seed(4)
    k_new = torch.randn(1, 32, 16, 128, generator=gen).to(DEVICE, torch.float16)
    q = torch.randn(1, 32, 1, 128, generator=gen).to(DEVICE, torch.float16)
    selection = PageSelection(method="quest", budget=48, sink=16, recent=16)
    split = _clone(index).append(k_new, kernel_options=TORCH)
    want = selection(q, split, kernel_options=TRITON)

    def refuse(*args, **kwargs):
        raise AssertionError("PageIndex.append was called: the fused path did not run")

    monkeypatch.setattr(PageIndex, "append", refuse)
    got = selection.append_and_select(q, index, k_new, kernel_options=TRITON)
    _assert_same_index(index, split, exact_sums=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="with_stats"):  # the append needs the top-k kernel to finish it
        triton_page_logits(q, index, "quest", 0.1, with_stats=False, k_new=k_new)


@pytest.mark.parametrize("method", ["quest", "pooled", "sink_window"])
def test_without_kernels_it_is_append_then_select(method):
    index = _index((40, 7), 2, 16, 16, torch.float32, "exact", capacity=64)
    gen = torch.Generator().manual_seed(3)
    k_new = torch.randn(2, 2, 2, 16, generator=gen).to(DEVICE)
    q = torch.randn(2, 4, 1, 16, generator=gen).to(DEVICE)
    selection = PageSelection(method=method, budget=48, sink=16, recent=16)
    fused, split = _clone(index), _clone(index)
    got = selection.append_and_select(q, fused, k_new, kernel_options=TORCH)
    split.append(k_new, kernel_options=TORCH)
    want = selection(q, split, kernel_options=TORCH)
    _assert_same_index(fused, split)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_input_is_refused_before_the_index_changes():
    index = _index((40,), 2, 16, 16, torch.float32, "exact", capacity=64)
    before = _clone(index)
    q = torch.randn(1, 4, 1, 16, device=DEVICE)
    selection = PageSelection(method="quest", budget=48, sink=16, recent=16)
    with pytest.raises(ValueError, match="k_new"):
        selection.append_and_select(q, index, torch.randn(1, 3, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="budget"):
        PageSelection(method="quest", budget=16, sink=16, recent=16).append_and_select(
            q, index, torch.randn(1, 2, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="oracle"):
        PageSelection(method="oracle", budget=48).append_and_select(q, index, torch.randn(1, 2, 1, 16, device=DEVICE))
    _assert_same_index(index, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bounds", ["exact", "int8"])
def test_fused_append_on_the_gpu_at_a_long_context(bounds):
    """Eight successive fused steps on 8K-token bf16 caches of two lengths (one crossing a page
    boundary), 4 query heads per KV head, pages of 64, with and without dependent launches: the
    index and the selections of append + select, step by step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 8, 8192, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    fused = PageIndex.build(k, 64, lengths=[8000, 4093], capacity=8192, bounds=bounds)
    split = PageIndex.build(k, 64, lengths=[8000, 4093], capacity=8192, bounds=bounds)
    selection = PageSelection(method="quest", budget=2048, sink=64, recent=64)
    for step in range(8):
        options = KernelOptions(estimator_kernels="triton", dependent_launch=step % 2 == 1)
        k_new = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        got = selection.append_and_select(q, fused, k_new, kernel_options=options)
        split.append(k_new, kernel_options=options)
        want = selection(q, split, kernel_options=options)
        _assert_same_index(fused, split)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), step
    assert fused.lengths.tolist() == [8008, 4101]
