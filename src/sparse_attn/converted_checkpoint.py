"""What converting a transformers model's attention layers (NSA, DSA), saving and loading it have in
common: the decoder layers, replacing their attention, a JSON file of how the layers were converted
beside ``save_pretrained``'s files, and restoring the added parameters from the saved weights."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

__all__ = ["decoder_layers", "replace_attention", "write_conversion", "read_conversion", "restore_parameters"]


def decoder_layers(model: nn.Module):
    """``model.model.layers`` of a transformers Llama-family model (ValueError otherwise)."""
    decoder = getattr(getattr(model, "model", model), "layers", None)
    if decoder is None:
        raise ValueError("model must be a transformers Llama-family model (model.model.layers)")
    return decoder


def replace_attention(model: nn.Module, layers, converted: type, make) -> nn.Module:
    """Replace the ``self_attn`` of ``model``'s decoder layers (``layers``: their indices, None: all)
    by ``make(dense_attention)``, in place, skipping layers already of type ``converted``; returns
    ``model``. ValueError naming a bad index."""
    decoder = decoder_layers(model)
    chosen = range(len(decoder)) if layers is None else list(layers)
    for index in chosen:
        if not isinstance(index, int) or not 0 <= index < len(decoder):
            raise ValueError(f"layers must hold layer indices in [0, {len(decoder)}), got {index!r}")
        if not isinstance(decoder[index].self_attn, converted):
            decoder[index].self_attn = make(decoder[index].self_attn)
    return model


def write_conversion(model: nn.Module, path, file_name: str, meta: dict, **save_kwargs) -> Path:
    """``model.save_pretrained(path, **save_kwargs)``, then ``meta`` as JSON in ``path / file_name``."""
    path = Path(path)
    model.save_pretrained(path, **save_kwargs)
    (path / file_name).write_text(json.dumps(meta, indent=1))
    return path


def read_conversion(path, file_name: str, expected_format: str, writer: str) -> dict:
    """The JSON ``write_conversion`` wrote (ValueError naming the file when absent or of another
    format; ``writer`` names the function that writes such a directory)."""
    meta_file = Path(path) / file_name
    if not meta_file.is_file():
        raise ValueError(f"{path} has no {file_name}: not a model written by {writer}")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != expected_format:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r}, expected {expected_format!r}")
    return meta


def restore_parameters(model: nn.Module, path, infix: str, what: str) -> None:
    """Copy the parameters whose names contain ``infix`` from the safetensors files in ``path`` into
    ``model`` (only those tensors are read); ValueError when some are missing (``what`` names them)."""
    import torch
    from safetensors import safe_open

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            state.update({name: weights.get_tensor(name) for name in weights.keys() if infix in name})
    wanted = {name for name, _ in model.named_parameters() if infix in name}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"the weights in {path} lack {len(missing)} {what} parameter(s), e.g. {missing[0]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name in wanted:
            params[name].copy_(state[name])
