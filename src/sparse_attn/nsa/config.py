"""NSAConfig: the sizes of Native Sparse Attention's three branches, validated when built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..layout import SUPPORTED_BLOCK_SIZES

__all__ = ["NSAConfig"]


@dataclass(frozen=True)
class NSAConfig:
    """Sizes of the three NSA branches (names of the paper in brackets; its defaults).

    Attributes:
        compress_block: tokens per compressed block [l] (32).
        compress_stride: tokens between the starts of consecutive compressed blocks [d] (16); at most
            ``compress_block`` so that no key is skipped.
        select_block: tokens per selection block [l'] (64); the key block of the kernels, so one of
            ``16, 32, 64, 128, 256``.
        select_blocks: blocks each query token attends in the selected branch [n] (16), the forced
            ones included.
        forced_initial: the first blocks of the sequence always selected (1).
        forced_local: the most recent blocks always selected, the query's own block included (2);
            at least 1 (a query always reads its own block, causally inside it).
        window: tokens of the sliding-window branch [w] (512), a multiple of ``window_block``.
        window_block: the window branch's block size (64): a query reads the keys of the
            ``window // window_block`` blocks ending with its own block, causally inside it.
        compress_hidden: hidden width of the compression MLPs; ``None``: the head dimension.
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    select_blocks: int = 16
    forced_initial: int = 1
    forced_local: int = 2
    window: int = 512
    window_block: int = 64
    compress_hidden: Optional[int] = None

    def __post_init__(self) -> None:
        minimum = {"forced_initial": 0}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "compress_hidden" and value is None:
                continue
            low = minimum.get(f.name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"NSAConfig.{f.name} must be an int >= {low}, got {value!r}")
        if self.compress_stride > self.compress_block:
            raise ValueError(f"NSAConfig.compress_stride must be at most compress_block={self.compress_block} "
                             f"(a larger stride skips keys), got {self.compress_stride}")
        for name in ("select_block", "window_block"):
            if getattr(self, name) not in SUPPORTED_BLOCK_SIZES:
                raise ValueError(f"NSAConfig.{name} must be one of {SUPPORTED_BLOCK_SIZES} (a kernel block size), "
                                 f"got {getattr(self, name)}")
        if self.forced_initial + self.forced_local > self.select_blocks:
            raise ValueError(f"NSAConfig.select_blocks must be at least forced_initial + forced_local = "
                             f"{self.forced_initial + self.forced_local}, got {self.select_blocks}")
        if self.window % self.window_block:
            raise ValueError(f"NSAConfig.window must be a multiple of window_block={self.window_block}, "
                             f"got {self.window}")

    @property
    def window_blocks(self) -> int:
        """Blocks of ``window_block`` tokens the window branch reads, the query's own included."""
        return self.window // self.window_block

    def hidden(self, head_dim: int) -> int:
        """The compression MLPs' hidden width for ``head_dim``."""
        return head_dim if self.compress_hidden is None else self.compress_hidden

    def replace(self, **changes) -> "NSAConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
