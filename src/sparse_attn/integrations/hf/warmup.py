"""Warm-up of a patched model: run its sparse paths once per shape before serving.

The first call of each kernel for a new argument specialization compiles it (Triton: about 0.5-3 s
per kernel on a GPU; the estimator kernels, the attention kernels and, with ``decode``, the page
index, selection and decode kernels). :func:`warmup` pays that at start-up, on random tokens, for
the lengths a server expects, and then forgets everything the random prompts left behind (records,
prefill decisions, page indexes), so the first real request runs as it would have, only without the
compilation. Triton also keeps compiled kernels on disk (``TRITON_CACHE_DIR``, by default
``~/.triton/cache``), so a restarted process on the same machine compiles nothing again.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import torch

__all__ = ["warmup"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"warmup: {name} must be an int >= 1, got {value!r}")
    return value


def warmup(model, lengths: Iterable[int], *, batch_size: int = 1, decode_steps: Optional[int] = None,
           seed: int = 0) -> list:
    """Run a :func:`~sparse_attn.integrations.hf.patch`-ed model once per prompt length in
    ``lengths`` on random tokens, so that the kernels its config uses are compiled before the first
    request; returns one ``{"length", "batch_size", "decode_steps", "seconds"}`` row per length.

    Args:
        model: a patched transformers model (``patch`` first; a RuntimeError otherwise).
        lengths: prompt lengths in tokens (ints >= 1), e.g. the lengths a server expects. Kernels
            specialize on shapes and on alignments of lengths and strides, so give each length
            bucket a request may fall in.
        batch_size: sequences per warm-up prompt (an int >= 1).
        decode_steps: tokens generated after each prompt (``generate``), which compiles the decode
            path; None: 2 when the config decodes sparsely (``decode`` other than "dense"), else 0.
        seed: seed of the random prompts.

    Random tokens give diffuse attention, which a config's length rule, pre-check or cost model
    would send to dense attention without running the method's full estimate and sparse kernels; the
    warm-up therefore runs every layer sparse (as ``fallback="never"``, the pre-check off), then,
    unless the config's fallback is ``"never"``, the prompt once more as the config runs it (its
    pre-check, cost model and dense fallback, which compile kernels and dense backend plans of their
    own), and puts the config back afterwards. Run it before serving, not beside requests. Afterwards the patch
    state holds no trace of the warm-up: its records, its cached prefill decisions (``precheck``),
    its page indexes and page selections are emptied, and the one-time short-prompt warning is left
    as it was.
    """
    state = getattr(model, "_sparse_attn_state", None)
    if state is None:
        raise RuntimeError("warmup: the model is not patched; call sparse_attn.patch(model, ...) first")
    if isinstance(lengths, (int, str)) or not hasattr(lengths, "__iter__"):
        raise ValueError(f"warmup: lengths must be a list of ints >= 1, got {lengths!r}")
    lengths = [_positive_int("lengths[]", n) for n in lengths]
    if not lengths:
        raise ValueError("warmup: lengths is empty; give at least one prompt length")
    _positive_int("batch_size", batch_size)
    if decode_steps is None:
        decode_steps = 0 if state.config.decode == "dense" else 2
    elif isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 0:
        raise ValueError(f"warmup: decode_steps must be an int >= 0 or None, got {decode_steps!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"warmup: seed must be an int, got {seed!r}")

    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    first_record, warned = len(state.records), state.warned_short
    config = state.config
    precheck, fallback = config.precheck, config.fallback
    config.precheck = "auto"  # "never" takes no other pre-check setting
    config.fallback = "never"
    rows = []
    try:
        for length in lengths:
            ids = torch.randint(0, vocab, (batch_size, length), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            state.warned_short = True  # the short-prompt warning is for the first real request (restored below)
            with torch.no_grad():
                if decode_steps:
                    pad = model.generation_config.pad_token_id
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_steps,
                                   min_new_tokens=decode_steps, do_sample=False,
                                   pad_token_id=0 if pad is None else pad)
                else:
                    model(ids)
                if fallback != "never":  # once more as the config runs: its pre-check and dense fallback
                    config.fallback, config.precheck = fallback, precheck
                    try:
                        model(ids)
                    finally:
                        config.precheck = "auto"
                        config.fallback = "never"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows.append({"length": length, "batch_size": batch_size, "decode_steps": decode_steps,
                         "seconds": time.perf_counter() - start})
    finally:
        config.fallback = fallback
        config.precheck = precheck
        del state.records[first_record:]
        state.warned_short = warned
        state.clear_caches()
    return rows
