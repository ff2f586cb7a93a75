"""NSA's selection kernel (Triton; the CPU interpreter here) against the PyTorch selection it
replaces on CUDA (:func:`sparse_attn.nsa.compressed._selection`): the same blocks for every token
across GQA ratios (a group that is not a power of two included), lengths that are not block
multiples, queries that are the last rows of a longer cache, block sizes, forced blocks and
budgets larger than the blocks a token has; through :class:`~sparse_attn.nsa.NSAAttention`, the
same output either way."""

import math
import os

import pytest
import torch

from sparse_attn.nsa import NSAAttention, NSAConfig
from sparse_attn.nsa.compressed import _selection, blocks_to_mask, selection_kernel_supports
from sparse_attn.options import KernelOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")

SMALL = NSAConfig(compress_block=32, compress_stride=16, select_block=16, select_blocks=8, window=32,
                  window_block=16)
NARROW = NSAConfig(compress_block=16, compress_stride=8, select_block=32, select_blocks=4, forced_local=1,
                   window=64, window_block=32)
MANY = NSAConfig(compress_block=16, compress_stride=16, select_block=16, select_blocks=32, forced_initial=0,
                 window=32, window_block=16)


def case(batch, heads, kv_heads, seq, q_len, dim, config, dtype=torch.float16, seed=0):
    """Queries, compressed keys and the compressed branch's LSE (exact, from float32 scores)."""
    gen = torch.Generator().manual_seed(seed)
    nc = max(0, (seq - config.compress_block) // config.compress_stride + 1)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(DEVICE, dtype)
    kc = torch.randn(batch, kv_heads, nc, dim, generator=gen).to(DEVICE, dtype)
    group = heads // kv_heads
    positions = torch.arange(seq - q_len, seq, device=DEVICE)
    scores = torch.einsum("bngsd,bncd->bngsc", q.float().view(batch, kv_heads, group, q_len, dim), kc.float())
    ends = torch.arange(nc, device=DEVICE) * config.compress_stride + config.compress_block - 1
    visible = ends[None, :] <= positions[:, None]
    scale = 1 / math.sqrt(dim)
    lse = torch.logsumexp((scores * scale).masked_fill(~visible, float("-inf")), -1).view(batch, heads, q_len)
    return q, kc, lse, positions, scale


def kernel_choice(q, kc, lse, config, seq, scale):
    from sparse_attn.nsa.selection_kernels import triton_select_blocks

    blocks = triton_select_blocks(q, kc, lse, config, seq, scale)
    ns = math.ceil(seq / config.select_block)
    assert blocks.dtype == torch.int32 and blocks.shape[-1] == min(config.select_blocks, ns)
    return blocks_to_mask(blocks, ns)


@pytest.mark.parametrize("heads,kv_heads,config", [(2, 2, SMALL), (4, 2, NARROW), (3, 1, MANY), (16, 2, SMALL),
                                                   (16, 1, NARROW)], ids=["mha", "g2", "g3", "g8", "g16"])
def test_kernel_selects_the_pytorch_blocks(heads, kv_heads, config):
    seq = 150  # not a multiple of any block size
    q, kc, lse, positions, scale = case(1, heads, kv_heads, seq, seq, 16, config)
    want = _selection(q.float(), kc.float(), lse, config, scale, positions, math.ceil(seq / config.select_block), None)
    assert torch.equal(kernel_choice(q, kc, lse, config, seq, scale), want)


@pytest.mark.parametrize("dtype,seq,q_len", [(torch.float16, 300, 37), (torch.bfloat16, 97, 1),
                                             (torch.bfloat16, 40, 3)])
def test_kernel_for_the_last_rows_of_a_longer_cache(dtype, seq, q_len):
    """Queries at the end of a cache (a chunk, a decode step; one compressed key only), two sequences."""
    q, kc, lse, positions, scale = case(2, 8, 2, seq, q_len, 32, SMALL, dtype=dtype, seed=1)
    want = _selection(q.float(), kc.float(), lse, SMALL, scale, positions, math.ceil(seq / SMALL.select_block), None)
    got = kernel_choice(q, kc, lse, SMALL, seq, scale)
    assert torch.equal(got, want)
    assert (got.sum(-1) <= SMALL.select_blocks).all()


def test_kernel_limits():
    q = torch.zeros(1, 32, 4, 64, dtype=torch.bfloat16)
    assert selection_kernel_supports(q, 8) and selection_kernel_supports(q, 2)
    assert not selection_kernel_supports(q, 1)  # 32 query heads per KV head
    assert not selection_kernel_supports(q.float(), 8)
    assert not selection_kernel_supports(torch.zeros(1, 8, 4, 48, dtype=torch.bfloat16), 8)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_nsa_attention_gives_the_same_output_with_the_kernel_selection(kv_heads):
    """The whole module, forward: the kernel's selection and PyTorch's give the same output."""
    torch.manual_seed(0)
    heads, dim, seq = 4, 16, 150
    module = NSAAttention(SMALL, heads, kv_heads, dim).to(DEVICE, torch.float16)
    q = torch.randn(1, heads, seq, dim, device=DEVICE, dtype=torch.float16)
    k = torch.randn(1, kv_heads, seq, dim, device=DEVICE, dtype=torch.float16)
    v = torch.randn(1, kv_heads, seq, dim, device=DEVICE, dtype=torch.float16)
    runs = {}
    for choice in ("triton", "torch"):
        options = KernelOptions(estimator_kernels=choice)
        runs[choice] = module(q, k, v, kernel_options=options, return_selection=True)
    assert torch.equal(runs["triton"][1], runs["torch"][1])
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_gpu_kernel_at_8k_agrees_with_the_float32_selection(kv_heads):
    """bf16 at 8K with the default NSAConfig: the kernel (bf16 products summed in float32) against
    the PyTorch selection on the same values in float32; ties of nearly equal importance may rank
    apart where the two sum in a different order."""
    config = NSAConfig()
    seq = 8192 + 77
    q, kc, lse, positions, scale = case(1, 32, kv_heads, seq, seq, 128, config, dtype=torch.bfloat16)
    want = _selection(q.float(), kc.float(), lse, config, scale, positions, math.ceil(seq / config.select_block), None)
    got = kernel_choice(q, kc, lse, config, seq, scale)
    assert (got == want).float().mean() > 0.9999
    assert torch.equal(got.sum(-1), want.sum(-1))
