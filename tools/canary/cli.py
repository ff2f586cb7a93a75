"""``python -m tools.canary``: ``train`` (the shipped recipe, or the base alone), ``refine`` and ``dsa``
(DeepSeek Sparse Attention on a dense canary)."""

from __future__ import annotations

import json
import math
import time
from collections import deque

import click

from .training import ATTENTIONS

RECENT_STEPS = 20  # log lines show each loss as the mean of this many recent steps that had such tokens


def _loss(values) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


class Progress:
    """Log lines on stderr for a run made of one or more training steps in a row (``phases``: the
    base, refines), after each phase's first step and then every ``every`` seconds:

        [elapsed 3.2 / 9.9 min, ETA 6.7 min] base step 420: text 1.234 answer - copy 0.876

    ``budgets``: ``(max_steps, minutes)`` per phase, as the training functions take them. With a time
    budget the total is the phases' minutes; with step budgets it is estimated from the current
    phase's time per step (``~`` marks the estimate). Both leave out the evaluation after training. A
    loss is the mean over the last ``RECENT_STEPS`` steps whose batches had such tokens; ``-`` until
    one had (answer tokens, for instance, only come after the warm-up).
    """

    def __init__(self, phases: list, budgets: list, every: float, echo=None):
        self.phases, self.budgets, self.every = phases, budgets, every
        self.echo = echo or (lambda line: click.echo(line, err=True))
        self.start = time.time()
        self.phase, self.phase_start, self.last_step, self.logged = -1, self.start, 0, self.start
        self.history = {}

    def clock(self) -> str:
        now = time.time()
        elapsed = (now - self.start) / 60
        phase = max(self.phase, 0)
        in_phase = (now - self.phase_start) / 60
        steps, minutes = self.budgets[min(phase, len(self.budgets) - 1)]
        if steps is None:
            left = max(minutes - in_phase, 0.0) + sum(m for _, m in self.budgets[phase + 1:])
            total = f"{elapsed + left:.1f}"
        else:
            if not self.last_step:
                return f"[elapsed {elapsed:.1f} min, ETA -]"
            per_step = in_phase / self.last_step
            left = per_step * (max(steps - self.last_step, 0) + sum(s for s, _ in self.budgets[phase + 1:]))
            total = f"~{elapsed + left:.1f}"
        return f"[elapsed {elapsed:.1f} / {total} min, ETA {left:.1f} min]"

    def step(self, step: int, losses: dict, detail: str = "") -> None:
        """Record one optimizer step (``step`` counts from 1 in each phase) and its losses (NaN: none)."""
        if step <= self.last_step or self.phase < 0:  # a new phase began
            self.phase, self.phase_start, self.history = self.phase + 1, time.time(), {}
            first = True
        else:
            first = False
        self.last_step = step
        for name, value in losses.items():
            recent = self.history.setdefault(name, deque(maxlen=RECENT_STEPS))
            if value is not None and not math.isnan(value):
                recent.append(value)
        now = time.time()
        if first or now - self.logged >= self.every:
            shown = " ".join(f"{name} {_loss(self.history[name])}" for name in losses)
            self.echo(f"{self.clock()} {self.label()} step {step}{detail}: {shown}")
            self.logged = now

    def label(self) -> str:
        return self.phases[min(max(self.phase, 0), len(self.phases) - 1)]

    def note(self, text: str) -> None:
        self.echo(f"{self.clock()} {text}")


def _shape(pairs) -> dict:
    """``NAME=VALUE`` pairs -> model shape overrides (names of ``CANARY_SHAPE``, numeric values)."""
    from sparse_attn.eval.canary import CANARY_SHAPE

    shape = {}
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if name not in CANARY_SHAPE or not raw:
            raise click.BadParameter(f"expected NAME=VALUE with NAME one of {', '.join(CANARY_SHAPE)}, got {pair!r}",
                                     param_hint="--shape")
        try:
            shape[name] = json.loads(raw)
        except json.JSONDecodeError:
            raise click.BadParameter(f"{pair!r}: the value must be a number", param_hint="--shape") from None
    return shape


def _check_out(out: str, force: bool) -> None:
    from .training import out_dir_problem

    problem = out_dir_problem(out, force)
    if problem:
        raise click.ClickException(f"--out {out} {problem}")


def _continued_training_options(command):
    """The options ``refine`` and ``dsa`` share: evaluation before and after, logging, data workers,
    device and seed."""
    for option in reversed([
        click.option("--eval-samples", default=8, show_default=True,
                     help="prompts per task and length, before and after"),
        click.option("--eval-before/--no-eval-before", default=True, show_default=True),
        click.option("--log-every", default=15.0, show_default=True, help="seconds between log lines"),
        click.option("--workers", default=None, type=int),
        click.option("--device", default=None),
        click.option("--seed", default=1, show_default=True),
    ]):
        command = option(command)
    return command


@click.group()
def main():
    """Train the canary model (a maintainer tool; run from the repository root)."""


@main.command("train")
@click.option("--out", required=True,
              help="directory to save the model in (refused if it holds a model, unless --force)")
@click.option("--force", is_flag=True, help="overwrite a model already in --out")
@click.option("--minutes", default=9.9, show_default=True,
              help="training budget; with --refine the whole recipe's (base 5.5/9.9 of it, each refine 2.2/9.9)")
@click.option("--refine/--no-refine", default=True, show_default=True,
              help="the shipped recipe (train_recipe): the base, then two refine steps")
@click.option("--seq-len", default=8192, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--max-steps", default=None, type=int)
@click.option("--device", default=None)
@click.option("--eval-samples", default=8, show_default=True,
              help="dense-accuracy prompts per length after training (per task and length after a refine)")
@click.option("--log-every", default=30.0, show_default=True, help="seconds between log lines")
@click.option("--probe-every", default=60.0, show_default=True,
              help="seconds between greedy retrieval probes during training (0: none)")
@click.option("--task-share", default=0.45, show_default=True, type=click.FloatRange(0, 1),
              help="share of retrieval-task episodes")
@click.option("--copy-share", default=0.4, show_default=True, type=click.FloatRange(0, 1),
              help="share of copy episodes (rest: plain text)")
@click.option("--repeat-share", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="share of plain repeat (induction) episodes kept after the warm-up")
@click.option("--warmup-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="at most this share of the budget on the warm-up first: induction, then lookup episodes")
@click.option("--short-share", default=0.4, show_default=True, type=click.FloatRange(0, 1),
              help="share of the budget at a quarter of --seq-len")
@click.option("--workers", default=None, type=int, help="DataLoader workers (default: up to 8 on CUDA)")
@click.option("--seed", default=0, show_default=True)
@click.option("--shape", "shape", multiple=True, metavar="NAME=VALUE",
              help="override one entry of the model shape (CANARY_SHAPE, e.g. hidden_size=128), repeatable")
@click.option("--attention", type=click.Choice(ATTENTIONS), default="dense", show_default=True,
              help="train with dense attention, MoBA (patched in) or NSA (converted layers)")
def train_command(out, force, minutes, refine, seq_len, batch_size, lr, max_steps, device, eval_samples, log_every,
                  probe_every, task_share, copy_share, repeat_share, warmup_share, short_share, workers, seed, shape,
                  attention):
    """Train the byte-level canary model and save it in HF format (an NSA one with its nsa.json)."""
    _check_out(out, force)
    shape = _shape(shape)
    from .training import RECIPE_REFINES, recipe_budgets, train, train_recipe

    if refine:
        budgets = recipe_budgets(minutes, max_steps)
        phases = ["base"] + [f"refine {i + 1}/{len(RECIPE_REFINES)}" for i in range(len(RECIPE_REFINES))]
    else:
        budgets, phases = [(max_steps, minutes)], ["base"]
    log_lines = Progress(phases, budgets, log_every)
    budget = f"{max_steps} steps" if max_steps else f"{minutes:g} min"
    log_lines.note(f"training {'the recipe (' + ', '.join(phases) + ')' if refine else 'the base'} "
                   f"for {budget} -> {out}")

    def progress(step, text_loss, answer_loss, copy_loss):
        log_lines.step(step, {"text": text_loss, "answer": answer_loss, "copy": copy_loss})

    def refine_progress(step, phase, text_loss, answer_loss, first_loss):
        log_lines.step(step, {"text": text_loss, "answer": answer_loss, "first answer token": first_loss},
                       detail=f" ({phase[0]}@{phase[1]})")

    def on_probe(step, seconds, accuracy):
        log_lines.note(f"{log_lines.label()} step {step}: retrieval probe accuracy {accuracy:.2f}")

    base_kwargs = dict(seq_len=seq_len, batch_size=batch_size, lr=lr, probe_every_s=probe_every or None,
                       task_share=task_share, copy_share=copy_share, repeat_share=repeat_share,
                       warmup_share=warmup_share, short_share=short_share, seed=seed, attention=attention, **shape)
    if refine:
        log = train_recipe(out, minutes=minutes, max_steps=max_steps, device=device, workers=workers,
                           eval_samples=eval_samples, progress=progress, on_probe=on_probe,
                           refine_progress=refine_progress, force=force, **base_kwargs)
    else:
        log = train(out, minutes=minutes, max_steps=max_steps, device=device, workers=workers,
                    eval_samples=eval_samples, progress=progress, on_probe=on_probe, force=force, **base_kwargs)
    log_lines.note(f"saved to {out}")
    click.echo(json.dumps(log, indent=1))


@main.command("refine")
@click.option("--model", "--init", "model", default="canary", show_default=True,
              help="canary directory to start from ('canary': the shipped one)")
@click.option("--out", required=True,
              help="where to save the refined model (refused if it holds a model, unless --force)")
@click.option("--force", is_flag=True, help="overwrite a model already in --out")
@click.option("--minutes", default=2.2, show_default=True)
@click.option("--max-steps", default=None, type=int)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--lookup-phase-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="at most this share of the budget on lookup episodes alone, before the mix")
@click.option("--lookup-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="share of lookup episodes in the mix")
@click.option("--hard-key-share", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="share of lookup keys one syllable away from an earlier key")
@click.option("--multi-value-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="share of lookup keys with 2-3 values, asked as a list")
@_continued_training_options
@click.option("--attention", type=click.Choice(ATTENTIONS), default="dense", show_default=True,
              help="continue training with dense attention, MoBA (patched in) or NSA (converted layers)")
def refine_command(model, out, force, minutes, max_steps, lr, lookup_phase_share, lookup_share, hard_key_share,
                   multi_value_share, eval_samples, eval_before, log_every, workers, device, seed, attention):
    """Continue training a canary on whole-key lookup, then the retrieval mix (training.refine)."""
    _check_out(out, force)
    from .training import refine

    log_lines = Progress(["refine"], [(max_steps, minutes)], log_every)

    def progress(step, phase, text_loss, answer_loss, first_loss):
        log_lines.step(step, {"text": text_loss, "answer": answer_loss, "first answer token": first_loss},
                       detail=f" ({phase[0]}@{phase[1]})")

    log = refine(model, out, minutes=minutes, max_steps=max_steps, lr=lr, lookup_phase_share=lookup_phase_share,
                 lookup_share=lookup_share, hard_key_share=hard_key_share, multi_value_share=multi_value_share,
                 eval_samples_per_task=eval_samples, eval_before=eval_before, workers=workers, device=device,
                 seed=seed, progress=progress, force=force, attention=attention)
    log_lines.note(f"saved to {out}")
    click.echo(json.dumps({k: v for k, v in log.items() if k != "base"}, indent=1))


@main.command("dsa")
@click.option("--model", default="canary", show_default=True, help="the dense canary to start from")
@click.option("--out", required=True,
              help="directory to save the model in (refused if it holds a model, unless --force)")
@click.option("--force", is_flag=True, help="overwrite a model already in --out")
@click.option("--warmup-minutes", default=1.0, show_default=True,
              help="the warm-up: only the indexers train, against the dense attention")
@click.option("--warmup-steps", default=None, type=int, help="warm-up steps instead of --warmup-minutes")
@click.option("--minutes", default=2.0, show_default=True, help="sparse training of the whole model")
@click.option("--max-steps", default=None, type=int, help="sparse training steps instead of --minutes")
@click.option("--top-k", default=1024, show_default=True, type=click.IntRange(1), help="keys per token")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=3e-4, show_default=True)
@click.option("--indexer-lr", default=1e-3, show_default=True)
@_continued_training_options
def dsa_command(model, out, force, warmup_minutes, warmup_steps, minutes, max_steps, top_k, batch_size, lr, indexer_lr,
                eval_samples, eval_before, log_every, workers, device, seed):
    """DeepSeek Sparse Attention on a dense canary: indexer warm-up, then sparse training (training.train_dsa)."""
    _check_out(out, force)
    from .training import train_dsa

    log_lines = Progress(["warm-up", "sparse"], [(warmup_steps, warmup_minutes), (max_steps, minutes)], log_every)

    def progress(step, phase, text_loss, answer_loss, first_loss):
        if phase[0] == "warmup":
            log_lines.step(step, {"indexer KL": text_loss})
        else:
            log_lines.step(step, {"text": text_loss, "answer": answer_loss, "first answer token": first_loss})

    log = train_dsa(model, out, warmup_minutes=warmup_minutes, minutes=minutes, top_k=top_k, batch_size=batch_size,
                    lr=lr, indexer_lr=indexer_lr, warmup_steps=warmup_steps, max_steps=max_steps,
                    eval_samples_per_task=eval_samples, eval_before=eval_before, device=device, workers=workers,
                    seed=seed, progress=progress, force=force)
    log_lines.note(f"saved to {out}")
    click.echo(json.dumps(log, indent=1))
