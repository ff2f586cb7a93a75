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
cache) attend only to the pages ``select_pages`` picks (see :func:`_page_decode`); layers configured
dense, short sequences, masks other than causal or causal-with-padding (sliding windows) and
unsupported features (softcapping, dropout in training) run transformers' own SDPA path, with the
reason recorded. A padded batch (left or right padding) runs each sequence on its own unpadded span.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ...methods.cost import attend
from ...metrics import attention_recall
from .config import SparseConfig

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

    def summary(self) -> list:
        """Per-layer mean density and estimation time over the recorded sparse calls."""
        by_layer: dict = {}
        for r in self.records:
            by_layer.setdefault(r["layer"], []).append(r)
        out = []
        for layer, rs in sorted(by_layer.items()):
            sparse = [r for r in rs if r["sparse"]]
            out.append({
                "layer": layer, "calls": len(rs), "sparse_calls": len(sparse),
                "density": sum(r["density"] for r in sparse) / len(sparse) if sparse else 1.0,
                "estimate_ms": sum(r["estimate_ms"] for r in sparse),
                "reasons": sorted({r["reason"] for r in rs}),
            })
        return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _attention_modules(model):
    """The self-attention modules: the ones carrying a ``layer_idx`` and named ``*Attention``."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]


def patch(model, method: Optional[str] = None, config: Optional[SparseConfig] = None, **knobs):
    """Route ``model``'s attention through sparse_attn; returns the :class:`SparseState`.

    ``patch(model, method="xattention", threshold=0.9)`` or ``patch(model, config=SparseConfig(...))``
    (``config`` may also be a dict or a path to a JSON/YAML file).
    """
    if getattr(model, "config", None) is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError("patch() needs a transformers PreTrainedModel (with .config and set_attn_implementation)")
    if config is not None and (method is not None or knobs):
        raise ValueError("pass either config=... or method=/knobs, not both")
    if config is None:
        settings = {"method": method or "xattention"}
        for name in ("layers", "dense_first_layers", "min_kv_len", "fallback", "decode", "record", "backend"):
            if name in knobs:
                settings[name] = knobs.pop(name)
        config = SparseConfig(knobs=knobs, **settings)
    elif isinstance(config, dict):
        config = SparseConfig.from_dict(config)
    elif not isinstance(config, SparseConfig):
        config = SparseConfig.from_file(config)
    modules = _attention_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention modules with a layer_idx to patch")
    config.check_layers(1 + max(int(m.layer_idx) for m in modules))
    if is_patched(model):
        unpatch(model)
    _register()
    state = SparseState(config, model.config._attn_implementation)
    model.set_attn_implementation(ATTN_NAME)
    if model.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(f"{type(model).__name__} does not support switching its attention implementation")
    for module in modules:
        module._sparse_attn_state = state
    model._sparse_attn_state = state
    return state


def unpatch(model) -> None:
    """Restore the attention implementation the model had before :func:`patch`."""
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        return
    model.set_attn_implementation(state.original_implementation)
    for store in (state.page_indexes, state.index_lengths, state.index_builds):
        store.clear()
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


def _dense(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, **kwargs):
    """The function registered as ``attn_implementation="sparse_attn"``.

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

    def record(sparse: bool, reason: str, density=None, estimate_ms=0.0, recall=None, rows=q_len, keys=kv_len):
        if config.record:
            state.records.append({"layer": layer, "q_len": rows, "kv_len": keys, "sparse": sparse,
                                  "reason": reason, "density": density, "estimate_ms": estimate_ms,
                                  "recall": recall})

    def dense(reason: str):
        record(False, reason)
        return _dense(module, query, key, value, attention_mask, **dense_kwargs)

    pages_cfg = getattr(config, "_decode_pages", None)
    if pages_cfg is not None and (q_len == 1 or (q_len <= 16 and kv_len > q_len and layer in state.page_indexes)):
        return _page_decode(state, module, query, key, value, attention_mask, dropout, scaling, kwargs,
                            pages_cfg, record, dense)
    if pages_cfg is not None and q_len > 1:  # prefill: index the full keys for the decode steps
        if attention_mask is None or _is_plain_causal(attention_mask, q_len, kv_len):
            _sync_index(state, layer, key, pages_cfg["page"], fresh=kv_len == q_len)
        else:  # padded: its decode steps run dense; drop any index of an earlier sequence
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
    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        spans = _padding_spans(attention_mask, q_len, kv_len)
        if spans is None:
            return dense("mask is neither causal nor causal with padding (e.g. sliding window): dense")
    if config.fallback != "never" and kv_len < config.min_kv_len:
        if not state.warned_short:
            state.warned_short = True
            warnings.warn(f"sparse_attn: a {kv_len}-token prefill runs dense attention because it is shorter than "
                          f"min_kv_len={config.min_kv_len} (below that length sparse attention does not pay); "
                          "pass min_kv_len=... to patch() to change it. Said once per patch.", stacklevel=2)
        return dense(f"kv_len {kv_len} < min_kv_len {config.min_kv_len}")
    cost_model = config.cost_model() if config.fallback == "auto" and query.is_cuda else None

    def run(q, k, v):
        out, report = attend(q, k, v, method, layer_idx=layer, cost_model=cost_model,
                             backend=config.backend, scale=scaling)
        recall = None
        if config.record and config.measure_recall and report.used_sparse:
            recall = float(attention_recall(q, k, report.layout, num_rows=32, scale=scaling).mean())
        record(report.used_sparse, report.reason, report.density, report.estimate_ms, recall,
               rows=q.shape[2], keys=k.shape[2])
        return out

    if spans is None:
        return run(query, key, value).transpose(1, 2).contiguous(), None
    # Padded batch: each sequence runs on its own unpadded span; padded query rows get zeros.
    out = query.new_zeros(query.shape[0], q_len, query.shape[1], query.shape[3])
    offset = kv_len - q_len
    for b, (start, end) in enumerate(spans):
        q0, q1 = max(start - offset, 0), max(end - offset, 0)
        if q1 > q0:
            part = run(query[b:b + 1, :, q0:q1], key[b:b + 1, :, start:end], value[b:b + 1, :, start:end])
            out[b, q0:q1] = part[0].transpose(0, 1)
    return out, None


def _sync_index(state: SparseState, layer: int, key: torch.Tensor, page: int, fresh: bool = False):
    """Bring the layer's page index up to the cache ``key (B, Hkv, S, D)``: append the keys it lacks
    when it is at most 16 tokens behind and has room, else (no index, a new sequence, a different
    shape, full; ``fresh``: a prefill from position 0) rebuild it from ``key`` with headroom. Returns
    the index."""
    from ...decode import PageIndex

    kv_len = key.shape[2]
    index = state.page_indexes.get(layer)
    have = state.index_lengths.get(layer, -1)
    fits = (not fresh and index is not None and index.batch == key.shape[0] and index.kv_heads == key.shape[1]
            and index.head_dim == key.shape[3] and index.dtype == key.dtype and index.device == key.device)
    if fits and have == kv_len:
        return index
    if fits and 0 <= kv_len - have <= 16 and kv_len <= index.capacity:
        index.append(key[:, :, have:])
    else:
        headroom = max(256, kv_len // 2)
        capacity = -(-(kv_len + headroom) // page) * page
        index = PageIndex.build(key.detach(), page_size=page, capacity=capacity)
        state.page_indexes[layer] = index
        state.index_builds[layer] = state.index_builds.get(layer, 0) + 1
    state.index_lengths[layer] = kv_len
    return index


def _page_decode(state: SparseState, module, query, key, value, attention_mask, dropout, scaling, kwargs,
                 cfg: dict, record, dense):
    """A decode step (1-16 query rows at the end of the cache) through the layer's page index:
    append the new keys, ``select_pages``, ``decode_attention`` over the contiguous cache. Runs dense,
    with the reason recorded, for masks other than plain causal (padding, sliding window, a static
    cache's unused tail), a budget covering the cache, softcapping or attention outputs."""
    from ...decode import decode_attention, select_pages

    q_len, kv_len = query.shape[2], key.shape[2]
    if kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return dense("decode pages: softcap/output_attentions need dense attention")
    if dropout > 0.0 and module.training:
        return dense("decode pages: attention dropout in training runs dense")
    if attention_mask is not None and not _is_plain_causal(attention_mask, q_len, kv_len):
        return dense("decode pages: mask is not plain causal (padding or window): dense")
    if kv_len < q_len or key.dim() != 4:
        return dense("decode pages: not a decode step against a cache: dense")
    layer = int(module.layer_idx)
    page, budget = cfg["page"], cfg["budget"]
    index = _sync_index(state, layer, key, page)
    if budget >= kv_len:
        return dense(f"decode pages: budget {budget} covers the {kv_len}-token cache: dense")
    timed = state.config.record
    if timed and query.is_cuda:
        torch.cuda.synchronize(query.device)
    start = time.perf_counter()
    pages, counts = select_pages(query, index, method=cfg["method"], budget=budget, sink=cfg["sink"],
                                 recent=cfg["recent"], scale=scaling)
    if timed and query.is_cuda:
        torch.cuda.synchronize(query.device)
    select_ms = (time.perf_counter() - start) * 1e3
    cache_lens = torch.full((key.shape[0],), kv_len, dtype=torch.int32, device=key.device)
    out = decode_attention(query, key.contiguous(), value.contiguous(), pages, counts, cache_lens,
                           page_size=page, scale=scaling, check_values=False)
    if timed:
        slot = torch.arange(pages.shape[-1], device=pages.device)
        tokens = index.page_tokens().gather(1, pages.flatten(1).long()).view(pages.shape)
        selected = torch.where(slot < counts[..., None], tokens, torch.zeros_like(tokens)).sum()
        density = float(selected) / (pages.shape[0] * pages.shape[1] * kv_len)
        record(True, f"decode pages: {cfg['method']} budget {budget}", density, select_ms)
    return out.transpose(1, 2).contiguous(), None


def _padding_spans(mask: torch.Tensor, q_len: int, kv_len: int):
    """For a boolean mask that is causal restricted to one contiguous run of valid keys per sequence
    (left or right padding), ``[(start, end)]`` per batch row; None for any other mask.

    Only the rows of valid positions are checked: padded query rows are dropped anyway.
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
        spans.append((start, end))
    return spans
