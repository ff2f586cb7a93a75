"""The dense attention the library runs itself (``sparse_attn.backends.dense``): which SDPA backends
``KernelOptions.dense`` tries in which order, and exact causal results with GQA and chunked queries."""

import pytest
import torch

import sparse_attn.backends.dense as dense
from sparse_attn import KernelOptions
from sparse_attn.backends.reference import reference_attention
from sparse_attn.patterns import dense_layout

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability,q_len,choice,order", [
    ((9, 0), 4096, "auto", ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
    ((10, 0), 17, "auto", ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
    ((9, 0), 16, "auto", None),  # a decode step keeps SDPA's choice
    ((8, 0), 4096, "auto", None),  # before Hopper: SDPA's choice
    ((8, 0), 4096, "cudnn", ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
    ((9, 0), 4096, "flash", ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")),
    ((9, 0), 4096, "sdpa", None),
])
def test_backend_order(monkeypatch, capability, q_len, choice, order):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert dense.dense_backend_order(choice, CUDA, q_len) == order
    assert dense.dense_backend_order(choice, torch.device("cpu"), q_len) is None


@pytest.mark.parametrize("q_len,kv_len", [(37, 37), (5, 40)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_dense_causal_attention_is_exact(q_len, kv_len, kv_heads):
    """Bottom-right causal, GQA without repeated K/V, against the reference backend over a full
    causal layout (float64)."""
    q = torch.randn(2, 4, q_len, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, kv_len, 16, dtype=torch.float64)
    got = dense.dense_causal_attention(q, k, v, 0.3, kernel_options=KernelOptions(dense="cudnn"))
    want = reference_attention(q, k, v, dense_layout(q_len, kv_len, block_size=16), scale=0.3)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("choice", ["auto", "sdpa", "cudnn", "flash"])
@pytest.mark.parametrize("q_len,kv_len,kv_heads", [(2048, 2048, 8), (1000, 1000, 2), (64, 3000, 8), (1, 3000, 8)])
def test_gpu_every_choice_runs_and_agrees_with_float32(choice, q_len, kv_len, kv_heads):
    """bf16, 32 heads of 128: whichever backend runs (cuDNN, flash, or one after them where those
    cannot), the result is float32 SDPA's to bf16 rounding."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, q_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, kv_heads, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, kv_heads, kv_len, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    got = dense.dense_causal_attention(q, k, v, kernel_options=KernelOptions(dense=choice))
    want = dense.dense_causal_attention(q.float(), k.float(), v.float(), kernel_options=KernelOptions(dense="sdpa"))
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
