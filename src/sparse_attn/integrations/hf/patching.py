"""Make a Hugging Face transformers model sparse through its attention-function registry.

``patch(model, method=...)`` registers one attention function (``"sparse_attn"``) with
transformers' ``AttentionInterface`` and the matching mask function with
``AttentionMaskInterface``, then switches the model to it with ``set_attn_implementation``. No model
class is copied or monkey-patched, so new transformers releases keep working as long as the
registry does. Per-model settings live on the attention modules (``module._sparse_attn_state``),
so several models can be patched differently in one process; ``unpatch`` restores everything.

Routing per call: prefill (``q_len > 1``, with or without a KV cache already present) goes through
the method; decode (``q_len == 1``) stays dense unless ``decode`` names a method; with
``decode={"method": ..., "budget": ...}`` each layer keeps a :class:`~sparse_attn.decode.PageIndex`
of its K cache (built at prefill, appended each step) and decode steps (1-16 query rows against a
cache) attend only to the pages ``select_pages`` picks (see :func:`_page_decode`), with per-head
policies (streaming and full heads), per-layer knobs, selections shared across layers and sampled
oracle recall (an index follows the cache object each forward passes, noted by a forward pre-hook on
the attention modules: caches taking turns through one model are each indexed from their own keys);
layers configured dense, short sequences, masks other than causal or
causal-with-padding (sliding windows) and unsupported features (softcapping, dropout in training)
run transformers' own SDPA path, with the reason recorded. A padded batch (left or right padding)
runs each sequence on its own unpadded span. A static cache (keys past the filled length masked, or
a prefill from position 0 with no mask) is read up to its filled length only. Inside a compiled
decoding forward (a static cache's ``generate()``), page-index decode steps run as one custom op that
stays in the compiled graph (:mod:`.graph_decode`).
"""

from __future__ import annotations

import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...kv_cache_state import CacheFollower, cache_layer_keys
from ...methods import DecisionCache
from ...methods.cost import attend
from ...metrics import attention_recall
from .config import SparseConfig, decode_layer_knobs, decode_selection_source
from .graph_decode import graph_decode, graph_decode_plans, mark_static_index
from .page_steps import attend_pages, head_policies, page_selection

ATTN_NAME = "sparse_attn"


@dataclass
class SparseState:
    """What ``patch`` attached to a model: its config, original implementation and records."""

    config: SparseConfig
    original_implementation: str
    records: list = field(default_factory=list)
    warned_short: bool = False  # the first prefill that stayed dense for its length was reported
    # Page-index decode: per layer, the PageIndex of its K cache, the tokens it holds (host side, the
    # same for every sequence) and how many times it was built (prefill, new sequence, capacity).
    page_indexes: dict = field(default_factory=dict)
    index_lengths: dict = field(default_factory=dict)
    index_builds: dict = field(default_factory=dict)
    # Per layer, for seer decode: the decode gate's key summaries of the cache (GateKeySummaries),
    # appended with the index.
    gate_summaries: dict = field(default_factory=dict)
    # Per layer: the page selection of its current decode step, ``(pages, counts, filled, page)``, kept
    # for the later layers that reuse it (``select_layers``), and the sparse decode steps since its
    # index was built at prefill (``recall_every`` counts them).
    selections: dict = field(default_factory=dict)
    decode_steps: dict = field(default_factory=dict)
    # Prefill decisions (sparse or dense) per layer and length bucket, reused while the config's
    # ``precheck`` has ``cache`` on (:class:`~sparse_attn.methods.DecisionCache`); emptied by unpatch.
    decisions: DecisionCache = field(default_factory=DecisionCache)
    # What the last boolean mask says (its filled length, the mask cut to it, plain causal or not),
    # kept while the same unchanged mask tensor comes back: every layer of a forward gets the same
    # mask, and reading a mask waits for the device, so one forward reads it once, not once per layer.
    mask_facts: Optional[tuple] = None
    # Per layer, the decode knobs of the compiled decoding path (:mod:`.graph_decode`), for the layers
    # whose settings it can run; fixed by the config at patch time.
    graph_plans: dict = field(default_factory=dict)
    # The KV cache object the running forward passes its attention layers (a weak reference, noted
    # by a pre-hook on each attention module; None: none passed), and per layer the cache its page
    # index and gate summaries describe: appending to them from another cache (two conversations
    # decoded in turn through one model) would mix the two, so a different cache rebuilds them.
    cache_ref: Optional[weakref.ref] = None
    index_caches: dict = field(default_factory=dict)
    hook_handles: list = field(default_factory=list)
    # Per layer, a CacheFollower of the cache's key tensor after the layer's last indexed step; the
    # pre-hook compares the next forward's tensor with it and marks the layer ``moved`` where the rows
    # were replaced or rewritten (beam search reorders them): its index is then rebuilt. A crop
    # (assisted decoding) keeps the rows and is no move: the step's first position tells the index
    # how far to set back.
    index_keys: dict = field(default_factory=dict)
    moved: set = field(default_factory=set)

    def clear_caches(self) -> None:
        """Forget what earlier calls left for later ones: page indexes and selections, decode step
        counts and cached prefill decisions (records stay)."""
        for store in (self.page_indexes, self.index_lengths, self.index_builds, self.gate_summaries,
                      self.selections, self.decode_steps, self.decisions, self.index_caches, self.index_keys,
                      self.moved):
            store.clear()
        self.mask_facts = None
        self.cache_ref = None

    def current_cache(self):
        """The cache object of the running forward (None: none passed, or not known)."""
        return None if self.cache_ref is None else self.cache_ref()

    def same_cache(self, layer: int) -> bool:
        """Whether the layer's page index (and gate summaries) came from the running forward's cache
        (also true where neither forward passed one)."""
        known = self.index_caches.get(layer)
        return (None if known is None else known()) is self.current_cache()

    def note_index_cache(self, layer: int, key: torch.Tensor) -> None:
        """The layer's page index (and gate summaries) now describe the running forward's cache, whose
        key tensor for the layer is ``key``."""
        self.index_caches[layer] = self.cache_ref
        self.index_keys.setdefault(layer, CacheFollower()).saw(key)
        self.moved.discard(layer)

    def check_moved(self, layer: int, keys: Optional[torch.Tensor]) -> None:
        """Mark ``layer`` moved unless ``keys``, the cache's key tensor before this forward's update,
        is the tensor its index was last synced with, or a crop of it."""
        follower = self.index_keys.get(layer)
        if follower is not None and keys is not None and not follower.follows_or_cropped(keys):
            self.moved.add(layer)

    def summary(self) -> list:
        """Per layer: calls, sparse calls, mean density and total estimation time over the sparse
        calls, the distinct reasons, ``knob_dense``, the knobs that made any of its calls dense by
        themselves (sorted; empty when none did), ``full_heads``, the KV heads that ran full causal
        rows in any of its sparse calls (sorted), ``skipped_estimates``, the calls the pre-check or a
        cached decision sent to dense without an estimate, and ``decode_recall``, the mean oracle recall of the
        decode steps that measured it (``decode={..., "recall_every": N}``; None where none did)."""
        by_layer: dict = {}
        for r in self.records:
            by_layer.setdefault(r["layer"], []).append(r)
        out = []
        for layer, rs in sorted(by_layer.items()):
            sparse = [r for r in rs if r["sparse"]]
            recalls = [r["recall"] for r in rs if r.get("decode") and r.get("recall") is not None]
            out.append({
                "layer": layer, "calls": len(rs), "sparse_calls": len(sparse),
                "density": sum(r["density"] for r in sparse) / len(sparse) if sparse else 1.0,
                "estimate_ms": sum(r["estimate_ms"] for r in sparse),
                "reasons": sorted({r["reason"] for r in rs}),
                "knob_dense": sorted({knob for r in rs for knob in r.get("knob_dense", ())}),
                "full_heads": sorted({h for r in sparse for h in r.get("full_heads", ())}),
                "skipped_estimates": sum(1 for r in rs if (r.get("precheck") or {}).get("skipped_estimate")),
                "decode_recall": sum(recalls) / len(recalls) if recalls else None,
            })
        return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, sparse_attention_entry)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _find_cache(args, kwargs):
    """The transformers ``Cache`` among an attention module's call arguments (models name it
    ``cache``, ``past_key_values``, ``past_key_value`` or ``layer_past``, or pass it by position), or None."""
    from transformers.cache_utils import Cache

    return next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)


def _note_cache(module, args, kwargs):
    """Forward pre-hook of a patched attention module: note the cache object the call passes, and
    whether the layer's keys in it are still those its page index was synced with."""
    state = getattr(module, "_sparse_attn_state", None)
    if state is None or torch.compiler.is_compiling():
        return
    cache = _find_cache(args, kwargs)
    try:
        state.cache_ref = None if cache is None else weakref.ref(cache)
    except TypeError:  # an object that takes no weak reference: not tracked
        state.cache_ref = None
    if cache is not None:
        layer = int(module.layer_idx)
        state.check_moved(layer, cache_layer_keys(cache, layer))


def _attention_modules(model):
    """The self-attention modules: the ones carrying a ``layer_idx`` and named ``*Attention``."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def patch(model, method: Optional[str] = None, config: Optional[SparseConfig] = None, *, profile=None, **knobs):
    """Route ``model``'s attention through sparse_attn; returns the :class:`SparseState`.

    ``patch(model, method="xattention", threshold=0.9)``, ``patch(model, config=SparseConfig(...))``
    (``config`` may also be a dict or a path to a JSON/YAML file) or ``patch(model,
    profile="profile.json")``: the config a profile chose (``sparse-attn profile``,
    :meth:`SparseConfig.from_profile`).
    """
    if getattr(model, "config", None) is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError("patch() needs a transformers PreTrainedModel (with .config and set_attn_implementation)")
    if profile is not None:
        if config is not None or method is not None or knobs:
            raise ValueError("pass either profile=... or config=/method=/knobs, not both")
        config = SparseConfig.from_profile(profile)
    if config is not None and (method is not None or knobs):
        raise ValueError("pass either config=... or method=/knobs, not both")
    if config is None:
        settings = {"method": method or "xattention"}
        for name in ("layers", "dense_first_layers", "min_kv_len", "fallback", "decode", "record", "backend",
                     "precheck"):
            if name in knobs:
                settings[name] = knobs.pop(name)
        config = SparseConfig(knobs=knobs, **settings)
    elif isinstance(config, dict):
        config = SparseConfig.from_dict(config)
    elif not isinstance(config, SparseConfig):
        config = SparseConfig.from_file(config)
    modules = _attention_modules(model)
    own = sorted({type(m).__name__ for m in modules if getattr(m, "attends_itself", False)})
    if own:
        raise ValueError(f"{type(model).__name__} has attention layers that attend with their own module "
                         f"({', '.join(own)}, e.g. converted to NSA or DSA): they do not call transformers' attention "
                         "functions, so patch() cannot route them")
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention modules with a layer_idx to patch")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = getattr(text_config, "num_key_value_heads", None) or getattr(text_config, "num_attention_heads", None)
    config.check_layers(1 + max(int(m.layer_idx) for m in modules), kv_heads if isinstance(kv_heads, int) else None)
    for built in {id(m): m for m in config._methods.values() if m is not None}.values():
        if hasattr(built, "check_model"):  # methods tied to a model (seer's gates) check it
            built.check_model(model)
    if config._decode_pages is not None and config._decode_pages.get("gates") is not None:
        from ...methods.seer import load_gates

        load_gates(config._decode_pages["gates"], model)  # refused for gates trained on another model
    if is_patched(model):
        unpatch(model)
    _register()
    state = SparseState(config, model.config._attn_implementation)
    state.graph_plans = graph_decode_plans(config, 1 + max(int(m.layer_idx) for m in modules))
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"{type(model).__name__} does not support switching its attention implementation")
    for module in modules:
        module._sparse_attn_state = state
        state.hook_handles.append(module.register_forward_pre_hook(_note_cache, with_kwargs=True))
    model._sparse_attn_state = state
    return state


def unpatch(model) -> None:
    """Restore the attention implementation the model had before :func:`patch`."""
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        return
    model.set_attn_implementation(state.original_implementation)
    state.clear_caches()
    for handle in state.hook_handles:
        handle.remove()
    state.hook_handles.clear()
    for module in model.modules():
        if hasattr(module, "_sparse_attn_state"):
            del module._sparse_attn_state


def is_patched(model) -> bool:
    return getattr(model, "_sparse_attn_state", None) is not None


def _is_plain_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """True if a boolean mask is exactly bottom-right causal for every row (no padding/window)."""
    if mask.dtype != torch.bool:
        return False
    positions = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    expected = torch.arange(kv_len, device=mask.device)[None, :] <= positions
    return bool((mask == expected).all())


def _mask_facts(state: SparseState, attention_mask: torch.Tensor | None, q_len: int, kv_len: int) -> tuple:
    """``(filled, mask, plain)``: the keys the call may read (:func:`_filled_length`), the mask cut to
    them, and whether that is plain causal (no mask, or :func:`_is_plain_causal`). Both read the mask
    on the host, a device sync; the answer for a boolean mask is kept in ``state.mask_facts`` and
    reused while the same tensor, unmodified (its version), comes with the same shapes."""
    if attention_mask is None:
        return _filled_length(None, q_len, kv_len), None, True
    key = (q_len, kv_len, tuple(attention_mask.shape), attention_mask.data_ptr(), attention_mask._version)
    kept = state.mask_facts
    if kept is not None and kept[0] is attention_mask and kept[1] == key:
        return kept[2]
    filled = _filled_length(attention_mask, q_len, kv_len)
    mask = attention_mask if filled == kv_len else attention_mask[..., :filled]
    facts = (filled, mask, _is_plain_causal(mask, q_len, filled))
    state.mask_facts = (attention_mask, key, facts)  # held until the next mask: one mask, small
    return facts


def _filled_length(mask: torch.Tensor | None, q_len: int, kv_len: int) -> int:
    """How many leading keys the call may read: ``kv_len`` less a static cache's unused tail.

    Without a mask, a prefill (``q_len > 1``) against more keys than queries is a static cache filled
    from position 0 (transformers leaves the mask out and SDPA aligns ``is_causal`` top-left): its
    first ``q_len`` keys. With a boolean mask, the keys up to the last one any query may read (the
    tail no query reads is a static cache's unused part), provided that leaves at least ``q_len``
    keys; otherwise (and for other masks) ``kv_len``."""
    if mask is None:
        return q_len if 1 < q_len < kv_len else kv_len
    if mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != kv_len:
        return kv_len
    seen = mask.reshape(-1, kv_len).any(0).nonzero()
    if seen.numel() == 0:
        return kv_len
    end = int(seen[-1]) + 1
    return end if end >= q_len else kv_len


def _dense(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, on the SDPA backend ``KernelOptions.dense`` picks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ...backends.dense import dense_backend_context

    with dense_backend_context(query.device, query.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _own_attention_reason(module, kwargs) -> Optional[str]:
    """Why a call needs the model's own attention implementation (None: it does not): attention
    sinks (``s_aux``, gpt-oss) or non-causal attention (encoders, cross-attention), which neither the
    sparse path nor its SDPA fallback compute."""
    if kwargs.get("s_aux") is not None:
        return "attention sinks (s_aux)"
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return "non-causal attention"
    return None


def _own_attention(state: SparseState, module, query, key, value, attention_mask, **kwargs):
    """The model's own attention: SDPA where the model ran SDPA before :func:`patch`, else the
    ``eager_attention_forward`` of its modeling module, given the boolean mask (which the patched model
    builds) as the additive float mask eager attention adds to its scores."""
    if state.original_implementation == "sdpa":
        return _dense(module, query, key, value, attention_mask, **kwargs)
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(f"sparse_attn: {type(module).__name__} needs its own attention implementation "
                           f"({_own_attention_reason(module, kwargs)}); no eager_attention_forward was found next "
                           f"to it, and it ran {state.original_implementation!r} before patch(): unpatch the model")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1 and getattr(module, "is_causal", True):
        # No mask means causal as SDPA's is_causal aligns it (top-left); eager attention needs it spelled out.
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    return function(module, query, key, value, attention_mask, **kwargs)


def sparse_attention_entry(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """The function registered as ``attn_implementation="sparse_attn"``.

    transformers compiles the decoding forward of a static cache (``torch.compile``). While a forward
    is compiled, a page-index decode step the compiled path can run becomes one custom op inside the
    graph (:func:`.graph_decode.graph_decode`); every other call runs :func:`sparse_attention_forward`
    outside the compiled graph (it keeps host-side state and reads the mask on the host), with the rest
    of the layer compiled around it.
    """
    if torch.compiler.is_compiling() and _own_attention_reason(module, kwargs) is None:
        out = graph_decode(module, query, key, value, dropout, scaling, kwargs)
        if out is not None:
            return out, None
    return _eager_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """The attention of a patched layer outside compiled graphs (see :func:`sparse_attention_entry`).

    query ``(B, H, q_len, D)``, key/value ``(B, Hkv, kv_len, D)`` (cache already updated); returns
    ``((B, q_len, H, D), None)`` like transformers' own attention functions.
    """
    state: Optional[SparseState] = getattr(module, "_sparse_attn_state", None)
    dense_kwargs = dict(dropout=dropout, scaling=scaling, **kwargs)
    if state is None:
        warnings.warn("sparse_attn attention called on an unpatched module; running dense SDPA", stacklevel=2)
        return _dense(module, query, key, value, attention_mask, **dense_kwargs)
    config = state.config
    layer = int(module.layer_idx)
    q_len, kv_len = query.shape[2], key.shape[2]
    # A static cache is read up to its filled length only; the mask is judged over that part.
    filled, mask, plain = _mask_facts(state, attention_mask, q_len, kv_len)
    pages_cfg = getattr(config, "_decode_pages", None)
    page_step = pages_cfg is not None and (q_len == 1 or (q_len <= 16 and filled > q_len
                                                           and layer in state.page_indexes))

    def record(sparse: bool, reason: str, density=None, estimate_ms=0.0, recall=None, rows=q_len, keys=filled,
               select_layer=None, knob_dense=(), kv_head_density=None, full_heads=(), precheck=None):
        if config.record:
            state.records.append({"layer": layer, "q_len": rows, "kv_len": keys, "sparse": sparse,
                                  "reason": reason, "density": density, "estimate_ms": estimate_ms,
                                  "recall": recall, "decode": page_step or q_len == 1,
                                  "select_layer": select_layer, "knob_dense": tuple(knob_dense),
                                  "kv_head_density": kv_head_density, "full_heads": tuple(full_heads),
                                  "precheck": precheck})

    def dense(reason: str):
        record(False, reason)
        return _dense(module, query, key, value, attention_mask, **dense_kwargs)

    own = _own_attention_reason(module, kwargs)
    if own is not None:
        record(False, f"{own}: the model's own attention")
        return _own_attention(state, module, query, key, value, attention_mask, **dense_kwargs)

    if pages_cfg is not None:
        state.selections.pop(layer, None)  # a selection is shared only within the step that made it
    if page_step:
        return _page_decode(state, module, query, key, value, dropout, scaling, kwargs, pages_cfg, filled, plain,
                            record, dense)
    if pages_cfg is not None and q_len > 1:  # prefill: index the filled keys for the decode steps
        state.gate_summaries.pop(layer, None)  # rebuilt from this cache at the next decode step
        if plain and decode_layer_knobs(pages_cfg, layer)["method"] != "dense":
            _sync_index(state, layer, key, decode_layer_knobs(pages_cfg, layer)["page"], fresh=filled == q_len,
                        length=filled, bounds=_index_bounds(pages_cfg, layer), start=filled - q_len)
        else:  # padded (its decode steps run dense) or a dense layer: drop any index of an earlier sequence
            for store in (state.page_indexes, state.index_lengths):
                store.pop(layer, None)
    if q_len == 1:
        method = getattr(config, "_decode_method", None)
        if method is None:
            return dense("decode: dense")
    else:
        method = config.method_for(layer)
        if method is None:
            return dense("layer configured dense")
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return dense("softcap/output_attentions need dense attention")
    if dropout > 0.0 and module.training:
        return dense("attention dropout in training runs dense")
    spans = None
    if not plain:
        spans = _padding_spans(mask, q_len, filled)
        if spans is not None and len(spans) == 1 < query.shape[0]:  # one mask row broadcast over the batch
            spans = spans * query.shape[0]
        if spans is None or len(spans) != query.shape[0]:
            return dense("mask is neither causal nor causal with padding (e.g. sliding window): dense")
    # A static cache's unused tail is never read (``dense`` keeps the full tensors and the mask).
    k_run, v_run = (key, value) if filled == kv_len else (key[:, :, :filled], value[:, :, :filled])
    if config.fallback != "never" and filled < config.min_kv_len:
        if not state.warned_short and method.name != "dense":  # nothing sparse was asked for: nothing to say
            state.warned_short = True
            warnings.warn(f"sparse_attn: a {filled}-token prefill runs dense attention because it is shorter than "
                          f"min_kv_len={config.min_kv_len} (below that length sparse attention does not pay); "
                          "pass min_kv_len=... to patch() to change it. Said once per patch.", stacklevel=2)
        return dense(f"kv_len {filled} < min_kv_len {config.min_kv_len}")
    cost_model = config.cost_model() if config.fallback == "auto" and query.is_cuda else None
    precheck = config.precheck_for(query.is_cuda)

    def run(q, k, v):
        out, report = attend(q, k, v, method, layer_idx=layer, cost_model=cost_model,
                             backend=config.backend, scale=scaling, precheck=precheck, decisions=state.decisions)
        recall = None
        if config.record and config.measure_recall and report.used_sparse:
            recall = float(attention_recall(q, k, report.layout, num_rows=32, scale=scaling).mean())
        reason = report.reason
        if report.knob_dense:
            reason += f" (dense by knob: {', '.join(report.knob_dense)} keep every block at kv_len {k.shape[2]})"
        record(report.used_sparse, reason, report.density, report.estimate_ms, recall,
               rows=q.shape[2], keys=k.shape[2], knob_dense=report.knob_dense,
               kv_head_density=report.density_per_kv_head or None,
               full_heads=report.full_heads if report.used_sparse else (),
               precheck=report.precheck.as_record() if report.precheck is not None else None)
        return out

    if spans is None:
        return run(query, k_run, v_run).transpose(1, 2).contiguous(), None
    # Padded batch: each sequence runs on its own unpadded span; padded query rows get zeros.
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], value.shape[3])
    offset = filled - q_len
    for b, (start, end) in enumerate(spans):
        q0, q1 = max(start - offset, 0), max(end - offset, 0)
        if q1 > q0:
            part = run(query[b:b + 1, :, q0:q1], k_run[b:b + 1, :, start:end], v_run[b:b + 1, :, start:end])
            out[b, q0:q1] = part[0].transpose(0, 1)
    return out, None


# Outside compiled graphs: the general path keeps host-side state and reads the mask on the host.
_eager_attention = torch.compiler.disable(sparse_attention_forward)


def _sync_index(state: SparseState, layer: int, key: torch.Tensor, page: int, fresh: bool = False,
                length: int | None = None, bounds: str = "exact", start: int | None = None):
    """Bring the layer's page index up to the first ``length`` (default: all) positions of the cache
    ``key (B, Hkv, S, D)``: append the keys it lacks when it is at most 16 tokens behind and has room,
    else (no index, a new sequence, a different shape or page size, full, another cache object than
    the index's; ``fresh``: a prefill from position 0) rebuild it from those keys with headroom (a
    static cache, longer than ``length``: its whole length). ``start``: the first position this
    forward wrote (default: the index's length); where it is below the index's length the cache was
    set back (assisted decoding crops it after rejected candidates), and the page holding ``start``
    is rebuilt from the cache before the new keys are added (:meth:`~sparse_attn.decode.PageIndex.append_at`).
    Returns the index."""
    from ...decode import PageIndex

    kv_len = key.shape[2] if length is None else length
    index = state.page_indexes.get(layer)
    have = state.index_lengths.get(layer, -1)
    same_shape = (index is not None and index.batch == key.shape[0] and index.kv_heads == key.shape[1]
                  and index.head_dim == key.shape[3] and index.dtype == key.dtype and index.device == key.device
                  and index.page_size == page and index.bounds == bounds)
    same_cache = state.same_cache(layer) and layer not in state.moved
    if not same_cache:  # another cache, or its rows were replaced: index and summaries start over from it
        state.gate_summaries.pop(layer, None)
    fits = same_shape and not fresh and same_cache
    start = have if start is None else start
    if fits and have == kv_len and start == have:
        state.note_index_cache(layer, key)
        return index
    # have < 0: compiled decode steps appended to the index on the device; the host does not know its length.
    if fits and 0 <= start < have and kv_len - start <= 16 and kv_len <= index.capacity:
        positions = torch.full((index.batch,), start, dtype=torch.int64, device=index.device)
        index.append_at(key, positions, kv_len - start, check_values=False)  # set back to start, then the new keys
        state.gate_summaries.pop(layer, None)  # rebuilt from the cache when next read
    elif fits and have >= 0 and start >= have and 0 <= kv_len - have <= 16 and kv_len <= index.capacity:
        index.append(key[:, :, have:kv_len])
    else:
        room = key.shape[2] if key.shape[2] > kv_len else kv_len + max(256, kv_len // 2)
        capacity = -(-room // page) * page
        built = PageIndex.build(key[:, :, :kv_len].detach(), page_size=page, capacity=capacity, bounds=bounds)
        if same_shape and index.capacity == capacity:
            index.copy_(built)  # same tensors: a graph captured over them stays valid
        else:
            index = built
            mark_static_index(index)
            state.page_indexes[layer] = index
        state.index_builds[layer] = state.index_builds.get(layer, 0) + 1
        if fresh:
            state.decode_steps[layer] = 0
    state.index_lengths[layer] = kv_len
    state.note_index_cache(layer, key)
    return index


def _index_bounds(cfg: dict, layer: int) -> str:
    """How ``layer``'s page index keeps Quest's bounds: the ``bounds`` setting where the layer scores
    pages with Quest, else ``"exact"`` (no other method reads int8 bounds)."""
    return cfg["bounds"] if decode_layer_knobs(cfg, layer)["method"] == "quest" else "exact"


def _sync_gate_summaries(state: SparseState, layer: int, key: torch.Tensor, gates, length: int):
    """The seer decode gate's key summaries of the layer's cache, brought up to its first ``length``
    positions as :func:`_sync_index` brings the page index: appended when at most 16 tokens behind,
    else rebuilt from the cache."""
    from ...methods.seer_gate import GateKeySummaries

    summaries = state.gate_summaries.get(layer)
    fits = (summaries is not None and summaries.kmax.shape[:2] == key.shape[:2]
            and summaries.kmax.device == key.device and summaries.block == gates.spec.block_size)
    if fits and summaries.length == length:
        return summaries
    if fits and 0 < length - summaries.length <= 16:
        summaries.append(gates, key[:, :, summaries.length:length])
    else:
        summaries = GateKeySummaries(gates, key.detach(), length)
        state.gate_summaries[layer] = summaries
    return summaries


def _page_decode(state: SparseState, module, query, key, value, dropout, scaling, kwargs, cfg: dict,
                 filled: int, plain: bool, record, dense):
    """A decode step (1-16 query rows at the end of the filled cache) through the layer's page index:
    append the new keys, pick the pages (``select_pages`` with the layer's knobs, or the selection of
    the layer's ``select_layers`` source in this step; then the streaming and full heads' policies),
    ``decode_attention`` over the first ``filled`` positions of the contiguous cache. Runs dense, with
    the reason recorded, for masks other than causal over the filled cache (padding, sliding window),
    a layer configured dense, a budget covering the cache, softcapping or attention outputs."""

    q_len = query.shape[2]
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return dense("decode pages: softcap/output_attentions need dense attention")
    if dropout > 0.0 and module.training:
        return dense("decode pages: attention dropout in training runs dense")
    if not plain:
        return dense("decode pages: mask is not plain causal (padding or window): dense")
    if kwargs.get("sliding_window") is not None:  # a sliding-window cache drops and shifts its keys
        return dense("decode pages: sliding-window layer: dense")
    if filled < q_len or key.dim() != 4:
        return dense("decode pages: not a decode step against a cache: dense")
    layer = int(module.layer_idx)
    knobs = decode_layer_knobs(cfg, layer)
    if knobs["method"] == "dense":
        return dense("decode pages: layer configured dense (per_layer)")
    page, budget = knobs["page"], knobs["budget"]
    index = _sync_index(state, layer, key, page, length=filled, bounds=_index_bounds(cfg, layer), start=filled - q_len)
    if budget >= filled:
        return dense(f"decode pages: budget {budget} covers the {filled}-token cache: dense")
    streaming, full = cfg["streaming_heads"].get(layer, ()), cfg["full_heads"].get(layer, ())
    for name, heads in (("streaming_heads", streaming), ("full_heads", full)):
        bad = [h for h in heads if h >= key.shape[1]]
        if bad:
            raise ValueError(f"decode: {name}[{layer}] names KV head(s) {bad}; layer {layer} has "
                             f"{key.shape[1]} KV heads (0..{key.shape[1] - 1})")
    timed = state.config.record
    if timed and query.is_cuda:
        torch.cuda.synchronize(query.device)
    start = time.perf_counter()
    source = decode_selection_source(cfg, layer)
    shared = state.selections.get(source) if source != layer else None
    if shared is not None and shared[2:] == (filled, page) and shared[0].shape[:2] == key.shape[:2]:
        pages, counts = shared[:2]
        used = source
    else:  # a selecting layer, one before the first of select_layers, or its source ran dense this step
        if knobs["method"] == "seer":
            from ...decode import select_pages_by_score
            from ...methods.seer import decode_page_shares, load_gates

            gates = load_gates(cfg["gates"]).to(query.device)
            summaries = _sync_gate_summaries(state, layer, key, gates, filled)
            shares = decode_page_shares(gates, layer, query, key, index, summaries=summaries)
            pages, counts = select_pages_by_score(shares, index, budget=budget, sink=knobs["sink"],
                                                  recent=knobs["recent"])
        else:
            selection = page_selection(knobs["method"], budget, knobs["sink"], knobs["recent"], scaling)
            pages, counts = selection(query, index)
        used = layer
        if layer in cfg["select_layers"]:
            state.selections[layer] = (pages, counts, filled, page)
    if streaming or full:
        pages, counts = head_policies(query, index, pages, counts, knobs, streaming, full, scaling, filled)
    if timed and query.is_cuda:
        torch.cuda.synchronize(query.device)
    select_ms = (time.perf_counter() - start) * 1e3
    # The index holds exactly the filled positions of every sequence: its lengths are the cache lengths.
    # The kernel writes the (B, Sq, H, D) layout the layer returns (no transposing copy).
    out = query.new_empty(query.shape[0], q_len, query.shape[1], query.shape[3])
    attend_pages(query, key.contiguous(), value.contiguous(), pages, counts, index.lengths, page, scaling,
                  out.transpose(1, 2), kernel=query.is_cuda)
    step = state.decode_steps.get(layer, 0)
    state.decode_steps[layer] = step + 1
    if timed:
        slot = torch.arange(pages.shape[-1], device=pages.device)
        tokens = index.page_tokens().gather(1, pages.flatten(1).long()).view(pages.shape)
        selected = torch.where(slot < counts[..., None], tokens, torch.zeros_like(tokens)).sum()
        density = float(selected) / (pages.shape[0] * pages.shape[1] * filled)
        recall = None
        if cfg["recall_every"] and step % cfg["recall_every"] == 0:
            recall = _oracle_recall(query, index, key[:, :, :filled], pages, counts, scaling)
        reason = f"decode pages: {knobs['method']} budget {budget}"
        if used != layer:
            reason = f"decode pages: the pages layer {used} selected"
        record(True, reason, density, select_ms, recall, select_layer=used)
    return out, None


def _oracle_recall(query, index, k_filled, pages, counts, scaling) -> float:
    """The exact share of the step's attention mass (``page_mass(method="oracle")``) held by the
    selected pages, averaged over sequences, query heads and rows."""
    from ...decode import page_mass

    mass = page_mass(query, index, method="oracle", scale=scaling, k_cache=k_filled)  # (B, Hkv, G, Sq, Np)
    batch, kv_heads, groups, rows, _ = mass.shape
    width = pages.shape[-1]
    picked = mass.gather(-1, pages.long()[:, :, None, None, :].expand(batch, kv_heads, groups, rows, width))
    valid = (torch.arange(width, device=pages.device) < counts[..., None])[:, :, None, None, :]
    return float((picked * valid).sum(-1).mean())


def _padding_spans(mask: torch.Tensor, q_len: int, kv_len: int):
    """For a boolean mask that is causal restricted to one contiguous run of valid keys per sequence
    (left or right padding), ``[(start, end)]`` per batch row; None for any other mask.

    The queries are taken as the last ``q_len`` of ``kv_len`` positions. Rows inside a sequence's span
    must be causal over it; rows after it (right padding) must read the whole span or nothing, as a
    padded query there does (a right-padded prompt in a static cache, whose filled length the mask
    does not tell, reads a growing prefix instead: its queries sit elsewhere, so None); rows before
    it are padding and not checked (their outputs are dropped).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    offset = kv_len - q_len
    keys = torch.arange(kv_len, device=mask.device)
    positions = torch.arange(q_len, device=mask.device) + offset
    causal = keys[None, :] <= positions[:, None]
    spans = []
    for row_mask in mask[:, 0]:
        valid = row_mask.any(0)  # keys some query may read
        idx = valid.nonzero().flatten()
        if idx.numel() == 0:
            return None
        start, end = int(idx[0]), int(idx[-1]) + 1
        span = (keys >= start) & (keys < end)
        rows = (positions >= start) & (positions < end)
        if not bool(valid[start:end].all()) or not torch.equal(row_mask[rows], (causal & span)[rows]):
            return None
        after = row_mask[positions >= end]
        if after.numel() and not bool(((after == span[None, :]).all(-1) | ~after.any(-1)).all()):
            return None
        spans.append((start, end))
    return spans
