"""Host side of the Triton kernels: launchers, autotuning, and the autograd.Function."""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from ...layout import BlockSparseLayout
from . import gluon_backward, gluon_forward, kernels

LOG2E = 1.4426950408889634


# Triton reads TRITON_INTERPRET when the kernels are decorated (this module's import), so it is
# read once here too; the launch path asks on every call.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


# The kernels by kind: the names set_kernel_configs, the tuners and the launch caches use.
_KERNELS = {"fwd": kernels._fwd_kernel, "dq": kernels._bwd_dq_kernel, "dkdv": kernels._bwd_dkdv_kernel}
KERNEL_KINDS = tuple(_KERNELS)

# Tile configs pinned by set_kernel_configs, by kernel kind: (BLOCK_M, BLOCK_N, num_warps, num_stages).
_PINNED: dict = {}


def set_kernel_configs(kind: str, configs=None) -> None:
    """Replace kernel ``kind``'s autotuning space ("fwd", "dq" or "dkdv") with ``configs``, a list
    of ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; ``None`` restores the built-in space. What was
    tuned or compiled for that kind is forgotten, so the next call tunes (or, with one config, just
    runs) the new space. For tuning on a GPU the built-in space was not measured on, and for
    ``benchmarks/sweep_kernel_configs.py``, which times configs one at a time. Each tile must divide
    the layout's blocks (checked at the call, since blocks come with the layout)."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if configs is not None:
        configs = [tuple(c) for c in configs]
        for c in configs:
            if len(c) != 4 or not all(isinstance(x, int) and x > 0 for x in c) \
                    or any(x & (x - 1) for x in c[:3]) or min(c[:2]) < 16:
                raise ValueError(f"configs: each must be (BLOCK_M, BLOCK_N, num_warps, num_stages) with power-of-two "
                                 f"tiles >= 16 and warps, and stages >= 1; got {c}")
        if not configs:
            raise ValueError("configs: give at least one config, or None to restore the built-in space")
        _PINNED[kind] = configs
    else:
        _PINNED.pop(kind, None)
    for key in [key for key in TUNED if key[0] == kind]:
        del TUNED[key]
    for cache in (_CHOSEN, _COMPILED):
        for key in [key for key in cache if key[0] == kind]:
            del cache[key]


# dK/dV tiles for head dim 128, (BLOCK_M, BLOCK_N, num_warps, num_stages): sweeps of every config
# on an H100 at 32K (benchmarks/sweep_kernel_configs.py, docs/benchmarks.md sessions 11-12) found
# one of these fastest or within 1% of it at d = 0.05, 0.2, 0.5 and 1.0, while the 128-key tiles on
# 8 warps (in the general space) ran 1-9% slower and, picked by a noisy tuning pass, cost a 32K
# d=0.5 training step ~5%. At head dim 64 a 128-key tile is the fastest, so the general space stays.
DKDV_HEAD_DIM_128 = ((64, 64, 4, 1), (64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3))
# On Hopper, one of them without tuning: 64x64 / 4 warps / 2 stages was the fastest dK/dV config in
# five of six full sweeps on an H100 (32K d = 0.05, 0.2, 0.5; 128K d = 0.02, 0.1) and 3.4% off the
# fastest at 32K d = 1.0, while the tuner's single timing pass, choosing among the four above, picked
# configs 0-4.7% slower than it (docs/benchmarks.md sessions 11-13). Elsewhere the four are tuned.
DKDV_HEAD_DIM_128_HOPPER = ((64, 64, 4, 2),)


def _as_configs(tiles) -> list:
    """Triton configs from ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuples."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]


def _configs(q_block: int, kv_block: int, kind: str, head_dim: int):
    """Autotune space (tiles divide the layout blocks); one small config in the CPU interpreter;
    the pinned configs (set_kernel_configs) instead of either."""
    if kind in _PINNED:
        bad = [c for c in _PINNED[kind] if q_block % c[0] or kv_block % c[1]]
        if bad:
            raise ValueError(f"pinned {kind} configs {bad}: BLOCK_M must divide the layout's q_block ({q_block}) "
                             f"and BLOCK_N its kv_block ({kv_block})")
        return _as_configs(_PINNED[kind])
    if interpreting():
        return [triton.Config({"BLOCK_M": min(16, q_block), "BLOCK_N": min(16, kv_block)},
                              num_warps=4, num_stages=1)]
    if kind == "dkdv" and head_dim >= 128:
        short_list = DKDV_HEAD_DIM_128_HOPPER if _on_hopper() else DKDV_HEAD_DIM_128
        fitting = [c for c in short_list if q_block % c[0] == 0 and kv_block % c[1] == 0]
        if fitting:
            return _as_configs(fitting)
    # The forward's 32-key tiles and single stage: at 32K and 2% density on an H100 the fastest
    # forward config (64x32, 4 warps, 2 stages) ran 1.25x faster than the tuner's pick from the
    # earlier space (benchmarks/sweep_kernel_configs.py, docs/benchmarks.md session 11); the
    # backward's spaces already held the fastest of 50 configs there, or one within 1% of it.
    space = {
        # kind: (BLOCK_M choices, BLOCK_N choices, num_stages choices)
        "fwd": ((64, 128), (32, 64, 128), (1, 2, 3)),
        "dq": ((64, 128), (32, 64), (2, 3)),
        "dkdv": ((32, 64), (64, 128), (2, 3)),
    }[kind]
    ms = [m for m in space[0] if q_block % m == 0] or [q_block]
    ns = [n for n in space[1] if kv_block % n == 0] or [kv_block]
    configs = []
    for m in ms:
        for n in ns:
            for stages in space[2]:
                if kind == "dkdv":
                    warps = (4, 8)
                elif kind == "fwd":
                    warps = (8,) if m * n >= 128 * 128 else (4,)
                else:
                    warps = (8,) if max(m, n) >= 128 else (4,)
                configs += [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=stages)
                            for w in warps]
    return configs


def _on_hopper() -> bool:
    """Whether the current CUDA device is a Hopper GPU (compute capability 9.x)."""
    return torch.cuda.is_available() and _major_capability(torch.cuda.current_device()) == 9


# Autotuned kernels by (kind, q_block, kv_block, head_dim); each tuner's ``cache`` holds what it chose.
TUNED: dict = {}


_TUNE_KEY = ("HEAD_DIM", "Q_BLOCK", "KV_BLOCK", "CAUSAL", "VARLEN", "GROUP", "LAYOUT_HDIV", "TMA", "tune_width")


def _width_class(indices: Tensor) -> int:
    """Autotuning class of a block list: the bit length of its width (the most blocks any row
    keeps), read from the shape (no device sync). Tiles tuned on a dense layout lose up to ~10% on
    a 5%-dense one at 8K (H100, docs/benchmarks.md session 9), so each class is tuned apart."""
    return max(int(indices.shape[-1]), 1).bit_length()


def _tuned(kind: str, q_block: int, kv_block: int, head_dim: int):
    if (kind, q_block, kv_block, head_dim) not in TUNED:
        configs = _configs(q_block, kv_block, kind, head_dim)
        TUNED[kind, q_block, kv_block, head_dim] = triton.autotune(configs=configs, key=list(_TUNE_KEY))(_KERNELS[kind])
    return TUNED[kind, q_block, kv_block, head_dim]


# The config each tuner chose, as (tile sizes, tile sizes + warps/stages), by kernel, dtype and
# tuning key. Later calls launch the kernel with it directly: Triton's Autotuner.run rebuilds its
# key on every call (a hasattr and a str(dtype) per argument, tens of microseconds per launch),
# which small problems feel.
_CHOSEN: dict = {}

# Compiled kernels by (kind, device, constexpr values, argument specialization): a call that Triton
# would specialize the same way launches the compiled kernel itself. Triton's own launch path
# (JITFunction.run) binds ~40 arguments, builds a cache key and checks globals on every call: on an
# H100 host that was 34-70 us per launch against 11-18 us for the compiled launcher
# (docs/benchmarks.md, session 9), paid three times per training step.
_COMPILED: dict = {}
# Set to False to always launch through Triton's JITFunction.run (also done automatically if the
# installed Triton's compiled-kernel interface is not the one this was written against).
FAST_LAUNCH = True


# Host-side TMA descriptors (the Gluon kernels' arguments), when this Triton has Gluon.
_TENSOR_DESCRIPTOR = gluon_forward.TensorDescriptor if gluon_forward.GLUON_IMPORT_ERROR is None else None


def _specialization(args):
    """What Triton specializes a launch on, per argument, at least as finely as it does: a tensor's
    dtype and 16-byte alignment; an int's residue mod 16 (so divisibility by 16), ``== 1`` and
    whether it fits 32 bits; a host TMA descriptor's dtype, block shape and shared layout (its
    shape and strides are runtime values); floats are not specialized. None for any other
    argument type (then Triton's own path launches)."""
    spec = []
    add = spec.append
    for a in args:
        kind = a.__class__
        if kind is int:
            add(16 if a == 1 else a & 15)
            if (a >> 31) not in (0, -1):  # 64-bit (i64 or u64)
                add(("wide", a >> 63))
        elif kind is float:
            add(None)
        elif isinstance(a, Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        elif kind is _TENSOR_DESCRIPTOR:
            add((a.base.dtype, *a.block_shape, a.layout))
        else:  # bool and anything else: Triton's own path
            return None
    return tuple(spec)


def _fast_launch_ready(fn) -> bool:
    """Whether the compiled launcher may be called directly: a GPU run, no launch hooks (profilers
    such as proton observe launches through them) and no pre-run hooks on the kernel."""
    global FAST_LAUNCH
    if not FAST_LAUNCH or interpreting():
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton before 3.4: keep its own launch path
        FAST_LAUNCH = False
        return False
    runtime = knobs.runtime
    return _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook) \
        and not getattr(fn, "pre_run_hooks", None)


def _no_hook(hook) -> bool:
    """True for an unset launch hook: None, or (Triton 3.6) an empty HookChain."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _fast_key(name: str, fn, args, meta, spec=None):
    """The compiled-launcher cache key of a launch of ``fn`` (named ``name``), or None when it must
    go through Triton's own path. ``spec``: what the launch's specialization depends on, when the
    caller knows it (the Gluon modules' ``launch_spec``); otherwise :func:`_specialization`."""
    if not _fast_launch_ready(fn):
        return None
    if spec is None:
        spec = _specialization(args)
        if spec is None:
            return None
    return (name, triton.runtime.driver.active.get_current_device(), *meta.values(), spec)


def _launch_cached(fast_key, grid, args) -> bool:
    """Launch the kernel compiled under ``fast_key`` through its compiled launcher (``grid``: the
    grid, or a function of the chosen tile sizes); False when none is cached yet, or when this
    Triton's compiled-kernel interface is not the one this was written against (the path then
    turns itself off)."""
    global FAST_LAUNCH
    entry = _COMPILED.get(fast_key)
    if entry is None:
        return False
    kernel, constexprs, tiles = entry
    dims = grid(tiles) if callable(grid) else grid
    stream = triton.runtime.driver.active.get_current_stream(fast_key[1])
    try:
        kernel.run(dims[0], dims[1], 1, stream, kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *constexprs)
        return True
    except (TypeError, AttributeError):
        FAST_LAUNCH = False
        _COMPILED.clear()
        return False


def _remember(fast_key, fn, kernel, args, meta, tiles=None) -> None:
    """Cache a kernel Triton just compiled and launched, for :func:`_launch_cached`."""
    if fast_key is not None and kernel is not None and FAST_LAUNCH:
        merged = {**meta, **(tiles or {})}
        _COMPILED[fast_key] = (kernel, tuple(merged[name] for name in fn.arg_names[len(args):]), tiles)


def _launch(kind: str, grid, *args, **meta):
    """Launch kernel ``kind``: autotuned on first use for this key, then with the chosen config;
    once compiled for this argument specialization, through its compiled launcher. The compiled
    entry is looked up first (its key holds every launch input the tuner's choice depends on), so a
    warm launch skips the tuner lookups."""
    fn = _KERNELS[kind]
    fast_key = _fast_key(kind, fn, args, meta)
    if fast_key is not None and _launch_cached(fast_key, grid, args):
        return
    tuner = _tuned(kind, meta["Q_BLOCK"], meta["KV_BLOCK"], meta["HEAD_DIM"])
    key = (kind, args[0].dtype, *(meta[name] for name in _TUNE_KEY))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        tuner[grid](*args, **meta)
        _CHOSEN[key] = (tuner.best_config.kwargs, tuner.best_config.all_kwargs())
        return
    tiles, options = chosen  # tile sizes; tile sizes + warps/stages
    kernel = fn[grid](*args, **meta, **options)
    _remember(fast_key, fn, kernel, args, meta, tiles)


def _launch_gluon(fn, grid, args, meta, spec):
    """Launch a Gluon kernel (the ``launch`` the gluon_* modules take, with their ``launch_spec``):
    through its compiled launcher once compiled for this specialization. Gluon's JIT path costs
    the host as much per launch as Triton's (``_COMPILED``), and at 8K the Gluon kernels take
    0.1-0.3 ms."""
    fast_key = _fast_key(fn.__name__, fn, args, meta, spec)
    if fast_key is not None and _launch_cached(fast_key, grid, args):
        return
    _remember(fast_key, fn, fn[grid](*args, **meta), args, meta)


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
    """What the kernels read from a layout, computed once per layout object: ``(counts, indices,
    count strides, index strides, tuning width class)`` of its query-major lists (forward, dQ) or,
    with ``kv_major``, of its transpose's kv-major lists (dK/dV)."""
    name = "_kv_major_launch_cache" if kv_major else "_launch_cache"
    cached = getattr(layout, name, None)
    if cached is None:
        if kv_major:
            lists = layout.transpose()
            cnt, idx = lists.q_num_blocks, lists.q_indices
        else:
            cnt, idx = layout.kv_num_blocks, layout.kv_indices
        cached = (cnt, idx, *_layout_args(cnt, idx), _width_class(idx))
        object.__setattr__(layout, name, cached)
    return cached


def _upcast(q: Tensor) -> bool:
    """fp32 dot operands: only for bf16 in the CPU interpreter (see kernels._dot)."""
    return interpreting() and q.dtype == torch.bfloat16


# Tile loads through tensor descriptors (Hopper TMA) instead of pointer loads: K/V in the forward
# and dQ kernels, Q/dO in the dK/dV kernel. None: on for Hopper and newer GPUs, off in the CPU
# interpreter (so CI checks the pointer path everywhere else used); True: wherever possible, the
# interpreter included (its tests); False: never. On an H100 (2026-11-24, bench_attention.py
# --forward-tma / --backward-tma, docs/benchmarks.md sessions 7-8) descriptors made the forward
# 1.05-1.14x faster at 128K and forward+backward 1.01-1.10x faster at 32K.
FORWARD_TMA = None
BACKWARD_TMA = None
# The forward through the Gluon kernel (gluon_forward.py) instead of the Triton one. None: on a
# Hopper GPU for every call it supports (padded or packed batches of contiguous tensors, 128- or
# 64-row query blocks, head dim 64/128), the Triton kernel otherwise; False: never; True: required (a call it
# cannot run raises, naming why). On an H100 it was 1.09-1.20x faster than the Triton forward on
# random layouts at 32K-128K with 128-row blocks (docs/benchmarks.md, session 14), 1.00-1.06x with
# 64-row blocks (session 16).
GLUON_FORWARD = None
# The backward through the Gluon dQ and dK/dV kernels (gluon_backward.py), with the same three
# settings as GLUON_FORWARD; its own calls: padded batches only (packed ones run the Triton backward),
# and grad_output must also be contiguous.
GLUON_BACKWARD = None


def _use_tma(setting, *rows: Tensor) -> bool:
    """TMA for this call: wanted (``setting``, see FORWARD_TMA) and possible (Hopper or newer, or
    the interpreter when forced; every tensor in ``rows``, the ones read through descriptors, with
    unit last stride and 16-byte aligned base and nonzero strides: a broadcast tensor takes the
    pointer path)."""
    if setting is False or (setting is None and interpreting()):
        return False
    for t in rows:
        *outer, last = t.stride()
        if last != 1 or t.data_ptr() % 16 or any(st == 0 or st * t.element_size() % 16 for st in outer):
            return False
    if interpreting():
        return True
    if not rows[0].is_cuda or _major_capability(rows[0].device.index) < 9:
        return False
    # Triton keeps the allocator in a context variable: set it on every call, since the backward
    # runs on autograd's own thread, where the forward's setting is not visible.
    triton.set_allocator(_descriptor_scratch)
    return True


@functools.lru_cache(maxsize=None)
def _major_capability(index) -> int:
    """Compute capability major of a CUDA device (cached: asked on every call)."""
    return torch.cuda.get_device_capability(index)[0]


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


def gluon_skip_reason(q, k, v, layout, out_and_grad=None) -> str | None:
    """Why a forward (padded or packed) or, given the forward's output and its gradient, a
    padded-batch backward would not run the Gluon kernels (None when it would)."""
    backward = out_and_grad is not None
    setting, name = (GLUON_BACKWARD, "GLUON_BACKWARD") if backward else (GLUON_FORWARD, "GLUON_FORWARD")
    if setting is False:
        return f"turned off (ops.{name} = False)"
    if interpreting():
        return "the CPU interpreter"
    if not q.is_cuda or _major_capability(q.device.index) != 9:
        return "not a Hopper GPU"
    if backward:
        return gluon_backward.unsupported_reason(q, k, v, *out_and_grad, layout)
    return gluon_forward.unsupported_reason(q, k, v, layout)


def attention_forward(q, k, v, layout, scale, cu_q=None, cu_k=None, batch=None):
    """Launch the forward kernel. Padded: q ``(B, H, S, D)``; varlen: q ``(T, H, D)`` + cu_seqlens.

    Returns ``(out, lse)`` with the natural-log ``lse`` ``(B, H, S)`` float32 (padded) or ``(H, T)`` (varlen).
    """
    varlen = cu_q is not None
    reason = gluon_skip_reason(q, k, v, layout)
    if reason is None:
        cnt, idx, cnt_strides, idx_strides, _ = _block_lists(layout)
        return gluon_forward.gluon_attention_forward(q, k, v, layout, scale * LOG2E, cnt, idx, cnt_strides,
                                                     idx_strides, launch=_launch_gluon, cu_q=cu_q, cu_k=cu_k,
                                                     batch=batch)
    if GLUON_FORWARD:
        raise ValueError(f"GLUON_FORWARD=True but the Gluon forward cannot run this call: {reason}")
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
    grid = lambda meta: (triton.cdiv(layout.num_q_blocks * layout.q_block, meta["BLOCK_M"]),  # noqa: E731
                         batch * heads)
    _launch(
        "fwd", grid, q, k, v, out, lse, cnt, idx, cu_q, cu_k,
        *qs, *ks, *vs, *os_, *lse_strides, *cnt_strides, *idx_strides,
        layout.q_len, layout.kv_len, scale * LOG2E, tune_width=width,
        H=heads, GROUP=heads // kv_heads, LAYOUT_HDIV=heads // layout.heads,
        HEAD_DIM=dim, Q_BLOCK=layout.q_block, KV_BLOCK=layout.kv_block,
        CAUSAL=layout.causal, VARLEN=varlen, UPCAST=_upcast(q), TMA=_use_tma(FORWARD_TMA, k, v),
    )
    return out, (lse[0] if varlen else lse)


def attention_backward(do, q, k, v, out, lse, layout, scale, cu_q=None, cu_k=None, batch=None, dlse=None):
    """dQ, dK, dV from the saved output and (natural-log) LSE; the dQ kernel runs first and leaves
    ``delta = rowsum(O * dO) - dlse`` for the dK/dV kernel. ``dlse``: the gradient of the returned
    LSE, or None when the LSE was not used."""
    varlen = cu_q is not None
    do = do.contiguous() if do.stride(-1) != 1 else do
    if dlse is not None:  # the kernels read it with the LSE's strides
        dlse = torch.empty_like(lse).copy_(dlse.view(lse.shape))
    if not varlen:
        reason = gluon_skip_reason(q, k, v, layout, (out, do))
        if reason is None:
            cnt, idx, cnt_strides, idx_strides, _ = _block_lists(layout)
            descriptors = gluon_backward.row_descriptors(q, k, v, do)
            dq, delta = gluon_backward.gluon_attention_dq(q, k, v, out, do, lse, layout, scale, scale * LOG2E,
                                                          cnt, idx, cnt_strides, idx_strides, launch=_launch_gluon,
                                                          descriptors=descriptors, dlse=dlse)
            t_cnt, t_idx, t_strides, ti_strides, _ = _block_lists(layout, kv_major=True)
            dk, dv = gluon_backward.gluon_attention_dkdv(q, k, v, do, lse, delta, layout, scale, scale * LOG2E,
                                                         t_cnt, t_idx, t_strides, ti_strides, launch=_launch_gluon,
                                                         descriptors=descriptors)
            return dq, dk, dv
        if GLUON_BACKWARD:
            raise ValueError(f"GLUON_BACKWARD=True but the Gluon backward cannot run this call: {reason}")
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
                  VARLEN=varlen, UPCAST=_upcast(q), TMA=_use_tma(BACKWARD_TMA, q, k, v, do))
    grid_dq = lambda meta: (triton.cdiv(layout.num_q_blocks * layout.q_block, meta["BLOCK_M"]),  # noqa: E731
                            batch * heads)
    _launch(
        "dq", grid_dq, q, k, v, out, do, dq, lse, delta, lse if dlse is None else dlse, cnt, idx, cu_q, cu_k,
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
        "dkdv", grid_kv, q, k, v, do, dk, dv, lse, delta, t_cnt, t_idx, cu_q, cu_k,
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
    def forward(ctx, q, k, v, layout, scale, cu_q, cu_k, batch):
        out, lse = attention_forward(q, k, v, layout, scale, cu_q, cu_k, batch)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.cu, ctx.batch = layout, scale, (cu_q, cu_k), batch
        # An unused output arrives as None instead of a zero-filled tensor (the usual case: no LSE).
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:  # only the LSE was used
            do = torch.zeros_like(out)
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.layout, ctx.scale, *ctx.cu,
                                        batch=ctx.batch, dlse=dlse)
        return dq, dk, dv, None, None, None, None, None


def _needs_grad(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _positive_scale(q: Tensor, scale: float):
    """The kernels need ``scale >= 0`` (they scale row maxima, not every score); a negative scale
    is the same attention with ``-q`` and ``-scale`` (autograd carries the sign to dQ)."""
    return (-q, -scale) if scale < 0 else (q, scale)


def triton_attention(q, k, v, layout, scale):
    """Padded-batch entry used by the backend registry; returns ``(out, lse natural log)``."""
    q, scale = _positive_scale(q, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    layout = _on_device(layout, q.device)
    if not _needs_grad(q, k, v):  # inference: no autograd node (saves its overhead per call)
        return attention_forward(q, k, v, layout, scale, None, None, q.shape[0])
    return BlockSparseAttentionFunction.apply(q, k, v, layout, scale, None, None, q.shape[0])


def triton_attention_varlen(q, k, v, cu_q, cu_k, layout, scale):
    """Packed variable-length entry: q ``(T, H, D)``; returns ``(out (T, H, D), lse (H, T))``."""
    q, scale = _positive_scale(q, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    layout = _on_device(layout, q.device)
    batch = cu_q.numel() - 1
    if not _needs_grad(q, k, v):
        return attention_forward(q, k, v, layout, scale, cu_q.int(), cu_k.int(), batch)
    return BlockSparseAttentionFunction.apply(q, k, v, layout, scale, cu_q.int(), cu_k.int(), batch)


def _on_device(layout: BlockSparseLayout, device) -> BlockSparseLayout:
    return layout if layout.device == device else layout.to(device)

