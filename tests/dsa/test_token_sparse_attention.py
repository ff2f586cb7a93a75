"""token_sparse_attention: the Triton kernels (CPU interpreter) against the float64 reference, forward
and gradients, across dtypes, GQA ratios, lengths, lists with unused and future entries, queries that
read nothing; the reference against dense attention; errors that name the argument."""

import pytest
import torch

from sparse_attn.dsa import reference_token_sparse_attention, token_mask, token_sparse_attention
from utils import TOLERANCE, rel_error

pytestmark = pytest.mark.usefixtures("poison_empty")


def random_lists(batch, q_len, seq, width, unused=0.2, future=True, gen=None):
    """``(B, Sq, width)`` int32 lists of distinct positions in ``[0, seq)`` (causal or not), some
    entries -1; one query of the first sequence reads nothing."""
    rows = []
    for _ in range(batch * q_len):
        rows.append(torch.randperm(seq, generator=gen)[:width])
    lists = torch.stack(rows).view(batch, q_len, width)
    if not future:
        positions = torch.arange(seq - q_len, seq)[None, :, None]
        lists = torch.where(lists <= positions, lists, -1)
    lists = torch.where(torch.rand(lists.shape, generator=gen) < unused, -1, lists)
    lists[0, q_len // 2] = -1
    return lists.to(torch.int32)


def test_reference_equals_dense_attention_when_every_key_is_listed():
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64) for _ in range(2))
    every = torch.arange(9).expand(2, 9, 9).flip(-1).to(torch.int32)  # any order, future keys too
    out, _ = reference_token_sparse_attention(q, k, v, every, 0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True, scale=0.3)
    torch.testing.assert_close(out, dense)
    mask = token_mask(torch.tensor([[[2, -1, 0]]]), 4)
    assert mask.tolist() == [[[True, False, True, False]]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,q_len,seq,width,dim", [
    (4, 4, 13, 13, 5, 16),     # MHA, self-attention
    (8, 2, 37, 70, 20, 32),    # GQA 4, the last 37 of 70 positions, a list wider than one position's past
    (16, 1, 3, 100, 70, 64),   # MQA (DSA's case), lists longer than one key tile
    (8, 1, 1, 129, 64, 128),   # a decode step
])
def test_triton_kernels_match_the_reference_with_gradients(dtype, heads, kv_heads, q_len, seq, width, dim):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, heads, q_len, dim, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(2, kv_heads, seq, dim, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    lists = random_lists(2, q_len, seq, width, gen=gen)
    out, lse = token_sparse_attention(q, k, v, lists, backend="triton", return_lse=True)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = token_sparse_attention(qd, kd, vd, lists, backend="reference", return_lse=True)
    ref.backward(grad.double())
    tol = TOLERANCE[dtype] * 2
    assert rel_error(out, ref) < tol
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert rel_error(got, want) < tol
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(lse), empty)  # queries that read nothing: LSE -inf, output 0
    assert bool((out.float()[empty] == 0).all())
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [None, 2, 5])
def test_lists_split_over_several_programs_merge_to_the_reference(num_splits):
    """A decode step (one query token, one KV head of 8 query heads, a 600-key list with unused
    entries): its list split over programs (3 by default here: 2 programs per SM of the interpreter's
    4, 256 entries at least each), the partial results merged by LSE."""
    from sparse_attn.dsa.kernels import choose_num_splits, triton_forward

    assert choose_num_splits(1, 600, torch.device("cpu")) == 3 and choose_num_splits(64, 600, torch.device("cpu")) == 1
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 1, 64, generator=gen).half()
    k, v = (torch.randn(1, 1, 700, 64, generator=gen).half() for _ in range(2))
    chosen = torch.randperm(700, generator=gen)[:400].int()
    lists = torch.full((1, 1, 600), -1, dtype=torch.int32)
    lists[0, 0, :300], lists[0, 0, 500:] = chosen[:300], chosen[300:]  # unused entries in the middle
    out, lse = triton_forward(q, k, v, lists, 0.125, num_splits=num_splits)
    ref, ref_lse = reference_token_sparse_attention(q.double(), k.double(), v.double(), lists, 0.125)
    assert rel_error(out, ref) < TOLERANCE[torch.float16] * 2
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


def test_auto_takes_the_reference_on_cpu_and_float64_works_with_gradients():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    lists = random_lists(1, 5, 6, 3, unused=0.0, future=False)
    assert torch.autograd.gradcheck(lambda q, k, v: token_sparse_attention(q, k, v, lists), (q, k, v))


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    lists = torch.zeros(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="indices must be an int32/int64 tensor of shape"):
        token_sparse_attention(q, k, v, lists[:, :2])
    with pytest.raises(ValueError, match=r"indices must hold key positions in \[0, 8\) or -1"):
        token_sparse_attention(q, k, v, lists + 8)
    with pytest.raises(ValueError, match="must not list a key position twice"):
        token_sparse_attention(q, k, v, lists)
    with pytest.raises(ValueError, match="KV heads must divide"):
        token_sparse_attention(q, torch.zeros(1, 3, 8, 16), torch.zeros(1, 3, 8, 16), lists)
    with pytest.raises(ValueError, match="q must hold 1 to S = 2 queries"):
        token_sparse_attention(q, k[:, :, :2], v[:, :, :2], lists)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_sparse_attention(q, k, v, lists, backend="flex")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: dtype torch.float32"):
        token_sparse_attention(q, k, v, torch.tensor([[[0, 1]] * 3], dtype=torch.int32), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv_heads", [8, 1])
def test_gpu_kernels_match_the_reference_at_4k_tokens(kv_heads):
    """bf16, 32 query heads, head dim 128, 4096 tokens, 512 keys per token chosen by a random indexer:
    forward and gradients against the float64 reference."""
    from sparse_attn.dsa import select_tokens

    gen = torch.Generator(device="cuda").manual_seed(0)
    seq = 4096
    q = torch.randn(1, 32, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
    k, v = (torch.randn(1, kv_heads, seq, 128, device="cuda", generator=gen).bfloat16().requires_grad_()
            for _ in range(2))
    lists = select_tokens(torch.randn(1, seq, 4, 32, device="cuda", generator=gen),
                          torch.randn(1, seq, 4, device="cuda", generator=gen),
                          torch.randn(1, seq, 32, device="cuda", generator=gen), 512)
    out = token_sparse_attention(q, k, v, lists, backend="triton")
    grad = torch.randn(out.shape, device="cuda", generator=gen).bfloat16()
    out.backward(grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = token_sparse_attention(qd, kd, vd, lists, backend="reference")
    ref.backward(grad.double())
    assert rel_error(out, ref) < 2e-2
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert rel_error(got, want) < 2e-2
