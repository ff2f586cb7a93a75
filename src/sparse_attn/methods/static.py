"""Static patterns as methods, so the HF integration and the harness treat every layout alike."""

from __future__ import annotations

from dataclasses import dataclass

from ..patterns import dense_layout, power_layout, random_layout, sliding_window_layout, strided_layout
from .base import Method, register_method
from .knobs import KnobSpec


@dataclass
class StaticPattern(Method):
    """A layout that depends only on the shapes, not on q and k (built for each call)."""

    def build(self, q_len, kv_len, heads, kv_heads, device):
        raise NotImplementedError

    def select(self, q, k, grid, scale, kernel_options=None):
        layout = self.build(q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.device)
        return layout.expand(batch=q.shape[0], heads=q.shape[1]).to_dense()


@register_method
@dataclass
class Dense(StaticPattern):
    """Every reachable block (the baseline; also what ``patch`` uses to check exactness)."""

    name = "dense"

    def build(self, q_len, kv_len, heads, kv_heads, device):
        return dense_layout(q_len, kv_len, block_size=self.block_size, device=device)


@register_method
@dataclass
class SlidingWindow(StaticPattern):
    """Sliding window + sinks (StreamingLLM, MInference A-shape); ``window`` in tokens (or a share
    of the key length)."""

    name = "sliding_window"
    KNOBS = {"window": KnobSpec.count(1)}  # tokens
    window: int = 4096

    def build(self, q_len, kv_len, heads, kv_heads, device):
        return sliding_window_layout(q_len, kv_len, window=self.count(self.window, kv_len), sink=self.sink,
                                     block_size=self.block_size, device=device)

    def dense_knobs(self, grid, forced):
        window = grid.window_blocks(self.count(self.window, grid.kv_len))
        return ("window",) if bool((window | forced | ~grid.reachable).all()) else ()


@register_method
@dataclass
class Strided(StaticPattern):
    """S2-Attention shards per query head plus a local window of ``local_blocks``."""

    name = "strided"
    KNOBS = {"stride": KnobSpec.integer(1), "local_blocks": KnobSpec.integer(1)}
    stride: int = 4
    local_blocks: int = 4
    granularity: str = "head"  # each query head keeps its own shard (merging a GQA group would union them)

    def build(self, q_len, kv_len, heads, kv_heads, device):
        return strided_layout(q_len, kv_len, stride=self.stride, num_heads=heads,
                              local_blocks=self.local_blocks, sink=self.sink,
                              block_size=self.block_size, device=device)


@register_method
@dataclass
class Power(StaticPattern):
    """PowerAttention: power-of-two block distances plus a local window."""

    name = "power"
    KNOBS = {"local_blocks": KnobSpec.integer(1)}  # the diagonal block counts as one
    local_blocks: int = 2

    def build(self, q_len, kv_len, heads, kv_heads, device):
        return power_layout(q_len, kv_len, local_blocks=self.local_blocks, sink=self.sink,
                            block_size=self.block_size, device=device)


@register_method
@dataclass
class RandomBlocks(StaticPattern):
    """Independent random blocks at an expected ``density`` of the reachable blocks (the diagonal
    block of every row always kept), one layout shared by every head and fixed by ``seed``: a
    controlled density, e.g. to measure what a whole model gains at that density."""

    name = "random"
    KNOBS = {"density": KnobSpec.real(0.0, 1.0, low_open=True), "seed": KnobSpec.integer(0)}
    density: float = 0.1
    seed: int = 0

    def build(self, q_len, kv_len, heads, kv_heads, device):
        return random_layout(q_len, kv_len, density=self.density, block_size=self.block_size, seed=self.seed,
                             device=device)
