"""MoBA: the exact per-token reference against a float64 golden written here with loops; the
block-granular method equal to exact MoBA (outputs and gradients, reference backend and the Triton
kernels in the interpreter) when the rows of each query block agree, across GQA ratios, lengths
that are not block multiples and chunked prefill; its agreement with exact MoBA below 1 otherwise;
knob errors; MoBA through patch() for inference and a training step."""

import math

import pytest
import torch

import sparse_attn
from sparse_attn.methods.knobs import KnobError
from sparse_attn.methods.moba import moba_reference, moba_selection_agreement, moba_token_blocks
from utils import tiny_llama


def golden(q, k, v, moba_block, top_k):
    """Float64 exact MoBA, one query token at a time."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            kk, vv = k[b, h // group].double(), v[b, h // group].double()
            for i in range(q_len):
                pos = kv_len - q_len + i
                own = pos // moba_block
                x = q[b, h, i].double()
                gates = [float(x @ kk[j * moba_block:(j + 1) * moba_block].mean(0)) for j in range(own)]
                chosen = sorted(range(own), key=lambda j: -gates[j])[:top_k] + [own]
                keys = [t for j in chosen for t in range(j * moba_block, min((j + 1) * moba_block, pos + 1))]
                s = kk[keys] @ x / math.sqrt(dim)
                out[b, h, i] = torch.softmax(s, 0) @ vv[keys]
    return out


def block_constant_rows(q, q_block):
    """q with every query block's rows equal to the block's first row (block-granular = exact)."""
    b, h, s, d = q.shape
    idx = (torch.arange(s) // q_block) * q_block
    return q[:, :, idx]


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("q_len,kv_len", [(100, 100), (37, 130)])
def test_reference_matches_golden(heads, kv_heads, q_len, kv_len):
    gen = torch.Generator().manual_seed(heads + q_len)
    q = torch.randn(2, heads, q_len, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, 16, generator=gen, dtype=torch.float64)
    v = torch.randn_like(k)
    torch.testing.assert_close(moba_reference(q, k, v, 32, 2), golden(q, k, v, 32, 2))


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 1)])
@pytest.mark.parametrize("q_len,kv_len", [(200, 200), (72, 200)])
def test_block_granular_equals_exact_when_block_rows_agree(heads, kv_heads, q_len, kv_len):
    """Lengths that are not block multiples; a chunk starting at position 128 (block-aligned, so
    no query block straddles two MoBA blocks)."""
    gen = torch.Generator().manual_seed(heads * 7 + q_len)
    method = sparse_attn.get_method("moba", block_size=16, moba_block=32, top_k=2)
    # The layout's query blocks start at kv_len - q_len: rows agree within each of them.
    q = block_constant_rows(torch.randn(1, heads, q_len, 16, generator=gen, dtype=torch.float64), 16)
    k = torch.randn(1, kv_heads, kv_len, 16, generator=gen, dtype=torch.float64)
    v = torch.randn_like(k)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    layout = method.estimate(q, k)
    got = sparse_attn.sparse_attention(q, k, v, layout, backend="reference")
    want = moba_reference(q, k, v, 32, 2)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), grad)
    g_want = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernels_run_moba_layouts(dtype):
    """Forward and backward of the Triton kernels (interpreter) on a MoBA layout, against exact
    MoBA in float64, GQA 2, 150 tokens."""
    gen = torch.Generator().manual_seed(5)
    method = sparse_attn.get_method("moba", block_size=16, moba_block=32, top_k=1)
    q64 = block_constant_rows(torch.randn(1, 4, 150, 16, generator=gen, dtype=torch.float64), 16)
    k64 = torch.randn(1, 2, 150, 16, generator=gen, dtype=torch.float64)
    v64 = torch.randn_like(k64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = sparse_attn.sparse_attention(q, k, v, method.estimate(q, k), backend="triton")
    ref64 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = moba_reference(*(t.double() for t in ref64), 32, 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, ref64, grad)
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 8 * tol * max(1.0, float(b.abs().max()))


def test_selection_keeps_own_block_and_top_k_earlier_blocks():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 256, 16, generator=gen)
    k = torch.randn(1, 2, 256, 16, generator=gen)
    chosen = moba_token_blocks(q, k, 64, 2)
    assert chosen.shape == (1, 2, 256, 4)
    own = torch.arange(256) // 64
    assert chosen[..., torch.arange(256), own].all()
    assert (chosen.sum(-1) == torch.clamp(own, max=2) + 1).all()
    # No block after the token's own one.
    assert not (chosen & (torch.arange(4)[None, :] > own[:, None])).any()


def test_agreement_with_exact_moba():
    gen = torch.Generator().manual_seed(2)
    method = sparse_attn.get_method("moba", block_size=16, moba_block=64, top_k=1)
    q = torch.randn(1, 4, 256, 32, generator=gen)
    k = torch.randn(1, 2, 256, 32, generator=gen)
    share = moba_selection_agreement(q, k, method)
    assert 0.5 < share < 1.0  # rows of a block disagree on random data
    assert moba_selection_agreement(block_constant_rows(q, 16), k, method) == 1.0


def test_knob_errors_name_the_knob():
    with pytest.raises(KnobError, match="moba_block"):
        sparse_attn.get_method("moba", block_size=64, moba_block=96)
    with pytest.raises(KnobError, match="top_k"):
        sparse_attn.get_method("moba", top_k=0)


def test_moba_through_patch_for_inference_and_training():
    model = tiny_llama(vocab_size=64, layers=2)
    state = sparse_attn.patch(model, method="moba", block_size=16, moba_block=32, top_k=1, min_kv_len=0,
                              fallback="never", record=True)
    ids = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert state.records and all(r["sparse"] for r in state.records)
    assert max(r["density"] for r in state.records) < 1.0
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
