"""SparseConfig: which method each layer uses, with which knobs, and when attention stays dense."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ...methods import METHODS, CostModel, Method, get_method

FALLBACKS = ("auto", "length", "never")


@dataclass
class SparseConfig:
    """Per-model sparse-attention settings (also readable from JSON or YAML).

    * ``method`` / ``knobs``: the default method and its knobs (per-head lists allowed).
    * ``layers``: ``{layer_idx: {"method": ..., **knobs}}`` overrides for single layers
      (``{"method": "dense"}`` keeps a layer dense).
    * ``dense_first_layers``: the first N layers stay dense (early layers are the least sparse).
    * ``min_kv_len``: below this many keys attention stays dense (sparse does not pay there).
    * ``fallback``: ``"auto"`` also asks the cost model after estimating (CUDA only), ``"length"``
      only applies ``min_kv_len``, ``"never"`` always runs the sparse path.
    * ``decode``: ``"dense"`` (default), or a method for decode steps (``q_len == 1``): a name or
      ``{"method": name, **knobs}``, e.g. ``{"method": "quest", "top_k": 32}``.
    * ``record``: keep per-forward, per-layer density and estimation cost in the state.
    * ``measure_recall``: with ``record``, also the attention recall of each sparse call (exact on
      32 sampled query rows per layer; costs a little extra).
    * ``backend``: attention backend for the sparse path (``"auto"`` picks Triton on GPUs).
    """

    method: str = "xattention"
    knobs: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    dense_first_layers: int = 0
    min_kv_len: int = 8192
    fallback: str = "auto"
    decode: Union[str, dict] = "dense"
    record: bool = False
    measure_recall: bool = False
    backend: str = "auto"

    def __post_init__(self):
        self.layers = {int(k): dict(v) for k, v in self.layers.items()}
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.dense_first_layers < 0 or self.min_kv_len < 0:
            raise ValueError("dense_first_layers and min_kv_len must be >= 0")
        # Build every method once now, so a wrong name or knob fails at patch time.
        self._methods: dict = {}
        self.method_for(None)
        for idx in self.layers:
            self.method_for(idx)
        if self.decode != "dense":
            spec = {"method": self.decode} if isinstance(self.decode, str) else dict(self.decode)
            self._decode_method = get_method(spec.pop("method"), **spec)

    def method_for(self, layer_idx: Optional[int]) -> Optional[Method]:
        """The method for a layer, or None when the layer stays dense."""
        if layer_idx is not None and layer_idx < self.dense_first_layers:
            return None
        key = layer_idx if layer_idx in self.layers else None
        if key not in self._methods:
            spec = dict(self.layers[key]) if key is not None else {}
            name = spec.pop("method", self.method)
            if name not in METHODS:
                where = f"layers[{key}]" if key is not None else "method"
                raise ValueError(f"{where}: unknown method {name!r}; available: {sorted(METHODS)}")
            knobs = {**(self.knobs if name == self.method else {}), **spec}
            self._methods[key] = None if name == "dense" and key is not None else get_method(name, **knobs)
        return self._methods[key]

    def check_layers(self, num_layers: int) -> None:
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")

    def cost_model(self) -> CostModel:
        return CostModel(min_kv_len=self.min_kv_len)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SparseConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SparseConfig field(s) {sorted(unknown)}; fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SparseConfig":
        """Read a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ImportError("reading YAML configs needs PyYAML: pip install pyyaml") from exc
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data or {})

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
