"""NSA's compressed branch without the score matrix (:func:`sparse_attn.nsa.compressed.compressed_branch`:
causal attention per group of query phases on the library's kernels, chunked selection) against
the reference
(:func:`~sparse_attn.nsa.reference.compressed_attention` and ``select_blocks``): float64 outputs,
gradients of q, k, v and the compression parameters, and the same selection, over GQA ratios,
lengths that are not block multiples, queries that are the last rows of a longer cache, chunk
sizes, and a sequence shorter than one compressed block."""

import pytest
import torch

from sparse_attn.nsa import NSAConfig, select_blocks
from sparse_attn.nsa.compressed import compressed_branch
from sparse_attn.nsa.reference import compressed_attention

from test_nsa_attention import CONFIG, grads, make_inputs, random_module
from utils import rel_error


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("seq,q_len", [(77, 77), (130, 130), (130, 9), (64, 1), (20, 3)])
@pytest.mark.parametrize("chunk_rows", [None, 5])
@pytest.mark.parametrize("direct_rows", [0, None], ids=["phases", "direct_for_few_queries"])
def test_matches_the_reference_with_gradients(heads, kv_heads, seq, q_len, chunk_rows, direct_rows, monkeypatch):
    """Both ways to the compressed branch (queries regrouped by phase; a few queries scoring every
    compressed key at once) against the reference, outputs, selection and gradients."""
    from sparse_attn.nsa import compressed as compressed_module

    if direct_rows is not None:  # 0: every call regrouped by phase
        monkeypatch.setattr(compressed_module, "DIRECT_ROWS", direct_rows)
    module = random_module(heads, kv_heads)
    params = module.nsa_params()
    q, k, v = make_inputs(heads, kv_heads, seq)
    q = q[:, :, seq - q_len:].detach().requires_grad_()
    out, chosen = compressed_branch(q, k, v, params, CONFIG, 0.25, chunk_rows=chunk_rows)
    want, probs = compressed_attention(q, k, v, params, CONFIG, 0.25)
    assert chosen.dtype == torch.bool and torch.equal(chosen, select_blocks(probs, CONFIG, seq))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    inputs = (q, k, v, *(p for name, p in params.items() if not name.startswith("gate")))
    got_grads = grads(out, inputs)
    want_grads = grads(want, inputs)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("block,stride", [(16, 8), (12, 8), (16, 16), (20, 6)])
def test_block_and_stride_that_do_not_divide(block, stride):
    """The phase offsets hold for any compressed block and stride (the block a multiple of the
    stride or not): output, selection and q's gradient equal the reference's."""
    from sparse_attn.nsa import NSAConfig

    config = NSAConfig(compress_block=block, compress_stride=stride, select_block=16, select_blocks=4,
                       forced_initial=1, forced_local=2, window=32, window_block=16, compress_hidden=8)
    module = random_module(4, 2, config=config)
    q, k, v = make_inputs(4, 2, 93)
    out, chosen = compressed_branch(q, k, v, module.nsa_params(), config, 0.25)
    want, probs = compressed_attention(q, k, v, module.nsa_params(), config, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(chosen, select_blocks(probs, config, 93))
    torch.testing.assert_close(grads(out, (q,))[0], grads(want, (q,))[0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_triton_kernels_in_the_interpreter(dtype, tol):
    """The phase groups through the Triton forward and backward (CPU interpreter) against the
    float64 reference on the same rounded inputs and parameters."""
    module = random_module(4, 2)
    params = {n: p.to(dtype) for n, p in module.nsa_params().items()}
    q, k, v = make_inputs(4, 2, 70, batch=1, dtype=dtype)
    out, chosen = compressed_branch(q, k, v, params, CONFIG, 0.25, backend="triton")
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want, probs = compressed_attention(*wide, {n: p.double() for n, p in params.items()}, CONFIG, 0.25)
    assert out.dtype == dtype and rel_error(out, want) < tol
    assert (chosen == select_blocks(probs, CONFIG, 70)).float().mean() > 0.95
    for name, g, w in zip("qkv", grads(out, (q, k, v)), grads(want, wide)):
        assert rel_error(g, w) < 2 * tol, name


def test_shorter_than_one_compressed_block():
    """No compressed block yet: output 0 (gradients 0), only the forced blocks selected."""
    module = random_module(4, 2)
    q, k, v = make_inputs(4, 2, CONFIG.compress_block - 1)
    out, chosen = compressed_branch(q, k, v, module.nsa_params(), CONFIG, 0.25)
    want, probs = compressed_attention(q, k, v, module.nsa_params(), CONFIG, 0.25)
    assert torch.equal(out, want) and not out.any()
    assert torch.equal(chosen, select_blocks(probs, CONFIG, k.shape[2]))
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert not gq.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_long_sequence_matches_the_reference():
    """bf16 on the GPU (the Triton or Gluon kernels), 4K tokens, 32 query heads over 8 KV heads, head dim 128, the
    default NSAConfig: the output and q's gradient close to the reference's, the selections agree
    but for near-ties."""
    from sparse_attn.nsa import NSAAttention, NSAConfig

    config = NSAConfig()
    module = NSAAttention(config, 32, 8, 128).cuda()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    params = {n: p.to(torch.bfloat16) for n, p in module.nsa_params().items()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 4096, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (32, 8, 8))
    out, chosen = compressed_branch(q, k, v, params, config, 128 ** -0.5)
    want, probs = compressed_attention(q, k, v, params, config, 128 ** -0.5)
    torch.testing.assert_close(out.float(), want.float(), rtol=3e-2, atol=3e-2)
    ref_chosen = select_blocks(probs.float(), config, 4096)
    assert (chosen == ref_chosen).float().mean() > 0.98
    dout = torch.randn_like(out)
    (gq,) = torch.autograd.grad(out, q, dout)
    (wq,) = torch.autograd.grad(want, q, dout)
    torch.testing.assert_close(gq.float(), wq.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("block,stride,select_block", [(32, 16, 64), (32, 16, 16), (48, 16, 16), (32, 32, 32),
                                                       (20, 8, 64), (32, 16, 128)])
def test_mapping_onto_selection_blocks_equals_the_overlap_product(block, stride, select_block):
    """The selection maps compressed probabilities onto selection blocks through each compressed
    block's few overlaps; the result equals the product with the whole overlap matrix (eq. 9)."""
    from sparse_attn.nsa.compressed import map_to_selection_blocks, overlap_pieces
    from sparse_attn.nsa.reference import block_overlap

    config = NSAConfig(compress_block=block, compress_stride=stride, select_block=select_block, select_blocks=4,
                       window=128, window_block=64)
    for seq in (block, 200, 1000):
        nc, ns = (seq - block) // stride + 1, -(-seq // select_block)
        probs = torch.rand(2, 3, 5, nc, dtype=torch.float64)
        targets, weights = overlap_pieces(config, nc, ns, "cpu", torch.float64)
        assert targets.shape[0] <= -(-block // select_block) + 1
        torch.testing.assert_close(map_to_selection_blocks(probs, targets, weights, ns),
                                   probs @ block_overlap(config, nc, ns), rtol=0, atol=1e-12)


def test_earlier_blocks_from_block_indices_equal_the_dense_conversion():
    """The selected branch's layout rows from the kernel's block indices (-1 padded, best first)
    equal those ``dense_to_csr`` gives for the same blocks before each token's own."""
    from sparse_attn.layout import dense_to_csr
    from sparse_attn.nsa.compressed import blocks_to_mask
    from sparse_attn.nsa.module import _earlier_blocks

    gen = torch.Generator().manual_seed(0)
    seq, ns, n = 40, 10, 4
    own = torch.arange(seq) // 4
    distinct = torch.rand(2, 3, seq, ns, generator=gen).argsort(-1)[..., :n].to(torch.int32)  # no repeats
    blocks = torch.where(distinct <= own[:, None], distinct, -1)  # none after the token's own block
    earlier = blocks_to_mask(blocks, ns) & (torch.arange(ns)[None, :] < own[:, None])
    want_counts, want_indices = dense_to_csr(earlier)
    counts, indices = _earlier_blocks(blocks, own)
    assert torch.equal(counts, want_counts)
    width = want_indices.shape[-1]
    assert torch.equal(indices[..., :width], want_indices) and not indices[..., width:].any()
