"""XAttention: block scores from antidiagonal sums inside each block pair, top-p per query block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Knob, Method, register_method
from .knobs import KnobSpec
from .primitives.block_mass import block_mass
from .primitives.top_p import top_p_mask


def antidiagonal_reshape(q: Tensor, k: Tensor, stride: int):
    """XAttention's reshaping, so one dot product sums an antidiagonal of an ``s x s`` tile: row ``a``
    of ``q_r`` concatenates ``q[a*s + i]`` and row ``b`` of ``k_r`` concatenates ``k[b*s + s-1-i]``
    over ``i`` (the paper reverses the queries instead; the sums are the same). Reversing the keys
    leaves ``q_r`` a view of ``q`` when the length is a stride multiple: only K, 1/G of Q's size under
    GQA, is copied (copying both was ~12% of XAttention's time at 128K on an H100)."""
    def pad(x):
        extra = (-x.shape[2]) % stride
        return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x

    q, k = pad(q), pad(k)
    dim = q.shape[-1]
    q_r = q.reshape(*q.shape[:2], q.shape[2] // stride, stride * dim)
    k_r = k.reshape(*k.shape[:2], k.shape[2] // stride, stride, dim).flip(3).flatten(3)
    return q_r, k_r


@register_method
@dataclass
class XAttention(Method):
    """XAttention: antidiagonal scores with stride ``stride`` inside each block pair, softmax over
    the row, then per query block the fewest key blocks whose mass reaches ``threshold`` (in (0, 1];
    ``stride`` >= 1 must divide ``block_size``).
    ``one_pass``: the block mass kernel computes the scores once (default) or twice
    (:func:`.primitives.block_mass.block_mass`)."""

    name = "xattention"
    KNOBS = {
        "threshold": KnobSpec.fraction(),  # cumulative mass per query block
        "stride": KnobSpec.integer(1),  # must also divide block_size (check_knobs)
        "one_pass": KnobSpec.boolean(),
    }
    threshold: Knob = 0.9
    stride: int = 8
    one_pass: bool = True

    def check_knobs(self):
        if self.block_size % self.stride:
            raise self.knob_error("stride", self.stride, f"does not divide block_size={self.block_size} "
                                  "(stride must be >= 1 and divide block_size)")

    def select(self, q, k, grid, scale, kernel_options=None):
        if grid.q_block % self.stride or grid.kv_block % self.stride:
            raise ValueError(f"xattention: block_size {grid.q_block} must be a multiple of stride {self.stride}")
        q_r, k_r = antidiagonal_reshape(q, k, self.stride)
        mass = block_mass(q_r, k_r, grid.q_block // self.stride, grid.kv_block // self.stride,
                          scale / self.stride, causal=True, kernel_options=kernel_options, one_pass=self.one_pass)
        nq, nk = grid.reachable.shape
        mass = mass[..., :nq, :nk]
        return top_p_mask(mass, self.row_values(self.threshold, mass, k.shape[1]), kernel_options=kernel_options)
