"""Saving and loading a transformers model converted to NSA (:func:`~sparse_attn.nsa.convert_llama`).

``save_nsa_model`` writes the model as ``save_pretrained`` does (its weights include the NSA
parameters) plus :data:`NSA_FILE`, which records the :class:`NSAConfig` and the converted layers;
``load_nsa_model`` loads the dense model, converts the same layers and restores the NSA parameters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..options import KernelOptions
from .config import NSAConfig
from .llama import NSALlamaAttention, convert_llama

__all__ = ["NSA_FILE", "save_nsa_model", "load_nsa_model", "is_nsa_model"]

NSA_FILE = "nsa.json"
NSA_FORMAT = "sparse_attn.nsa/1"
_PARAMETER_INFIX = ".self_attn.nsa."


def _decoder(model: nn.Module):
    decoder = getattr(getattr(model, "model", model), "layers", None)
    if decoder is None:
        raise ValueError("model must be a transformers Llama-family model (model.model.layers)")
    return decoder


def save_nsa_model(model: nn.Module, path: Union[str, Path], **save_kwargs) -> Path:
    """Write ``model`` (converted by :func:`convert_llama`) to the directory ``path``:
    ``model.save_pretrained(path, **save_kwargs)`` and :data:`NSA_FILE`. Returns ``path``."""
    layers = [i for i, layer in enumerate(_decoder(model)) if isinstance(layer.self_attn, NSALlamaAttention)]
    if not layers:
        raise ValueError("model has no NSA attention layer: convert it with sparse_attn.nsa.convert_llama first")
    config = _decoder(model)[layers[0]].self_attn.nsa.config
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    meta = {"format": NSA_FORMAT, "config": dataclasses.asdict(config), "layers": layers}
    (path / NSA_FILE).write_text(json.dumps(meta, indent=1))
    return path


def is_nsa_model(path: Union[str, Path]) -> bool:
    """Whether the model directory ``path`` holds a model written by :func:`save_nsa_model`."""
    return (Path(path) / NSA_FILE).is_file()


def load_nsa_model(path: Union[str, Path], *, dtype=None, device=None, backend: str = "auto",
                   kernel_options: Optional[KernelOptions] = None) -> nn.Module:
    """The model :func:`save_nsa_model` wrote to ``path``, converted again, with its NSA parameters,
    in eval mode; ``dtype``/``device`` as for ``from_pretrained`` / ``.to``; ``backend`` and
    ``kernel_options`` as in :func:`convert_llama`. ValueError naming the file when it is not such a
    model or its weights lack NSA parameters."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta_file = path / NSA_FILE
    if not meta_file.is_file():
        raise ValueError(f"{path} has no {NSA_FILE}: not a model written by sparse_attn.nsa.save_nsa_model")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != NSA_FORMAT:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {NSA_FORMAT!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    convert_llama(model, NSAConfig(**meta["config"]), layers=meta["layers"], backend=backend,
                  kernel_options=kernel_options)
    state = {}
    for file in sorted(path.glob("*.safetensors")):  # only the NSA tensors are read from each file
        with safe_open(str(file), framework="pt") as weights:
            state.update({name: weights.get_tensor(name) for name in weights.keys() if _PARAMETER_INFIX in name})
    wanted = {name for name, _ in model.named_parameters() if _PARAMETER_INFIX in name}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"the weights in {path} lack {len(missing)} NSA parameter(s), e.g. {missing[0]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in wanted:
            params[name].copy_(state[name])
    return (model.to(device) if device is not None else model).eval()
