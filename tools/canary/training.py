"""Canary training: the curriculum, :func:`train`, :func:`refine` and the shipped recipe :func:`train_recipe`.

The model is a Llama-architecture model (RoPE, GQA) of :data:`sparse_attn.eval.canary.CANARY_SHAPE`
with the byte tokenizer of :mod:`sparse_attn.integrations.hf.tokenizer`, trained on real text (the
bundled haystack) mixed with the retrieval episodes of :mod:`sparse_attn.eval.tasks`, at the context
length it will be evaluated at (it does not extrapolate), then refined twice on whole-key lookup and
lists (:func:`refine`). The shipped weights in ``sparse_attn/eval/canary/`` are :func:`train_recipe`'s:
5.5 + 2.2 + 2.2 = 9.9 minutes of training on an H100 (0.99 dense accuracy at 8K, 10 prompts per task).

Every function that saves a model refuses an output directory that already holds one unless
``force=True``, and never writes into the shipped canary directory (:func:`check_out_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Optional

import torch

from sparse_attn.eval.canary import CANARY_SHAPE, canary_config, canary_dir, resolve_model
from sparse_attn.eval.corpus import haystack_text
from sparse_attn.eval.tasks import TASKS, make_sample
from sparse_attn.integrations.hf import load_model
from sparse_attn.integrations.hf.tokenizer import byte_tokenizer

# The attention a canary can be trained with (``attention=``): dense SDPA, MoBA through
# ``sparse_attn.patch`` (its parameter-free gate), or NSA modules in place of every layer's attention
# (``sparse_attn.nsa.convert_llama``; learned compression and gates). Knobs at the canary's scale.
ATTENTIONS = ("dense", "moba", "nsa")
MOBA_KNOBS = {"moba_block": 512, "top_k": 3, "block_size": 64}


def canary_nsa_config():
    """NSA at the canary's scale: 32-token compressed blocks every 16, 8 selected blocks of 64 tokens,
    a 512-token window."""
    from sparse_attn.nsa import NSAConfig

    return NSAConfig(compress_block=32, compress_stride=16, select_block=64, select_blocks=8, window=512,
                     window_block=64)


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")


def _with_attention(model, attention: str):
    """``model`` made to train and run with ``attention`` (in place): MoBA patched in, NSA converted."""
    if attention == "moba":
        from sparse_attn.integrations.hf import SparseConfig, patch

        patch(model, config=SparseConfig(method="moba", knobs=MOBA_KNOBS, fallback="never", min_kv_len=0))
    elif attention == "nsa":
        from sparse_attn.nsa import convert_llama

        convert_llama(model, canary_nsa_config())
    return model


def _save(model, out: Path, attention: str, dtype) -> None:
    """Write the trained model: MoBA's patch removed first (its weights are a plain Llama's), NSA with
    its NSA parameters and configuration (``sparse_attn.nsa.save_nsa_model``)."""
    model.to(dtype)
    if attention == "moba":
        from sparse_attn.integrations.hf import unpatch

        unpatch(model)
    if attention == "nsa":
        from sparse_attn.nsa import save_nsa_model

        save_nsa_model(model, out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)


# Files that mark a directory as holding a model (HF weights or config).
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def _source_canary_dir() -> Path:
    """The shipped canary directory of the source tree this tool belongs to."""
    return Path(__file__).resolve().parents[2] / "src" / "sparse_attn" / "eval" / "canary"


def out_dir_problem(out_dir, force: bool = False) -> Optional[str]:
    """Why a model may not be saved to ``out_dir`` (None if it may), phrased to follow the path.

    Refused: the shipped canary directory (of the installed package or of this source tree), always;
    a path that is not a directory; a directory that already holds a model (:data:`MODEL_FILES`)
    unless ``force``.
    """
    path = Path(out_dir).expanduser().resolve()
    if path in {canary_dir().resolve(), _source_canary_dir()}:
        return ("is the shipped canary model, which training never overwrites (even with --force): "
                "train into another directory, check the model, then copy its files there")
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    if not force and path.is_dir():
        found = sorted({f.name for pattern in MODEL_FILES for f in path.glob(pattern)})
        if found:
            return f"already holds a model ({', '.join(found)}); pass --force to overwrite it"
    return None


def check_out_dir(out_dir, force: bool = False) -> None:
    """Raise ``FileExistsError`` if :func:`out_dir_problem` refuses ``out_dir``."""
    problem = out_dir_problem(out_dir, force)
    if problem:
        raise FileExistsError(f"{out_dir} {problem}")


# Token roles in a training episode: padding (no loss), text (language-model loss), answer
# (retrieval answers) and copy (second occurrences of random codes). Text is averaged on its own and
# answer + copy tokens together, and the two means are added, so a few targets in 8K tokens of text
# still carry half the gradient; answer and copy losses are also logged apart.
PAD, TEXT, ANSWER, COPY = 0, 1, 2, 3
FIRST = "first"  # not a role in the data: the loss mask of each answer's first token (see _train_step)


def _text_ids(tokenizer, text: str, n: int, rng: random.Random) -> list:
    start = rng.randrange(0, len(text) - 4 * n)
    return tokenizer(text[start:start + 2 * n], add_special_tokens=False).input_ids[:n]


def _copy_episode(tokenizer, seq_len: int, rng: random.Random, text: str):
    """Real text with random byte strings (8-48 bytes, about one per 128 tokens) that each occur
    twice at random places; the second copy (after its first byte) is the target.

    This is the data that grows an induction circuit (find where the current token occurred before,
    predict what followed it), which needle retrieval is built on. The codes use all 256 byte values,
    so one matching byte nearly always identifies the earlier copy and copying pays from the first
    step; codes over a small alphabet (36 letters and digits, measured on an H100) stayed at
    the no-copy loss, because matching one character there points at dozens of places. Random
    distances keep the model from learning a fixed-offset shortcut instead.
    """
    pairs = rng.randint(1, max(1, seq_len // 128))
    codes = [[rng.randrange(256) for _ in range(rng.randint(8, 48))] for _ in range(pairs)]
    events = sorted([(rng.random(), i) for i in range(pairs)] + [(rng.random(), i) for i in range(pairs)])
    filler = _text_ids(tokenizer, text, max(seq_len - 2 * sum(len(c) for c in codes), 16), rng)
    ids, roles, last, seen = [], [], 0, set()
    for depth, i in events:
        cut = int(depth * len(filler))
        role = COPY if i in seen else TEXT
        seen.add(i)
        ids += filler[last:cut] + codes[i]
        roles += [TEXT] * (cut - last) + [TEXT] + [role] * (len(codes[i]) - 1)
        last = cut
    ids += filler[last:]
    roles += [TEXT] * (len(filler) - last)
    return ids[:seq_len], roles[:seq_len]


# Length of the warm-up's first induction episodes. Short sequences leave the copy plateau sooner (a
# near-uniform attention spreads the useful gradient over every earlier position): on CPU, a
# 2-layer width-128 model needed ~370 steps at 128 tokens, ~620 at 256 and more than 950 at 512,
# with the same number of tokens per step.
INDUCTION_LEN = 128
INDUCTION_COPY_LOSS = 1.0  # nats per copied byte: below it, copying works at that length


def _doubling_lengths(first: int, seq_len: int) -> list:
    """``first``, doubled until ``seq_len`` (the last entry is ``seq_len``); empty if ``seq_len < first``."""
    lengths = [first] if seq_len >= first else []
    while lengths and lengths[-1] < seq_len:
        lengths.append(min(2 * lengths[-1], seq_len))
    return lengths


def induction_lengths(seq_len: int) -> list:
    """Episode lengths of the warm-up: ``INDUCTION_LEN`` doubled up to ``seq_len``.

    A copy circuit formed at 128 tokens breaks when the length jumps: on an H100 a jump from 128
    to 2048 tokens put the copy loss back at ln 256 for 7000 steps, and on CPU a jump to 2048 stayed
    there for 100+ steps, while each doubling (256, 512, ... 4096) took 20-63 steps to get back
    below 1 nat (see docs/benchmarks.md).
    """
    return _doubling_lengths(INDUCTION_LEN, seq_len)


# The lookup warm-up: :func:`_lookup_episode` at 512 tokens, doubled up to seq_len, each length
# until the loss on the answer digits is below this many nats per digit. A copy circuit alone picks
# the needle at random (the shipped canary: every wrong multikey answer was another key's value);
# on CPU a 4-layer width-128 model trained on these episodes at 512 tokens went from 0.21 to 0.95
# first-digit accuracy in ~350 steps (digit loss 1.5 -> 0.14), while on drill episodes in haystack
# text (multikey, 4 keys at 1K, every key asked) the answer loss was still 0.21 nats per token after
# 500 steps, about what picking one of 4 needles at random costs. On an H100 this
# warm-up passed every stage in ~250 steps yet the canary ended no better (first-digit accuracy 0.22
# on these episodes); a stricter test, on the first answer token, cost the copy circuit and made it
# worse (docs/benchmarks.md).
LOOKUP_ANSWER_LOSS = 0.25
LOOKUP_FIRST_LEN = 512
LOOKUP_MAX_KEYS = 32


def lookup_lengths(seq_len: int) -> list:
    """Episode lengths of the lookup warm-up: ``LOOKUP_FIRST_LEN`` doubled up to ``seq_len``."""
    return _doubling_lengths(LOOKUP_FIRST_LEN, seq_len)


def _near_key(key: str, rng: random.Random) -> str:
    """``key`` with one of its three syllables replaced: a hard negative that shares two of them."""
    from sparse_attn.eval.tasks import _SYLLABLES, _word

    syllables = re.findall("|".join(sorted(_SYLLABLES, key=len, reverse=True)), key)
    if "".join(syllables) != key:  # not made of the syllables: a fresh word instead
        return _word(rng)
    syllables[rng.randrange(len(syllables))] = rng.choice(_SYLLABLES)
    return "".join(syllables)


def _lookup_episode(tokenizer, seq_len: int, rng: random.Random, text: str, hard_key_share: float = 0.0,
                    multi_value_share: float = 0.0):
    """Multi-query associative recall with multi-byte keys: lines ``The number for KEY is: VALUE.``
    (keys are the tasks' three-syllable words, values six digits; at most ``LOOKUP_MAX_KEYS``, up to
    half the sequence), haystack text, then questions ``The number for KEY is:`` answered with the
    value. Only the digits are ``ANSWER`` targets. Every question ends in the same bytes (``is:``),
    so only matching the whole key finds the right line: the step the copy circuit alone lacks.
    ``hard_key_share``: the share of keys made from an earlier key by changing one syllable, so that
    matching part of a key is not enough (models matching only a syllable or two score ~0.7 on
    such keys where they score ~0.9 on random ones, measured on CPU).
    ``multi_value_share``: the share of keys with 2-3 values on separate lines (scattered among the
    others), asked ``The numbers for KEY are:`` and answered with every value in order of appearance:
    the list retrieval of the multivalue task."""
    from sparse_attn.eval.tasks import _interleave, _number, _word

    def encode(piece):
        return tokenizer(piece, add_special_tokens=False).input_ids

    pairs, lines, lines_len = {}, [], 0
    while len(pairs) < LOOKUP_MAX_KEYS:
        key = _near_key(rng.choice(list(pairs)), rng) if pairs and rng.random() < hard_key_share else _word(rng)
        count = rng.randint(2, 3) if multi_value_share and rng.random() < multi_value_share else 1
        values = [_number(rng, 6) for _ in range(count)]
        key_lines = [encode(f" The number for {key} is: {value}.") for value in values]
        if key in pairs:
            continue
        if lines_len + sum(map(len, key_lines)) > seq_len // 2:
            break
        pairs[key] = values
        lines.append(key_lines)
        lines_len += sum(map(len, key_lines))
    if any(len(values) > 1 for values in pairs.values()):
        lines = [[line] for line in _interleave(lines, rng)]
    ids = [token for key_lines in lines for line in key_lines for token in line]
    roles = [TEXT] * len(ids)
    questions, asked_len = [], 0
    while len(questions) < 2 * len(pairs):
        key = rng.choice(list(pairs))
        if len(pairs[key]) == 1:
            asked, answer = encode(f" The number for {key} is:"), encode(f" {pairs[key][0]}.")
        else:
            asked, answer = encode(f" The numbers for {key} are:"), encode(" " + ", ".join(pairs[key]) + ".")
        if asked_len + len(asked) + len(answer) > seq_len - len(ids) - 16:
            break
        questions.append((asked, answer))
        asked_len += len(asked) + len(answer)
    filler = _text_ids(tokenizer, text, seq_len - len(ids) - asked_len, rng)
    ids, roles = ids + filler, roles + [TEXT] * len(filler)
    for asked, answer in questions:
        ids += asked + answer
        roles += [TEXT] * len(asked) + [TEXT] + [ANSWER] * (len(answer) - 2) + [TEXT]
    return ids[:seq_len], roles[:seq_len]


def _repeat_episode(seq_len: int, rng: random.Random):
    """Pure induction: random bytes, in which a random code (L/8 to L/2 bytes) is followed at once
    by itself at a random place; the copy (after its first byte) is the target, the rest carries no
    loss. The code length, hence the copy distance, varies, so only content matching (find the
    current byte earlier, predict what followed it) solves it: a fixed distance was solved by a
    positional shortcut that did not transfer (measured on an H100). The warm-up uses it at
    lengths of :func:`induction_lengths`; the mix keeps some at full length (long-range copying)."""
    length = rng.randint(max(2, seq_len // 8), max(2, seq_len // 2))
    code = [rng.randrange(256) for _ in range(length)]
    start = rng.randint(0, seq_len - 2 * length)
    ids = [rng.randrange(256) for _ in range(start)] + code + code
    ids += [rng.randrange(256) for _ in range(seq_len - len(ids))]
    roles = [PAD] * (start + length + 1) + [COPY] * (length - 1) + [PAD] * (seq_len - start - 2 * length)
    return ids, roles


def _episode(tokenizer, seq_len: int, rng: random.Random, text: str, task_share: float,
             copy_share: float = 0.0, repeat: bool = False, repeat_share: float = 0.0,
             lookup: bool = False, lookup_share: float = 0.0, hard_key_share: float = 0.0,
             multi_value_share: float = 0.0, tasks: Optional[tuple] = None):
    """Token ids and per-token roles (``PAD``/``TEXT``/``ANSWER``/``COPY``) for one training sequence.

    With probability ``copy_share`` a copy episode (:func:`_copy_episode`); with ``task_share`` a
    retrieval episode: a task prompt, its answer, then any follow-up questions about the same
    needles with their answers (so one sequence supervises several retrievals). "drill" episodes are
    multikey samples with 8-32 keys, all asked: the haystack text is small enough to be memorized,
    so without dense retrieval supervision the model learns the text and never learns to look up.
    Otherwise plain text. ``repeat``: always a :func:`_repeat_episode` (the warm-up);
    ``repeat_share``: the share of repeat episodes kept in the mix after it. ``lookup``: always a
    :func:`_lookup_episode` (the second warm-up); ``lookup_share``: the share of them in the mix;
    ``hard_key_share``, ``multi_value_share``: see :func:`_lookup_episode`. ``tasks``: the retrieval tasks to draw from
    (repeat a name to weight it; default every task once, plus "drill" from 1K tokens on); besides
    :data:`.tasks.TASKS`, "drill", "multivalue_drill" (2-4 keys with three values each) and
    "vartrack_drill" (2-3 chains), each asking about every key or chain.
    """
    if lookup or (lookup_share and rng.random() < lookup_share):
        return _lookup_episode(tokenizer, seq_len, rng, text, hard_key_share, multi_value_share)
    if repeat or (repeat_share and rng.random() < repeat_share):
        return _repeat_episode(seq_len, rng)
    draw = rng.random()
    if draw < copy_share:
        return _copy_episode(tokenizer, seq_len, rng, text)
    if draw >= copy_share + task_share:
        ids = _text_ids(tokenizer, text, seq_len, rng)
        return ids, [TEXT] * len(ids)
    tasks = tasks or TASKS + ("drill",)
    task = rng.choice([t for t in tasks if not t.endswith("drill") or seq_len >= 1024])  # drills need ~1K tokens
    if task == "drill":  # many keys, every one asked: dense supervision for learning to look things up
        most = max(2, min(32, seq_len // 256))  # a needle plus its question take ~110 tokens
        keys = rng.randint(min(8, most), most)
        reserve = 105 * keys + (130 if seq_len >= 2048 else 0)  # + the echoed question
        sample = make_sample("multikey", tokenizer, seq_len - reserve, seed=rng.randrange(1 << 30),
                             haystack=text, keys=keys)
    elif task in ("multivalue_drill", "vartrack_drill"):  # several lists / chains, every one asked
        groups = rng.randint(2, 4 if task == "multivalue_drill" else 3)
        reserve = 110 * groups + (130 if seq_len >= 2048 else 0)
        sample = make_sample(task.split("_")[0], tokenizer, seq_len - reserve, seed=rng.randrange(1 << 30),
                             haystack=text, groups=groups)
    else:
        reserve = (min(400, seq_len // 4) if task == "multikey" else 40) + (130 if seq_len >= 2048 else 0)
        sample = make_sample(task, tokenizer, seq_len - reserve, seed=rng.randrange(1 << 30), haystack=text)
    ids = tokenizer(sample.prompt, add_special_tokens=False).input_ids
    roles = [TEXT] * len(ids)
    # The first question is asked once more at the end ("echo"): copying its answer from a few
    # hundred tokens back is the easy, short-range case of the same lookup, which gets the copying
    # circuit going before long-range retrieval can pay off.
    asks = [(None, sample.answer)] + list(sample.followups) + [(sample.question, sample.answer)]
    for question, answer in asks:
        if question is not None:
            asked = tokenizer("\n\n" + question, add_special_tokens=False).input_ids
            ids, roles = ids + asked, roles + [TEXT] * len(asked)
        answer_ids = tokenizer(" " + answer + ".", add_special_tokens=False).input_ids
        ids, roles = ids + answer_ids, roles + [ANSWER] * len(answer_ids)
    return ids[:seq_len], roles[:seq_len]


class _Episodes(torch.utils.data.IterableDataset):
    """Endless training episodes (:func:`_episode` with ``episode_kwargs``); each DataLoader worker
    draws from its own seeded stream."""

    def __init__(self, seq_len: int, seed: int, episode_kwargs: dict):
        self.seq_len, self.seed, self.episode_kwargs = seq_len, seed, episode_kwargs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}-{self.seq_len}-{info.id if info else 0}")
        tokenizer, text = byte_tokenizer(), haystack_text()
        while True:
            ids, roles = _episode(tokenizer, self.seq_len, rng, text, **self.episode_kwargs)
            yield torch.tensor(ids), torch.tensor(roles)


def _pad_batch(episodes):
    width = max(len(ids) for ids, _ in episodes)
    ids = torch.zeros(len(episodes), width, dtype=torch.long)
    roles = torch.full((len(episodes), width), PAD, dtype=torch.long)
    for i, (e_ids, e_roles) in enumerate(episodes):
        ids[i, :len(e_ids)] = e_ids
        roles[i, :len(e_roles)] = e_roles
    return ids, roles


def _loader(seq_len: int, batch_size: int, seed: int, workers: int, pin: bool, **episode_kwargs):
    """An endless iterator of padded ``(ids, roles)`` batches of :func:`_episode` episodes."""
    return iter(torch.utils.data.DataLoader(
        _Episodes(seq_len, seed, episode_kwargs), batch_size=batch_size,
        collate_fn=_pad_batch, num_workers=workers, pin_memory=pin, prefetch_factor=4 if workers else None))


def _scores(model, tokenizer, samples, device) -> float:
    """Mean greedy RULER score of ``model`` on ``samples`` (bf16 autocast on CUDA: the model trains
    in float32)."""
    from sparse_attn.eval.runner import greedy_score

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
        return sum(greedy_score(model, tokenizer, sample) for sample in samples) / len(samples)


def dense_accuracy(model, tokenizer, lengths, samples: int, device) -> dict:
    """Greedy accuracy of ``model`` on ``samples`` retrieval prompts per length (the tasks in turn)."""
    return {length: _scores(model, tokenizer, [make_sample(TASKS[i % len(TASKS)], tokenizer, length, seed=10_000 + i)
                                               for i in range(samples)], device)
            for length in lengths}


def task_accuracy(model, tokenizer, lengths, samples_per_task: int, device) -> dict:
    """``{length: {task: accuracy, "mean": ...}}``: greedy accuracy per task on ``samples_per_task``
    prompts each (other prompts than :func:`dense_accuracy`'s)."""
    result = {}
    for length in lengths:
        per_task = {task: _scores(model, tokenizer, [make_sample(task, tokenizer, length, seed=20_000 + i)
                                                     for i in range(samples_per_task)], device)
                    for task in TASKS}
        result[length] = {**per_task, "mean": sum(per_task.values()) / len(per_task)}
    return result


@torch.no_grad()
def lookup_accuracy(model, tokenizer, length: int, episodes: int, device, hard_key_share: float = 0.0) -> float:
    """Share of questions in held-out :func:`_lookup_episode` episodes whose first answer digit is the
    model's top prediction (teacher forced): whether it finds the line of the asked key, with random
    keys or, with ``hard_key_share``, keys one syllable apart."""
    rng, text = random.Random(f"lookup-test-{length}-{hard_key_share}"), haystack_text()
    hits = total = 0
    for _ in range(episodes):
        ids, roles = _lookup_episode(tokenizer, length, rng, text, hard_key_share)
        ids, roles = torch.tensor([ids], device=device), torch.tensor([roles], device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            predicted = model(ids[:, :-1]).logits.argmax(-1)
        first = (roles[:, 1:] == ANSWER) & (roles[:, :-1] != ANSWER)
        hits += int((predicted == ids[:, 1:])[first].sum())
        total += int(first.sum())
    return hits / max(total, 1)


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _role_loss(token_loss, mask) -> float:
    """Mean loss over the tokens of ``mask`` (NaN if the batch has none)."""
    return float(_masked_mean(token_loss, mask)) if bool(mask.any()) else float("nan")


def _train_step(model, optimizer, batch, device, use_bf16: bool, extra_loss=None):
    """One optimizer step on a ``(ids, roles)`` batch. The loss is the mean over text tokens plus the
    mean over answer and copy tokens (so a few targets in 8K tokens still carry half the gradient),
    plus ``extra_loss()`` when given (called after the forward, e.g. DSA's indexer loss).
    Returns the detached per-token losses and the role masks (``FIRST``: each answer's first token,
    the one that shows whether the right needle was found; the rest can be copied from it)."""
    ids, roles = (t.to(device, non_blocking=True) for t in batch)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(ids[:, :-1]).logits.float()
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    masks = {role: (roles[:, 1:] == role).float() for role in (TEXT, ANSWER, COPY)}
    masks[FIRST] = masks[ANSWER] * (roles[:, :-1] != ANSWER).float()
    loss = _masked_mean(token_loss, masks[TEXT]) + _masked_mean(token_loss, masks[ANSWER] + masks[COPY])
    if extra_loss is not None:
        loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return token_loss.detach(), masks


def _training_device(device: Optional[str], workers: Optional[int]):
    """``(device, use_bf16, workers)``: CUDA if there is one, bf16 autocast there, and by default up
    to 8 DataLoader workers on CUDA (none on CPU) so the GPU never waits on tokenization."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = torch.device(device).type == "cuda"
    if workers is None:
        workers = min(8, max((os.cpu_count() or 1) - 2, 0)) if use_bf16 else 0
    return device, use_bf16, workers


def _recent_mean(history: list, count: int) -> Optional[float]:
    """Mean of the last ``count`` entries that are not NaN (None if there are none)."""
    recent = [x for x in history[-count:] if x == x]
    return sum(recent) / len(recent) if recent else None


def train(out_dir: str, minutes: float = 10.0, seq_len: int = 8192, batch_size: int = 8, lr: float = 2e-3,
          task_share: float = 0.45, copy_share: float = 0.4, device: Optional[str] = None,
          max_steps: Optional[int] = None,
          eval_lengths=(2048, 4096, 8192), eval_samples: int = 8, seed: int = 0, progress=None,
          workers: Optional[int] = None, short_share: float = 0.4, warmup_share: float = 0.3,
          repeat_share: float = 0.1, probe_every_s: Optional[float] = None,
          on_probe=None, force: bool = False, attention: str = "dense", **shape_overrides) -> dict:
    """Train for ``minutes`` (or ``max_steps``), save HF-format weights + tokenizer, return a log.

    Curriculum: first pure induction (:func:`_repeat_episode` at each length of
    :func:`induction_lengths`, the batch scaled to keep the tokens per step) at the full learning
    rate, moving to the next length once the copy loss falls below 1 nat (the circuit has formed;
    otherwise the haystack text is memorized first and the circuit never forms); then lookup
    (:func:`_lookup_episode` at each length of :func:`lookup_lengths` until the answer-digit loss
    is below ``LOOKUP_ANSWER_LOSS``); the whole warm-up takes at most ``warmup_share`` of the
    budget; then a cosine decay over the rest:
    ``short_share`` of the budget on episodes a quarter as long (4x the batch), where retrieval is
    found sooner, then ``seq_len``.
    Episodes are built by DataLoader workers (``workers``; default: up to 8 on CUDA, none on CPU) so
    the GPU never waits on tokenization. ``repeat_share`` keeps that share of repeat episodes in the
    mix after the warm-up. ``progress(step, text_loss, answer_loss, copy_loss)`` is called every step
    (NaN where a batch had no such tokens).
    Every ``probe_every_s`` seconds (if set) greedy accuracy on 8 prompts at 1/4 of ``seq_len`` is
    measured, logged under ``"probes"`` and passed to ``on_probe(step, seconds, accuracy)``: a run
    that is not learning to retrieve shows it within minutes.
    ``out_dir`` must not hold a model yet unless ``force`` (:func:`check_out_dir`).
    ``attention`` (:data:`ATTENTIONS`): what the model attends with while it trains, is probed and
    evaluated: ``"dense"``, ``"moba"`` (saved as a plain Llama; evaluate it with ``--methods moba``)
    or ``"nsa"`` (saved with :func:`sparse_attn.nsa.save_nsa_model`, loaded with its NSA attention).
    """
    from transformers import AutoModelForCausalLM

    check_attention(attention)
    if seq_len < 512:
        raise ValueError(f"train: seq_len must be at least 512 (the retrieval episodes need it), got {seq_len}")
    check_out_dir(out_dir, force)
    device, use_bf16, workers = _training_device(device, workers)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    config = canary_config(seq_len, len(tokenizer), **shape_overrides)
    model = _with_attention(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device),
                            attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    short_len = max(seq_len // 4, 512)
    loader, phase = None, None
    budget_s = minutes * 60
    start, step, losses, answer_losses, copy_losses, probes = time.time(), 0, [], [], [], []
    last_probe = start
    warmup = 100
    # Warm-up stages: (kind, length, the loss history that ends it, below what)
    stages = [("repeat", n, copy_losses, INDUCTION_COPY_LOSS) for n in induction_lengths(seq_len)]
    stages += [("lookup", n, answer_losses, LOOKUP_ANSWER_LOSS) for n in lookup_lengths(seq_len)]
    stages_done = []  # (kind, length, step) of each finished stage
    induction_step = None  # the step at which the induction stages ended (at full length)
    stage_start = 0  # the step at which the current stage began
    decay_from = 0.0  # budget share at which the learning-rate decay starts (the warm-up's end)
    while True:
        elapsed = time.time() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed > budget_s):
            break
        frac = step / max_steps if max_steps else elapsed / budget_s
        in_warmup = len(stages_done) < len(stages) and frac < warmup_share
        if in_warmup:  # full learning rate until the copy circuit forms: decay lengthens the plateau
            decay_from, scale = frac, 1.0
        else:  # then a cosine over the rest of the budget
            scale = 0.5 * (1 + math.cos(math.pi * min((frac - decay_from) / max(1 - decay_from, 1e-9), 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(min(1.0, (step + 1) / warmup) * scale, 0.05)
        if in_warmup:
            want = stages[len(stages_done)][:2]
        elif frac < warmup_share + short_share and short_len < seq_len:
            want = ("mix", short_len)
        else:
            want = ("mix", seq_len)
        if want != phase:
            factor = max(seq_len // want[1], 1)
            loader = _loader(want[1], batch_size * factor, seed, workers, use_bf16, task_share=task_share,
                             copy_share=copy_share, repeat=want[0] == "repeat", repeat_share=repeat_share,
                             lookup=want[0] == "lookup")
            phase = want
        token_loss, masks = _train_step(model, optimizer, next(loader), device, use_bf16)
        for history, role in ((losses, TEXT), (answer_losses, ANSWER), (copy_losses, COPY)):
            history.append(_role_loss(token_loss, masks[role]))
        step += 1
        if in_warmup:
            kind, length, history, goal = stages[len(stages_done)]
            stage_mean = _recent_mean(history[stage_start:], 20) if step - stage_start >= 20 else None
            if stage_mean is not None and stage_mean < goal:
                stages_done.append((kind, length, step))
                stage_start = step
                if kind == "repeat" and length == seq_len:
                    induction_step = step
        if progress:
            progress(step, losses[-1], answer_losses[-1], copy_losses[-1])
        if probe_every_s and time.time() - last_probe >= probe_every_s:
            model.eval()
            accuracy = dense_accuracy(model, tokenizer, [short_len], 8, device)[short_len]
            model.train()
            last_probe = time.time()
            probes.append({"step": step, "seconds": round(last_probe - start, 1), "accuracy": accuracy})
            if on_probe:
                on_probe(step, last_probe - start, accuracy)
    model.eval()
    accuracy = dense_accuracy(model, tokenizer, [n for n in eval_lengths if n <= seq_len], eval_samples, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(model, out, attention, torch.bfloat16 if use_bf16 else torch.float32)
    tokenizer.save_pretrained(out)
    log = {"steps": step, "seconds": time.time() - start, "seq_len": seq_len, "batch_size": batch_size,
           "attention": attention, **({"moba_knobs": MOBA_KNOBS} if attention == "moba" else {}),
           "short_len": short_len, "short_share": short_share, "warmup_share": warmup_share,
           "repeat_share": repeat_share, "induction_step": induction_step,
           "induction_steps": {n: at for kind, n, at in stages_done if kind == "repeat"},
           "lookup_steps": {n: at for kind, n, at in stages_done if kind == "lookup"},
           "final_text_loss": _recent_mean(losses, 20),
           "first_text_loss": next((x for x in losses if x == x), None),
           "final_answer_loss": _recent_mean(answer_losses, 50),
           "final_copy_loss": _recent_mean(copy_losses, 50),
           "dense_accuracy": accuracy, "device": torch.cuda.get_device_name() if use_bf16 else "cpu",
           "parameters": sum(p.numel() for p in model.parameters()), "shape": {**CANARY_SHAPE, **shape_overrides},
           "lr": lr, "task_share": task_share, "copy_share": copy_share,
           "probes": probes}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


# The late lookup phase (:func:`refine`). CPU evidence (on a canary trained with the
# recipe above): lookup episodes alone at 512 tokens broke the key-matching plateau after ~130 steps
# (first-digit accuracy 0.19 -> 0.90) and lifted multikey at 2K from 0.42 to 0.75, while a mix with
# half lookup episodes had not broken it after 240 steps; the same fine-tuning then cost multivalue
# and vartrack accuracy, hence the mix after it weights those tasks up. On an H100 the
# lookup phase lifted multikey from 0.25-0.38 to 0.88-1.0; multivalue (0.42-0.63) and vartrack
# (0.69-0.91) stayed below, answering one list item twice: hence the list and chain drills.
REFINE_TASKS = ("passkey", "multikey", "multivalue", "multivalue_drill", "multivalue_drill", "vartrack",
                "vartrack_drill", "drill")
REFINE_FIRST_DIGIT_LOSS = 0.3  # nats on an answer's first digit: below it, the asked key's line is found


def refine(model_dir: str, out_dir: str, minutes: float = 2.2, batch_size: int = 8, lr: float = 1e-3,
           lookup_phase_share: float = 0.3, lookup_share: float = 0.3, hard_key_share: float = 0.5,
           multi_value_share: float = 0.3,
           task_share: float = 0.6, copy_share: float = 0.2, repeat_share: float = 0.05,
           tasks: tuple = REFINE_TASKS, eval_lengths=(2048, 4096, 8192), eval_samples_per_task: int = 8,
           eval_before: bool = True, device: Optional[str] = None, max_steps: Optional[int] = None,
           workers: Optional[int] = None, seed: int = 1, progress=None, force: bool = False,
           attention: str = "dense") -> dict:
    """Continue training a canary (``model_dir``, or ``"canary"``) to match whole keys, save it to
    ``out_dir`` and return a log with per-task accuracy before and after.

    First lookup episodes alone (:func:`_lookup_episode` with ``hard_key_share`` near-miss keys and
    ``multi_value_share`` keys with several values) at each length of :func:`lookup_lengths`, each
    until the first-answer-token loss is below
    ``REFINE_FIRST_DIGIT_LOSS`` or its share of ``lookup_phase_share`` of the budget is spent, at
    ``lr``; then the retrieval mix at the model's full length (``tasks`` weighted, ``lookup_share``
    lookup episodes kept) with a cosine decay to 5% of ``lr``. ``minutes`` or ``max_steps`` bound it.
    ``progress(step, (kind, length), text_loss, answer_loss, first_answer_token_loss)`` is called
    every step (NaN where a batch had no such tokens). ``out_dir`` must not hold a model yet unless
    ``force`` (:func:`check_out_dir`). ``attention`` as in :func:`train`: continued training of a dense
    canary with ``"moba"`` or ``"nsa"`` converts it first (an NSA canary keeps its NSA attention).
    """
    check_attention(attention)
    check_out_dir(out_dir, force)
    device, use_bf16, workers = _training_device(device, workers)
    source = resolve_model(model_dir)
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    from sparse_attn.nsa import is_nsa_model

    if is_nsa_model(source) and attention != "nsa":
        raise ValueError(f"{source} attends with NSA layers: continue it with attention='nsa' (got {attention!r})")
    model = _with_attention(load_model(source, dtype=torch.float32, device=device), attention)
    seq_len = model.config.max_position_embeddings - 64  # canary_config's margin
    lengths = [n for n in eval_lengths if n <= seq_len]

    def measure():  # leaves the model in eval mode
        model.eval()
        return {"tasks": task_accuracy(model, tokenizer, lengths, eval_samples_per_task, device),
                "lookup_1024": {"random": lookup_accuracy(model, tokenizer, 1024, 8, device),
                                "hard": lookup_accuracy(model, tokenizer, 1024, 8, device, hard_key_share=1.0)}}

    before = measure() if eval_before else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    stages, stages_done = lookup_lengths(seq_len), []
    lookup = dict(hard_key_share=hard_key_share, multi_value_share=multi_value_share)
    mix = dict(task_share=task_share, copy_share=copy_share, repeat_share=repeat_share, lookup_share=lookup_share,
               tasks=tasks, **lookup)
    start, step, stage_start, phase, loader = time.time(), 0, 0, None, None
    decay_from = mix_from_step = None
    text_losses, answer_losses, first_losses = [], [], []
    while True:
        elapsed = time.time() - start
        frac = step / max_steps if max_steps else elapsed / (minutes * 60)
        if frac >= 1:
            break
        in_lookup = len(stages_done) < len(stages)
        if in_lookup and frac >= lookup_phase_share * (len(stages_done) + 1) / len(stages):
            stages_done.append({"length": stages[len(stages_done)], "step": step, "passed": False,
                                "first_digit_loss": _recent_mean(first_losses[stage_start:], 20)})
            stage_start = step
            continue
        if in_lookup:
            want, scale = ("lookup", stages[len(stages_done)]), 1.0
        else:
            if decay_from is None:
                decay_from, mix_from_step = frac, step
            want = ("mix", seq_len)
            scale = 0.5 * (1 + math.cos(math.pi * (frac - decay_from) / max(1 - decay_from, 1e-9)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(min(1.0, (step + 1) / 20) * scale, 0.05)
        if want != phase:
            factor = max(seq_len // want[1], 1)
            kwargs = dict(task_share=0.0, lookup=True, **lookup) if in_lookup else mix
            loader = _loader(want[1], batch_size * factor, seed, workers, use_bf16, **kwargs)
            phase = want
        token_loss, masks = _train_step(model, optimizer, next(loader), device, use_bf16)
        for history, role in ((text_losses, TEXT), (answer_losses, ANSWER), (first_losses, FIRST)):
            history.append(_role_loss(token_loss, masks[role]))
        step += 1
        if in_lookup and step - stage_start >= 20:
            recent = _recent_mean(first_losses[stage_start:], 20)
            if recent is not None and recent < REFINE_FIRST_DIGIT_LOSS:
                stages_done.append({"length": want[1], "step": step, "passed": True, "first_digit_loss": recent})
                stage_start = step
        if progress:
            progress(step, want, text_losses[-1], answer_losses[-1], first_losses[-1])
    after = measure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_log = Path(source) / "training_log.json"
    base = json.loads(base_log.read_text()) if base_log.exists() else None
    _save(model, out, attention, torch.bfloat16 if use_bf16 else torch.float32)
    tokenizer.save_pretrained(out)
    log = {"refined_from": str(model_dir), "attention": attention, "steps": step, "seconds": time.time() - start,
           "seq_len": seq_len,
           "batch_size": batch_size, "lr": lr, "lookup_phase_share": lookup_phase_share,
           "lookup_share": lookup_share, "hard_key_share": hard_key_share, "multi_value_share": multi_value_share,
           "task_share": task_share, "copy_share": copy_share, "repeat_share": repeat_share, "tasks": list(tasks),
           "lookup_stages": stages_done, "mix_from_step": mix_from_step,
           "final_text_loss": _recent_mean(text_losses, 20), "final_answer_loss": _recent_mean(answer_losses, 50),
           "seed": seed, "before": before, "after": after,
           "device": torch.cuda.get_device_name() if use_bf16 else "cpu", "base": base}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


DSA_TOP_K = 1024  # keys per token at the canary's scale (MoBA reads about 2K, NSA about 1.3K)


def canary_dsa_config(top_k: int = DSA_TOP_K, head_dim: int = 64):
    """DSA at the canary's scale: 4 indexer heads of 64 with 32 RoPE dims (at most the model's
    ``head_dim``, whose rotary tables they use), ``top_k`` keys per token."""
    from sparse_attn.dsa import DSAConfig

    return DSAConfig(index_heads=4, index_head_dim=64, rope_dim=min(32, head_dim), top_k=top_k)


def train_dsa(model_dir: str, out_dir: str, warmup_minutes: float = 1.0, minutes: float = 2.0, top_k: int = DSA_TOP_K,
              batch_size: int = 8, lr: float = 3e-4, indexer_lr: float = 1e-3, warmup_steps: Optional[int] = None,
              max_steps: Optional[int] = None, eval_lengths=(2048, 4096, 8192), eval_samples_per_task: int = 8,
              eval_before: bool = True, device: Optional[str] = None, workers: Optional[int] = None, seed: int = 1,
              progress=None, force: bool = False) -> dict:
    """DeepSeek Sparse Attention on a dense canary (``model_dir``, or ``"canary"``), trained as
    DeepSeek-V3.2 was: every layer gains a lightning indexer (:func:`sparse_attn.dsa.convert_llama`,
    :func:`canary_dsa_config`); a warm-up in which only the indexers train, on the KL to the dense
    attention (``warmup_minutes`` or ``warmup_steps``, at ``indexer_lr``); then sparse training of the
    whole model, each token attending its ``top_k`` keys, on the language loss plus the indexers'
    loss on the selected keys (``minutes`` or ``max_steps``, ``lr`` with a cosine decay to 5%), on
    the retrieval mix at the model's full length. Saved with :func:`sparse_attn.dsa.save_dsa_model`;
    returns a log with per-task accuracy before (dense) and after (sparse) and the indexer losses.
    ``progress(step, phase, text_loss, answer_loss, first_answer_token_loss)`` per step (``phase``:
    ``("warmup", length)`` with the indexer loss as ``text_loss``, or ``("sparse", length)``)."""
    from sparse_attn.dsa import convert_llama, indexer_loss, indexer_parameters, save_dsa_model, set_stage
    from sparse_attn.nsa import is_nsa_model

    check_out_dir(out_dir, force)
    device, use_bf16, workers = _training_device(device, workers)
    source = resolve_model(model_dir)
    if is_nsa_model(source):
        raise ValueError(f"{source} attends with NSA layers: DSA starts from a dense canary")
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    model = load_model(source, dtype=torch.float32, device=device)
    seq_len = model.config.max_position_embeddings - 64  # canary_config's margin
    lengths = [n for n in eval_lengths if n <= seq_len]
    config = canary_dsa_config(top_k, model.model.layers[0].self_attn.head_dim)
    convert_llama(model, config, stage="dense")
    model.to(device)

    def measure():  # leaves the model in eval mode
        model.eval()
        return {"tasks": task_accuracy(model, tokenizer, lengths, eval_samples_per_task, device)}

    before = measure() if eval_before else None
    mix = dict(task_share=0.6, copy_share=0.2, repeat_share=0.05, lookup_share=0.3, tasks=REFINE_TASKS,
               hard_key_share=0.5, multi_value_share=0.3)
    loader = _loader(seq_len, batch_size, seed, workers, use_bf16, **mix)
    indexers = indexer_parameters(model)
    start, warmup_losses = time.time(), []
    # Warm-up: the model frozen and attending densely; the indexers learn its attention.
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in indexers:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(indexers, lr=indexer_lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    while (step < warmup_steps) if warmup_steps is not None else (time.time() - start < warmup_minutes * 60):
        ids, _ = (t.to(device, non_blocking=True) for t in next(loader))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            model(ids[:, :-1], use_cache=False)
        loss = indexer_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup_losses.append(float(loss.detach()))
        step += 1
        if progress:
            progress(step, ("warmup", seq_len), warmup_losses[-1], float("nan"), float("nan"))
    warmup_seconds, warmup_done = time.time() - start, step
    # Sparse training: everything trains; the indexers keep learning on the selected keys.
    set_stage(model, "sparse")
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sparse_start, step = time.time(), 0
    text_losses, answer_losses, first_losses, sparse_indexer_losses = [], [], [], []

    def extra():
        loss = indexer_loss(model)
        sparse_indexer_losses.append(float(loss.detach()))
        return loss

    while True:
        frac = step / max_steps if max_steps else (time.time() - sparse_start) / (minutes * 60)
        if frac >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * max(min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac)), 0.05)
        token_loss, masks = _train_step(model, optimizer, next(loader), device, use_bf16, extra_loss=extra)
        for history, role in ((text_losses, TEXT), (answer_losses, ANSWER), (first_losses, FIRST)):
            history.append(_role_loss(token_loss, masks[role]))
        step += 1
        if progress:
            progress(step, ("sparse", seq_len), text_losses[-1], answer_losses[-1], first_losses[-1])
    after = measure()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16 if use_bf16 else torch.float32)
    save_dsa_model(model, out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log = {"trained_from": str(model_dir), "attention": "dsa",
           "dsa_config": dataclasses.asdict(config), "warmup_steps": warmup_done,
           "warmup_seconds": warmup_seconds, "steps": step,
           "seconds": time.time() - start, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
           "indexer_lr": indexer_lr, "warmup_indexer_loss": {"first": warmup_losses[0] if warmup_losses else None,
                                                             "last": _recent_mean(warmup_losses, 10)},
           "sparse_indexer_loss": _recent_mean(sparse_indexer_losses, 10),
           "final_text_loss": _recent_mean(text_losses, 20), "final_answer_loss": _recent_mean(answer_losses, 50),
           "seed": seed, "before": before, "after": after,
           "device": torch.cuda.get_device_name() if use_bf16 else "cpu"}
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    return log


# The shipped recipe (:func:`train_recipe`): the base's share of the budget, then one refine per
# entry, each ``RECIPE_REFINE_SHARE`` of it. On an H100: base alone 0.50 at 8K, after the first
# refine 0.91, after the second 0.99 (docs/benchmarks.md).
RECIPE_BASE_SHARE = 5.5 / 9.9
RECIPE_REFINE_SHARE = 2.2 / 9.9
RECIPE_REFINES = ({"seed": 2, "multi_value_share": 0.0}, {"seed": 1, "multi_value_share": 0.3})


def recipe_budgets(minutes: float = 9.9, max_steps: Optional[int] = None) -> list:
    """``(max_steps, minutes)`` of each step of :func:`train_recipe`: the base, then each refine."""
    def share(fraction):
        return (None, minutes * fraction) if max_steps is None else (max(1, round(max_steps * fraction)), minutes)

    return [share(RECIPE_BASE_SHARE)] + [share(RECIPE_REFINE_SHARE) for _ in RECIPE_REFINES]


def train_recipe(out_dir: str, minutes: float = 9.9, max_steps: Optional[int] = None, device: Optional[str] = None,
                 workers: Optional[int] = None, eval_samples: int = 8, eval_lengths=(2048, 4096, 8192),
                 progress=None, on_probe=None, refine_progress=None, force: bool = False, attention: str = "dense",
                 **train_kwargs) -> dict:
    """Train the canary the way the shipped one was: :func:`train` for ``RECIPE_BASE_SHARE`` of
    ``minutes`` (or of ``max_steps``), then :func:`refine` once per ``RECIPE_REFINES`` entry for
    ``RECIPE_REFINE_SHARE`` each; intermediate models live in a temporary directory. Returns the last
    refine's log; each log nests the one before under ``"base"``. ``out_dir`` is checked before
    training starts and must not hold a model yet unless ``force`` (:func:`check_out_dir`).
    ``attention`` (:data:`ATTENTIONS`) is the attention of every phase.
    """
    import tempfile

    check_attention(attention)
    check_out_dir(out_dir, force)
    (steps, budget), *refine_budgets = recipe_budgets(minutes, max_steps)
    with tempfile.TemporaryDirectory(prefix="canary_recipe_") as work:
        train(f"{work}/base", minutes=budget, max_steps=steps, device=device, workers=workers,
              eval_samples=eval_samples, eval_lengths=eval_lengths, progress=progress, on_probe=on_probe,
              attention=attention, **train_kwargs)
        source = f"{work}/base"
        for i, (settings, (steps, budget)) in enumerate(zip(RECIPE_REFINES, refine_budgets)):
            last = i == len(RECIPE_REFINES) - 1
            target = out_dir if last else f"{work}/refined_{i}"
            log = refine(source, target, minutes=budget, max_steps=steps, device=device, workers=workers,
                         eval_before=False, eval_samples_per_task=eval_samples if last else 2,
                         eval_lengths=eval_lengths, progress=refine_progress, force=force and last,
                         attention=attention, **settings)
            source = target
    return log
