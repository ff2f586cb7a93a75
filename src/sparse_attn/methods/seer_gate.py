"""SeerAttention-style learned gates: per layer, a small module that predicts the block attention mass of
a frozen model from pooled queries and keys.

For each query block the gate pools the queries (mean over the block's rows) of the ``G`` query heads
of a KV group and projects their concatenation to ``gate_dim`` (one learned map per KV group); for each
key block it pools the keys three ways (max, min and mean over the block's tokens, concatenated) and
projects them the same way. Both are then rotated by RoPE at the pooled positions, the position of each
block's first token (SeerAttention's downsampled position ids), with the base model's ``rope_theta``
over ``gate_dim`` dimensions. The block score is the scaled dot product of the two, masked to the
causal blocks; its softmax over a query block's key blocks is the gate's estimate of that row's share
of attention mass per key block, one row per (sequence, KV group, query block).

Pooling reads the keys and queries *before* RoPE, as SeerAttention does. The attention function of a
patched model receives them after RoPE, so :meth:`SeerGates.unrotate` undoes the model's rotation
first (exact: RoPE is a rotation), with the model's inverse frequencies stored in the gates file and
positions counted from the call's first key.

* :meth:`SeerGate.forward` is the prefill gate: ``(B, Hkv, NQ, NK)`` logits for a (chunked) prefill.
* :meth:`SeerGate.decode_probs` is the decode gate: for a decode step's query rows (pooled over the
  rows and the KV group, as SeerAttention-R pools query heads), the share of each key block of the
  cache, ``(B, Hkv, NK)``; :func:`block_shares_to_pages` spreads it over the pages of a
  :class:`~sparse_attn.decode.PageIndex` (pages no larger than the gate's blocks).

:class:`SeerGates` holds one gate per layer and reads and writes them: a ``.safetensors`` file of the
weights (and the model's inverse RoPE frequencies) next to a ``.json`` with the shapes, the block size
and the base model's config hash; :meth:`SeerGates.load` refuses gates trained for another model,
naming both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .primitives.mean_pool import block_mean_pool

__all__ = ["GATES_FORMAT", "GateSpec", "SeerGate", "SeerGates", "GatesError", "pooled_keys", "rope",
           "rotate_half", "model_config_hash", "block_shares_to_pages", "gates_json_path", "resolve_gates"]

GATES_FORMAT = "sparse_attn.seer_gates"
# The config fields that fix what a gate sees (shapes, RoPE): their hash ties gates to a base model.
HASHED_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta",
                 "rope_scaling", "rope_parameters", "partial_rotary_factor")


class GatesError(ValueError):
    """A gates file that is missing, unreadable, or trained for another model (a ValueError)."""


def rotate_half(x: Tensor) -> Tensor:
    """The RoPE partner of every dimension (Llama's convention: the two halves, the first negated)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor, *, inverse: bool = False, scaling: float = 1.0) -> Tensor:
    """``x (..., S, D)`` rotated by RoPE at ``positions`` (``(S,)``, or ``(B, S)`` for ``x (B, h, S, D)``:
    each sequence's own) with ``inv_freq`` (``(R/2,)``, the first ``R <= D`` dimensions rotate), as
    transformers' Llama applies it (``cos``/``sin`` times ``scaling``); ``inverse`` undoes that
    rotation. Computes in float32."""
    x = x.float()
    rot = 2 * inv_freq.numel()
    angles = positions.float()[..., None] * inv_freq.float().to(x.device)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if positions.dim() == 2:  # (B, S, R) -> (B, 1, S, R), broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    head, tail = x[..., :rot], x[..., rot:]
    if inverse:
        head = (head * cos - rotate_half(head) * sin) / scaling
    else:
        head = (head * cos + rotate_half(head) * sin) * scaling
    return torch.cat((head, tail), dim=-1) if tail.shape[-1] else head


def default_inv_freq(dim: int, theta: float) -> Tensor:
    """RoPE's inverse frequencies over ``dim`` dimensions with base ``theta``."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def pooled_keys(k: Tensor, block: int, lengths: Optional[Tensor] = None) -> Tensor:
    """``(B, Hkv, S, D)`` -> ``(B, Hkv, ceil(S / block), 3 * D)`` float32: per key block the max, the min
    and the mean of its keys, concatenated (a tail block pools its real tokens). ``lengths (B,)``: keys
    at or past a sequence's length are left out (a block with none of its keys pools to 0)."""
    batch, heads, length, dim = k.shape
    nblocks = -(-length // block)
    pad = nblocks * block - length
    kf = k.float()
    valid = torch.ones(batch, length, dtype=torch.bool, device=k.device)
    if lengths is not None:
        valid = torch.arange(length, device=k.device)[None, :] < lengths.to(k.device)[:, None]
    valid = nn.functional.pad(valid, (0, pad)).view(batch, 1, nblocks, block, 1)
    blocks = nn.functional.pad(kf, (0, 0, 0, pad)).view(batch, heads, nblocks, block, dim)
    count = valid.sum(3).float()
    if lengths is None and pad == 0:
        mean = block_mean_pool(k, block)
    else:
        mean = (blocks * valid).sum(3) / count.clamp(min=1)
    kmax = blocks.masked_fill(~valid, float("-inf")).amax(3)
    kmin = blocks.masked_fill(~valid, float("inf")).amin(3)
    empty = count == 0
    return torch.cat((kmax.masked_fill(empty, 0.0), kmin.masked_fill(empty, 0.0), mean), dim=-1)


@dataclass(frozen=True)
class GateSpec:
    """What a set of gates was trained for: the base model's shapes and config hash, the gate's block
    size and width, and its RoPE (the model's ``rope_theta``; ``rope_scaling`` its attention scaling)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    gate_dim: int
    rope_theta: float
    rope_scaling: float
    model_hash: str
    model_name: str = ""

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


class SeerGate(nn.Module):
    """The gate of one layer: ``q_weight (Hkv, G * D, gate_dim)`` maps a KV group's pooled queries,
    ``k_weight (Hkv, 3 * D, gate_dim)`` its pooled keys (max, min, mean)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, gate_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"SeerGate: heads={heads} is not a multiple of kv_heads={kv_heads}")
        if gate_dim % 2:
            raise ValueError(f"SeerGate: gate_dim={gate_dim} is not even (RoPE rotates pairs of dimensions)")
        self.heads, self.kv_heads, self.head_dim, self.gate_dim = heads, kv_heads, head_dim, gate_dim
        groups = heads // kv_heads
        self.q_weight = nn.Parameter(torch.randn(kv_heads, groups * head_dim, gate_dim) / math.sqrt(groups * head_dim))
        self.k_weight = nn.Parameter(torch.randn(kv_heads, 3 * head_dim, gate_dim) / math.sqrt(3 * head_dim))
        self.register_buffer("inv_freq", default_inv_freq(gate_dim, rope_theta), persistent=False)

    def query_features(self, q: Tensor, block: int, positions: Tensor) -> Tensor:
        """Pre-RoPE queries ``(B, H, Sq, D)`` -> ``(B, Hkv, NQ, gate_dim)``: each query block's mean,
        the group's heads concatenated, projected, rotated at ``positions (NQ,)``."""
        batch = q.shape[0]
        pooled = block_mean_pool(q, block)  # (B, H, NQ, D)
        nq = pooled.shape[2]
        grouped = pooled.view(batch, self.kv_heads, -1, nq, self.head_dim).transpose(2, 3).flatten(3)
        feats = torch.einsum("bnqi,nio->bnqo", grouped, self.q_weight)
        return rope(feats, positions, self.inv_freq)

    def key_features(self, k: Tensor, block: int, positions: Tensor, lengths: Optional[Tensor] = None,
                     pooled: Optional[Tensor] = None) -> Tensor:
        """Pre-RoPE keys ``(B, Hkv, S, D)`` -> ``(B, Hkv, NK, gate_dim)``: max, min and mean per key
        block, projected, rotated at ``positions (NK,)``; ``pooled``: those per-block statistics
        already computed (:func:`pooled_keys`' layout), in place of ``k``."""
        pooled = pooled_keys(k, block, lengths) if pooled is None else pooled
        feats = torch.einsum("bnki,nio->bnko", pooled, self.k_weight)
        return rope(feats, positions, self.inv_freq)

    def scores(self, qf: Tensor, kf: Tensor, valid: Tensor) -> Tensor:
        """Scaled dot products of query and key features, ``-inf`` where ``valid`` is False."""
        logits = torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(self.gate_dim)
        return logits.masked_fill(~valid, float("-inf"))

    def forward(self, q: Tensor, k: Tensor, block: int) -> Tensor:
        """The prefill gate: ``(B, Hkv, NQ, NK)`` float32 logits (``-inf`` off the causal blocks) of
        pre-RoPE ``q (B, H, Sq, D)`` against ``k (B, Hkv, Skv, D)``, queries the last ``Sq`` positions,
        blocks of ``block`` tokens as :class:`~sparse_attn.patterns.grid.BlockGrid` cuts them."""
        from ..patterns.grid import BlockGrid

        grid = BlockGrid(q.shape[2], k.shape[2], block, causal=True, device=q.device)
        qf = self.query_features(q, block, grid.q_first.to(q.device))
        kf = self.key_features(k, block, grid.k_first.to(q.device))
        return self.scores(qf, kf, grid.reachable)

    def decode_probs(self, q: Tensor, k: Optional[Tensor], block: int, lengths: Optional[Tensor] = None,
                     pooled: Optional[Tensor] = None) -> Tensor:
        """The decode gate: pre-RoPE query rows ``q (B, H, Sq, D)`` of a decode step (the last ``Sq``
        positions of each sequence) against the pre-RoPE cache ``k (B, Hkv, S, D)`` of ``lengths (B,)``
        tokens (None: ``S``), or against its per-block statistics ``pooled (B, Hkv, NK, 3 * D)``
        (:class:`GateKeySummaries`; then ``k`` is None and ``lengths`` is required). Returns
        ``(B, Hkv, NK)`` float32: each key block's share of the step's attention mass as the gate
        estimates it, one row per KV group (the rows and the group's heads pooled together), 0 past a
        sequence's length."""
        batch, _, rows, _ = q.shape
        device = q.device
        if pooled is None:
            length = k.shape[2]
            lengths = torch.full((batch,), length, device=device) if lengths is None else lengths.to(device)
            nk = -(-length // block)
        else:
            lengths, nk = lengths.to(device), pooled.shape[2]
        qf = torch.stack([self.query_features(q[b:b + 1], rows, (lengths[b:b + 1] - rows).clamp(min=0))[0]
                          for b in range(batch)])  # (B, Hkv, 1, gate_dim), rotated at the first row's position
        kf = self.key_features(k, block, torch.arange(nk, device=device) * block, lengths, pooled=pooled)
        valid = (torch.arange(nk, device=device)[None, :] * block < lengths[:, None])[:, None, None, :]
        return torch.softmax(self.scores(qf, kf, valid), dim=-1).nan_to_num(0.0)[:, :, 0]


class GateKeySummaries:
    """What the decode gate pools from a KV cache, kept up to date as keys are appended: per (sequence,
    KV head, key block of ``block`` tokens) the max, min and sum of the pre-RoPE keys, for a cache whose
    sequences all hold ``length`` tokens. Building reads the cache once; :meth:`append` costs only the
    new keys, so a decode step's gate no longer reads the whole cache (:func:`~sparse_attn.methods.
    seer.decode_page_shares` with ``summaries=``)."""

    def __init__(self, gates: "SeerGates", k: Tensor, length: int):
        """From the post-RoPE cache ``k (B, Hkv, S, D)``, its first ``length`` positions."""
        self.block = gates.spec.block_size
        self.length = 0
        batch, heads, _, dim = k.shape
        self.kmax = k.new_full((batch, heads, 0, dim), float("-inf"), dtype=torch.float32)
        self.kmin = k.new_full((batch, heads, 0, dim), float("inf"), dtype=torch.float32)
        self.ksum = k.new_zeros((batch, heads, 0, dim), dtype=torch.float32)
        self.append(gates, k[:, :, :length])

    def append(self, gates: "SeerGates", k_new: Tensor) -> None:
        """Add the post-RoPE keys ``k_new (B, Hkv, n, D)`` at positions ``length, length + 1, ...``."""
        n = k_new.shape[2]
        if n == 0:
            return
        pre = gates.unrotate(k_new, self.length)  # float32
        blocks = -(-(self.length + n) // self.block)
        grow = blocks - self.kmax.shape[2]
        if grow > 0:
            shape = (*self.kmax.shape[:2], grow, self.kmax.shape[3])
            self.kmax = torch.cat([self.kmax, pre.new_full(shape, float("-inf"))], dim=2)
            self.kmin = torch.cat([self.kmin, pre.new_full(shape, float("inf"))], dim=2)
            self.ksum = torch.cat([self.ksum, pre.new_zeros(shape)], dim=2)
        owner = (torch.arange(self.length, self.length + n, device=pre.device) // self.block)
        index = owner.view(1, 1, n, 1).expand_as(pre)
        self.kmax.scatter_reduce_(2, index, pre, reduce="amax")
        self.kmin.scatter_reduce_(2, index, pre, reduce="amin")
        self.ksum.scatter_add_(2, index, pre)
        self.length += n

    def pooled(self) -> Tensor:
        """``(B, Hkv, NK, 3 * D)``: max, min and mean per block, as :func:`pooled_keys` gives them."""
        starts = torch.arange(self.kmax.shape[2], device=self.kmax.device) * self.block
        count = (self.length - starts).clamp(0, self.block).float().view(1, 1, -1, 1)
        empty = count == 0
        return torch.cat((self.kmax.masked_fill(empty, 0.0), self.kmin.masked_fill(empty, 0.0),
                          self.ksum / count.clamp(min=1)), dim=-1)


def block_shares_to_pages(shares: Tensor, block: int, page_size: int, page_tokens: Tensor) -> Tensor:
    """Block shares ``(B, Hkv, NK)`` of blocks of ``block`` tokens spread over pages of ``page_size``
    tokens (``block`` a multiple of it): each page gets its block's share times its tokens over the
    block's tokens. ``page_tokens (B, Np)`` (:meth:`~sparse_attn.decode.PageIndex.page_tokens`); returns
    ``(B, Hkv, Np)`` float32."""
    if block % page_size:
        raise ValueError(f"block_shares_to_pages: the gate's block_size={block} is not a multiple of "
                         f"page_size={page_size}")
    per = block // page_size
    pages = page_tokens.shape[1]
    owner = torch.arange(pages, device=shares.device) // per  # the block of each page
    tokens = page_tokens.float().to(shares.device)
    block_tokens = nn.functional.pad(tokens, (0, (-pages) % per)).view(tokens.shape[0], -1, per).sum(-1)
    have = min(shares.shape[-1], block_tokens.shape[-1])
    owner = owner.clamp(max=have - 1)
    weight = tokens / block_tokens[:, owner].clamp(min=1)
    return shares[..., owner] * weight[:, None, :]


def model_config_hash(config) -> str:
    """A short hash of the fields of a transformers config that fix what a gate sees (shapes, RoPE)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = {name: getattr(config, name, None) for name in HASHED_FIELDS}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gates_json_path(path: Union[str, Path]) -> Path:
    """The JSON that goes with a gates file: ``gates.safetensors`` -> ``gates.json``."""
    return Path(path).with_suffix(".json")


def resolve_gates(path: Union[str, os.PathLike]) -> Path:
    """``"canary"`` -> the gates shipped with the canary model; the ``.json`` of a gates file (what
    :meth:`SeerGates.save` returns) -> the ``.safetensors`` beside it; any other value as a path."""
    if str(path) == "canary":
        from ..eval.canary import canary_dir

        return canary_dir() / "seer_gates.safetensors"
    path = Path(path)
    return path.with_suffix(".safetensors") if path.suffix == ".json" else path


class SeerGates(nn.Module):
    """One :class:`SeerGate` per layer, with the :class:`GateSpec` they were trained for and the base
    model's inverse RoPE frequencies (``model_inv_freq``) to undo its rotation."""

    def __init__(self, spec: GateSpec, model_inv_freq: Tensor):
        super().__init__()
        self.spec = spec
        self.gates = nn.ModuleList(SeerGate(spec.heads, spec.kv_heads, spec.head_dim, spec.gate_dim, spec.rope_theta)
                                   for _ in range(spec.layers))
        self.register_buffer("model_inv_freq", model_inv_freq.float().clone())

    @classmethod
    def for_model(cls, model, block_size: int = 64, gate_dim: Optional[int] = None, name: str = "") -> "SeerGates":
        """Fresh (untrained) gates for a transformers model with rotary embeddings."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rotary = next((m for m in model.modules() if hasattr(m, "inv_freq") and type(m).__name__.endswith(
            "RotaryEmbedding")), None)
        if rotary is None:
            raise ValueError(f"{type(model).__name__} has no rotary embedding: seer gates need a RoPE model")
        params = getattr(config, "rope_parameters", None) or {}
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        spec = GateSpec(layers=config.num_hidden_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        block_size=block_size, gate_dim=gate_dim or head_dim, rope_theta=theta,
                        rope_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
                        model_hash=model_config_hash(model.config),
                        model_name=name or str(getattr(config, "_name_or_path", "")))
        return cls(spec, rotary.inv_freq.detach().cpu())

    def unrotate(self, x: Tensor, first) -> Tensor:
        """Post-RoPE ``x (B, h, S, D)`` at positions ``first, first + 1, ...`` -> the pre-RoPE tensor
        (float32); ``first``: an int, or a ``(B,)`` tensor of each sequence's first position."""
        positions = torch.arange(x.shape[2], device=x.device)
        positions = positions + (first.to(x.device)[:, None] if isinstance(first, Tensor) else first)
        return rope(x, positions, self.model_inv_freq, inverse=True, scaling=self.spec.rope_scaling)

    def check_model(self, model, where: str = "gates") -> None:
        """GatesError unless ``model``'s config hash is the one these gates were trained for."""
        mine = model_config_hash(model.config)
        if mine != self.spec.model_hash:
            config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            other = str(getattr(config, "_name_or_path", "")) or type(model).__name__
            raise GatesError(f"{where} were trained for model {self.spec.model_name or '?'} (config hash "
                             f"{self.spec.model_hash}), not for model {other} (config hash {mine}); train gates for "
                             f"it with `sparse-attn train-gates --model {other} --out GATES`")

    def save(self, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
        """Write ``path`` (``.safetensors``: the weights in bfloat16 and the model's inverse RoPE
        frequencies) and its ``.json`` (format, spec, ``extra``). Returns the JSON's path."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"model_inv_freq": self.model_inv_freq.float().contiguous()}
        for i, gate in enumerate(self.gates):
            tensors[f"layers.{i}.q_weight"] = gate.q_weight.detach().to(torch.bfloat16).contiguous()
            tensors[f"layers.{i}.k_weight"] = gate.k_weight.detach().to(torch.bfloat16).contiguous()
        save_file(tensors, str(path))
        meta = {"format": GATES_FORMAT, "spec": asdict(self.spec), **(extra or {})}
        json_path = gates_json_path(path)
        json_path.write_text(json.dumps(meta, indent=2))
        return json_path

    @classmethod
    def read_spec(cls, path: Union[str, Path]) -> GateSpec:
        """The :class:`GateSpec` of a gates file (from its JSON); GatesError naming the file otherwise."""
        path = Path(path)
        json_path = gates_json_path(path)
        if not path.is_file():
            raise GatesError(f"{path} does not exist: expected a gates file written by `sparse-attn train-gates` "
                             "(a .safetensors with its .json)")
        if not json_path.is_file():
            raise GatesError(f"{path} has no {json_path.name} next to it: expected the JSON `sparse-attn "
                             "train-gates` writes with the gates")
        try:
            meta = json.loads(json_path.read_text())
            if meta.get("format") != GATES_FORMAT:
                raise GatesError(f"{json_path} is not a gates JSON (format {meta.get('format')!r}, expected "
                                 f"{GATES_FORMAT!r})")
            return GateSpec(**meta["spec"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise GatesError(f"{json_path} is not a valid gates JSON: {err}") from None

    @classmethod
    def load(cls, path: Union[str, Path], model=None, device=None) -> "SeerGates":
        """Read gates written by :meth:`save`; with ``model``, refuse (GatesError naming both models)
        gates trained for a model with another config."""
        from safetensors.torch import load_file

        path = Path(path)
        spec = cls.read_spec(path)
        tensors = load_file(str(path))
        gates = cls(spec, tensors["model_inv_freq"])
        for i, gate in enumerate(gates.gates):
            gate.q_weight.data.copy_(tensors[f"layers.{i}.q_weight"].float())
            gate.k_weight.data.copy_(tensors[f"layers.{i}.k_weight"].float())
        if model is not None:
            gates.check_model(model, where=f"gates {path}")
        gates.requires_grad_(False)
        return gates.to(device) if device is not None else gates
