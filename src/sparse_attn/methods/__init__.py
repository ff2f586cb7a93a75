"""Sparsity methods behind one interface: ``get_method(name, **knobs).estimate(q, k) -> layout``."""

from .base import METHODS, EstimateReport, Method, get_method, register_method
from .cost import CostModel, attend
from .methods_impl import FlexPrefill, Oracle, PooledTopK, PooledTopP, Quest, VerticalSlash, XAttention
from .static import StaticPattern

__all__ = [
    "METHODS", "Method", "EstimateReport", "get_method", "register_method", "CostModel", "attend",
    "PooledTopP", "PooledTopK", "Oracle", "Quest", "XAttention", "VerticalSlash", "FlexPrefill", "StaticPattern",
]
