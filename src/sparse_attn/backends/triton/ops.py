"""The call path of the Triton and Gluon attention kernels: what a call reads from its layout,
which kernel runs it, the forward and backward launchers, and the autograd.Function.

Which kernels run is decided per call from its :class:`~sparse_attn.options.KernelOptions`; nothing
here is a process-wide switch.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ...layout import BlockSparseLayout
from ...options import KernelOptions
from . import gluon_backward, gluon_forward
from .autotune import _width_class
from .launch import GLUON_LAUNCHERS, _launch
from .runtime import cdiv, fp32_dot_operands, interpreting, major_capability

LOG2E = 1.4426950408889634


def _seq_strides(t: Tensor, varlen: bool):
    """(batch, head, seq) strides of padded ``(B, H, S, D)`` or packed ``(T, H, D)`` tensors (packed:
    batch stride 0, the batch offset comes from cu_seqlens). One ``stride()`` call: each tensor
    method call costs ~0.5-0.8 us on an H100 host, and a training step made ~65 of them."""
    st = t.stride()
    return (0, st[1], st[0]) if varlen else st[:3]


def _layout_args(cnt: Tensor, idx: Tensor):
    """Strides of a block-count ``(B, H, rows)`` and block-index ``(B, H, rows, width)`` pair; batch
    stride 0 when one layout serves the whole batch."""
    cnt_st, idx_st = cnt.stride(), idx.stride()
    return ((cnt_st[0] if cnt.shape[0] > 1 else 0, cnt_st[1]),
            (idx_st[0] if idx.shape[0] > 1 else 0, idx_st[1], idx_st[2]))


def _block_lists(layout: BlockSparseLayout, kv_major: bool = False):
    """What the kernels read from a layout, computed once per layout object (kept in its
    ``kernel_cache``): ``(counts, indices, count strides, index strides, tuning width class)`` of
    its query-major lists (forward, dQ) or, with ``kv_major``, of its kv-major transpose (dK/dV)."""
    cache = layout.kernel_cache
    cached = cache.get(kv_major)
    if cached is None:
        if kv_major:
            lists = layout.kv_major
            cnt, idx = lists.q_num_blocks, lists.q_indices
        else:
            cnt, idx = layout.kv_num_blocks, layout.kv_indices
        cached = cache[kv_major] = (cnt, idx, *_layout_args(cnt, idx), _width_class(idx))
    return cached


def _use_tma(setting, *rows: Tensor) -> bool:
    """TMA for this call: wanted (``setting``, ``KernelOptions.forward_tma`` / ``backward_tma``:
    None on Hopper and newer GPUs and off in the CPU interpreter, True wherever possible, False
    never) and possible (every tensor in ``rows``, the ones read through descriptors, with unit last
    stride, 16-byte aligned base and nonzero strides: a broadcast tensor takes the pointer path).
    On an H100 descriptors made the forward 1.05-1.14x faster at 128K and forward+backward
    1.01-1.10x faster at 32K (bench_attention.py --forward-tma / --backward-tma)."""
    if setting is False or (setting is None and interpreting()):
        return False
    for t in rows:
        *outer, last = t.stride()
        if last != 1 or t.data_ptr() % 16 or any(st == 0 or st * t.element_size() % 16 for st in outer):
            return False
    if interpreting():
        return True
    if not rows[0].is_cuda or major_capability(rows[0].device.index) < 9:
        return False
    # Triton keeps the allocator in a context variable: set it on every call, since the backward
    # runs on autograd's own thread, where the forward's setting is not visible.
    triton.set_allocator(_descriptor_scratch)
    return True


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global scratch for descriptors built on the device (Triton's allocator hook)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_DUMMIES: dict = {}


def _dummy(device):
    """A placeholder cu_seqlens pointer for padded batches (cached: no allocation per call)."""
    dummy = _DUMMIES.get(device)
    if dummy is None:
        dummy = _DUMMIES[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return dummy


def gluon_unsupported_reason(q, k, v, layout, out_and_grad=None) -> str | None:
    """Why the Gluon kernels cannot run a forward (padded or packed) or, given the forward's output
    and its gradient, a backward of this call (None when they can)."""
    if interpreting():
        return "the CPU interpreter"
    if not q.is_cuda or major_capability(q.device.index) != 9:
        return "not a Hopper GPU"
    if out_and_grad is None:
        return gluon_forward.unsupported_reason(q, k, v, layout)
    if q.dim() == 3:
        return "packed (varlen) batches run the Triton backward"
    return gluon_backward.unsupported_reason(q, k, v, *out_and_grad, layout)


def choose_kernel(direction: str, setting: str, q, k, v, layout, out_and_grad=None) -> tuple[str, str | None]:
    """The kernel that runs ``direction`` ("forward" or "backward") of a call under the option
    ``setting`` (``KernelOptions.forward`` / ``backward``): ``("gluon", None)`` or ``("triton",
    why not Gluon)``. A required Gluon kernel that cannot run raises ``ValueError`` naming why."""
    if setting == "triton":
        return "triton", f"KernelOptions.{direction}='triton'"
    reason = gluon_unsupported_reason(q, k, v, layout, out_and_grad)
    if reason is None:
        return "gluon", None
    if setting == "gluon":
        raise ValueError(f"KernelOptions.{direction}='gluon' but the Gluon {direction} cannot run this call: {reason}")
    return "triton", reason


def attention_forward(q, k, v, layout, scale, cu_q, cu_k, batch, kernel: str, options: KernelOptions):
    """Launch the forward ``kernel`` ("gluon" or "triton"). Padded: q ``(B, H, S, D)``; varlen: q
    ``(T, H, D)`` + cu_seqlens.

    Returns ``(out, lse)`` with the natural-log ``lse`` ``(B, H, S)`` float32 (padded) or ``(H, T)`` (varlen).
    """
    varlen = cu_q is not None
    if kernel == "gluon":
        cnt, idx, cnt_strides, idx_strides, _ = _block_lists(layout)
        return gluon_forward.gluon_attention_forward(q, k, v, layout, scale * LOG2E, cnt, idx, cnt_strides,
                                                     idx_strides, launch=GLUON_LAUNCHERS[options.fast_launch],
                                                     cu_q=cu_q, cu_k=cu_k, batch=batch)
    if varlen:
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        lse = torch.empty(1, heads, q.shape[0], device=q.device, dtype=torch.float32)
        lse_strides = (0, lse.stride(1))
    else:
        batch, heads, _, dim = q.shape
        kv_heads = k.shape[1]
        lse = torch.empty(batch, heads, q.shape[2], device=q.device, dtype=torch.float32)
        lse_strides = (lse.stride(0), lse.stride(1))
    out = torch.empty_like(q)
    cnt, idx, cnt_strides, idx_strides, width = _block_lists(layout)
    qs, ks, vs, os_ = (_seq_strides(t, varlen) for t in (q, k, v, out))
    if cu_q is None:
        cu_q = cu_k = _dummy(q.device)
    grid = lambda meta: (cdiv(layout.num_q_blocks * layout.q_block, meta["BLOCK_M"]),  # noqa: E731
                         batch * heads)
    _launch(
        "fwd", grid, options.fast_launch, q, k, v, out, lse, cnt, idx, cu_q, cu_k,
        *qs, *ks, *vs, *os_, *lse_strides, *cnt_strides, *idx_strides,
        layout.q_len, layout.kv_len, scale * LOG2E, tune_width=width,
        H=heads, GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads,
        HEAD_DIM=dim, Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block,
        CAUSAL=layout.causal, VARLEN=varlen, UPCAST=fp32_dot_operands(q.dtype), TMA=_use_tma(options.forward_tma, k, v),
    )
    return out, (lse[0] if varlen else lse)


def attention_backward(do, q, k, v, out, lse, layout, scale, cu_q, cu_k, batch, options: KernelOptions,
                       dlse=None):
    """dQ, dK, dV from the saved output and (natural-log) LSE, on the kernels ``options.backward``
    chooses; the dQ kernel runs first and leaves ``delta = rowsum(O * dO) - dlse`` for the dK/dV
    kernel. ``dlse``: the gradient of the returned LSE, or None when the LSE was not used."""
    varlen = cu_q is not None
    do = do.contiguous() if do.stride(-1) != 1 else do
    if dlse is not None:  # the kernels read it with the LSE's strides
        dlse = torch.empty_like(lse).copy_(dlse.view(lse.shape))
    kernel, _ = choose_kernel("backward", options.backward, q, k, v, layout, (out, do))
    if kernel == "gluon":
        launch = GLUON_LAUNCHERS[options.fast_launch]
        cnt, idx, cnt_strides, idx_strides, _ = _block_lists(layout)
        descriptors = gluon_backward.row_descriptors(q, k, v, do)
        dq, delta = gluon_backward.gluon_attention_dq(q, k, v, out, do, lse, layout, scale, scale * LOG2E,
                                                      cnt, idx, cnt_strides, idx_strides, launch=launch,
                                                      descriptors=descriptors, dlse=dlse)
        t_cnt, t_idx, t_strides, ti_strides, _ = _block_lists(layout, kv_major=True)
        dk, dv = gluon_backward.gluon_attention_dkdv(q, k, v, do, lse, delta, layout, scale, scale * LOG2E,
                                                     t_cnt, t_idx, t_strides, ti_strides, launch=launch,
                                                     descriptors=descriptors)
        return dq, dk, dv
    if varlen:
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        lse = lse[None]  # (1, H, T)
        dlse = None if dlse is None else dlse[None]
        lse_strides = (0, lse.stride(1))
    else:
        batch, heads, _, dim = q.shape
        kv_heads = k.shape[1]
        lse_strides = (lse.stride(0), lse.stride(1))
    delta = torch.empty_like(lse)  # same shape and strides as the LSE; written by the dQ kernel
    dq = torch.empty_like(q)
    cnt, idx, cnt_strides, idx_strides, width = _block_lists(layout)
    strides = {name: _seq_strides(t, varlen) for name, t in
               (("q", q), ("k", k), ("v", v), ("o", out), ("do", do), ("dq", dq))}
    if cu_q is None:
        cu_q = cu_k = _dummy(q.device)
    common = dict(GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads, HEAD_DIM=dim,
                  Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block, CAUSAL=layout.causal,
                  VARLEN=varlen, UPCAST=fp32_dot_operands(q.dtype),
                  TMA=_use_tma(options.backward_tma, q, k, v, do))
    grid_dq = lambda meta: (cdiv(layout.num_q_blocks * layout.q_block, meta["BLOCK_M"]),  # noqa: E731
                            batch * heads)
    _launch(
        "dq", grid_dq, options.fast_launch, q, k, v, out, do, dq, lse, delta, lse if dlse is None else dlse, cnt, idx, cu_q, cu_k,
        *strides["q"], *strides["k"], *strides["v"], *strides["o"], *strides["do"], *strides["dq"],
        *lse_strides, *cnt_strides, *idx_strides,
        layout.q_len, layout.kv_len, scale * LOG2E, scale, tune_width=width, H=heads,
        HAS_DLSE=dlse is not None, **common,
    )
    # dK/dV's buffers and arguments are prepared while the dQ kernel runs: in host-bound steps the
    # GPU would otherwise wait for them between the forward and the first backward kernel.
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    strides.update(dk=_seq_strides(dk, varlen), dv=_seq_strides(dv, varlen))
    t_cnt, t_idx, t_strides, ti_strides, t_width = _block_lists(layout, kv_major=True)
    grid_kv = lambda meta: (layout.num_kv_blocks * (layout.kv_block // meta["BLOCK_N"]),  # noqa: E731
                            batch * kv_heads)
    _launch(
        "dkdv", grid_kv, options.fast_launch, q, k, v, do, dk, dv, lse, delta, t_cnt, t_idx, cu_q, cu_k,
        *strides["q"], *strides["k"], *strides["v"], *strides["do"], *strides["dk"], *strides["dv"],
        *lse_strides, *t_strides, *ti_strides,
        layout.q_len, layout.kv_len, scale * LOG2E, scale, tune_width=t_width,
        KV_HEADS=kv_heads, **common,
    )
    return dq, dk, dv


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, out, lse); backward runs the dQ and dK/dV kernels.
    Both outputs are differentiable: a loss that uses the LSE (merging partial attention results by
    their LSE) gets its gradient through ``delta``."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale, cu_q, cu_k, batch, kernel, options):
        out, lse = attention_forward(q, k, v, layout, scale, cu_q, cu_k, batch, kernel, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.cu, ctx.batch, ctx.options = layout, scale, (cu_q, cu_k), batch, options
        # An unused output arrives as None instead of a zero-filled tensor (the usual case: no LSE).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:  # only the LSE was used
            do = torch.zeros_like(out)
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.layout, ctx.scale, *ctx.cu, ctx.batch,
                                        ctx.options, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None, None, None


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _positive_scale(q: Tensor, scale: float):
    """The kernels need ``scale >= 0`` (they scale row maxima, not every score); a negative scale
    is the same attention with ``-q`` and ``-scale`` (autograd carries the sign to dQ)."""
    return (-q, -scale) if scale < 0 else (q, scale)


def triton_attention(q, k, v, layout, scale, kernel: str, options: KernelOptions):
    """Padded-batch entry used by the backend registry (forward ``kernel`` "gluon" or "triton");
    returns ``(out, lse natural log)``."""
    q, scale = _positive_scale(q, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if not _needs_grad(q, k, v):  # inference: no autograd node (saves its overhead per call)
        return attention_forward(q, k, v, layout, scale, None, None, q.shape[0], kernel, options)
    return BlockSparseAttentionFunction.apply(q, k, v, layout, scale, None, None, q.shape[0], kernel, options)


def triton_attention_varlen(q, k, v, cu_q, cu_k, layout, scale, kernel: str, options: KernelOptions):
    """Packed variable-length entry: q ``(T, H, D)``; returns ``(out (T, H, D), lse (H, T))``."""
    q, scale = _positive_scale(q, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
    batch = cu_q.numel() - 1
    if not _needs_grad(q, k, v):
        return attention_forward(q, k, v, layout, scale, cu_q, cu_k, batch, kernel, options)
    return BlockSparseAttentionFunction.apply(q, k, v, layout, scale, cu_q, cu_k, batch, kernel, options)
