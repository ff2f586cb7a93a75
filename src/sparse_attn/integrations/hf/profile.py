"""Profile once, serve many: measure a model's layers on a few calibration prompts and write the
SparseConfig that meets a target attention recall at the lowest density.

:func:`profile_model` runs each calibration prompt through the model (dense attention), and at every
layer measures, for each method at each value of its main knob (:data:`PROFILE_SWEEPS`), the density
and the attention recall (:func:`sparse_attn.metrics.attention_recall`, exact on sampled query
rows) of the layout per KV head. Then, per layer, it keeps the cheapest choice that meets the target
recall on every KV head at every profiled length:

* a method whose sweep knobs take per-head values gets one value per KV head (``threshold=[0.8,
  0.95]``): each KV group the cheapest value its own heads accept; the others one value per layer
  (the cheapest for the KV heads it serves);
* a KV head that no value of the method serves runs dense inside the layer's calls: it goes to the
  method's ``dense_heads`` (full causal rows, density 1, exact);
* the method with the lowest mean density wins; a layer that no method serves on any KV head below
  density 1 is ``{"method": "dense"}``.

Recall of a KV head is the mean over its group's query heads and the prompts of a length, the
minimum over the lengths; density is the mean over the prompts and lengths. The profile is JSON
(:func:`write_profile`): the decisions and every measurement, and under ``"config"`` a
:class:`~.config.SparseConfig` (one ``layers`` entry per layer) that ``patch(model,
profile="profile.json")`` or ``SparseConfig.from_profile(path)`` reads.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ...methods import METHODS, get_method
from ...methods.common import per_kv_head
from ...metrics import attention_recall
from .attention_hook import attention_hook
from .config import PROFILE_FORMAT, SparseConfig

PROFILE_VERSION = 1

# Each method's main knob, swept from sparse to dense; count knobs as shares of the length, so one
# choice means the same at every length (docs/methods.md, count knobs).
PROFILE_SWEEPS = {
    "xattention": [{"threshold": t} for t in (0.8, 0.9, 0.95, 0.98)],
    "flexprefill": [{"gamma": g} for g in (0.8, 0.9, 0.95, 0.98)],
    "vertical_slash": [{"vertical_size": v, "slash_size": s}
                       for v, s in ((0.005, 0.02), (0.01, 0.05), (0.02, 0.1), (0.05, 0.2))],
    "pooled_topp": [{"top_p": p} for p in (0.8, 0.9, 0.95, 0.98)],
    "pooled_topk": [{"top_k": k} for k in (0.05, 0.1, 0.2, 0.4)],
    "sliding_window": [{"window": w} for w in (0.05, 0.1, 0.25, 0.5)],
}
DEFAULT_METHODS = ("xattention", "flexprefill", "vertical_slash", "pooled_topp")
SEER_THRESHOLDS = (0.1, 0.03, 0.01, 0.006, 0.004, 0.003, 0.002, 0.001)  # sparse to dense


def seer_sweep(gates, thresholds=SEER_THRESHOLDS) -> list:
    """The profile's settings of ``seer`` with the gates file ``gates`` (trained for the profiled model
    by ``sparse-attn train-gates``; ``"canary"``: the canary's): one per ``threshold``. Pass it as
    ``sweeps={"seer": seer_sweep(path)}``; the profile then picks a threshold per layer and KV head."""
    return [{"gates": str(gates), "threshold": t} for t in thresholds]


def calibration_prompts(tokenizer, lengths: Sequence[int], samples: int, text: Optional[str] = None) -> dict:
    """``{length: [ids (1, S), ...]}``, ``samples`` prompts per length: the retrieval tasks of
    :mod:`sparse_attn.eval.tasks` in turn, those whose needles fit the length, as the evaluation
    harness builds them (``S`` within a token of ``length``; ``text`` None), or ``length``-token
    windows of ``text`` spread evenly over it (ValueError naming ``text`` when it is shorter than the
    longest length)."""
    from ...eval.tasks import TASKS, make_sample

    out = {}
    if text is not None:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() < max(lengths):
            raise ValueError(f"text has {ids.numel()} tokens; the longest length, {max(lengths)}, needs that many")
    for length in lengths:
        if text is None:
            prompts = []
            for i in range(samples * len(TASKS)):
                try:
                    prompts.append(make_sample(TASKS[i % len(TASKS)], tokenizer, length, seed=i // len(TASKS)).prompt)
                except ValueError:  # the task's needles do not fit this length
                    continue
                if len(prompts) == samples:
                    break
            if len(prompts) < samples:
                raise ValueError(f"lengths: {length} tokens is too short for the calibration tasks; give longer "
                                 "lengths or a text")
            out[length] = [tokenizer(p, return_tensors="pt").input_ids[:, :length] for p in prompts]
        else:
            last = ids.numel() - length
            starts = [round(last * i / max(samples - 1, 1)) for i in range(samples)]
            out[length] = [ids[s:s + length][None] for s in starts]
    return out


def _check(methods, sweeps, lengths, samples, target_recall, block_size) -> None:
    unknown = [m for m in methods if m not in sweeps]
    if not methods or unknown:
        raise ValueError(f"methods: {unknown or 'none'} given; choose from {sorted(sweeps)}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths={list(lengths)!r}: give positive token counts")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} is not an int >= 1")
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or not 0 < target_recall <= 1:
        raise ValueError(f"target_recall={target_recall!r} is outside (0, 1]")
    for name in methods:  # every setting builds (knob names and values checked now)
        for knobs in sweeps[name]:
            get_method(name, block_size=block_size, **knobs)


def measure_layer(q: torch.Tensor, k: torch.Tensor, plan: list, block_size: int, num_rows: int = 64,
                  scale: Optional[float] = None, layer_idx: Optional[int] = None) -> list:
    """Per ``(method, knobs)`` of ``plan``, the layout's density and attention recall per KV head:
    a list of ``(density (Hkv,), recall (Hkv,))`` float tensors. ``layer_idx``: the layer (methods
    with per-layer parameters, such as ``seer``'s gates, need it)."""
    kv_heads = k.shape[1]
    out = []
    for name, knobs in plan:
        layout = get_method(name, block_size=block_size, **knobs).estimate(q, k, layer_idx, scale=scale)
        recall = attention_recall(q, k, layout, num_rows=num_rows, scale=scale)
        out.append((per_kv_head(layout.density_per_head(), kv_heads).cpu(), per_kv_head(recall, kv_heads).cpu()))
    return out


def _collapse(values: list):
    return values[0] if all(v == values[0] for v in values) else values


def choose_layer(methods: Sequence[str], sweeps: dict, density: dict, recall: dict, target_recall: float) -> dict:
    """The cheapest choice for one layer: ``density[(method, i)]`` and ``recall[(method, i)]`` are
    ``(Hkv,)`` tensors for setting ``i`` of ``sweeps[method]``. Returns ``{"method", "knobs",
    "dense_heads", "density", "kv_head_density", "kv_head_recall"}``: the KV heads no setting of the
    method serves are in ``dense_heads`` (density and recall 1 there); ``{"method": "dense", ...}``
    (every KV head in ``dense_heads``) when no method meets ``target_recall`` on any KV head below
    density 1."""
    best = None
    for name in methods:
        settings = sweeps[name]
        dens = torch.stack([density[(name, i)] for i in range(len(settings))]).float()  # (S, Hkv)
        rec = torch.stack([recall[(name, i)] for i in range(len(settings))]).float()
        ok = rec >= target_recall
        # A KV head a setting does not serve runs dense under it: density and recall 1.
        cost, served = torch.where(ok, dens, torch.ones_like(dens)), torch.where(ok, rec, torch.ones_like(rec))
        specs = METHODS[name].knob_specs()
        # Knobs that vary over the settings decide; the others (seer's gates) are the same in all.
        varying = [knob for knob in settings[0] if any(s[knob] != settings[0][knob] for s in settings)]
        if all(specs[knob].per_head for knob in varying):  # one setting per KV head
            picks = cost.argmin(0).tolist()
        else:  # one setting for the layer
            picks = [int(cost.mean(1).argmin())] * dens.shape[1]
        heads = range(dens.shape[1])
        dense_heads = [h for h, i in zip(heads, picks) if not bool(ok[i, h])]
        if len(dense_heads) == dens.shape[1]:
            continue
        first = next(i for h, i in zip(heads, picks) if h not in dense_heads)
        picks = [first if h in dense_heads else i for h, i in zip(heads, picks)]  # any value: full rows there
        knobs = {knob: _collapse([settings[i][knob] for i in picks]) for knob in settings[0]}
        head_density = [float(cost[i, h]) for h, i in zip(heads, picks)]
        choice = {"method": name, "knobs": knobs, "dense_heads": dense_heads,
                  "density": sum(head_density) / len(head_density), "kv_head_density": head_density,
                  "kv_head_recall": [float(served[i, h]) for h, i in zip(heads, picks)]}
        if best is None or choice["density"] < best["density"]:
            best = choice
    if best is None or best["density"] >= 1.0 - 1e-6:
        kv_heads = next(iter(density.values())).numel()
        return {"method": "dense", "knobs": {}, "dense_heads": list(range(kv_heads)), "density": 1.0,
                "kv_head_density": [1.0] * kv_heads, "kv_head_recall": [1.0] * kv_heads}
    return best


def profile_model(model, tokenizer=None, *, prompts: Optional[dict] = None, text: Optional[str] = None,
                  methods: Sequence[str] = DEFAULT_METHODS, sweeps: Optional[dict] = None,
                  lengths: Sequence[int] = (4096,), samples: int = 2, target_recall: float = 0.95,
                  block_size: int = 64, num_rows: int = 64, min_kv_len: Optional[int] = None,
                  progress: bool = False, model_name: Optional[str] = None) -> dict:
    """Profile ``model`` (unpatched, any transformers model ``patch`` supports) and return the profile
    (a JSON-ready dict, see the module doc); :func:`write_profile` saves it.

    Calibration prompts: ``prompts`` (``{length: [ids (1, length), ...]}``), else
    :func:`calibration_prompts` from ``tokenizer`` (the retrieval tasks, or windows of ``text``),
    ``samples`` per length. ``sweeps`` (default :data:`PROFILE_SWEEPS`) gives each method's settings;
    ``block_size`` goes to every method; ``min_kv_len`` (None: SparseConfig's default) to the config.
    ``progress``: a bar on stderr (tqdm when installed). Bad arguments raise ValueError naming them.
    ``seer`` needs its gates in its settings: ``sweeps={"seer": seer_sweep(path)}`` (:func:`seer_sweep`).
    """
    from .patching import _dense, is_patched

    sweeps = PROFILE_SWEEPS if sweeps is None else sweeps
    methods = list(methods)
    lengths = sorted(prompts) if prompts is not None else list(lengths)
    _check(methods, sweeps, lengths, samples, target_recall, block_size)
    if is_patched(model):
        raise ValueError("profile an unpatched model: unpatch(model) first")
    for name in methods:  # methods tied to a model (seer's gates) check it before anything runs
        for knobs in sweeps[name]:
            built = get_method(name, block_size=block_size, **knobs)
            if hasattr(built, "check_model"):
                built.check_model(model)
    if prompts is None:
        if tokenizer is None:
            raise ValueError("give a tokenizer (for the calibration prompts) or prompts={length: [ids, ...]}")
        prompts = calibration_prompts(tokenizer, lengths, samples, text)
    plan = [(name, i) for name in methods for i in range(len(sweeps[name]))]
    settings = [(name, sweeps[name][i]) for name, i in plan]
    # measured[length][layer][(name, i)] = ([density (Hkv,)], [recall (Hkv,)]) over the prompts
    measured: dict = {length: {} for length in lengths}
    current: dict = {}
    kv_heads = {}

    def capture(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = int(module.layer_idx)
        if query.shape[2] > 1:
            kv_heads[layer] = key.shape[1]
            store = measured[current["length"]].setdefault(layer, {p: ([], []) for p in plan})
            for p, (dens, rec) in zip(plan, measure_layer(query, key, settings, block_size, num_rows, scaling,
                                                          layer)):
                store[p][0].append(dens)
                store[p][1].append(rec)
        return _dense(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    from ...eval.progress import Progress, step_cost

    total = sum(step_cost(length) * len(prompts[length]) for length in lengths)
    bar = Progress(total, enabled=progress, label="sparse-attn profile",
                   intro=f"{len(methods)} method(s), {len(plan)} settings, {len(lengths)} length(s)")
    device = next(model.parameters()).device
    try:
        with attention_hook(model, capture):
            for length in lengths:
                current["length"] = length
                for i, ids in enumerate(prompts[length]):
                    with torch.no_grad():
                        model(ids.to(device), use_cache=False)
                    bar.update(step_cost(length), f"length {length} | prompt {i + 1}/{len(prompts[length])}")
    finally:
        bar.close()
    return _build_profile(measured, kv_heads, methods, sweeps, lengths, prompts, target_recall, block_size,
                          min_kv_len, model_name)


def _build_profile(measured, kv_heads, methods, sweeps, lengths, prompts, target_recall, block_size, min_kv_len,
                   model_name) -> dict:
    layers_out, config_layers = [], {}
    for layer in sorted(kv_heads):
        density, recall, rows = {}, {}, []
        for name in methods:
            for i, knobs in enumerate(sweeps[name]):
                per_length = [measured[length][layer][(name, i)] for length in lengths]
                density[(name, i)] = torch.stack([d for dens, _ in per_length for d in dens]).mean(0)
                recall[(name, i)] = torch.stack([torch.stack(rec).mean(0) for _, rec in per_length]).amin(0)
                rows.append({"method": name, "knobs": knobs, "kv_head_density": density[(name, i)].tolist(),
                             "kv_head_recall": recall[(name, i)].tolist()})
        choice = choose_layer(methods, sweeps, density, recall, target_recall)
        layers_out.append({"layer": layer, **choice, "measurements": rows})
        spec = {"method": "dense"}
        if choice["method"] != "dense":
            spec = {"method": choice["method"], "block_size": block_size, **choice["knobs"]}
            if choice["dense_heads"]:
                spec["dense_heads"] = choice["dense_heads"]
        config_layers[layer] = spec
    used = Counter(spec["method"] for spec in config_layers.values() if spec["method"] != "dense")
    settings = {} if min_kv_len is None else {"min_kv_len": min_kv_len}
    method, knobs = "dense", {"block_size": block_size}
    if used:  # the top-level method (every layer has its own): the most used one, as its first layer has it
        method = used.most_common(1)[0][0]
        first = next(spec for spec in config_layers.values() if spec["method"] == method)
        knobs = {k: v for k, v in first.items() if k not in ("method", "dense_heads")}
    config = SparseConfig(method=method, knobs=knobs, layers=config_layers, **settings)
    return {
        "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": model_name,
        "target_recall": target_recall, "lengths": list(lengths),
        "prompts": {str(length): len(prompts[length]) for length in lengths}, "block_size": block_size,
        "methods": {name: sweeps[name] for name in methods}, "decisions": "per layer: method; per KV head: "
        "the values of per-head knobs, and dense_heads (full rows) where no value meets the target",
        "layers": layers_out, "config": _jsonable(config.to_dict()),
    }


def _jsonable(config: dict) -> dict:
    return {**config, "layers": {str(k): v for k, v in config["layers"].items()}}


def write_profile(profile: dict, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(profile, indent=2))
