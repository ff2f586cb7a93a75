"""Hugging Face transformers integration: ``patch(model, method=...)`` / ``unpatch(model)``,
``profile_model`` (profile once, ``patch(model, profile=...)`` many times), and ``convert(model,
"nsa" | "dsa", config)`` (trainable sparse attention layers with parameters of their own)."""

from .config import SparseConfig
from .convert import convert
from .models import attention_shape, load_model
from .patching import ATTN_NAME, SparseState, is_patched, patch, sparse_attention_forward, unpatch
from .profile import profile_model, write_profile
from .warmup import warmup

__all__ = ["patch", "unpatch", "convert", "warmup", "is_patched", "SparseConfig", "SparseState", "ATTN_NAME",
           "sparse_attention_forward", "profile_model", "write_profile", "load_model", "attention_shape"]
