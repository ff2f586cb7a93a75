"""NSA: the selection against a loop written from the paper's eq. 9; NSAAttention equal to
nsa_reference (outputs and gradients wrt q, k, v and every parameter) in float64 on the reference
backend for GQA ratios 1-16 and lengths that are not block multiples, and in float16/bfloat16 on the
Triton kernels (interpreter); the last queries over a KV cache (decode steps and chunks) equal to the
whole sequence's rows; causality; config and input errors."""

import pytest
import torch

from sparse_attn.nsa import NSAAttention, NSAConfig, nsa_reference, select_blocks
from sparse_attn.nsa.reference import compressed_attention
from utils import rel_error

CONFIG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, forced_initial=1,
                   forced_local=2, window=32, window_block=16, compress_hidden=8)


def random_module(heads, kv_heads, dim=16, config=CONFIG, dtype=torch.float64, seed=0):
    """A module whose every parameter is random (the default init zeroes some)."""
    gen = torch.Generator().manual_seed(seed)
    module = NSAAttention(config, heads, kv_heads, dim).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    return module


def make_inputs(heads, kv_heads, seq, dim=16, batch=2, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def grads(out, tensors, seed=2):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, tensors, dout)


def check_grads(got, want, names, tol):
    """Each gradient within ``tol`` (relative) of the reference's, and not zero; but ``k_fc2_bias``'s,
    which is 0 up to rounding in both: a bias on every compressed key shifts each query's scores by a
    constant, which the softmax ignores."""
    for name, g, w in zip(names, got, want):
        if name == "k_fc2_bias":
            assert g.abs().max() < 1e-12 and w.abs().max() < 1e-12, name
            continue
        assert w.norm() > 0, name
        assert rel_error(g, w) < tol, name


def golden_selection(probs, config, seq):
    """Per token and KV group: importance of selection block j = sum over the group's heads and the
    compressed blocks i of p[i] times the stride-d pieces of block i that lie in block j; forced blocks
    first, then by importance (ties: the earlier block); the best n of blocks 0..own."""
    batch, kv_heads, group, _, nc = probs.shape
    d, l, ls = config.compress_stride, config.compress_block, config.select_block
    ns = -(-seq // ls)
    chosen = torch.zeros(batch, kv_heads, seq, ns, dtype=torch.bool)
    for b in range(batch):
        for n in range(kv_heads):
            for t in range(seq):
                own = t // ls
                imp = [0.0] * (own + 1)
                for j in range(own + 1):
                    for i in range(nc):
                        pieces = sum(1 for s in range(i * d, i * d + l, d) if j * ls <= s < (j + 1) * ls)
                        imp[j] += float(probs[b, n, :, t, i].detach().sum()) * pieces
                forced = [j for j in range(own + 1) if j < config.forced_initial or j > own - config.forced_local]
                rest = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: (-imp[j], j))
                for j in (forced + rest)[:config.select_blocks]:
                    chosen[b, n, t, j] = True
    return chosen


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)])
def test_selection_matches_paper_loop(heads, kv_heads):
    module = random_module(heads, kv_heads)
    q, k, v = make_inputs(heads, kv_heads, 83, batch=1)
    _, probs = compressed_attention(q, k, v, module.nsa_params(), CONFIG, 0.25)
    chosen = select_blocks(probs, CONFIG, 83)
    assert torch.equal(chosen, golden_selection(probs, CONFIG, 83))
    own = torch.arange(83) // 16
    assert torch.equal(chosen.sum(-1)[0, 0], torch.clamp(own + 1, max=4))
    assert bool(chosen[..., 0].all()) and bool(chosen[:, :, torch.arange(83), own].all())


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (8, 2), (8, 1), (16, 1)])
@pytest.mark.parametrize("seq", [64, 91])
def test_module_equals_reference_float64(heads, kv_heads, seq):
    """Reference backend. The two calls of the selected branch merge through the float32 LSE the
    attention calls return, which bounds the agreement near 1e-7."""
    module = random_module(heads, kv_heads)
    q, k, v = make_inputs(heads, kv_heads, seq)
    out, chosen = module(q, k, v, backend="reference", return_selection=True)
    ref = nsa_reference(q, k, v, module.nsa_params(), CONFIG)
    assert rel_error(out, ref) < 2e-6
    params = list(module.parameters())
    got, want = grads(out, [q, k, v] + params), grads(ref, [q, k, v] + params)
    check_grads(got, want, ["q", "k", "v"] + [name for name, _ in module.named_parameters()], 2e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_triton_kernels_match_reference(dtype, tol):
    """Triton kernels (interpreter) in float16/bfloat16 against the float64 reference on the same
    rounded inputs and the same block choice."""
    heads, kv_heads, seq = 4, 2, 50
    module = random_module(heads, kv_heads)
    q, k, v = make_inputs(heads, kv_heads, seq, batch=1)
    q, k, v = (t.detach().to(dtype).double().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).double())
    ref, chosen = module(q, k, v, backend="reference", return_selection=True)
    ref_grads = grads(ref, [q, k, v])
    low = random_module(heads, kv_heads).to(dtype)
    low.load_state_dict(module.state_dict())
    ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = low(ql, kl, vl, backend="triton", selection=chosen)
    assert out.dtype == dtype
    assert rel_error(out, ref) < tol
    for name, g, w in zip("qkv", grads(out, [ql, kl, vl]), ref_grads):
        assert rel_error(g, w) < 2 * tol, name


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1)])
@pytest.mark.parametrize("seq,q_len", [(75, 1), (64, 1), (17, 1), (75, 3), (40, 16)])
def test_last_queries_over_a_cache_equal_the_whole_sequence_rows(heads, kv_heads, seq, q_len):
    """Queries that are the last positions (a decode step: one query, through decode_attention; a
    chunk: several, through masks) give the rows of the whole sequence's output, as does the
    reference given the same last queries."""
    module = random_module(heads, kv_heads)
    q, k, v = (t.detach() for t in make_inputs(heads, kv_heads, seq))
    whole, chosen = module(q, k, v, backend="reference", return_selection=True)
    tail, tail_chosen = module(q[:, :, -q_len:], k, v, backend="reference", return_selection=True)
    assert tail.shape == (2, heads, q_len, 16)
    assert torch.equal(tail_chosen, chosen[:, :, -q_len:])
    assert rel_error(tail, whole[:, :, -q_len:]) < 1e-6
    ref = nsa_reference(q[:, :, -q_len:], k, v, module.nsa_params(), CONFIG)
    assert rel_error(tail, ref) < 1e-6


def test_a_decode_step_reads_every_block_of_a_given_selection():
    """A caller's selection wider than select_blocks: the decode step reads all of it, as the
    reference does."""
    module = random_module(4, 2)
    q, k, v = (t.detach() for t in make_inputs(4, 2, 90))
    selection = torch.ones(2, 2, 1, 6, dtype=torch.bool)  # all 6 blocks; select_blocks is 4
    got = module(q[:, :, -1:], k, v, backend="reference", selection=selection)
    want = nsa_reference(q[:, :, -1:], k, v, module.nsa_params(), CONFIG, selection=selection)
    assert rel_error(got, want) < 1e-6


@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1")
def test_decode_step_on_the_triton_decode_kernel_matches_the_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = random_module(8, 2, dtype=torch.float32).to(device, torch.float16)
    q, k, v = (t.detach().to(device) for t in make_inputs(8, 2, 90, dtype=torch.float16))
    got = module(q[:, :, -1:], k, v, backend="triton")
    want = nsa_reference(q[:, :, -1:].double(), k.double(), v.double(),
                         {n: p.double() for n, p in module.nsa_params().items()}, CONFIG)
    assert rel_error(got, want) < 2e-2


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 1)])
def test_packed_sequences_equal_the_reference_per_sequence_with_gradients(heads, kv_heads):
    """forward_varlen over sequences of 37, 0, 64 and 5 tokens: each sequence's rows and the
    gradients wrt q, k, v and every parameter equal nsa_reference run on it alone."""
    module = random_module(heads, kv_heads)
    lengths = [37, 0, 64, 5]
    q, k, v = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_()
               for t in make_inputs(heads, kv_heads, sum(lengths), batch=1))
    cu = torch.tensor([0, 37, 37, 101, 106], dtype=torch.int32)
    out = module.forward_varlen(q, k, v, cu, backend="reference")
    params = list(module.parameters())
    got = grads(out, [q, k, v, *params])
    ref = torch.cat([nsa_reference(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), module.nsa_params(),
                                   CONFIG)[0].transpose(0, 1) for a, b in ((0, 37), (37, 101), (101, 106))])
    assert rel_error(out, ref) < 1e-6
    check_grads(got, grads(ref, [q, k, v, *params]), ["q", "k", "v"] + [n for n, _ in module.named_parameters()],
                1e-6)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to the packed length 106"):
        module.forward_varlen(q, k, v, torch.tensor([0, 50, 40, 106]))
    with pytest.raises(ValueError, match=rf"k must be a packed \(total, {kv_heads}, 16\) tensor"):
        module.forward_varlen(q, k[..., :8], v, cu)


def test_causal():
    """Changing q, k, v from position 40 on leaves outputs before 40 unchanged (also within a block)."""
    module = random_module(4, 2)
    q, k, v = (t.detach() for t in make_inputs(4, 2, 70))
    out = module(q, k, v, backend="reference")
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, 40:] = torch.randn_like(t[:, :, 40:]) * 3
    out2 = module(q2, k2, v2, backend="reference")
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 40:], out[:, :, 40:])


@pytest.mark.parametrize("field,value", [
    ("compress_block", 0), ("compress_stride", 40), ("select_block", 24), ("select_blocks", 2),
    ("forced_local", 0), ("window", 40), ("window_block", 8), ("compress_hidden", -1), ("forced_initial", -1),
])
def test_config_errors_name_the_field(field, value):
    base = dict(compress_block=32, compress_stride=16, select_block=64, select_blocks=3, forced_initial=1,
                forced_local=2, window=64, window_block=32)
    with pytest.raises(ValueError, match=f"NSAConfig.{field} "):
        NSAConfig(**{**base, field: value})


def test_module_input_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NSAAttention(CONFIG, 6, 4, 16)
    module = NSAAttention(CONFIG, 4, 2, 16)
    q, k, v = (t.detach() for t in make_inputs(4, 2, 20, dtype=torch.float32))
    with pytest.raises(ValueError, match="k must have 2 heads"):
        module(q, q, v)
    with pytest.raises(ValueError, match=r"q must hold 1 to S queries .* got q \(2, 4, 20, 16\), k \(2, 2, 10, 16\)"):
        module(q, k[:, :, :10], v[:, :, :10])
    with pytest.raises(ValueError, match=r"q must hold 1 to S queries .* v \(2, 2, 10, 16\)"):
        module(q, k, v[:, :, :10])
    with pytest.raises(ValueError, match="selection must be a bool tensor of shape"):
        module(q, k, v, selection=torch.ones(2, 2, 20, 1, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_steps_match_the_reference_at_a_long_cache(dtype):
    """32 query heads, 8 KV heads, head dim 128, a 4099-token cache: a decode step on the Triton
    kernels against the float64 reference given the same selection."""
    config = NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_blocks=8, window=256,
                       window_block=64)
    module = random_module(32, 8, dim=128, config=config, dtype=torch.float32).to("cuda", dtype)
    q, k, v = (t.detach().to("cuda") for t in make_inputs(32, 8, 4099, dim=128, batch=2, dtype=dtype))
    got, chosen = module(q[:, :, -1:], k, v, backend="triton", return_selection=True)
    want = nsa_reference(q[:, :, -1:].double(), k.double(), v.double(),
                         {n: p.double() for n, p in module.nsa_params().items()}, config, selection=chosen)
    assert rel_error(got, want) < 2e-2
