"""The canary model: a small byte-level Llama trained here (dense attention) to retrieve needles.

No machine here reaches a model hub, so the project trains its own default model: a
Llama-architecture model (RoPE, GQA) with the byte tokenizer of
:mod:`sparse_attn.integrations.hf.tokenizer`, on real text (the bundled haystack) mixed with the
retrieval episodes of :mod:`.tasks`, at the context length it will be evaluated at (it does not
extrapolate). Weights ship in ``sparse_attn/eval/canary/`` once trained on a GPU:

    sparse-attn train-canary --out src/sparse_attn/eval/canary --minutes 10 --seq-len 8192
"""

from __future__ import annotations

import json
import math
import random
import time
from importlib import resources
from pathlib import Path
from typing import Optional

import torch

from .corpus import haystack_text
from .tasks import TASKS, make_sample

CANARY_SHAPE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=64, rope_theta=10000.0)


def canary_dir() -> Path:
    return Path(str(resources.files("sparse_attn.eval").joinpath("canary")))


def resolve_model(name_or_path: str) -> str:
    """``"canary"`` -> the shipped canary directory (clear error if it was not trained yet)."""
    if name_or_path != "canary":
        return name_or_path
    path = canary_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the canary model is not in {path} yet: train it on a GPU with "
            "`sparse-attn train-canary --out src/sparse_attn/eval/canary` (about 10 minutes)"
        )
    return str(path)


def canary_config(seq_len: int, vocab_size: int, **overrides):
    from transformers import LlamaConfig

    shape = {**CANARY_SHAPE, **overrides}
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len + 64, tie_word_embeddings=True,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None, **shape)


def _episode(tokenizer, seq_len: int, rng: random.Random, text: str, task_share: float):
    """Token ids and per-token loss weights for one training sequence."""
    if rng.random() >= task_share:
        start = rng.randrange(0, len(text) - 4 * seq_len)
        ids = tokenizer(text[start:start + 2 * seq_len], add_special_tokens=False).input_ids[:seq_len]
        return ids, [1.0] * len(ids)
    task = rng.choice(TASKS)
    sample = make_sample(task, tokenizer, seq_len - 32, seed=rng.randrange(1 << 30), haystack=text)
    prompt = tokenizer(sample.prompt, add_special_tokens=False).input_ids
    answer = tokenizer(" " + sample.answer + ".", add_special_tokens=False).input_ids
    ids = (prompt + answer)[-seq_len:]
    weights = [1.0] * (len(ids) - len(answer)) + [5.0] * len(answer)  # the answer carries retrieval
    return ids, weights


def train(out_dir: str, minutes: float = 10.0, seq_len: int = 8192, batch_size: int = 4, lr: float = 1e-3,
          task_share: float = 0.6, device: Optional[str] = None, max_steps: Optional[int] = None,
          eval_lengths=(2048, 4096, 8192), eval_samples: int = 8, seed: int = 0, progress=None,
          **shape_overrides) -> dict:
    """Train for ``minutes`` (or ``max_steps``), save HF-format weights + tokenizer, return a log."""
    from transformers import AutoModelForCausalLM

    from ..integrations.hf.tokenizer import byte_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = byte_tokenizer()
    config = canary_config(seq_len, len(tokenizer), **shape_overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    text = haystack_text()
    use_bf16 = device.startswith("cuda")
    budget_s = minutes * 60
    start, step, losses = time.time(), 0, []
    warmup = 100
    while True:
        elapsed = time.time() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed > budget_s):
            break
        frac = step / max_steps if max_steps else elapsed / budget_s
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        episodes = [_episode(tokenizer, seq_len, rng, text, task_share) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in episodes)
        ids = torch.zeros(batch_size, width, dtype=torch.long)
        weights = torch.zeros(batch_size, width)
        for i, (e_ids, e_w) in enumerate(episodes):
            ids[i, :len(e_ids)] = torch.tensor(e_ids)
            weights[i, :len(e_w)] = torch.tensor(e_w)
        ids, weights = ids.to(device), weights.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(ids[:, :-1]).logits.float()
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (token_loss * weights[:, 1:]).sum() / weights[:, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if progress:
            progress(step, losses[-1])
    model.eval()
    accuracy = {}
    for length in eval_lengths:
        if length > seq_len:
            continue
        hits = 0
        for i in range(eval_samples):
            sample = make_sample(TASKS[i % len(TASKS)], tokenizer, length, seed=10_000 + i)
            prompt = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                out = model.generate(prompt, max_new_tokens=len(sample.answer) + 4, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            from .tasks import score

            hits += score(sample, tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
        accuracy[length] = hits / eval_samples
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16 if use_bf16 else torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log = {"steps": step, "seconds": time.time() - start, "seq_len": seq_len, "batch_size": batch_size,
           "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1), "first_loss": losses[0] if losses else None,
           "dense_accuracy": accuracy, "device": torch.cuda.get_device_name() if use_bf16 else "cpu",
           "parameters": sum(p.numel() for p in model.parameters())}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log
