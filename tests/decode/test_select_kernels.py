"""The selection kernels (Triton, run by the CPU interpreter here) against the PyTorch selection:
the page-score kernel gives the same shares per page for quest and pooled across dtypes, GQA ratios,
query rows, page sizes and sequence lengths that are not page multiples (an empty sequence
included); the top-k kernel selects the same pages and counts for every method, group rule, budget,
sink and recent window, takes tied pages in page order, writes every slot, and leaves larger
indexes to PyTorch."""

import pytest
import torch

import sparse_attn.decode.select as select_module
from sparse_attn.decode import PageIndex, page_mass, select_pages
from sparse_attn.options import KernelOptions

TRITON = KernelOptions(estimator_kernels="triton")
TORCH = KernelOptions(estimator_kernels="torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreted_or_gpu():
    import os

    return DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.skipif(not _interpreted_or_gpu(), reason="needs a GPU or TRITON_INTERPRET=1")


def make(lengths, heads, kv_heads, rows, dim, page, dtype, capacity=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(lengths), kv_heads, capacity, dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(len(lengths), heads, rows, dim, generator=gen).to(DEVICE, dtype)
    index = PageIndex.build(k, page, lengths=list(lengths), capacity=capacity)
    return q, index


@pytest.mark.parametrize("method", ["quest", "pooled"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,rows,dim,page", [(4, 2, 1, 32, 16), (8, 1, 3, 64, 32), (2, 2, 2, 16, 16)])
def test_kernel_shares_match_pytorch(method, dtype, heads, kv_heads, rows, dim, page):
    q, index = make((150, 37, 0), heads, kv_heads, rows, dim, page, dtype)
    got = page_mass(q, index, method=method, kernel_options=TRITON)
    want = page_mass(q, index, method=method, kernel_options=TORCH)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
    assert (got[2] == 0).all()  # the empty sequence: no page has a share
    assert (got[1, ..., 3:] == 0).all()  # 37 tokens fill pages 0-2 (page 16) or 0-1 (page 32)
    assert torch.allclose(got[:2].sum(-1), torch.ones(()).to(got), atol=1e-4)


@pytest.mark.parametrize("method", ["quest", "pooled"])
def test_kernel_selects_the_pytorch_pages_when_scores_are_apart(method):
    """Planted pages (keys aligned with the query) are chosen either way."""
    q, index = make((160, 160), 4, 2, 1, 32, 16, torch.float16)
    k = torch.randn(2, 2, 160, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float16)
    for page in (3, 6):
        k[:, :, page * 16:(page + 1) * 16] = q[:, ::2, :1].float().sign().to(k.dtype) * 6
    index = PageIndex.build(k, 16, capacity=160)
    got = select_pages(q, index, method=method, budget=32, sink=0, recent=0, kernel_options=TRITON)
    want = select_pages(q, index, method=method, budget=32, sink=0, recent=0, kernel_options=TORCH)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][:, :, :2].tolist() == [[[3, 6], [3, 6]], [[3, 6], [3, 6]]]


def test_unsupported_shapes_fall_back_to_pytorch():
    """float32 and a head dim that is not a power of two run the PyTorch scores under "triton"."""
    q, index = make((100,), 4, 2, 1, 24, 16, torch.float32)
    got = page_mass(q, index, method="quest", kernel_options=TRITON)
    torch.testing.assert_close(got, page_mass(q, index, method="quest", kernel_options=TORCH))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["quest", "pooled"])
@pytest.mark.parametrize("rows", [1, 4])
def test_kernel_on_the_gpu_at_a_long_context(method, rows):
    """8K-token caches of different lengths, 8 query heads per KV head, bf16."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 4, 8192, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 32, rows, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    index = PageIndex.build(k, 16, lengths=[8192, 5000], capacity=8192)
    got = page_mass(q, index, method=method, kernel_options=TRITON)
    want = page_mass(q, index, method=method, kernel_options=TORCH)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=3e-2)


@pytest.mark.parametrize("method", ["quest", "pooled", "sink_window"])
@pytest.mark.parametrize("group_score", ["mass", "max"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget,sink,recent", [(64, 16, 16), (96, 0, 0), (48, 0, 20), (1000, 16, 16), (16, 0, 0)])
def test_topk_kernel_selects_the_pytorch_pages(method, group_score, dtype, budget, sink, recent):
    """Lengths that are not page multiples, a short and an empty sequence, 4 heads per KV head,
    two query rows; a budget that covers every page, and one of a single page."""
    q, index = make((300, 37, 0), 8, 2, 2, 32, 16, dtype, capacity=320, seed=3)
    knobs = dict(method=method, budget=budget, sink=sink, recent=recent, group_score=group_score)
    got = select_pages(q, index, kernel_options=TRITON, **knobs)
    want = select_pages(q, index, kernel_options=TORCH, **knobs)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("group_score", ["mass", "max"])
def test_topk_kernel_reading_rows_one_by_one_selects_the_same_pages(monkeypatch, group_score):
    """Above ROWS_TOGETHER_MAX values the kernel reads the query rows one at a time: same pages."""
    import sparse_attn.decode.select_kernels as kernels

    q, index = make((300, 37, 0), 8, 2, 2, 32, 16, torch.float16, capacity=320, seed=4)
    knobs = dict(method="quest", budget=64, sink=16, recent=16, group_score=group_score)
    together = select_pages(q, index, kernel_options=TRITON, **knobs)
    monkeypatch.setattr(kernels, "ROWS_TOGETHER_MAX", 0)
    one_by_one = select_pages(q, index, kernel_options=TRITON, **knobs)
    want = select_pages(q, index, kernel_options=TORCH, **knobs)
    for got in (together, one_by_one):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_topk_kernel_takes_tied_pages_in_page_order_and_writes_every_slot():
    """A zero query scores every full page alike: the budget goes to the first pages after the
    forced ones, in order; padding repeats the last page."""
    q, index = make((200, 40), 4, 2, 1, 32, 16, torch.float16, capacity=256)
    q = torch.zeros_like(q)
    pages, counts = select_pages(q, index, method="quest", budget=96, sink=16, recent=16, kernel_options=TRITON)
    # Sequence 0: 13 pages (the last holds 8 tokens, so a lower score); sink page 0, recent pages
    # 11-12 forced, then pages 1-3 by page order among the tied full pages.
    assert pages[0].tolist() == [[0, 1, 2, 3, 11, 12]] * 2
    # Sequence 1: 3 pages fit the 6-page budget: all of them, padded with the last.
    assert pages[1].tolist() == [[0, 1, 2, 2, 2, 2]] * 2 and counts[1].tolist() == [3, 3]


def test_larger_indexes_than_the_topk_kernel_holds_run_pytorch(monkeypatch):
    q, index = make((150, 60), 4, 2, 1, 32, 16, torch.float16)
    want = select_pages(q, index, method="quest", budget=48, sink=16, recent=16, kernel_options=TORCH)
    monkeypatch.setattr(select_module, "KERNEL_MAX_PAGES", index.max_pages - 1)
    import sparse_attn.decode.select_kernels as kernels

    def refuse(*args, **kwargs):
        raise AssertionError("the top-k kernel ran on an index larger than it holds")

    monkeypatch.setattr(kernels, "triton_select_pages", refuse)
    got = select_pages(q, index, method="quest", budget=48, sink=16, recent=16, kernel_options=TRITON)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("page", [16, 32])
def test_append_and_selection_kernels_on_the_gpu_at_a_long_context(page):
    """A decode step's append and selection, kernels vs PyTorch, on 8K-token bf16 caches of two
    lengths with 4 query heads per KV head: the same summaries and lengths, the same page counts,
    and the same pages but for near-ties of the scores."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 8, 8192, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k_new = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    got = PageIndex.build(k, page, lengths=[8192, 5000], capacity=8192 + 64)
    want = PageIndex.build(k, page, lengths=[8192, 5000], capacity=8192 + 64)
    for step in range(2):  # the second append launches through the compiled launcher
        got.append(k_new + step, kernel_options=TRITON)
        want.append(k_new + step, kernel_options=TORCH)
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.kmin, want.kmin) and torch.equal(got.kmax, want.kmax)
    torch.testing.assert_close(got.ksum, want.ksum, atol=1e-3, rtol=1e-5)
    knobs = dict(method="quest", budget=2048, sink=64, recent=64)
    pages, counts = select_pages(q, got, kernel_options=TRITON, **knobs)
    ref_pages, ref_counts = select_pages(q, want, kernel_options=TORCH, **knobs)
    assert torch.equal(counts, ref_counts)
    # Later calls launch through the compiled launchers; Triton's own path gives the same pages.
    for options in (TRITON, KernelOptions(estimator_kernels="triton", fast_launch=False)):
        again = select_pages(q, got, kernel_options=options, **knobs)
        assert torch.equal(again[0], pages) and torch.equal(again[1], counts)
    shared = sum(len(set(a[:n]) & set(b[:n])) for a, b, n in
                 zip(pages.flatten(0, 1).tolist(), ref_pages.flatten(0, 1).tolist(), counts.flatten().tolist()))
    assert shared >= 0.98 * int(counts.sum())


def test_topk_kernel_matches_pytorch_over_random_budgets_windows_and_ties():
    """Random lengths, budgets, sinks and recent windows, with random queries and with zero queries
    (every full page tied): the kernel's search gives PyTorch's pages and counts."""
    gen = torch.Generator().manual_seed(11)
    for case in range(24):
        lengths = torch.randint(1, 400, (2,), generator=gen).tolist()
        q, index = make(lengths, 4, 2, 1, 16, 16, torch.float16, capacity=400, seed=case)
        if case % 3 == 0:
            q = torch.zeros_like(q)
        sink, recent, extra = (16 * int(torch.randint(0, n, (1,), generator=gen)) for n in (4, 6, 10))
        knobs = dict(method="quest", budget=sink + recent + 16 + extra, sink=sink, recent=recent)
        got = select_pages(q, index, kernel_options=TRITON, **knobs)
        want = select_pages(q, index, kernel_options=TORCH, **knobs)
        assert torch.equal(got[1], want[1]), (case, lengths, knobs)
        assert torch.equal(got[0], want[0]), (case, lengths, knobs)

