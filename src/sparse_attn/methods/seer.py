"""SeerAttention: block selection from learned gates distilled from the frozen model (:mod:`.seer_gate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .base import Knob, Method, register_method
from .knobs import KnobSpec
from .primitives.top_p import top_p_mask
from .seer_gate import GatesError, SeerGates, block_shares_to_pages, resolve_gates
from .selection import select_top_k, top_k_dense

_LOADED: dict = {}  # (resolved path, mtime) -> SeerGates, so every layer and call reads a file once


def load_gates(path, model=None) -> SeerGates:
    """The gates at ``path`` (``"canary"``: the canary's shipped gates), read once per file version;
    with ``model``, refused (GatesError naming both) when trained for a model with another config."""
    file = resolve_gates(path).resolve()
    key = (str(file), file.stat().st_mtime_ns if file.is_file() else None)
    if key not in _LOADED:
        _LOADED[key] = SeerGates.load(file)
    gates = _LOADED[key]
    if model is not None:
        gates.check_model(model, where=f"seer: gates={str(path)!r}")
    return gates


@register_method
@dataclass
class Seer(Method):
    """SeerAttention's learned gates: per layer and KV group, a gate trained by ``sparse-attn
    train-gates`` scores every causal key block from pooled queries and keys (its softmax over a query
    block's key blocks estimates the frozen model's attention mass there); keep the blocks whose share
    reaches ``threshold`` (SeerAttention's rule); with ``top_p`` > 0, the fewest key blocks whose
    shares reach ``top_p`` per query block (every row keeps that much of the gate's mass); with
    ``top_k`` > 0, the ``top_k`` best key blocks per query block (a count, or a share of the key
    blocks). At most one of ``top_p`` and ``top_k`` is set. ``gates``: the gates file (``"canary"``:
    the ones shipped with the canary model); ``block_size`` must be the block size they were trained
    at. Estimation cost: un-rotating the call's queries and keys, pooling them per block, and the
    gate's ``NQ x NK`` scores of ``gate_dim`` (no ``S x S`` work)."""

    name = "seer"
    needs_gates: ClassVar[bool] = True  # nothing to estimate with until gates= names a file
    KNOBS = {
        "gates": KnobSpec.path(),
        "threshold": KnobSpec.real(0.0, 1.0, high_open=True, per_head=True),
        "top_k": KnobSpec.count(0, share_of="the key blocks", per_head=True),  # 0: threshold decides
        "top_p": KnobSpec.real(0.0, 1.0, per_head=True),  # 0: threshold decides
    }
    gates: Optional[str] = None
    threshold: Knob = 0.01
    top_k: Knob = 0
    top_p: Knob = 0.0

    def check_knobs(self):
        if self._top_k_on() and self.knob_max(self.top_p) > 0:
            raise self.knob_error("top_p", self.top_p, "and top_k cannot both be set: pick one rule")
        if self.gates is None:
            return
        try:
            spec = SeerGates.read_spec(resolve_gates(self.gates))
        except GatesError as err:
            raise self.knob_error("gates", self.gates, f"is not a gates file: {err}") from None
        if spec.block_size != self.block_size:
            raise self.knob_error("block_size", self.block_size, f"differs from the block size the gates "
                                  f"{str(self.gates)!r} were trained at ({spec.block_size}); use "
                                  f"block_size={spec.block_size}")

    def check_model(self, model) -> None:
        """ValueError unless ``gates`` names gates trained for ``model`` (its config hash); run by
        :func:`sparse_attn.integrations.hf.patch`."""
        if self.gates is None:
            raise self.knob_error("gates", None, "is required: pass gates=PATH (trained with `sparse-attn "
                                  "train-gates`)")
        load_gates(self.gates, model)

    def for_layer(self, layer_idx):
        method = super().for_layer(layer_idx)
        method = dataclasses.replace(method) if method is self else method
        object.__setattr__(method, "_layer", layer_idx)
        return method

    def select(self, q, k, grid, scale, kernel_options=None):
        if self.gates is None:
            raise self.knob_error("gates", None, "is required: pass gates=PATH (trained with `sparse-attn "
                                  "train-gates`)")
        layer = getattr(self, "_layer", None)
        gates = load_gates(self.gates)
        spec = gates.spec
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
        if (heads, kv_heads, dim) != (spec.heads, spec.kv_heads, spec.head_dim):
            raise ValueError(f"seer: gates {str(self.gates)!r} are for {spec.heads} heads, {spec.kv_heads} KV heads "
                             f"and head_dim {spec.head_dim}; the call has {heads}, {kv_heads} and {dim}")
        if layer is None or not 0 <= layer < spec.layers:
            raise ValueError(f"seer: layer_idx={layer!r}: the gates {str(self.gates)!r} have layers "
                             f"0..{spec.layers - 1} (estimate(q, k, layer_idx) names the layer)")
        gates = gates.to(q.device)
        kv_len = k.shape[2]
        q_pre = gates.unrotate(q, kv_len - q.shape[2])
        k_pre = gates.unrotate(k, 0)
        logits = gates.gates[layer](q_pre, k_pre, grid.q_block)  # (B, Hkv, NQ, NK)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        if self._top_k_on():
            top_k = self.count(self.top_k, grid.reachable.shape[1])
            keep = select_top_k(probs, self.row_values(top_k, probs, kv_heads).long(), valid=grid.reachable,
                                k_max=int(self.knob_max(top_k)))
        elif self.knob_max(self.top_p) > 0:
            p = self.row_values(self.top_p, probs, kv_heads)
            keep = top_p_mask(probs, p, kernel_options=kernel_options)
            # Heads whose top_p is 0 (a per-head list) keep the threshold rule.
            by_threshold = probs >= self.row_values(self.threshold, probs, kv_heads)[..., None]
            keep = torch.where((p > 0)[..., None], keep, by_threshold) & grid.reachable
        else:
            keep = (probs >= self.row_values(self.threshold, probs, kv_heads)[..., None]) & grid.reachable
        return keep.repeat_interleave(heads // kv_heads, dim=1)

    def _top_k_on(self) -> bool:
        return self.knob_max(self.top_k) > 0

    def dense_knobs(self, grid, forced):
        return top_k_dense(self.top_k, grid) if self._top_k_on() else ()


def decode_page_shares(gates: SeerGates, layer: int, q, k, index, summaries=None):
    """The decode gate of ``layer`` scoring the pages of a :class:`~sparse_attn.decode.PageIndex`:
    ``(B, Hkv, max_pages)`` float32, each page's share of the step's attention mass as the gate
    estimates it (one row per KV group). ``q (B, H, Sq, D)``: the step's post-RoPE query rows, the
    last ``Sq`` positions of each sequence; ``k (B, Hkv, S, D)``: the post-RoPE K cache holding at
    least ``index.lengths`` tokens. The gate pools the cache's keys per block at each call (work
    linear in the cache), with no device sync; with ``summaries`` (a
    :class:`~sparse_attn.methods.seer_gate.GateKeySummaries` of this layer's cache, kept up to date
    by the caller) it reads those instead of the keys. Feed the result to
    :func:`sparse_attn.decode.select_pages_by_score`."""
    spec = gates.spec
    if not 0 <= layer < spec.layers:
        raise ValueError(f"decode_page_shares: layer={layer!r}; the gates have layers 0..{spec.layers - 1}")
    if spec.block_size % index.page_size:
        raise ValueError(f"decode_page_shares: the gates' block_size={spec.block_size} is not a multiple of the "
                         f"index's page_size={index.page_size}")
    gates = gates.to(q.device)
    rows, lengths = q.shape[2], index.lengths
    q_pre = gates.unrotate(q, (lengths - rows).clamp_min(0))
    if summaries is not None:
        shares = gates.gates[layer].decode_probs(q_pre, None, spec.block_size, lengths, pooled=summaries.pooled())
    else:
        k_pre = gates.unrotate(k, 0)
        shares = gates.gates[layer].decode_probs(q_pre, k_pre, spec.block_size, lengths)
    return block_shares_to_pages(shares, spec.block_size, index.page_size, index.page_tokens())
