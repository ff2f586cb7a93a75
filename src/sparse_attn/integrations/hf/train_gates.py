"""Distilling SeerAttention-style gates (:mod:`sparse_attn.methods.seer_gate`) from a frozen model.

Each step runs the frozen model (no gradient) on one prompt with an attention function that records
every layer's queries and keys, then fits the gates to the model's own block attention mass: the
target of a layer is, per (sequence, KV group, query block, key block), the mean softmax mass of the
group's query heads over the block pair, computed blockwise by
:func:`~sparse_attn.methods.primitives.block_mass.block_mass` (never an ``S x S`` tensor); the loss is
the KL divergence from it to the gate's softmax over the causal key blocks, averaged over the query
blocks that reach more than one key block and summed over layers. Only the gates learn (Adam).

Prompts alternate between the retrieval episodes of :mod:`sparse_attn.eval.tasks` and windows of the
bundled corpus (:func:`sparse_attn.eval.corpus.haystack_text`), or are windows of a user's text, at
lengths drawn from ``lengths``. Training stops after ``steps`` steps or ``minutes`` of wall time,
whichever comes first; a checkpoint (gates, optimizer, step, tokens, losses) is written every
``checkpoint_every`` steps and at the end to ``OUT.ckpt``, and ``resume=True`` continues from it.
``init=GATES`` starts from trained gates instead of fresh ones (with a fresh optimizer), e.g. to train
gates further at longer lengths than they were trained at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ...eval.progress import Progress
from ...methods.primitives.block_mass import block_mass
from ...methods.seer_gate import GatesError, SeerGates, gates_json_path, model_config_hash, resolve_gates
from .attention_hook import attention_hook

TASK_SHARE = 0.5  # share of the prompts that are retrieval episodes (the rest: corpus windows)


@contextlib.contextmanager
def capture_qk(model):
    """Within the block, ``model``'s forward records each layer's post-RoPE ``(query, key)`` in the
    dict it yields (``{layer_idx: (q, k)}``, detached) and attends with transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict = {}

    def forward(module, query, key, value, attention_mask, **kwargs):
        captured[int(module.layer_idx)] = (query.detach(), key.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with attention_hook(model, forward):
        yield captured


def gate_targets(q: torch.Tensor, k: torch.Tensor, block: int, scale: Optional[float] = None) -> torch.Tensor:
    """``(B, Hkv, NQ, NK)`` float32: the block attention mass of ``q (B, H, Sq, D)`` against
    ``k (B, Hkv, Skv, D)`` (causal, queries the last ``Sq`` positions), the mean over each KV group's
    query heads; each query block's row sums to 1."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mass = block_mass(q, k, block, block, scale, causal=True)
    batch, heads = mass.shape[:2]
    return mass.view(batch, k.shape[1], heads // k.shape[1], *mass.shape[2:]).mean(2)


def kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the rows that reach more than one key block of ``KL(target || softmax(logits))``
    (``logits`` ``-inf`` off the causal blocks)."""
    logp = torch.log_softmax(logits, dim=-1)
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logp), torch.zeros_like(target))
    rows = torch.isfinite(logits).sum(-1) > 1
    return terms.sum(-1)[rows].mean() if rows.any() else terms.sum() * 0.0


def distill_loss(gates: SeerGates, captured: dict, block: int) -> torch.Tensor:
    """The sum over layers of :func:`kl_loss` between each layer's gate and its target."""
    total = 0.0
    for layer, (q, k) in sorted(captured.items()):
        target = gate_targets(q.float(), k.float(), block)
        offset = k.shape[2] - q.shape[2]
        logits = gates.gates[layer](gates.unrotate(q, offset), gates.unrotate(k, 0), block)
        total = total + kl_loss(logits, target)
    return total


def prompt_ids(tokenizer, length: int, rng: random.Random, text: Optional[str] = None) -> torch.Tensor:
    """``(1, length)`` token ids: a retrieval episode (``TASK_SHARE`` of the time) or a window of the
    corpus; with ``text``, a window of it (ValueError naming ``text`` when it is too short)."""
    from ...eval.corpus import haystack_text
    from ...eval.tasks import TASKS, make_sample

    if text is None and rng.random() < TASK_SHARE:
        try:
            sample = make_sample(rng.choice(TASKS), tokenizer, length, seed=rng.randrange(1 << 30))
            ids = tokenizer(sample.prompt, return_tensors="pt").input_ids[:, :length]
            if ids.shape[1] == length:
                return ids
        except ValueError:  # the task's needles do not fit this length: a corpus window instead
            pass
    source = haystack_text() if text is None else text
    start = rng.randrange(0, max(1, len(source) - 8 * length))
    ids = tokenizer(source[start:start + 8 * length + 64], add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < length:
        ids = tokenizer(source, add_special_tokens=False, return_tensors="pt").input_ids
        if ids.shape[1] < length:
            raise ValueError(f"text has {ids.shape[1]} tokens; a {length}-token prompt needs that many")
        begin = rng.randrange(0, ids.shape[1] - length + 1)
        return ids[:, begin:begin + length]
    return ids[:, :length]


def checkpoint_path(out) -> Path:
    return Path(str(out) + ".ckpt")


def train_gates(model, tokenizer, out, lengths: Sequence[int], minutes: float, steps: Optional[int] = None,
                text: Optional[str] = None, block_size: int = 64, gate_dim: Optional[int] = None, lr: float = 2e-3,
                resume: bool = False, checkpoint_every: int = 25, seed: int = 0, progress: bool = True,
                model_name: str = "", init=None) -> dict:
    """Train gates for the frozen ``model`` and write them to ``out`` (``.safetensors`` and ``.json``).

    Returns a summary: ``steps``, ``tokens``, ``seconds`` (this run's wall time and the total over
    resumed runs; with ``init``, the initial gates' training included), ``first_loss`` and ``last_loss``
    (means over the first and last ten steps). ``init``: a gates file for this model to start from
    (``"canary"``: the canary's), recorded as given; its block size and width replace ``block_size``
    and ``gate_dim``. See the module docstring for the data, the loss and checkpointing."""
    device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    ckpt = checkpoint_path(out)
    state = None
    if resume:
        if not ckpt.is_file():
            raise FileNotFoundError(f"resume: no checkpoint {ckpt} to resume from (train without resume first)")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["spec"]["model_hash"] != model_config_hash(model.config):
            raise GatesError(f"resume: the checkpoint {ckpt} is for model {state['spec']['model_name']} (config hash "
                             f"{state['spec']['model_hash']}), not this one ({model_config_hash(model.config)})")
        block_size, gate_dim = state["spec"]["block_size"], state["spec"]["gate_dim"]
    start_from, init_seconds = None, 0.0
    if init is not None and state is None:
        init_file = resolve_gates(init)
        start_from = SeerGates.load(init_file)
        start_from.check_model(model, where=f"init gates {init}")
        block_size, gate_dim = start_from.spec.block_size, start_from.spec.gate_dim
        trained = json.loads(gates_json_path(init_file).read_text()).get("training") or {}
        init_seconds = float(trained.get("total_seconds", 0.0))
    gates = SeerGates.for_model(model, block_size=block_size, gate_dim=gate_dim, name=model_name).to(device)
    if start_from is not None:
        gates.load_state_dict(start_from.state_dict())
        gates.requires_grad_(True)
    optimizer = torch.optim.Adam(gates.parameters(), lr=lr)
    done, tokens, seconds_before, losses = 0, 0, init_seconds, []
    if state is not None:
        gates.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        done, tokens, seconds_before, losses = state["step"], state["tokens"], state["seconds"], state["losses"]
    rng = random.Random(f"{seed}-{done}")
    budget = minutes * 60.0
    bar = Progress(steps - done if steps else budget, enabled=progress, label="sparse-attn train-gates",
                   intro=f"lengths {list(lengths)}, block {block_size}, up to {minutes:g} minutes"
                         + (f" or {steps} steps" if steps else ""))

    def save_checkpoint(elapsed: float):
        torch.save({"gates": gates.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                    "tokens": tokens, "seconds": seconds_before + elapsed, "losses": losses,
                    "spec": dataclasses.asdict(gates.spec),
                    "init": str(init) if start_from is not None else (state or {}).get("init")}, ckpt)

    start = time.monotonic()
    try:
        while (steps is None or done < steps) and time.monotonic() - start < budget:
            step_start = time.monotonic()
            length = rng.choice(list(lengths))
            ids = prompt_ids(tokenizer, length, rng, text).to(device)
            with torch.no_grad(), capture_qk(model) as captured:
                model(ids, use_cache=False)
            loss = distill_loss(gates, captured, block_size)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done, tokens = done + 1, tokens + ids.shape[1]
            losses.append(loss.item())
            if done % checkpoint_every == 0:
                save_checkpoint(time.monotonic() - start)
            bar.update(1 if steps else time.monotonic() - step_start,
                       f"step {done} | length {length} | KL {losses[-1]:.4f}")
    finally:
        bar.close()
    elapsed = time.monotonic() - start
    save_checkpoint(elapsed)
    summary = {"steps": done, "tokens": tokens, "seconds": round(elapsed, 1),
               "total_seconds": round(seconds_before + elapsed, 1), "lengths": list(lengths),
               "block_size": gates.spec.block_size, "gate_dim": gates.spec.gate_dim,
               "first_loss": _mean(losses[:10]), "last_loss": _mean(losses[-10:])}
    if start_from is not None or (state is not None and state.get("init")):
        summary["init"] = str(init) if start_from is not None else state["init"]
    gates.cpu().save(out, extra={"training": summary})
    return summary


def _mean(values) -> Optional[float]:
    return sum(values) / len(values) if values else None
