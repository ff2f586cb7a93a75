"""Hugging Face transformers integration: ``patch(model, method=...)`` / ``unpatch(model)``."""

from .config import SparseConfig
from .patching import ATTN_NAME, SparseState, is_patched, patch, sparse_attention_forward, unpatch

__all__ = ["patch", "unpatch", "is_patched", "SparseConfig", "SparseState", "ATTN_NAME",
           "sparse_attention_forward"]
