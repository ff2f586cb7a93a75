"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): a lightning indexer scores every earlier key token
per query token, and attention reads only each token's ``top_k`` keys.

* :func:`token_sparse_attention`: attention of each query token over its own list of key tokens
  (Triton forward and backward; the plain-PyTorch reference :func:`reference_token_sparse_attention`);
* :class:`DSAConfig`, :class:`LightningIndexer`, :func:`select_tokens`, :func:`indexer_kl_loss`: the
  indexer, its chunked top-k selection and its distillation loss;
* :func:`convert_llama`: a transformers Llama-family model's layers with DSA (dense warm-up and
  sparse stages, :func:`set_stage`, :func:`indexer_loss`, :func:`indexer_parameters`);
  :func:`save_dsa_model` / :func:`load_dsa_model` write and read such a model.
"""

from .attention import reference_token_sparse_attention, token_mask, token_sparse_attention
from .checkpoint import is_dsa_model, load_dsa_model, save_dsa_model
from .indexer import DSAConfig, LightningIndexer, attention_target, index_scores, indexer_kl_loss, select_tokens
from .llama import DSALlamaAttention, convert_llama, indexer_loss, indexer_parameters, set_stage

__all__ = ["token_sparse_attention", "reference_token_sparse_attention", "token_mask", "DSAConfig",
           "LightningIndexer", "index_scores", "select_tokens", "indexer_kl_loss", "attention_target",
           "DSALlamaAttention", "convert_llama", "set_stage", "indexer_parameters", "indexer_loss", "save_dsa_model",
           "load_dsa_model", "is_dsa_model"]
