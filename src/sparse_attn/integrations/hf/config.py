"""SparseConfig: which method each layer uses, with which knobs, and when attention stays dense."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from ...backends import BACKENDS
from ...methods import METHODS, CostModel, KnobError, KnobSpec, Method, get_method
from ...methods.knobs import CheckedOnAssignment

FALLBACKS = ("auto", "length", "never")

# Declared types and ranges of the plain settings (the method ones are checked by building them).
SETTINGS = {
    "dense_first_layers": KnobSpec.integer(0),
    "min_kv_len": KnobSpec.integer(0),
    "fallback": KnobSpec.choice(*FALLBACKS),
    "record": KnobSpec.boolean(),
    "measure_recall": KnobSpec.boolean(),
}
OWNER = "SparseConfig"


class SparseConfigError(KnobError):
    """A SparseConfig field (or a method knob in it) is unknown or outside its type or range; the
    message names the field (and the file, from :meth:`SparseConfig.from_file`). A ValueError."""


def _error(detail: str) -> SparseConfigError:
    return SparseConfigError(f"{OWNER}: {detail}", owner=OWNER, detail=detail)


@dataclass
class SparseConfig(CheckedOnAssignment):
    """Per-model sparse-attention settings (also readable from JSON or YAML).

    * ``method`` / ``knobs``: the default method and its knobs (per-head lists allowed).
    * ``layers``: ``{layer_idx: {"method": ..., **knobs}}`` overrides for single layers
      (``{"method": "dense"}`` keeps a layer dense).
    * ``dense_first_layers``: the first N layers stay dense (early layers are the least sparse).
    * ``min_kv_len``: below this many keys attention stays dense (sparse does not pay there).
    * ``fallback``: ``"auto"`` also asks the cost model after estimating (CUDA only), ``"length"``
      only applies ``min_kv_len``, ``"never"`` always runs the sparse path.
    * ``decode``: ``"dense"`` (default), or a method for decode steps (``q_len == 1``): a name or
      ``{"method": name, **knobs}``, e.g. ``{"method": "quest", "top_k": 32}`` (a prefill method,
      page bounds recomputed each step). A dict with a ``"budget"`` decodes through a page index
      kept per layer (:mod:`sparse_attn.decode`): ``{"method": "quest" | "pooled" | "sink_window",
      "budget": tokens, "page": 16, "sink": 64, "recent": 64}``; ``page`` a power of two in 16..256,
      ``budget >= page`` and large enough for the sink and recent pages, ``sink``/``recent`` >= 0.
    * ``record``: keep per-forward, per-layer density and estimation cost in the state.
    * ``measure_recall``: with ``record``, also the attention recall of each sparse call (exact on
      32 sampled query rows per layer; costs a little extra).
    * ``backend``: attention backend for the sparse path (``"auto"`` picks Triton on GPUs).

    Everything is checked when the config is built and again when a field is assigned
    (``config.min_kv_len = -1`` raises and leaves the config as it was): the method names exist,
    every method (default, per layer, decode) is built once with its knobs, ``dense_first_layers``
    and ``min_kv_len`` are ints >= 0, ``fallback`` is one of ``FALLBACKS``, ``record`` and
    ``measure_recall`` are bools, ``backend`` is ``"auto"`` or a known backend. Errors are
    :class:`SparseConfigError` (a ValueError) naming the field. Mutating ``knobs`` or ``layers`` in
    place is not seen: assign a new dict.
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
        self.validate()
        self._start_checking()  # from here on, assigning a field checks the whole config again

    def checked_fields(self):
        return _FIELD_NAMES

    def validate(self) -> None:
        """Check every field and build every method once (a wrong name or knob fails here, not at
        the first forward); commit the normalized layers and the built methods only if all pass."""
        for name, spec in SETTINGS.items():
            try:
                spec.check(OWNER, name, getattr(self, name))
            except KnobError as err:
                raise _error(err.detail) from None
        if not isinstance(self.backend, str) or self.backend not in ("auto", *BACKENDS):
            raise _error(f"backend={self.backend!r} is not one of {['auto', *BACKENDS]}")
        if not isinstance(self.method, str):
            raise _error(f"method={self.method!r} is not a method name (a str)")
        if not isinstance(self.knobs, Mapping):
            raise _error(f"knobs={self.knobs!r} is not a dict {{knob: value}}")
        if not isinstance(self.layers, Mapping):
            raise _error(f"layers={self.layers!r} is not a dict {{layer_idx: {{'method': ..., **knobs}}}}")
        layers = {}
        for key, spec in self.layers.items():
            idx = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise _error(f"layers has key {key!r}, not a layer index (an int >= 0)")
            if not isinstance(spec, Mapping):
                raise _error(f"layers[{idx}]={spec!r} is not a dict {{'method': ..., **knobs}}")
            layers[idx] = dict(spec)
        methods = {None: self._build(None, {})}
        for idx, spec in layers.items():
            methods[idx] = self._build(idx, spec)
        decode = None
        if isinstance(self.decode, str):
            if self.decode != "dense":
                decode = self._build_named("decode", "decode", self.decode, {})
        decode_pages = None
        if isinstance(self.decode, str):
            if self.decode != "dense":
                decode = self._build_named("decode", "decode", self.decode, {})
        elif isinstance(self.decode, Mapping):
            spec = dict(self.decode)
            if "method" not in spec:
                raise _error(f"decode={self.decode!r} has no 'method' key")
            if "budget" in spec:  # page-index decode (sparse_attn.decode); otherwise a prefill method
                decode_pages = _check_decode_pages(spec)
            else:
                name = spec.pop("method")
                decode = self._build_named("decode", "decode", name, spec)
        else:
            raise _error(f"decode={self.decode!r} is not 'dense', a method name or {{'method': name, **knobs}}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_decode_method", decode)
        object.__setattr__(self, "_decode_pages", decode_pages)

    def _build(self, key: Optional[int], spec: dict) -> Optional[Method]:
        """The method of ``layers[key]`` (``key`` None: the default method), built (and so checked);
        None for a layer configured dense."""
        spec = dict(spec)
        name = spec.pop("method", self.method)
        name_field, knobs_field = ("method", "knobs") if key is None else (f"layers[{key}]",) * 2
        knobs = {**(self.knobs if name == self.method else {}), **spec}
        method = self._build_named(name_field, knobs_field, name, knobs)
        return None if name == "dense" and key is not None else method

    @staticmethod
    def _build_named(name_field: str, knobs_field: str, name, knobs: dict) -> Method:
        if not isinstance(name, str) or name not in METHODS:
            raise _error(f"{name_field}: unknown method {name!r}; available: {sorted(METHODS)}")
        try:
            return get_method(name, **knobs)
        except KnobError as err:
            raise _error(f"{knobs_field}: {err}") from None

    def method_for(self, layer_idx: Optional[int]) -> Optional[Method]:
        """The method for a layer, or None when the layer stays dense."""
        if layer_idx is not None and layer_idx < self.dense_first_layers:
            return None
        key = layer_idx if layer_idx in self.layers else None
        if key not in self._methods:  # layers changed in place since the last check
            self._methods[key] = self._build(key, self.layers[key])
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
        """Build from a dict of fields; an unknown key is refused, naming it."""
        if not isinstance(data, Mapping):
            raise SparseConfigError(f"a SparseConfig needs a mapping of fields, got {type(data).__name__}")
        unknown = set(data) - _FIELD_NAMES
        if unknown:
            detail = f"unknown SparseConfig field(s) {sorted(unknown, key=str)}; fields: {sorted(_FIELD_NAMES)}"
            raise SparseConfigError(detail, owner=OWNER, detail=detail)
        return cls(**data)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "SparseConfig":
        """Read a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML). Every error of the
        contents (syntax, unknown key, bad value) is a :class:`SparseConfigError` naming the file."""
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                try:
                    import yaml
                except ImportError as exc:
                    raise ImportError("reading YAML configs needs PyYAML: pip install pyyaml") from exc
                try:
                    data = yaml.safe_load(text)
                except yaml.YAMLError as err:
                    raise SparseConfigError(f"not valid YAML: {err}") from None
            else:
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as err:
                    raise SparseConfigError(f"not valid JSON: {err}") from None
            return cls.from_dict(data or {})
        except (SparseConfigError, KnobError) as err:
            raise SparseConfigError(f"{path}: {err}", owner=getattr(err, "owner", None),
                                    detail=getattr(err, "detail", None)) from None

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# Page-index decode: ``decode={"method": ..., "budget": ..., "page": ..., "sink": ..., "recent": ...}``.
DECODE_PAGE_METHODS = ("quest", "pooled", "sink_window")
DECODE_PAGE_DEFAULTS = {"page": 16, "sink": 64, "recent": 64}


def _check_decode_pages(spec: dict) -> dict:
    """The checked settings of page-index decode (a dict with method, budget, page, sink, recent);
    :class:`SparseConfigError` naming the knob otherwise."""
    from ...decode import PAGE_SIZES
    from ...decode.select import PageSelection

    unknown = sorted(set(spec) - {"method", "budget", *DECODE_PAGE_DEFAULTS}, key=str)
    if unknown:
        raise _error(f"decode: unknown key(s) {unknown} for page-index decode; keys: method, budget, "
                     f"{', '.join(DECODE_PAGE_DEFAULTS)}")
    out = {**DECODE_PAGE_DEFAULTS, **spec}
    method = out["method"]
    if not isinstance(method, str) or method not in DECODE_PAGE_METHODS:
        raise _error(f"decode: method={method!r} is not a page-selection method; one of {list(DECODE_PAGE_METHODS)}")
    for name in ("budget", "page", "sink", "recent"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f"decode: {name}={value!r} is not an int")
    if out["page"] not in PAGE_SIZES:
        raise _error(f"decode: page={out['page']!r} is not a power of two from {PAGE_SIZES[0]} to {PAGE_SIZES[-1]}")
    for name in ("sink", "recent"):
        if out[name] < 0:
            raise _error(f"decode: {name}={out[name]!r} is negative (must be >= 0)")
    if out["budget"] < out["page"]:
        raise _error(f"decode: budget={out['budget']!r} is smaller than page={out['page']} (the budget is read "
                     "in whole pages)")
    selection = PageSelection(method=method, budget=out["budget"], sink=out["sink"], recent=out["recent"])
    try:
        selection.check_budget(out["page"])
    except ValueError as err:
        raise _error(f"decode: {str(err).split(': ', 1)[-1]}") from None
    return out


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SparseConfig))
