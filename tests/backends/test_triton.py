"""Triton kernels against the float64 golden, in the CPU interpreter (or on a GPU when present).

The kernel's error must stay within 2x the reference backend's own error on the same low-precision
inputs (plus a small floor), the habit of FlashAttention's tests.
"""

import math

import pytest
import torch

from sparse_attn import BlockSparseLayout, KernelOptions, sparse_attention, sparse_attention_varlen
from sparse_attn.backends.reference import naive_masked_attention
from sparse_attn.backends.triton import triton_can_run
from utils import TOLERANCE, random_layout, rel_error

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float16: 1e-3, torch.bfloat16: 4e-3}
pytestmark = pytest.mark.usefixtures("poison_empty")  # fresh buffers start as NaN (conftest)


def _inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype, grad=False):
    def make(h, s):
        return torch.randn(batch, h, s, dim, device=DEVICE, dtype=dtype).requires_grad_(grad)
    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def _check_close(got, ref_lowp, golden, dtype, what):
    bound = 2 * rel_error(ref_lowp, golden) + FLOOR[dtype]
    err = rel_error(got, golden)
    assert err <= bound, f"{what}: kernel error {err:.2e} > bound {bound:.2e}"
    assert err < TOLERANCE[dtype], f"{what}: {err:.2e} over the {dtype} target"


CASES = [
    # batch, heads, kv_heads, q_len, kv_len, dim, q_block, kv_block, causal, layout_heads
    (1, 2, 2, 64, 64, 32, 16, 16, True, "q"),
    (2, 4, 2, 100, 100, 32, 32, 16, True, "kv"),
    (1, 8, 2, 37, 130, 16, 16, 32, True, "one"),
    (2, 4, 1, 70, 45, 64, 16, 16, False, "q"),
    (1, 2, 1, 1, 90, 32, 16, 16, True, "kv"),
    (1, 2, 2, 33, 33, 128, 16, 16, True, "q"),
    # Layout blocks several tiles wide (the interpreter's tiles are 16): tiles past a query tile's
    # last visible key, or above a key tile's diagonal, are skipped; q_len > kv_len leaves rows empty.
    (1, 4, 2, 150, 100, 32, 64, 64, True, "kv"),
    (1, 2, 1, 75, 203, 32, 32, 64, True, "q"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_and_backward_match_golden(case, dtype):
    """The Triton forward and backward kernels (not the Hopper Gluon ones) against the golden."""
    _check_against_golden(case, dtype, "triton", KernelOptions(backward="triton"))


# The Gluon kernels' cases (Hopper GPUs): 128- and 64-row query blocks, lengths that are not tile
# multiples, q_len below and above kv_len (empty causal rows), non-causal, GQA, layouts per head, KV
# head or one.
GLUON_CASES = [
    (1, 4, 2, 256, 256, 128, 128, 128, True, "q"),
    (2, 4, 1, 300, 300, 64, 128, 64, True, "kv"),
    (1, 8, 2, 200, 456, 128, 128, 128, True, "one"),
    (1, 4, 2, 333, 250, 64, 128, 128, False, "q"),
    (1, 2, 2, 400, 300, 128, 128, 64, True, "q"),
    (1, 4, 2, 200, 200, 128, 64, 64, True, "kv"),
    (2, 2, 1, 129, 257, 64, 64, 128, False, "q"),
]


def _on_hopper_gpu() -> bool:
    return DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper_gpu(), reason="the Gluon forward runs on Hopper GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gluon_forward_matches_golden(case, dtype, monkeypatch):
    """The Gluon forward (required here, so a fallback would fail) against the float64 golden,
    gradients included (the Triton backward runs on its output and LSE)."""
    from sparse_attn.backends.triton import gluon_forward

    calls = []
    real = gluon_forward.gluon_attention_forward
    monkeypatch.setattr(gluon_forward, "gluon_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _check_against_golden(case, dtype, "gluon", KernelOptions(forward="gluon", backward="triton"))
    assert calls, "the Gluon forward did not run"


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper_gpu(), reason="the Gluon backward runs on Hopper GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GLUON_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gluon_backward_matches_golden(case, dtype, monkeypatch):
    """The Gluon dQ and dK/dV kernels (required here) against the float64 golden gradients."""
    from sparse_attn.backends.triton import gluon_backward

    calls = []
    for name in ("gluon_attention_dq", "gluon_attention_dkdv"):
        real = getattr(gluon_backward, name)
        monkeypatch.setattr(gluon_backward, name,
                            lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    _check_against_golden(case, dtype, "triton", KernelOptions(backward="gluon"))
    assert calls == ["gluon_attention_dq", "gluon_attention_dkdv"], calls


# Packed batches through the Gluon forward: lengths not tile multiples, q_len != kv_len per sequence,
# 128- and 64-row blocks, GQA, one layout per sequence or one for all, causal and not.
GLUON_VARLEN_CASES = [
    # lens_q, lens_k, heads, kv_heads, dim, q_block, kv_block, causal, layout_batch
    ([300, 77, 513], [300, 77, 513], 4, 2, 128, 128, 128, True, 3),
    ([64, 200, 129], [100, 260, 129], 4, 1, 64, 64, 64, True, 3),
    ([150, 33], [90, 260], 2, 2, 128, 128, 64, False, 1),
]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper_gpu(), reason="the Gluon forward runs on Hopper GPUs only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GLUON_VARLEN_CASES, ids=lambda c: "-".join(map(str, c[2:])))
def test_gluon_varlen_forward_matches_golden(case, dtype, monkeypatch):
    """The Gluon forward on packed sequences (required, so a fallback would fail) against the float64
    per-sequence reference: output, LSE (empty rows included) and the gradients the Triton varlen
    backward computes from its output and LSE."""
    from sparse_attn.backends.triton import gluon_forward

    lens_q, lens_k, heads, kv_heads, dim, q_block, kv_block, causal, layout_batch = case
    calls = []
    real = gluon_forward.gluon_attention_forward
    monkeypatch.setattr(gluon_forward, "gluon_attention_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for lens in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), heads, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    layout = random_layout(layout_batch, kv_heads, max(lens_q), max(lens_k), block=q_block, kv_block=kv_block,
                           causal=causal, density=0.6).to(DEVICE)
    out, lse = sparse_attention_varlen(q, k, v, cu_q, cu_k, layout, backend="gluon", return_lse=True)
    assert calls, "the Gluon forward did not run"
    golden = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = sparse_attention_varlen(*golden, cu_q, cu_k, layout, backend="reference", return_lse=True)
    assert rel_error(out, ref) < TOLERANCE[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and 0 < int(finite.sum()) < finite.numel()
    assert torch.allclose(lse[finite].double(), ref_lse[finite].double(), atol=1e-2)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, golden, grad.double())
    for name, g, w in zip("qkv", got, want):
        assert rel_error(g, w) < 2 * TOLERANCE[dtype], f"d{name}"


def test_which_backend_names_the_kernels_and_why():
    from sparse_attn import which_backend

    layout = random_layout(1, 2, 48, 48, block=16).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 48, 48, 64, torch.bfloat16)
    choice = which_backend(q, k, v, layout, backend="triton")
    assert (choice.backend, choice.forward_kernel, choice.backward_kernel) == ("triton", "triton", "triton")
    assert choice.backward_reason in ("the CPU interpreter", "blocks 16x16 (multiples of 64 x 64 only)")
    skipped = dict(which_backend(q, k, v, layout).skipped)
    assert skipped["gluon"] in ("the CPU interpreter", "blocks 16x16 (64 or 128 x multiple of 64 only)")
    choice = which_backend(q, k, v, layout, backend="triton", kernel_options=KernelOptions(backward="triton"))
    assert choice.backward_reason == "KernelOptions.backward='triton'"
    skipped = dict(which_backend(q, k, v, layout, kernel_options=KernelOptions(forward="triton")).skipped)
    assert skipped["gluon"] == "KernelOptions.forward='triton' asks for the Triton forward"


def test_required_gluon_forward_refuses_what_it_cannot_run():
    """A call the Gluon forward cannot take (the CPU interpreter, 16-row blocks) raises, naming why,
    when the Gluon forward is required (by name or by KernelOptions), instead of quietly running
    the Triton kernel."""
    layout = random_layout(1, 2, 48, 48, block=16).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 48, 48, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="backend='gluon' cannot run this call: (the CPU interpreter|blocks 16x16)"):
        sparse_attention(q, k, v, layout, backend="gluon")
    with pytest.raises(ValueError, match="Gluon forward cannot run this call: (the CPU interpreter|blocks 16x16)"):
        sparse_attention(q, k, v, layout, kernel_options=KernelOptions(forward="gluon"))
    with pytest.raises(ValueError, match="KernelOptions.forward='gluon' asks for the Gluon forward"):
        sparse_attention(q, k, v, layout, backend="triton", kernel_options=KernelOptions(forward="gluon"))


def test_required_gluon_backward_refuses_what_it_cannot_run():
    """KernelOptions(backward="gluon") on a call the Gluon kernels cannot take raises in the
    backward, naming why; the forward is unaffected."""
    layout = random_layout(1, 2, 48, 48, block=16).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 48, 48, 64, torch.bfloat16, grad=True)
    out = sparse_attention(q, k, v, layout, backend="triton", kernel_options=KernelOptions(backward="gluon"))
    with pytest.raises(ValueError, match="Gluon backward cannot run this call: (the CPU interpreter|blocks 16x16)"):
        out.sum().backward()


def _check_against_golden(case, dtype, backend="triton", options=None):
    batch, heads, kv_heads, q_len, kv_len, dim, qb, kb, causal, lh = case
    n = {"one": 1, "kv": kv_heads, "q": heads}[lh]
    layout = random_layout(1 if lh == "one" else batch, n, q_len, kv_len, block=qb, kv_block=kb,
                           causal=causal, density=0.6).to(DEVICE)
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, dim, dtype, grad=True)
    out, lse = sparse_attention(q, k, v, layout, backend=backend, return_lse=True, kernel_options=options)
    ref, ref_lse = sparse_attention(q, k, v, layout, backend="reference", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold, gold_lse = naive_masked_attention(q64, k64, v64, layout.to_token_mask())
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    _check_close(out, ref, gold, dtype, "out")
    finite = torch.isfinite(gold_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), gold_lse[finite], atol=2e-2)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_lowp = torch.autograd.grad(ref, (q, k, v), grad)
    want = torch.autograd.grad(gold, (q64, k64, v64), grad.double())
    for g, r, w, name in zip(got, want_lowp, want, ("dq", "dk", "dv")):
        assert g.shape == w.shape and g.dtype == dtype
        _check_close(g, r, w, dtype, name)


def test_empty_rows_zero_output_and_finite_grads():
    dense = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    dense[0, 0, 2, :2] = True
    layout = BlockSparseLayout.from_dense(dense, 64, 64, 16).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float16, grad=True)
    out, lse = sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert (lse[0, 1] == float("-inf")).all()
    out.float().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(k.grad[0, 1], torch.zeros_like(k.grad[0, 1]))  # head 1 keeps nothing


def test_strided_inputs_from_bshd_views():
    base_q = torch.randn(2, 50, 4, 32, device=DEVICE, dtype=torch.float16)  # (B, S, H, D), HF-style
    base_k = torch.randn(2, 50, 2, 32, device=DEVICE, dtype=torch.float16)
    q, k, v = base_q.transpose(1, 2), base_k.transpose(1, 2), base_k.transpose(1, 2)
    layout = random_layout(2, 2, 50, 50, block=16).to(DEVICE)
    out = sparse_attention(q, k, v, layout, backend="triton")
    ref = sparse_attention(q, k, v, layout, backend="reference")
    assert rel_error(out, ref) < 5e-3


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_per_sequence_reference(dtype, causal, tma, monkeypatch):
    options = KernelOptions(forward_tma=tma, backward_tma=tma)
    lens_q, lens_k = [37, 64, 5], [37, 90, 20] if causal else [50, 64, 17]
    heads, kv_heads, dim = 4, 2, 32
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), heads, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), kv_heads, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), kv_heads, dim, device=DEVICE, dtype=dtype, requires_grad=True)
    layout = random_layout(3, kv_heads, max(lens_q), max(lens_k), block=16, causal=causal,
                           density=0.7).to(DEVICE)
    out, lse = sparse_attention_varlen(q, k, v, cu_q, cu_k, layout, backend="triton", return_lse=True,
                                       kernel_options=options)
    ref, ref_lse = sparse_attention_varlen(q, k, v, cu_q, cu_k, layout, backend="reference",
                                           return_lse=True)
    assert out.shape == q.shape and lse.shape == (heads, sum(lens_q))
    assert rel_error(out, ref) < TOLERANCE[dtype]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        assert rel_error(g, w) < 2 * TOLERANCE[dtype]


def test_triton_refuses_unsupported_inputs_clearly():
    layout = random_layout(1, 2, 32, 32, block=16).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 32, 32, 48, torch.float16)
    with pytest.raises(ValueError, match="head_dim 48"):
        sparse_attention(q, k, v, layout, backend="triton")
    q, k, v = _inputs(1, 2, 2, 32, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        sparse_attention(q, k, v, layout, backend="triton")


def test_too_many_batch_heads_is_refused_clearly():
    """(batch, head) pairs walk one grid dimension (at most 65535 programs): more get a reason."""
    from sparse_attn.backends.triton import MAX_BATCH_HEADS

    layout = random_layout(1, 1, 16, 16, block=16).to(DEVICE)
    q = torch.empty(MAX_BATCH_HEADS + 1, 1, 16, 16, dtype=torch.float16, device=DEVICE)
    reason = triton_can_run(q, q, q, layout)
    assert reason is not None and "batch * heads" in reason and "split the batch" in reason
    assert triton_can_run(q[:MAX_BATCH_HEADS], q[:1], q[:1], layout) is None
    packed = torch.empty(MAX_BATCH_HEADS + 1, 1, 16, dtype=torch.float16, device=DEVICE)
    cu = torch.arange(MAX_BATCH_HEADS + 2, dtype=torch.int32, device=DEVICE)  # one-token sequences
    with pytest.raises(ValueError, match="split the packed batch"):
        sparse_attention_varlen(packed, packed, packed, cu, cu, random_layout(1, 1, 1, 1, block=16).to(DEVICE),
                                backend="triton")


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 16, 16, dtype=torch.float16)
    reason = triton_can_run(q, q, q, random_layout(1, 1, 16, 16, block=16))
    assert reason is not None and "CUDA" in reason


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]], ids=lambda c: "-".join(map(str, c)))
def test_tma_descriptor_loads_match_golden(case, monkeypatch):
    """The optional tensor-descriptor (TMA) tile loads (K/V in the forward and dQ kernels, Q/dO in
    dK/dV): rows past a sequence read as zeros like the masked pointer loads, on GQA, chunked and
    non-multiple lengths; output and all three gradients against the float64 golden."""
    from sparse_attn.backends.triton import ops

    batch, heads, kv_heads, q_len, kv_len, dim, qb, kb, causal, lh = case
    n = {"one": 1, "kv": kv_heads, "q": heads}[lh]
    layout = random_layout(1 if lh == "one" else batch, n, q_len, kv_len, block=qb, kv_block=kb,
                           causal=causal, density=0.6).to(DEVICE)
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, dim, torch.bfloat16, grad=True)
    if DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9:
        assert ops._use_tma(True, q, k, v)
    options = KernelOptions(forward_tma=True, backward_tma=True, backward="triton")
    out = sparse_attention(q, k, v, layout, backend="triton", kernel_options=options)
    ref = sparse_attention(q, k, v, layout, backend="reference")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    gold, _ = naive_masked_attention(q64, k64, v64, layout.to_token_mask())
    assert not torch.isnan(out).any()
    _check_close(out, ref, gold, torch.bfloat16, "out (TMA)")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_lowp = torch.autograd.grad(ref, (q, k, v), grad)
    want = torch.autograd.grad(gold, (q64, k64, v64), grad.double())
    for g, r, w, name in zip(got, want_lowp, want, ("dq", "dk", "dv")):
        _check_close(g, r, w, torch.bfloat16, f"{name} (TMA)")
    assert not ops._use_tma(True, q, k[..., ::2], v)  # a strided last dim cannot use descriptors
    assert not ops._use_tma(True, q, k[:1].expand(2, -1, -1, -1))  # nor a broadcast batch
    assert not ops._use_tma(False, q, k, v)


def test_negative_scale_matches_reference():
    """The kernels scale row maxima, so a negative scale runs as (-q, -scale); values and dQ agree."""
    layout = random_layout(1, 2, 40, 40, block=16, density=0.7).to(DEVICE)
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, torch.float16, grad=True)
    out = sparse_attention(q, k, v, layout, backend="triton", scale=-0.3)
    ref = sparse_attention(q, k, v, layout, backend="reference", scale=-0.3)
    assert rel_error(out, ref) < TOLERANCE[torch.float16]
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_error(g, w) < 2 * TOLERANCE[torch.float16]


def test_inference_call_skips_autograd_and_matches():
    """Without gradients the forward runs with no autograd node; same numbers as the training path."""
    layout = random_layout(1, 2, 48, 48, block=16, density=0.7).to(DEVICE)
    q, k, v = _inputs(1, 4, 2, 48, 48, 32, torch.bfloat16, grad=True)
    trained, lse = sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    with torch.no_grad():
        inferred, lse_inf = sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert trained.grad_fn is not None and inferred.grad_fn is None and not inferred.requires_grad
    assert torch.equal(trained, inferred) and torch.equal(lse, lse_inf)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("packing", ["padded", "varlen"])
def test_cuda_graph_capture_matches_eager(packing):
    """A training step (forward + backward) and an inference call capture into CUDA graphs (no host
    sync, no allocation outside the graph's pool) and replay on new inputs with eager's results:
    what fixed-shape loops use to remove per-call host cost. Tuning happens before capture."""
    torch.manual_seed(0)
    if packing == "padded":
        layout = random_layout(1, 4, 256, 256, block=64, density=0.5).to(DEVICE)
        q, k, v = _inputs(1, 4, 2, 256, 256, 64, torch.bfloat16, grad=True)

        def attend():
            return sparse_attention(q, k, v, layout, backend="triton")
    else:
        lens = [100, 256, 37]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        layout = random_layout(3, 2, max(lens), max(lens), block=64, density=0.5).to(DEVICE)
        q, k, v = (torch.randn(sum(lens), h, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                   for h in (4, 2, 2))

        def attend():
            return sparse_attention_varlen(q, k, v, cu, cu, layout, backend="triton")
    grad = torch.randn_like(q)

    def train_step():
        for t in (q, k, v):
            t.grad = None
        out = attend()
        out.backward(grad)
        return out

    def infer():
        with torch.no_grad():
            return attend()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and compilation cannot run inside a capture
        for _ in range(2):
            train_step()
            infer()
    for t in (q, k, v):
        t.grad = None
    train_graph, infer_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    # Captured on the warm-up stream: the inputs' gradient accumulators were made there.
    with torch.cuda.graph(train_graph, stream=side):
        out = attend()
        out.backward(grad)
    with torch.cuda.graph(infer_graph, stream=side):
        inferred = infer()
    torch.cuda.current_stream().wait_stream(side)
    graphed = (out, q.grad, k.grad, v.grad)

    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
    train_graph.replay()
    infer_graph.replay()
    torch.cuda.synchronize()
    graphed = [t.clone() for t in (*graphed, inferred)]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the stream the gradient accumulators belong to
        eager_out = train_step()
        eager = (eager_out, q.grad, k.grad, v.grad, infer())
    torch.cuda.synchronize()
    for name, got, want in zip(("out", "dq", "dk", "dv", "inference out"), graphed, eager):
        assert torch.isfinite(got).all(), f"{name}: non-finite values from the graph replay"
        assert torch.equal(got, want), f"{name}: graph replay differs from eager (max {(got - want).abs().max()})"
    if packing == "varlen":  # the host-side backends cannot run inside a capture, and say so
        with pytest.raises(ValueError, match="reads cu_seqlens on the host, which a CUDA-graph capture forbids"):
            with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
                sparse_attention_varlen(q, k, v, cu, cu, layout, backend="reference")


def test_launch_specialization_is_at_least_as_fine_as_tritons():
    """The compiled-launcher cache (ops._launch) reuses a kernel for calls with the same
    ``_specialization``; that is only safe if every pair of arguments Triton would compile apart
    (int == 1, divisible by 16, 32 vs 64 bits; tensor dtype and 16-byte alignment) differs in it."""
    from sparse_attn.backends.triton import launch

    libtriton = pytest.importorskip("triton._C.libtriton")
    backend = pytest.importorskip("triton.backends.nvidia.compiler").CUDABackend
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this Triton specializes in Python; nothing native to compare against")
    base = torch.zeros(64, dtype=torch.bfloat16)
    samples = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 3,
               0.5, 1.0, 16.0, base, base[1:], base[8:], base[16:], base.float(), base.half()[1:]]
    if launch._TENSOR_DESCRIPTOR is not None:  # host TMA descriptors, the Gluon kernels' arguments
        from sparse_attn.backends.triton.gluon_forward import _shared_layout

        for rows, dtype, block in ((256, torch.bfloat16, 64), (200, torch.bfloat16, 64), (256, torch.float16, 64),
                                   (256, torch.bfloat16, 128)):
            t = torch.zeros(rows, 64, dtype=dtype)
            samples.append(launch._TENSOR_DESCRIPTOR(t, list(t.shape), list(t.stride()), [block, 64],
                                                  _shared_layout(block, 64, dtype)))
    for a in samples:
        for b in samples:
            theirs = [libtriton.native_specialize_impl(backend, x, False, True, True) for x in (a, b)]
            if theirs[0] != theirs[1]:
                assert launch._specialization([a]) != launch._specialization([b]), (a, b, theirs)
    assert launch._specialization([object()]) is None  # unknown argument types take Triton's own path


def test_row_descriptor_is_the_descriptor_tritons_constructor_would_build():
    """``row_descriptor`` skips TensorDescriptor's validation and the 2-D view (host cost): it must
    hold what the validated constructor over the view holds, and specialize like it."""
    from sparse_attn.backends.triton import gluon_forward

    if gluon_forward.GLUON_IMPORT_ERROR is not None:
        pytest.skip(f"no Gluon in this Triton: {gluon_forward.GLUON_IMPORT_ERROR}")
    libtriton = pytest.importorskip("triton._C.libtriton")
    backend = pytest.importorskip("triton.backends.nvidia.compiler").CUDABackend
    for shape, dtype, rows in (((1, 4, 300, 64), torch.bfloat16, 64), ((2, 2, 256, 128), torch.float16, 128)):
        t = torch.randn(shape, dtype=dtype)
        lean = gluon_forward.row_descriptor(t, rows)
        flat = t.view(-1, shape[-1])
        checked = gluon_forward.TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, shape[-1]],
                                                 gluon_forward._shared_layout(rows, shape[-1], dtype))
        for field in ("shape", "strides", "block_shape", "layout", "padding"):
            assert getattr(lean, field) == getattr(checked, field), field
        assert lean.base.data_ptr() == checked.base.data_ptr() and lean.base.dtype == checked.base.dtype
        if hasattr(libtriton, "native_specialize_impl"):
            assert libtriton.native_specialize_impl(backend, lean, False, True, True) == \
                libtriton.native_specialize_impl(backend, checked, False, True, True)


def test_gluon_launch_spec_is_at_least_as_fine_as_the_generic_specialization():
    """The Gluon launches key the compiled-launcher cache by their own ``launch_spec`` (cheaper than
    ``launch._specialization``'s walk over every argument): two launches of a kernel with the same
    constexprs and launch_spec must never differ in the generic specialization (which the test
    above holds to Triton's). Recorded on CPU tensors: the launchers only build arguments."""
    from sparse_attn.backends.triton import gluon_backward, gluon_forward, launch, ops

    if gluon_forward.GLUON_IMPORT_ERROR is not None:
        pytest.skip(f"no Gluon in this Triton: {gluon_forward.GLUON_IMPORT_ERROR}")
    launches = []

    def record(kernel, grid, args, meta, spec):
        launches.append(((kernel.__name__, tuple(meta.items()), spec), launch._specialization(args)))

    def misaligned(t):  # the same values, 4 bytes past a 16-byte boundary
        storage = torch.zeros(t.numel() + 1, dtype=t.dtype)
        return storage[1:].view(t.shape).copy_(t)

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        shapes = ((256, 256, 4, 2, 1), (256, 250, 4, 2, 1), (300, 300, 4, 2, 4), (128, 320, 4, 4, 4), (256, 256, 8, 2, 1))
        for q_len, kv_len, heads, kv_heads, layout_heads in shapes:
            layout = random_layout(1, layout_heads, q_len, kv_len, block=128, kv_block=64, density=0.5)
            q, do = (torch.randn(1, heads, q_len, 64, dtype=dtype) for _ in range(2))
            k, v = (torch.randn(1, kv_heads, kv_len, 64, dtype=dtype) for _ in range(2))
            lists, t_lists = ops._block_lists(layout)[:4], ops._block_lists(layout, kv_major=True)[:4]
            for lse_of, lists_of in ((lambda t: t, lambda t: t), (misaligned, lambda t: t), (lambda t: t, misaligned)):
                cnt, idx = lists_of(lists[0]), lists_of(lists[1])
                t_cnt, t_idx = lists_of(t_lists[0]), lists_of(t_lists[1])
                out, lse = gluon_forward.gluon_attention_forward(q, k, v, layout, 0.2, cnt, idx, *lists[2:], launch=record)
                lse = lse_of(lse)
                _, delta = gluon_backward.gluon_attention_dq(q, k, v, out, do, lse, layout, 0.1, 0.2, cnt, idx,
                                                             *lists[2:], launch=record)
                gluon_backward.gluon_attention_dkdv(q, k, v, do, lse, lse_of(delta), layout, 0.1, 0.2, t_cnt, t_idx,
                                                    *t_lists[2:], launch=record)
    specs = {}
    for key, generic in launches:
        assert specs.setdefault(key, generic) == generic, f"one launch_spec, two specializations: {key}"
    assert len(specs) < len(launches) and len({generic for _, generic in launches}) > 3  # not vacuous


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="the compiled-launcher path only runs on a GPU")
def test_compiled_launcher_matches_triton_launch(monkeypatch):
    """Calls after the first go through the compiled launcher; they must give bit-identical results
    to Triton's own launch path, for 16-byte-aligned and misaligned inputs (compiled apart)."""
    from sparse_attn.backends.triton import autotune, launch

    layout = random_layout(1, 2, 80, 80, block=16, density=0.6).to(DEVICE)
    flat = torch.randn(4 * 80 * 64 + 1, device=DEVICE, dtype=torch.float16)
    q_shape, kv_shape = (1, 4, 80, 64), (1, 2, 80, 64)
    misaligned = [flat[1:1 + math.prod(s)].view(s) for s in (q_shape, kv_shape, kv_shape)]  # 2-byte offset
    assert all(t.data_ptr() % 16 for t in misaligned)
    inputs = {"aligned": [t.clone() for t in misaligned], "misaligned": misaligned}
    results = {}
    monkeypatch.setattr(autotune, "_COMPILED", {})
    for fast in (True, False):
        options = KernelOptions(fast_launch=fast, backward="triton")
        for name, tensors in inputs.items():
            q, k, v = (t.detach().requires_grad_() for t in tensors)
            for _ in range(3):  # the first call tunes and compiles; the others reuse
                out = sparse_attention(q, k, v, layout, backend="triton", kernel_options=options)
                grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            results[fast, name] = (out, *grads)
        if fast:
            assert not launch._LAUNCHER_UNSUPPORTED, "the compiled-launcher path turned itself off on this Triton"
            assert len(autotune._COMPILED) == 6  # forward, dQ, dK/dV for each alignment
    for name in inputs:
        for got, want in zip(results[True, name], results[False, name]):
            assert torch.equal(got, want), name
    gold, _ = naive_masked_attention(*(t.double() for t in misaligned), layout.to_token_mask())
    assert rel_error(results[True, "misaligned"][0], gold) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper_gpu(), reason="the Gluon kernels run on Hopper GPUs only")
def test_gluon_kernels_through_the_compiled_launcher_match_their_jit_launch(monkeypatch):
    """The Gluon forward, dQ and dK/dV kernels launched through the compiled-launcher cache give
    bit-identical results to Gluon's own launch path."""
    from sparse_attn.backends.triton import autotune, launch

    layout = random_layout(1, 2, 300, 300, block=128, kv_block=64, density=0.6).to(DEVICE)
    inputs = _inputs(1, 4, 2, 300, 300, 128, torch.bfloat16)
    results = {}
    monkeypatch.setattr(autotune, "_COMPILED", {})
    for fast in (True, False):
        options = KernelOptions(fast_launch=fast, backward="gluon")
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        for _ in range(3):  # the first call compiles; the others reuse
            out = sparse_attention(q, k, v, layout, backend="gluon", kernel_options=options)
            results[fast] = (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
        if fast:
            assert not launch._LAUNCHER_UNSUPPORTED, "the compiled-launcher path turned itself off on this Triton"
            assert {key[0] for key in autotune._COMPILED} == {"_gluon_fwd_kernel", "_gluon_dq_kernel", "_gluon_dkdv_kernel"}
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)


def test_fast_launch_steps_aside_for_launch_hooks(monkeypatch):
    """A profiler hook on Triton launches (e.g. proton) must see our launches: then Triton's own path
    runs; an empty hook chain (Triton 3.6's default) does not count as a hook."""
    from sparse_attn.backends.triton import autotune, launch

    knobs = pytest.importorskip("triton").knobs
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    fn = autotune._tuned("fwd", 16, 16, 16).fn
    hook = knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):  # a HookChain
        assert launch._fast_launch_ready(fn, True)
        hook.add(print)
        try:
            assert not launch._fast_launch_ready(fn, True)
        finally:
            hook.remove(print)
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
        assert launch._fast_launch_ready(fn, True)
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", print)
        assert not launch._fast_launch_ready(fn, True)
    assert launch._no_hook(None)


def test_layouts_of_different_widths_are_tuned_apart(monkeypatch):
    """The autotuning key carries the layout's width class (bit length of its widest row), so a
    sparse layout does not inherit tiles tuned on a dense one."""
    from sparse_attn.backends.triton import autotune

    monkeypatch.setattr(autotune, "_CHOSEN", {})
    q, k, v = _inputs(1, 2, 2, 128, 128, 32, torch.float16)
    dense = random_layout(1, 2, 128, 128, block=16, density=1.0).to(DEVICE)
    diagonal = BlockSparseLayout.from_dense(torch.eye(8, dtype=torch.bool), 128, 128, 16).to(DEVICE)
    assert (autotune._width_class(dense.kv_indices), autotune._width_class(diagonal.kv_indices)) == (4, 1)
    for layout in (dense, diagonal, dense):
        sparse_attention(q, k, v, layout, backend="triton")
    assert sorted(key[-1] for key in autotune._CHOSEN if key[0] == "fwd") == [1, 4]


def test_block_lists_are_read_once_per_layout():
    """What the kernels read from a layout (lists, their strides, the width class; the kv-major
    transpose for dK/dV) is computed on the first call and reused: per-call tensor method calls cost
    microseconds on a GPU host. The cached values are the layout's own."""
    from sparse_attn.backends.triton import autotune, ops

    layout = random_layout(1, 2, 96, 96, block=32, density=0.7)
    lists = ops._block_lists(layout)
    assert ops._block_lists(layout) is lists
    cnt, idx, cnt_strides, idx_strides, width = lists
    assert cnt is layout.kv_num_blocks and idx is layout.kv_indices
    assert cnt_strides == (0, cnt.stride(1)) and idx_strides == (0, idx.stride(1), idx.stride(2))  # batch 1
    assert width == autotune._width_class(idx)
    t_cnt, t_idx, *_ = ops._block_lists(layout, kv_major=True)
    transposed = layout.transpose()
    assert torch.equal(t_cnt, transposed.q_num_blocks) and torch.equal(t_idx, transposed.q_indices)
    assert ops._block_lists(layout, kv_major=True)[0] is t_cnt


@pytest.mark.parametrize("hopper", [False, True])
def test_dkdv_tuning_space_depends_on_head_dim(monkeypatch, hopper):
    """On a GPU, head dim 128's dK/dV kernel tunes over the measured short list (64-key tiles on 4
    warps; on Hopper its one measured best, no tuning), head dim 64 over the general space
    (128-key tiles are its fastest); pinned configs replace either."""
    from sparse_attn.backends.triton import autotune

    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(autotune, "on_hopper", lambda: hopper)
    short_list = autotune.DKDV_HEAD_DIM_128_HOPPER if hopper else autotune.DKDV_HEAD_DIM_128
    assert set(autotune.DKDV_HEAD_DIM_128_HOPPER) <= set(autotune.DKDV_HEAD_DIM_128)

    def tiles(configs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}

    assert tiles(autotune._configs(128, 128, "dkdv", 128)) == set(short_list)
    general = tiles(autotune._configs(128, 128, "dkdv", 64))
    assert any(n == 128 for _, n, _, _ in general) and len(general) > len(autotune.DKDV_HEAD_DIM_128)
    assert tiles(autotune._configs(128, 32, "dkdv", 128)) == tiles(autotune._configs(128, 32, "dkdv", 64))  # 64 > block
    try:
        autotune.set_kernel_configs("dkdv", [(32, 128, 8, 2)])
        assert tiles(autotune._configs(128, 128, "dkdv", 128)) == {(32, 128, 8, 2)}
    finally:
        autotune.set_kernel_configs("dkdv", None)


def test_pinned_kernel_configs_are_used_and_still_match_golden():
    """set_kernel_configs replaces a kernel's tuning space: the kernels then run with the pinned
    tiles (several per layout block here) and still match the float64 golden; None restores the
    built-in space and forgets what the pinned one chose."""
    from sparse_attn.backends.triton import autotune

    pinned = {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (32, 32, 4, 2)}
    try:
        for kind, config in pinned.items():
            autotune.set_kernel_configs(kind, [config])
        layout = random_layout(1, 2, 96, 96, block=32, density=0.7).to(DEVICE)
        q, k, v = _inputs(1, 4, 2, 96, 96, 32, torch.float16, grad=True)
        out = sparse_attention(q, k, v, layout, backend="triton")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), grad)
        chosen = {key[0]: tiles for key, (tiles, _) in autotune._CHOSEN.items()}
        assert chosen == {kind: {"BLOCK_M": c[0], "BLOCK_N": c[1]} for kind, c in pinned.items()}
        ref = sparse_attention(q, k, v, layout, backend="reference")
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        gold, _ = naive_masked_attention(q64, k64, v64, layout.to_token_mask())
        _check_close(out, ref, gold, torch.float16, "out")
        want_lowp = torch.autograd.grad(ref, (q, k, v), grad)
        want = torch.autograd.grad(gold, (q64, k64, v64), grad.double())
        for g, r, w, name in zip(got, want_lowp, want, ("dq", "dk", "dv")):
            _check_close(g, r, w, torch.float16, name)
    finally:
        for kind in pinned:
            autotune.set_kernel_configs(kind, None)
    assert not autotune._PINNED and not any(key[0] in pinned for key in autotune._CHOSEN)


def test_bad_pinned_kernel_configs_are_refused_clearly():
    from sparse_attn.backends.triton import autotune

    with pytest.raises(ValueError, match="kind must be one of"):
        autotune.set_kernel_configs("bwd", [(64, 64, 4, 2)])
    with pytest.raises(ValueError, match="power-of-two"):
        autotune.set_kernel_configs("fwd", [(48, 64, 4, 2)])
    with pytest.raises(ValueError, match="at least one config"):
        autotune.set_kernel_configs("fwd", [])
    try:
        autotune.set_kernel_configs("fwd", [(64, 16, 4, 1)])  # BLOCK_M 64 cannot split 32-row blocks
        layout = random_layout(1, 2, 64, 64, block=32).to(DEVICE)
        q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float16)
        with pytest.raises(ValueError, match="must divide the layout's q_block"):
            sparse_attention(q, k, v, layout, backend="triton")
    finally:
        autotune.set_kernel_configs("fwd", None)
