"""Retrieval tasks in the RULER / needle-in-a-haystack tradition, for any HF tokenizer.

Each sample hides one or more "needles" at random depths in real text (the haystack) so that the
whole prompt is ``length`` tokens, then asks for them; the model's greedy continuation is scored as
RULER scores it (``string_match_all``): the share of the expected items (one number, or every value
or variable name) found in it, each as a whole word, in any order.

* ``passkey``: one number to recall.
* ``multikey``: several key -> number needles; one key is asked (the others are distractors).
* ``multivalue``: one key with several numbers; all are asked, in order of appearance.
* ``vartrack``: a chain of variable assignments (``VAR B = VAR A``) from one value; all names
  holding that value are asked, in chain order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from .corpus import haystack_text

TASKS = ("passkey", "multikey", "multivalue", "vartrack")
_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "zan", "vo", "pel", "dri", "sho", "nu", "gax", "bel", "fi", "tor"]


@dataclass
class Sample:
    task: str
    prompt: str
    answer: str
    length: int
    depths: list = field(default_factory=list)
    question: str = ""
    # The items scored (RULER's references): the answer's values or names, or the answer itself.
    references: list = field(default_factory=list)
    # Further (question, answer) pairs about the same needles; training appends them after the
    # answer so one long episode supervises several retrievals. Evaluation asks ``question`` only.
    followups: list = field(default_factory=list)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _distinct_words(rng: random.Random, count: int) -> list:
    """``count`` different :func:`_word` keys."""
    words = []
    while len(words) < count:
        w = _word(rng)
        if w not in words:
            words.append(w)
    return words


def _interleave(groups: list, rng: random.Random) -> list:
    """The items of ``groups`` in a random order that keeps each group's own order."""
    slots = [g for g, items in enumerate(groups) for _ in items]
    rng.shuffle(slots)
    positions = [0] * len(groups)
    merged = []
    for g in slots:
        merged.append(groups[g][positions[g]])
        positions[g] += 1
    return merged


def _needles(task: str, rng: random.Random, keys: int = 4, groups: int = 1):
    """(needle sentences, question, answer, follow-up (question, answer) pairs) for one sample.

    ``groups`` (training drills): how many value lists (``multivalue``) or assignment chains
    (``vartrack``) to hide; the first is asked, the others are distractors and follow-ups."""
    if task == "passkey":
        key = _number(rng, 5)
        return [f" The pass key is {key}. Remember it. {key} is the pass key. "], \
            "What is the pass key? The pass key is", key, []
    if task == "multikey":
        words = _distinct_words(rng, keys)
        values = [_number(rng, 6) for _ in words]
        asked = rng.randrange(len(words))
        needles = [f" One of the special magic numbers for {w} is: {v}. " for w, v in zip(words, values)]

        def ask(i):
            return f"What is the special magic number for {words[i]}? The special magic number for {words[i]} is:"

        others = [i for i in rng.sample(range(len(words)), len(words)) if i != asked]
        return needles, ask(asked), values[asked], [(ask(i), values[i]) for i in others]
    if task == "multivalue":
        words = _distinct_words(rng, groups)
        values = [[_number(rng, 6) for _ in range(3)] for _ in words]
        lists = [[f" One of the special magic numbers for {w} is: {v}. " for v in vs] for w, vs in zip(words, values)]
        asks = [(f"What are all the special magic numbers for {w}? They are:", ", ".join(vs))
                for w, vs in zip(words, values)]
        needles = lists[0] if groups == 1 else _interleave(lists, rng)
        return needles, asks[0][0], asks[0][1], asks[1:]
    if task == "vartrack":
        names, chains = [], []
        for _ in range(groups):
            chain = []
            while len(chain) < 4:
                n = _word(rng).upper()[:5]
                if n not in names and n not in chain:
                    chain.append(n)
            names += chain
            value = _number(rng, 5)
            while any(value == v for v, _ in chains):
                value = _number(rng, 5)
            chains.append((value, chain))
        lists = [[f" VAR {chain[0]} = {value}. "] + [f" VAR {b} = VAR {a}. " for a, b in zip(chain, chain[1:])]
                 for value, chain in chains]
        asks = [(f"Which variables are assigned the value {value}? They are:", ", ".join(chain))
                for value, chain in chains]
        needles = lists[0] if groups == 1 else _interleave(lists, rng)
        return needles, asks[0][0], asks[0][1], asks[1:]
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def make_sample(task: str, tokenizer, length: int, seed: int = 0, haystack: str | None = None,
                keys: int = 4, groups: int = 1) -> Sample:
    """A prompt of about ``length`` tokens (by ``tokenizer``) with needles at random depths.

    ``keys``: how many key -> number needles ``multikey`` hides (the training drills use many);
    ``groups``: how many value lists / assignment chains ``multivalue`` / ``vartrack`` hide (the
    first is asked, the rest are follow-ups: training drills; evaluation uses one).
    """
    rng = random.Random(f"{task}-{length}-{seed}" + ("" if keys == 4 else f"-{keys}")
                        + ("" if groups == 1 else f"-g{groups}"))
    needles, question, answer, followups = _needles(task, rng, keys, groups)
    text = haystack_text() if haystack is None else haystack
    fixed = sum(len(tokenizer(n, add_special_tokens=False).input_ids) for n in needles)
    fixed += len(tokenizer("\n\n" + question, add_special_tokens=False).input_ids) + 1
    budget = length - fixed
    if budget < 16:
        raise ValueError(f"length {length} is too short for task {task!r}: its needles and question "
                         f"take {fixed} tokens (need at least {fixed + 16})")
    start = rng.randrange(0, max(1, len(text) - 8 * budget))
    ids = tokenizer(text[start:start + 8 * budget + 64], add_special_tokens=False).input_ids[:budget]
    filler = tokenizer.decode(ids)
    depths = sorted(rng.random() for _ in needles)
    if task in ("vartrack", "multivalue"):
        needle_order = needles  # chains and lists keep their order of appearance
    else:
        needle_order = rng.sample(needles, len(needles))
    pieces, last = [], 0
    for depth, needle in zip(depths, needle_order):
        cut = int(depth * len(filler))
        pieces += [filler[last:cut], needle]
        last = cut
    pieces.append(filler[last:])
    prompt = "".join(pieces) + "\n\n" + question
    references = answer.split(", ") if task in ("multivalue", "vartrack") else [answer]
    return Sample(task, prompt, answer, length, depths, question, references=references, followups=followups)


def score(sample: Sample, generated: str) -> float:
    """RULER's ``string_match_all``: the share of ``sample.references`` found in ``generated``
    (case-insensitive), each as a whole word (``12345`` does not count inside ``123456``), in any
    order. 1.0 or 0.0 for the single-answer tasks."""
    references = sample.references or [sample.answer]
    text = generated.lower()
    found = sum(re.search(rf"(?<![0-9a-z]){re.escape(ref.lower())}(?![0-9a-z])", text) is not None
                for ref in references)
    return found / len(references)
