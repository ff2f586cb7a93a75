"""The canary model: a small byte-level Llama trained (dense attention) to retrieve needles.

No machine here reaches a model hub, so the project ships its own default model in
``sparse_attn/eval/canary/``: a Llama-architecture model (RoPE, GQA, :data:`CANARY_SHAPE`) with the
byte tokenizer of :mod:`sparse_attn.integrations.hf.tokenizer`, trained at 8K tokens on real text
mixed with the retrieval episodes of :mod:`.tasks` (0.99 dense accuracy at 8K). ``"canary"`` names it
wherever a model path is taken (``sparse-attn eval --model canary``, :func:`resolve_model`).

Training it is a maintainer tool kept out of the installed package; from a source checkout:

    python -m tools.canary train --out DIR --minutes 9.9

(9.9 minutes on an H100), then check ``DIR`` (``sparse-attn eval --model DIR``) and copy its files
into ``src/sparse_attn/eval/canary/``; the tool never writes into that directory itself.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CANARY_SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=64, rope_theta=10000.0)

TRAIN_COMMAND = "python -m tools.canary train --out DIR"


def canary_dir() -> Path:
    """The directory of the shipped canary weights, config and tokenizer."""
    return Path(str(resources.files("sparse_attn.eval").joinpath("canary")))


def resolve_model(name_or_path: str) -> str:
    """``"canary"`` -> the shipped canary directory (clear error if its weights are missing)."""
    if name_or_path != "canary":
        return name_or_path
    path = canary_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the canary model is not in {path}: from a source checkout, train it on a GPU with "
            f"`{TRAIN_COMMAND}` (9.9 minutes on an H100) and copy DIR's files there"
        )
    return str(path)


def canary_config(seq_len: int, vocab_size: int, **overrides):
    """A transformers ``LlamaConfig`` of the canary's shape (``overrides`` change it) for ``seq_len`` tokens."""
    from transformers import LlamaConfig

    shape = {**CANARY_SHAPE, **overrides}
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len + 64, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)
