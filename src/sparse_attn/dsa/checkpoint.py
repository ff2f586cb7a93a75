"""Saving and loading a transformers model converted to DSA (:func:`~sparse_attn.dsa.convert_llama`).

``save_dsa_model`` writes the model as ``save_pretrained`` does (its weights include the indexers)
plus :data:`DSA_FILE`, which records the :class:`DSAConfig`, the converted layers and their stage;
``load_dsa_model`` loads the dense model, converts the same layers and restores the indexers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

from torch import nn

from ..converted_checkpoint import decoder_layers, read_conversion, restore_parameters, write_conversion
from .indexer import DSAConfig
from .llama import DSALlamaAttention, convert_llama

__all__ = ["DSA_FILE", "save_dsa_model", "load_dsa_model", "is_dsa_model"]

DSA_FILE = "dsa.json"
DSA_FORMAT = "sparse_attn.dsa/1"
_PARAMETER_INFIX = ".self_attn.indexer."


def save_dsa_model(model: nn.Module, path: Union[str, Path], **save_kwargs) -> Path:
    """Write ``model`` (converted by :func:`convert_llama`) to the directory ``path``:
    ``model.save_pretrained(path, **save_kwargs)`` and :data:`DSA_FILE`. Returns ``path``."""
    decoder = decoder_layers(model)
    layers = [i for i, layer in enumerate(decoder) if isinstance(layer.self_attn, DSALlamaAttention)]
    if not layers:
        raise ValueError("model has no DSA attention layer: convert it with sparse_attn.dsa.convert_llama first")
    first = decoder[layers[0]].self_attn
    meta = {"format": DSA_FORMAT, "config": dataclasses.asdict(first.dsa_config), "layers": layers,
            "stage": first.stage}
    return write_conversion(model, path, DSA_FILE, meta, **save_kwargs)


def is_dsa_model(path: Union[str, Path]) -> bool:
    """Whether the model directory ``path`` holds a model written by :func:`save_dsa_model`."""
    return (Path(path) / DSA_FILE).is_file()


def load_dsa_model(path: Union[str, Path], *, dtype=None, device=None, backend: str = "auto") -> nn.Module:
    """The model :func:`save_dsa_model` wrote to ``path``, converted again (same layers and stage), with
    its indexers, in eval mode; ``dtype``/``device`` as for ``from_pretrained`` / ``.to``; ``backend``
    as in :func:`convert_llama`. ValueError naming the file when it is not such a model or its
    weights lack indexer parameters."""
    from transformers import AutoModelForCausalLM

    meta = read_conversion(path, DSA_FILE, DSA_FORMAT, "sparse_attn.dsa.save_dsa_model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    convert_llama(model, DSAConfig(**meta["config"]), layers=meta["layers"], stage=meta["stage"], backend=backend)
    restore_parameters(model, path, _PARAMETER_INFIX, "indexer")
    model = model.to(dtype) if dtype is not None else model
    return (model.to(device) if device is not None else model).eval()
