"""The oracle: exact block attention mass, top-p of it (the upper bound for estimators)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Knob, Method, register_method
from .knobs import KnobSpec
from .primitives.block_mass import block_mass
from .primitives.top_p import top_p_mask


@register_method
@dataclass
class Oracle(Method):
    """Exact block attention mass (computed blockwise), top-p of it: the upper bound for estimators.
    ``one_pass``: the block mass kernel computes the scores once (default) or twice
    (:func:`.primitives.block_mass.block_mass`)."""

    name = "oracle"
    KNOBS = {"top_p": KnobSpec.fraction(), "one_pass": KnobSpec.boolean()}
    top_p: Knob = 0.95
    one_pass: bool = True

    def select(self, q, k, grid, scale, kernel_options=None):
        mass = block_mass(q, k, grid.q_block, grid.kv_block, scale, causal=True, kernel_options=kernel_options,
                          one_pass=self.one_pass)
        return top_p_mask(mass, self.row_values(self.top_p, mass, k.shape[1]), kernel_options=kernel_options)
