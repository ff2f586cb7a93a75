"""SparseConfig: which method each layer uses, with which knobs, and when attention stays dense."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

from ...backends import BACKENDS
from ...methods import METHODS, CostModel, KnobError, KnobSpec, Method, Precheck, get_method
from ...methods.knobs import CheckedOnAssignment

FALLBACKS = ("auto", "length", "never")
PROFILE_FORMAT = "sparse_attn.profile"  # the "format" of a profile file (:mod:`.profile`)

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
      Policies in the same dict: ``streaming_heads``/``full_heads`` ``{layer: [kv_head, ...]}`` (those
      KV heads read only the sink and recent pages / every page), ``per_layer`` ``{layer: {knob:
      value}}`` (method, budget, page, sink, recent; ``"method": "dense"`` keeps a layer's decode
      dense), ``select_layers`` ``[layer, ...]`` (only these select; later layers reuse the last
      selection), ``recall_every`` (every Nth decode step records the oracle recall; 0: off) and
      ``bounds`` (``"exact"``, or ``"int8"``: the page index also keeps Quest's bounds as int8 with a
      scale per page and Quest scores from them, reading half the bytes; see
      :class:`~sparse_attn.decode.PageIndex`).
    * ``record``: keep per-forward, per-layer density and estimation cost in the state.
    * ``measure_recall``: with ``record``, also the attention recall of each sparse call (exact on
      32 sampled query rows per layer; costs a little extra).
    * ``backend``: attention backend for the sparse path (``"auto"`` picks Triton on GPUs).
    * ``precheck``: the pre-check before each estimate and the per-model decision cache
      (:mod:`sparse_attn.methods.precheck`): ``"auto"`` (default: on with the default settings
      where the cost model decides, i.e. ``fallback="auto"`` on CUDA; off elsewhere), ``True``,
      ``False``, or a dict of :class:`~sparse_attn.methods.Precheck` settings (``share``, ``runs``,
      ``cache``, ``recheck_every``), which turns it on. Not with ``fallback="never"`` (always sparse).

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
    precheck: Union[str, bool, dict] = "auto"

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
        precheck = self._check_precheck()
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
        object.__setattr__(self, "_precheck", precheck)

    def _check_precheck(self) -> Optional[Precheck]:
        """The checked ``precheck`` setting: the :class:`Precheck` it turns on (``"auto"`` and True:
        the defaults), or None for False."""
        value = self.precheck
        if isinstance(value, Mapping):
            try:
                built = Precheck.from_dict(dict(value))
            except KnobError as err:
                raise _error(f"precheck: {err.detail}") from None
        elif value is True or value == "auto":
            built = Precheck()
        elif value is False:
            return None
        else:
            raise _error(f"precheck={value!r} is not 'auto', True, False or a dict of settings "
                         f"{{'share': ..., 'runs': ..., 'cache': ..., 'recheck_every': ...}}")
        if self.fallback == "never" and value != "auto":
            raise _error(f"precheck={value!r} with fallback='never': 'never' always runs sparse, so nothing may "
                         "decide dense; use fallback='auto' or 'length'")
        return built

    def precheck_for(self, cuda: bool) -> Optional[Precheck]:
        """The pre-check a call gets (None: none): ``"auto"`` only where the cost model decides
        (``fallback="auto"`` and ``cuda``)."""
        if self.precheck == "auto" and not (self.fallback == "auto" and cuda):
            return None
        return self._precheck

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

    def check_layers(self, num_layers: int, kv_heads: int | None = None) -> None:
        """The layer indexes (of ``layers`` and the page-decode policies) and KV head indexes exist in a
        model of ``num_layers`` layers and ``kv_heads`` KV heads (None: not checked); ValueError
        otherwise."""
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1})")
        if kv_heads is not None:  # every method's dense_heads (and its per_layer overrides') name KV heads
            named = [("method", self._methods[None]), ("decode", self._decode_method),
                     *((f"layers[{i}]", m) for i, m in self._methods.items() if i is not None)]
            for where, method in named:
                for idx in [None, *method.per_layer] if method is not None else []:
                    try:
                        method.for_layer(idx).dense_head_mask(kv_heads, holder="the model")
                    except ValueError as err:
                        raise _error(f"{where}: {err}") from None
        if self._decode_pages is not None:
            _check_decode_model(self._decode_pages, num_layers, kv_heads)

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
        """Read a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML), or a profile (its config,
        as :meth:`from_profile`). Every error of the contents (syntax, unknown key, bad value) is a
        :class:`SparseConfigError` naming the file."""
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
            if isinstance(data, Mapping) and data.get("format") == PROFILE_FORMAT and "config" in data:
                data = data["config"]  # a profile: the config it chose
            return cls.from_dict(data or {})
        except (SparseConfigError, KnobError) as err:
            raise SparseConfigError(f"{path}: {err}", owner=getattr(err, "owner", None),
                                    detail=getattr(err, "detail", None)) from None

    @classmethod
    def from_profile(cls, path: Union[str, Path]) -> "SparseConfig":
        """The config a profile (``sparse-attn profile``, :mod:`.profile`) chose: its ``"config"``.
        A file that is not a profile, or whose config is refused, is a :class:`SparseConfigError`
        naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SparseConfigError(f"{path}: not valid JSON: {err}") from None
        if not isinstance(data, Mapping) or data.get("format") != PROFILE_FORMAT or "config" not in data:
            raise SparseConfigError(f"{path}: not a profile (a JSON object with format={PROFILE_FORMAT!r} and a "
                                    "'config'; write one with `sparse-attn profile`)")
        try:
            return cls.from_dict(data["config"])
        except (SparseConfigError, KnobError) as err:
            raise SparseConfigError(f"{path}: {err}", owner=getattr(err, "owner", None),
                                    detail=getattr(err, "detail", None)) from None

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


# Page-index decode: ``decode={"method": ..., "budget": ..., "page": ..., "sink": ..., "recent": ...}``
# plus the policy keys of DECODE_PAGE_POLICIES.
DECODE_PAGE_METHODS = ("quest", "pooled", "sink_window", "seer")  # seer: a learned decode gate (``gates``)
DECODE_PAGE_DEFAULTS = {"page": 16, "sink": 64, "recent": 64}
DECODE_PAGE_KNOBS = ("method", "budget", *DECODE_PAGE_DEFAULTS)  # the ones per_layer may override
DECODE_PAGE_POLICIES = {"streaming_heads": {}, "full_heads": {}, "per_layer": {}, "select_layers": (),
                        "recall_every": 0, "gates": None, "bounds": "exact"}


def _check_decode_pages(spec: dict) -> dict:
    """The checked settings of page-index decode: the knobs (method, budget, page, sink, recent) and
    the policies (streaming_heads, full_heads, per_layer, select_layers, recall_every), normalized
    (layer keys as ints, head lists as sorted tuples, per_layer entries fully resolved);
    :class:`SparseConfigError` naming the key otherwise."""
    unknown = sorted(set(spec) - {*DECODE_PAGE_KNOBS, *DECODE_PAGE_POLICIES}, key=str)
    if unknown:
        raise _error(f"decode: unknown key(s) {unknown} for page-index decode; keys: "
                     f"{', '.join((*DECODE_PAGE_KNOBS, *DECODE_PAGE_POLICIES))}")
    given = {k: spec[k] for k in DECODE_PAGE_KNOBS if k in spec}
    knobs = _check_page_knobs("decode", {**DECODE_PAGE_DEFAULTS, **given})
    out = dict(knobs)
    per_layer = {}
    for layer, override in _layer_map("per_layer", spec.get("per_layer", {})).items():
        if not isinstance(override, Mapping):
            raise _error(f"decode: per_layer[{layer}]={override!r} is not a dict {{knob: value}}")
        bad = sorted(set(override) - set(DECODE_PAGE_KNOBS), key=str)
        if bad:
            raise _error(f"decode: per_layer[{layer}]: unknown key(s) {bad}; keys: {', '.join(DECODE_PAGE_KNOBS)}")
        per_layer[layer] = _check_page_knobs(f"decode: per_layer[{layer}]", {**knobs, **override}, allow_dense=True)
    out["per_layer"] = per_layer
    heads = {}
    for name in ("streaming_heads", "full_heads"):
        heads[name] = {}
        for layer, value in _layer_map(name, spec.get(name, {})).items():
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or any(
                    isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in value):
                raise _error(f"decode: {name}[{layer}]={value!r} is not a list of KV head indices (ints >= 0)")
            if len(set(value)) != len(value):
                raise _error(f"decode: {name}[{layer}]={list(value)!r} names a KV head twice")
            heads[name][layer] = tuple(sorted(value))
        out[name] = heads[name]
    for layer in sorted(set(heads["streaming_heads"]) & set(heads["full_heads"])):
        both = sorted(set(heads["streaming_heads"][layer]) & set(heads["full_heads"][layer]))
        if both:
            raise _error(f"decode: KV head(s) {both} of layer {layer} are in both streaming_heads and full_heads")
    select = spec.get("select_layers", ())
    if isinstance(select, (str, bytes)) or not isinstance(select, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in select):
        raise _error(f"decode: select_layers={select!r} is not a list of layer indices (ints >= 0)")
    if len(set(select)) != len(select):
        raise _error(f"decode: select_layers={list(select)!r} names a layer twice")
    out["select_layers"] = tuple(sorted(select))
    for layer in out["select_layers"]:
        if decode_layer_knobs(out, layer)["method"] == "dense":
            raise _error(f"decode: select_layers: layer {layer} decodes dense (per_layer[{layer}]), so it has no "
                         "selection to share")
    every = spec.get("recall_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise _error(f"decode: recall_every={every!r} is not an int >= 0 (0: off)")
    out["recall_every"] = every
    out["gates"] = _check_decode_gates(out, spec.get("gates"))
    from ...decode.bounds import BOUNDS

    bounds = spec.get("bounds", "exact")
    if bounds not in BOUNDS:
        raise _error(f"decode: bounds={bounds!r} is not one of {list(BOUNDS)} (how the page index keeps Quest's "
                     "bounds: in the key dtype, or as int8 with a scale per page)")
    out["bounds"] = bounds
    return out


def _check_decode_gates(pages: dict, gates):
    """The ``gates`` of page decode: required (a gates file, or ``"canary"``) when a layer's method is
    ``seer``, with a block size that is a multiple of every seer layer's page."""
    seer_pages = {pages["page"]} if pages["method"] == "seer" else set()
    seer_pages |= {o["page"] for o in pages["per_layer"].values() if o["method"] == "seer"}
    if gates is None:
        if seer_pages:
            raise _error("decode: method='seer' needs gates=PATH (a file written by `sparse-attn train-gates`, "
                         "or 'canary')")
        return None
    from ...methods.seer_gate import GatesError, SeerGates, resolve_gates

    try:
        spec = SeerGates.read_spec(resolve_gates(gates))
    except (GatesError, OSError, TypeError) as err:
        raise _error(f"decode: gates={gates!r}: {err}") from None
    bad = sorted(p for p in seer_pages if spec.block_size % p)
    if bad:
        raise _error(f"decode: gates={gates!r} score blocks of {spec.block_size} tokens, not a multiple of "
                     f"page={bad[0]}; use a page that divides {spec.block_size}")
    return str(gates)


def _check_page_knobs(where: str, out: dict, allow_dense: bool = False) -> dict:
    """method, budget, page, sink and recent of one (layer's) page-index decode, checked; ``where``
    prefixes the error (``decode`` or ``decode: per_layer[i]``)."""
    from ...decode import PAGE_SIZES
    from ...decode.select import PageSelection

    method = out["method"]
    choices = (*DECODE_PAGE_METHODS, "dense") if allow_dense else DECODE_PAGE_METHODS
    if not isinstance(method, str) or method not in choices:
        raise _error(f"{where}: method={method!r} is not a page-selection method; one of {list(choices)}")
    for name in ("budget", "page", "sink", "recent"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f"{where}: {name}={value!r} is not an int")
    if out["page"] not in PAGE_SIZES:
        raise _error(f"{where}: page={out['page']!r} is not a power of two from {PAGE_SIZES[0]} to {PAGE_SIZES[-1]}")
    for name in ("sink", "recent"):
        if out[name] < 0:
            raise _error(f"{where}: {name}={out[name]!r} is negative (must be >= 0)")
    if method == "dense":
        return {k: out[k] for k in DECODE_PAGE_KNOBS}
    if out["budget"] < out["page"]:
        raise _error(f"{where}: budget={out['budget']!r} is smaller than page={out['page']} (the budget is read "
                     "in whole pages)")
    selection = PageSelection(method="quest" if method == "seer" else method, budget=out["budget"],
                              sink=out["sink"], recent=out["recent"])
    try:
        selection.check_budget(out["page"])
    except ValueError as err:
        raise _error(f"{where}: {str(err).split(': ', 1)[-1]}") from None
    return {k: out[k] for k in DECODE_PAGE_KNOBS}


def _layer_map(name: str, value) -> dict:
    """``{layer: ...}`` with int keys (digit strings, as JSON writes them, accepted)."""
    if not isinstance(value, Mapping):
        raise _error(f"decode: {name}={value!r} is not a dict {{layer_idx: ...}}")
    out = {}
    for key, item in value.items():
        idx = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise _error(f"decode: {name} has key {key!r}, not a layer index (an int >= 0)")
        out[idx] = item
    return out


def decode_layer_knobs(pages: dict, layer: int) -> dict:
    """The method, budget, page, sink and recent of ``layer`` under the checked page-decode settings
    ``pages`` (its per_layer entry, else the defaults)."""
    return pages.get("per_layer", {}).get(layer) or {k: pages[k] for k in DECODE_PAGE_KNOBS}


def decode_selection_source(pages: dict, layer: int) -> int:
    """The layer whose page selection ``layer`` reads: the last of ``select_layers`` at or before it,
    or the layer itself (no select_layers, a layer before the first of them, or one of them)."""
    earlier = [s for s in pages.get("select_layers", ()) if s <= layer]
    return earlier[-1] if earlier else layer


def _check_decode_model(pages: dict, num_layers: int, kv_heads: int | None) -> None:
    """The page-decode policies against the model: layers exist, KV heads exist, and a layer that
    reads another's selection has its page size."""
    for name in ("per_layer", "streaming_heads", "full_heads", "select_layers"):
        bad = sorted(i for i in pages[name] if not 0 <= i < num_layers)
        if bad:
            raise _error(f"decode: {name} names layer(s) {bad}, which do not exist: the model has {num_layers} "
                         f"layers (0..{num_layers - 1})")
    if kv_heads is not None:
        for name in ("streaming_heads", "full_heads"):
            for layer, heads in pages[name].items():
                bad = [h for h in heads if h >= kv_heads]
                if bad:
                    raise _error(f"decode: {name}[{layer}] names KV head(s) {bad}; the model has {kv_heads} KV "
                                 f"heads (0..{kv_heads - 1})")
    for layer in range(num_layers):
        source = decode_selection_source(pages, layer)
        mine, theirs = decode_layer_knobs(pages, layer), decode_layer_knobs(pages, source)
        if source != layer and mine["method"] != "dense" and mine["page"] != theirs["page"]:
            raise _error(f"decode: select_layers: layer {layer} reads the pages layer {source} selects, but its "
                         f"page={mine['page']} differs from layer {source}'s page={theirs['page']}")


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(SparseConfig))
