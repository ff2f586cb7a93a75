"""Autotuning of the Triton attention kernels: tile spaces, pinned configs, tuned kernels and the
config each tuner chose."""

from __future__ import annotations

import triton
from torch import Tensor

from . import kernels
from .runtime import interpreting, on_hopper

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
# on an H100 at 32K (benchmarks/sweep_kernel_configs.py) found
# one of these fastest or within 1% of it at d = 0.05, 0.2, 0.5 and 1.0, while the 128-key tiles on
# 8 warps (in the general space) ran 1-9% slower and, picked by a noisy tuning pass, cost a 32K
# d=0.5 training step ~5%. At head dim 64 a 128-key tile is the fastest, so the general space stays.
DKDV_HEAD_DIM_128 = ((64, 64, 4, 1), (64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3))
# On Hopper, one of them without tuning: 64x64 / 4 warps / 2 stages was the fastest dK/dV config in
# five of six full sweeps on an H100 (32K d = 0.05, 0.2, 0.5; 128K d = 0.02, 0.1) and 3.4% off the
# fastest at 32K d = 1.0, while the tuner's single timing pass, choosing among the four above, picked
# configs 0-4.7% slower than it . Elsewhere the four are tuned.
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
        short_list = DKDV_HEAD_DIM_128_HOPPER if on_hopper() else DKDV_HEAD_DIM_128
        fitting = [c for c in short_list if q_block % c[0] == 0 and kv_block % c[1] == 0]
        if fitting:
            return _as_configs(fitting)
    # The forward's 32-key tiles and single stage: at 32K and 2% density on an H100 the fastest
    # forward config (64x32, 4 warps, 2 stages) ran 1.25x faster than the tuner's pick from the
    # earlier space (benchmarks/sweep_kernel_configs.py); the
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


# Autotuned kernels by (kind, q_block, kv_block, head_dim); each tuner's ``cache`` holds what it chose.
TUNED: dict = {}


_TUNE_KEY = ("HEAD_DIM", "Q_BLOCK", "KV_BLOCK", "CAUSAL", "VARLEN", "GROUP", "LAYOUT_HDIV", "TMA", "tune_width")


def _width_class(indices: Tensor) -> int:
    """Autotuning class of a block list: the bit length of its width (the most blocks any row
    keeps), read from the shape (no device sync). Tiles tuned on a dense layout lose up to ~10% on
    a 5%-dense one at 8K (H100), so each class is tuned apart."""
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
# H100 host that was 34-70 us per launch against 11-18 us for the compiled launcher, paid three
# times per training step (see launch.py).
_COMPILED: dict = {}
