"""The page-score kernel (Triton, run by the CPU interpreter here) against the PyTorch page scores:
the same shares per page for quest and pooled across dtypes, GQA ratios, query rows, page sizes and
sequence lengths that are not page multiples (an empty sequence included), the same selection, and
the cases it leaves to PyTorch."""

import pytest
import torch

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
