"""Native Sparse Attention (DeepSeek, "Native Sparse Attention: Hardware-Aligned and Natively Trainable
Sparse Attention", 2025): compressed, selected and sliding-window branches mixed by learned gates.

* :class:`NSAConfig`: the branches' sizes (validated);
* :func:`nsa_reference`: the math in plain PyTorch with dense masks (for tests and short inputs);
* :class:`NSAAttention`: the same math as a module whose selected and window branches run on the
  block-sparse kernels (forward and backward);
* :class:`CompressedKVCache`: the compressed keys and values kept beside a KV cache, so a decode
  step compresses only new blocks;
* :func:`convert_llama`: a transformers Llama-family model's attention layers replaced by NSA, from
  their dense projections; :func:`save_nsa_model` / :func:`load_nsa_model` write and read such a model.
"""

from .checkpoint import is_nsa_model, load_nsa_model, save_nsa_model
from .compressed_cache import CompressedKVCache
from .config import NSAConfig
from .llama import NSALlamaAttention, convert_llama, nsa_parameters
from .module import NSAAttention
from .reference import nsa_reference, select_blocks

__all__ = ["NSAConfig", "NSAAttention", "CompressedKVCache", "nsa_reference", "select_blocks", "convert_llama",
           "NSALlamaAttention", "nsa_parameters", "save_nsa_model", "load_nsa_model", "is_nsa_model"]
