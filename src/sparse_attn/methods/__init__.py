"""Sparsity methods behind one interface: ``get_method(name, **knobs).estimate(q, k) -> layout``.

One module per method (:mod:`.pooled`, :mod:`.oracle`, :mod:`.xattention`, :mod:`.vertical_slash`,
:mod:`.flexprefill`, :mod:`.quest`, :mod:`.moba`, :mod:`.static`, :mod:`.seer` with its learned gates in
:mod:`.seer_gate`); the estimation steps they share are in
:mod:`.primitives` (Triton kernels with PyTorch references side by side), :mod:`.selection` and
:mod:`.common`. Knobs are declared (type and range) with :class:`.knobs.KnobSpec` and checked
when a method is built.
"""

from .base import METHODS, EstimateReport, Method, get_method, register_method
from .cost import CostModel, attend
from .flexprefill import FlexPrefill
from .knobs import KnobError, KnobSpec
from .oracle import Oracle
from .pooled import PooledTopK, PooledTopP
from .precheck import DecisionCache, Precheck, PrecheckReport
from .moba import MoBA
from .quest import Quest
from .seer import Seer
from .static import StaticPattern
from .vertical_slash import VerticalSlash
from .xattention import XAttention

__all__ = [
    "METHODS", "Method", "EstimateReport", "get_method", "register_method", "KnobSpec", "KnobError",
    "CostModel", "attend", "Precheck", "PrecheckReport", "DecisionCache",
    "PooledTopP", "PooledTopK", "Oracle", "Quest", "XAttention", "VerticalSlash", "FlexPrefill", "StaticPattern",
    "MoBA",
    "Seer",
]
