"""``sparse_attention``: the single entry point that checks inputs and dispatches to a backend."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .backends import BackendChoice, explain_choice, select_backend
from .backends.reference import with_zero_gradients
from .layout import BlockSparseLayout, LayoutError
from .options import KernelOptions, resolve_kernel_options

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
    """Raise ``ValueError`` / :class:`LayoutError` naming the bad argument and what was expected."""
    check_qkv(q, k, v, layout)
    batch, heads, q_len, _ = q.shape
    if q_len == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequence: q_len={q_len}, kv_len={k.shape[2]}")
    layout.check_compatible(batch, heads, k.shape[1], q_len, k.shape[2], q.device)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout) -> None:
    """The checks of :func:`check_attention_inputs` that hold for empty sequences too: q, k, v are
    4-D tensors of one supported dtype on one device, with one batch size, GQA-compatible head
    counts and one head dim for q and k, and ``layout`` is a BlockSparseLayout."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, _, dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in (batch, heads, seq)")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"k/v heads ({kv_heads}) must divide q heads ({heads}) for GQA")
    if k.shape[-1] != dim:
        raise ValueError(f"q head_dim {dim} and k head_dim {k.shape[-1]} differ")


def _graph_break_when_compiled(fn):
    """Under ``torch.compile`` a call to ``fn`` is a graph break (its checks and the Triton autotuner
    stay in eager mode). Eager calls go straight to ``fn``: ``torch.compiler.disable``'s own wrapper
    costs several microseconds per call, which short attention calls feel."""
    disable = getattr(torch.compiler, "disable", None)
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    if disable is None or is_compiling is None:
        return fn
    disabled = disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def autocast_inputs(*tensors):
    """The tensors as ``torch.autocast`` hands them to SDPA: inside an autocast region for their device
    type, float32 ones in the region's dtype (the others unchanged); outside one, all unchanged. So a
    model trained under autocast (float32 weights, queries and keys left float32 by RoPE's float32
    tables, values in bfloat16) attends in bfloat16, differentiably."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors)


@_graph_break_when_compiled
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, *,
                     causal: Optional[bool] = None, scale: Optional[float] = None,
                     backend: str = "auto", return_lse: bool = False,
                     kernel_options: Optional[KernelOptions] = None):
    """Attention restricted to the key blocks ``layout`` keeps.

    Args:
        q: ``(B, H, Sq, D)`` queries; float16, bfloat16, float32 or float64.
        k, v: ``(B, Hkv, Skv, D)`` keys and values; ``Hkv`` must divide ``H`` (GQA: query head
            ``h`` reads KV head ``h // (H // Hkv)``; K/V are never repeated in fast paths).
        layout: a :class:`BlockSparseLayout` built for ``(Sq, Skv)``; its heads are 1, ``Hkv`` or
            ``H`` and its batch 1 or ``B``.
        causal: defaults to ``layout.causal``; if given it must agree with the layout. Causal
            queries are bottom-right aligned: query ``i`` sits at position ``i + Skv - Sq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (fastest that can run: ``gluon``, ``triton``, ``flex``, ``reference``
            in that order), or one of them by name (:func:`which_backend` says what a call gets).
        return_lse: also return the log-sum-exp ``(B, H, Sq)`` float32 (natural log).
        kernel_options: a :class:`~sparse_attn.options.KernelOptions` (which forward and backward
            kernels, TMA loads, launcher); default: the current default (see
            :func:`~sparse_attn.options.kernel_options`).

    Rows with no kept key get output 0 and LSE ``-inf``. Gradients flow through every backend
    that supports them (``reference`` always), through the output and through the LSE (a loss may
    use both, e.g. to merge partial results by their LSE). Under ``torch.compile`` this call is a
    graph break (``torch.compiler.disable``): the layout checks and the Triton autotuner stay in
    eager mode.

    Numerics: the ``reference`` backend computes in float32 (float64 for float64 inputs), sums
    K/V gradients in that precision and is bitwise reproducible on CPU (on CUDA under
    ``torch.use_deterministic_algorithms(True)``). The Triton and Gluon backwards, like
    FlashAttention-2/3, take the row term ``rowsum(O * dO)`` from the output rounded to the input
    dtype, so their gradient error grows with the spread of the logits ``scale * q.k``: on random
    inputs with logit standard deviation 5 vs 200, the relative dQ/dK error is 5e-4 vs 1.7e-3 for
    float16 and 1e-2 vs 5e-2 for bfloat16 (the reference: 2e-4 and 1.6e-3 throughout). Use
    float16 or the reference backend where logits are that extreme.

    Inside a ``torch.autocast`` region for q's device type, float32 inputs are cast to the region's
    dtype first (as autocast does for SDPA), so the output is in that dtype; the backends then
    compute as they do outside autocast.
    """
    q, k, v = autocast_inputs(q, k, v)
    check_attention_inputs(q, k, v, layout)
    if causal is not None and bool(causal) != layout.causal:
        raise LayoutError(
            f"causal={causal} disagrees with the layout (built with causal={layout.causal}); "
            "rebuild the layout or omit causal"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = resolve_kernel_options(kernel_options)
    chosen, _ = select_backend(backend, q, k, v, layout, options)
    with torch.autocast(q.device.type, enabled=False):  # the backends compute in their own precision
        out, lse = chosen.forward(q, k, v, layout, scale, options)
    return (out, lse) if return_lse else out


def which_backend(q: Tensor, k: Tensor, v: Tensor, layout: BlockSparseLayout, *, backend: str = "auto",
                  kernel_options: Optional[KernelOptions] = None) -> BackendChoice:
    """What :func:`sparse_attention` would run for these inputs: the backend, the kernel of its
    forward and of its backward (for a contiguous output gradient), and why each faster option was
    skipped. Raises like the call would when nothing (or the named backend) can run it."""
    check_attention_inputs(q, k, v, layout)
    return explain_choice(q, k, v, layout, resolve_kernel_options(kernel_options), backend)


@_graph_break_when_compiled
def sparse_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                            cu_seqlens_k: Tensor, layout: BlockSparseLayout, *,
                            scale: Optional[float] = None, backend: str = "auto",
                            return_lse: bool = False, kernel_options: Optional[KernelOptions] = None):
    """Block-sparse attention over a packed batch of variable-length sequences (training).

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, Hkv, D)``, sequences concatenated.
        cu_seqlens_q, cu_seqlens_k: int ``(num_seqs + 1,)`` cumulative lengths starting at 0.
        layout: built for the longest sequence (``q_len >= max len_q``, ``kv_len >= max len_k``),
            batch 1 (shared) or ``num_seqs``; sequence ``i`` uses its top-left corner, and its
            causal offset is ``len_k_i - len_q_i``.
        backend: as in :func:`sparse_attention` (``auto``, ``gluon``, ``triton``, ``flex``,
            ``reference``; the last two loop over the sequences).
        kernel_options: as in :func:`sparse_attention`.

    Returns ``out (total_q, H, D)`` and, with ``return_lse``, ``lse (H, total_q)``. Sequences with
    no key give 0 and LSE ``-inf``; a batch with no query or no key at all gives such results too.

    Inside a CUDA-graph capture the offsets must be on the GPU and are not checked (reading them
    would synchronize); an eager call with the same offsets, such as the warm-up before capturing,
    checks them. Only the Triton and Gluon kernels run there.
    Under ``torch.autocast``, float32 inputs are cast as in :func:`sparse_attention`.
    """
    q, k, v = autocast_inputs(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D packed tensor (total, heads, head_dim)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int tensor of num_seqs + 1 offsets")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k describe different numbers of sequences")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    num_seqs = cu_seqlens_q.numel() - 1
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing and not (cu_seqlens_q.is_cuda and cu_seqlens_k.is_cuda):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be on the GPU inside a CUDA-graph capture "
                         f"(got {cu_seqlens_q.device} and {cu_seqlens_k.device})")
    if not capturing:  # reading the offsets on the host would synchronize, which a capture forbids
        _check_offsets(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), q.shape[0], k.shape[0], layout)
    views = tuple(t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend: zeros and -inf, zero gradients
        check_qkv(*views, layout)
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        out, lse = with_zero_gradients(out, lse, q, k, v)
        return (out, lse) if return_lse else out
    # Shapes and the layout through the padded-batch checks, on the (1, H, L, D) views.
    check_attention_inputs(*views, _as_single(layout, q.shape[0], k.shape[0]))
    if layout.batch not in (1, num_seqs):
        raise LayoutError(f"layout batch {layout.batch} must be 1 or the number of sequences {num_seqs}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = resolve_kernel_options(kernel_options)
    chosen, _ = select_backend(backend, q, k, v, layout, options, num_seqs=num_seqs)
    with torch.autocast(q.device.type, enabled=False):  # the backends compute in their own precision
        out, lse = chosen.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, layout, scale, options)
    return (out, lse) if return_lse else out


def _check_offsets(starts_q: list, starts_k: list, total_q: int, total_k: int, layout: BlockSparseLayout):
    """cu_seqlens values (read on the host): start at 0, end at the packed lengths, never decrease,
    and no sequence longer than the layout."""
    if starts_q[0] != 0 or starts_q[-1] != total_q or starts_k[0] != 0 or starts_k[-1] != total_k:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed lengths (q {total_q}, k {total_k})")
    lens_q = [b - a for a, b in zip(starts_q, starts_q[1:])]
    lens_k = [b - a for a, b in zip(starts_k, starts_k[1:])]
    if min(lens_q) < 0 or min(lens_k) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lens_q) > layout.q_len or max(lens_k) > layout.kv_len:
        raise LayoutError(
            f"layout (q_len={layout.q_len}, kv_len={layout.kv_len}) is shorter than the longest "
            f"sequence (q {max(lens_q)}, k {max(lens_k)})"
        )


def _as_single(layout: BlockSparseLayout, total_q: int, total_k: int) -> BlockSparseLayout:
    """A stand-in layout with the packed lengths, so shape checks can reuse check_attention_inputs."""
    nq = math.ceil(total_q / layout.q_block)
    cnt = torch.zeros(1, layout.heads, nq, dtype=torch.int32, device=layout.device)
    idx = torch.zeros(1, layout.heads, nq, 1, dtype=torch.int32, device=layout.device)
    return BlockSparseLayout(cnt, idx, total_q, total_k, layout.q_block, layout.kv_block,
                             layout.causal, check=False)
