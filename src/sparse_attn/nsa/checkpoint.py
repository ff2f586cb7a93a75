"""Saving and loading a transformers model converted to NSA (:func:`~sparse_attn.nsa.convert_llama`).

``save_nsa_model`` writes the model as ``save_pretrained`` does (its weights include the NSA
parameters) plus :data:`NSA_FILE`, which records the :class:`NSAConfig` and the converted layers;
``load_nsa_model`` loads the dense model, converts the same layers and restores the NSA parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..converted_checkpoint import decoder_layers, read_conversion, restore_parameters, write_conversion
from ..options import KernelOptions
from .config import NSAConfig
from .llama import NSALlamaAttention, convert_llama

__all__ = ["NSA_FILE", "save_nsa_model", "load_nsa_model", "is_nsa_model"]

NSA_FILE = "nsa.json"
NSA_FORMAT = "sparse_attn.nsa/1"
_PARAMETER_INFIX = ".self_attn.nsa."


def save_nsa_model(model: nn.Module, path: Union[str, Path], **save_kwargs) -> Path:
    """Write ``model`` (converted by :func:`convert_llama`) to the directory ``path``:
    ``model.save_pretrained(path, **save_kwargs)`` and :data:`NSA_FILE`. Returns ``path``."""
    decoder = decoder_layers(model)
    layers = [i for i, layer in enumerate(decoder) if isinstance(layer.self_attn, NSALlamaAttention)]
    if not layers:
        raise ValueError("model has no NSA attention layer: convert it with sparse_attn.nsa.convert_llama first")
    config = decoder[layers[0]].self_attn.nsa.config
    meta = {"format": NSA_FORMAT, "config": dataclasses.asdict(config), "layers": layers}
    return write_conversion(model, path, NSA_FILE, meta, **save_kwargs)


def is_nsa_model(path: Union[str, Path]) -> bool:
    """Whether the model directory ``path`` holds a model written by :func:`save_nsa_model`."""
    return (Path(path) / NSA_FILE).is_file()


def load_nsa_model(path: Union[str, Path], *, dtype=None, device=None, backend: str = "auto",
                   kernel_options: Optional[KernelOptions] = None) -> nn.Module:
    """The model :func:`save_nsa_model` wrote to ``path``, converted again, with its NSA parameters,
    in eval mode; ``dtype``/``device`` as for ``from_pretrained`` / ``.to``; ``backend`` and
    ``kernel_options`` as in :func:`convert_llama`. ValueError naming the file when it is not such a
    model or its weights lack NSA parameters."""
    from transformers import AutoModelForCausalLM

    meta = read_conversion(path, NSA_FILE, NSA_FORMAT, "sparse_attn.nsa.save_nsa_model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    convert_llama(model, NSAConfig(**meta["config"]), layers=meta["layers"], backend=backend,
                  kernel_options=kernel_options)
    restore_parameters(model, path, _PARAMETER_INFIX, "NSA")
    return (model.to(device) if device is not None else model).eval()
