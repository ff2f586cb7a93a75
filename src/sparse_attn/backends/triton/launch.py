"""Launching compiled Triton and Gluon kernels with little host work per call.

Triton's own launch path (``JITFunction.run``) binds ~40 arguments, builds a cache key and checks
globals on every call; once a kernel is compiled for an argument specialization, its compiled
launcher is called directly here (``KernelOptions.fast_launch``). If the installed Triton's
compiled-kernel interface is not the one this was written against, the library warns once and
keeps Triton's own path for the rest of the process.
"""

from __future__ import annotations

import warnings

import triton
from torch import Tensor

from . import gluon_forward
from . import autotune
from .runtime import interpreting

# Set when this Triton's compiled-kernel interface turned out not to be the one this was written
# against: a fact about the installed Triton, found once (with a warning) and kept for the process.
_LAUNCHER_UNSUPPORTED: list = []


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


def _fast_launch_ready(fn, fast: bool) -> bool:
    """Whether the compiled launcher may be called directly: wanted (``fast``), a GPU run, a Triton
    whose launcher interface is known, no launch hooks (profilers such as proton observe launches
    through them) and no pre-run hooks on the kernel."""
    if not fast or _LAUNCHER_UNSUPPORTED or interpreting():
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        _launcher_unsupported("Triton before 3.4 has no triton.knobs")
        return False
    runtime = knobs.runtime
    return _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook) \
        and not getattr(fn, "pre_run_hooks", None)


def _launcher_unsupported(why: str) -> None:
    """Stop using compiled launchers for the rest of the process, saying so once."""
    if not _LAUNCHER_UNSUPPORTED:
        _LAUNCHER_UNSUPPORTED.append(why)
        autotune._COMPILED.clear()
        warnings.warn(f"sparse_attn: launching kernels through Triton's own path from now on ({why}); "
                      "results are unchanged, each launch costs more host time", RuntimeWarning, stacklevel=3)


def _no_hook(hook) -> bool:
    """True for an unset launch hook: None, or (Triton 3.6) an empty HookChain."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _fast_key(name: str, fn, args, meta, fast: bool, spec=None):
    """The compiled-launcher cache key of a launch of ``fn`` (named ``name``), or None when it must
    go through Triton's own path (``fast``: ``KernelOptions.fast_launch``). ``spec``: what the
    launch's specialization depends on, when the caller knows it (the Gluon modules'
    ``launch_spec``); otherwise :func:`_specialization`."""
    if not _fast_launch_ready(fn, fast):
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
    turns itself off, with a warning)."""
    entry = autotune._COMPILED.get(fast_key)
    if entry is None:
        return False
    kernel, constexprs, tiles = entry
    dims = tuple(grid(tiles) if callable(grid) else grid) + (1, 1)
    stream = triton.runtime.driver.active.get_current_stream(fast_key[1])
    try:
        kernel.run(dims[0], dims[1], dims[2], stream, kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *constexprs)
        return True
    except (TypeError, AttributeError) as exc:
        _launcher_unsupported(f"its compiled launcher refused the call: {type(exc).__name__}: {exc}")
        return False


def _remember(fast_key, fn, kernel, args, meta, tiles=None) -> None:
    """Cache a kernel Triton just compiled and launched, for :func:`_launch_cached`."""
    if fast_key is not None and kernel is not None and not _LAUNCHER_UNSUPPORTED:
        merged = {**meta, **(tiles or {})}
        autotune._COMPILED[fast_key] = (kernel, tuple(merged[name] for name in fn.arg_names[len(args):]), tiles)


def _launch(kind: str, grid, fast: bool, *args, **meta):
    """Launch kernel ``kind``: autotuned on first use for this key, then with the chosen config;
    once compiled for this argument specialization, through its compiled launcher. The compiled
    entry is looked up first (its key holds every launch input the tuner's choice depends on), so a
    warm launch skips the tuner lookups."""
    fn = autotune._KERNELS[kind]
    fast_key = _fast_key(kind, fn, args, meta, fast)
    if fast_key is not None and _launch_cached(fast_key, grid, args):
        return
    tuner = autotune._tuned(kind, meta["Q_BLOCK"], meta["KV_BLOCK"], meta["HEAD_DIM"])
    key = (kind, args[0].dtype, *(meta[name] for name in autotune._TUNE_KEY))
    chosen = autotune._CHOSEN.get(key)
    if chosen is None:
        tuner[grid](*args, **meta)
        autotune._CHOSEN[key] = (tuner.best_config.kwargs, tuner.best_config.all_kwargs())
        return
    tiles, options = chosen  # tile sizes; tile sizes + warps/stages
    kernel = fn[grid](*args, **meta, **options)
    _remember(fast_key, fn, kernel, args, meta, tiles)


def launch_jit(fn, grid, args: tuple, meta: dict, fast: bool = True, spec=None) -> None:
    """Launch the ``@triton.jit`` (or Gluon) kernel ``fn`` on ``grid`` (1 to 3 dims) with the
    positional ``args`` and the keyword ``meta`` (every constexpr after ``args``, plus
    ``num_warps``/``num_stages``): through Triton's own path the first time, then, once compiled
    for this argument specialization, through its compiled launcher (``fast``:
    ``KernelOptions.fast_launch``; ``spec``: see :func:`_fast_key`)."""
    fast_key = _fast_key(fn.__name__, fn, args, meta, fast, spec)
    if fast_key is not None and _launch_cached(fast_key, grid, args):
        return
    _remember(fast_key, fn, fn[grid](*args, **meta), args, meta)


def _launch_gluon(fn, grid, args, meta, spec, fast: bool = True):
    """Launch a Gluon kernel (the ``launch`` the gluon_* modules take, with their ``launch_spec``):
    through its compiled launcher once compiled for this specialization. Gluon's JIT path costs
    the host as much per launch as Triton's (``autotune._COMPILED``), and at 8K the Gluon kernels take
    0.1-0.3 ms."""
    launch_jit(fn, grid, args, meta, fast, spec)


def _launch_gluon_jit(fn, grid, args, meta, spec):
    """:func:`_launch_gluon` through Gluon's own JIT path (``KernelOptions(fast_launch=False)``)."""
    _launch_gluon(fn, grid, args, meta, spec, fast=False)


# The ``launch`` argument of the gluon_* launchers, by ``KernelOptions.fast_launch``.
GLUON_LAUNCHERS = {True: _launch_gluon, False: _launch_gluon_jit}
