"""``sparse-attn`` command line: ``demo`` (static patterns vs dense), ``generate`` (a local HF model,
sparse prefill vs dense, then generation), ``eval`` (accuracy vs density vs speed), ``train-gates``
(learned gates for the ``seer`` method, distilled from the frozen model) and ``profile`` (per-layer
choices that meet a target recall, written as a SparseConfig that ``patch`` reads).

Bad options end in one line naming the option and what is expected, exit code 2; ``--debug`` shows
the traceback of any error instead.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from . import __version__


def _parse_knobs(pairs) -> dict:
    knobs = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="--knob")
        name, raw = pair.split("=", 1)
        try:
            knobs[name] = json.loads(raw)
        except json.JSONDecodeError:
            knobs[name] = raw
    return knobs


class _Commands(click.Group):
    """Errors as one line: a bad option names the option and what is expected (exit code 2); an
    error inside a command is reported the same way unless ``--debug`` was given."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # every other error is reported the same way
            if ctx.params.get("debug"):
                raise
            click.echo(f"Error: {exc} (run with --debug for the traceback)", err=True)
            sys.exit(2)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="sparse-attn")
@click.option("--debug", is_flag=True, help="show the full traceback of an error")
def main(debug):
    """Block-sparse attention: patterns, methods, and sparse prefill for transformers models."""


def _device(value, param_hint: str = "--device") -> str:
    """``value`` (None: cuda when available, else cpu), checked to exist on this machine."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(f"{value!r} is not a device; use cpu or cuda[:N]", param_hint=param_hint) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise click.BadParameter("cuda was asked for but this machine has no CUDA GPU (or torch is a CPU build); "
                                     "use --device cpu", param_hint=param_hint)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise click.BadParameter(f"{value} does not exist: {torch.cuda.device_count()} GPU(s)",
                                     param_hint=param_hint)
    elif device.type != "cpu":
        raise click.BadParameter(f"{value!r}: use cpu or cuda[:N]", param_hint=param_hint)
    return str(device)


def _model_dir(value: str, param_hint: str = "--model") -> str:
    """``canary`` (the shipped model) or a local transformers model directory."""
    from .eval.canary import resolve_model

    try:
        path = resolve_model(value)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint=param_hint) from None
    if not os.path.isdir(path):
        raise click.BadParameter(f"{value!r} is not a directory; give 'canary' or a local transformers model directory "
                                 "(models are never downloaded)", param_hint=param_hint)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise click.BadParameter(f"{value!r} has no config.json: not a transformers model directory",
                                 param_hint=param_hint)
    return path


def _position_limit(path: str):
    """The most positions the model in ``path`` supports (its config's ``max_position_embeddings``),
    or None if it does not say. Read before the weights are loaded."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


@main.command()
@click.option("--seq-len", default=4096, show_default=True, type=click.IntRange(min=64))
@click.option("--heads", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--kv-heads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--dim", default="64", show_default=True, type=click.Choice(["16", "32", "64", "128"]))
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available)")
@click.option("--show", is_flag=True, help="draw each layout")
def demo(seq_len, heads, kv_heads, dim, device, show):
    """Run each static pattern on random inputs: density, error vs dense, backend, time."""
    from .demo import run_demo

    if heads % kv_heads:
        raise click.BadParameter(f"{kv_heads} must divide --heads {heads} (GQA groups)", param_hint="--kv-heads")
    device, dim = _device(device), int(dim)
    rows = run_demo(seq_len, heads, kv_heads, dim, device, show)
    click.echo(f"\nseq_len={seq_len} heads={heads}/{kv_heads} dim={dim} on {device}")
    click.echo(f"{'pattern':<14}{'density':>9}{'rel.err vs dense':>18}{'backend':>11}{'ms':>10}")
    for name, density, err, backend, ms in rows:
        click.echo(f"{name:<14}{density:>9.3f}{err:>18.3e}{backend:>11}{ms:>10.1f}")
    click.echo("\nrel.err vs dense: how far each pattern's output is from full causal attention on these random "
               "inputs. Random q/k spread attention over every key, so skipping blocks changes the output a lot "
               "(0.1-1 is expected); trained models concentrate attention, which is what the sparsity methods "
               "exploit (see `sparse-attn eval`). The dense row is the kernel's own error.")


@main.command()
@click.option("--model", "model_path", required=True,
              help="'canary' (the shipped model) or a local transformers model directory (config, weights, tokenizer)")
@click.option("--method", default="xattention", show_default=True)
@click.option("--knob", "knobs", multiple=True, help="method knob NAME=VALUE (JSON value), repeatable")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="SparseConfig JSON/YAML file (instead of --method/--knob)")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--min-kv-len", default=None, type=int, help="override the dense-below length (tokens, >= 0)")
@click.option("--device", default=None)
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
def generate(model_path, method, knobs, config_path, prompt_file, max_new_tokens, min_kv_len, device, dtype):
    """Prefill PROMPT dense and sparse (timed), then generate with the sparse model."""
    import torch
    from transformers import AutoTokenizer

    from .integrations.hf import SparseConfig, load_model, patch

    model_path, device = _model_dir(model_path), _device(device)
    with open(prompt_file) as fh:
        prompt = fh.read()
    if not prompt.strip():
        raise click.BadParameter(f"{prompt_file} is empty; give a file with the prompt text",
                                 param_hint="--prompt-file")
    if config_path:
        config = SparseConfig.from_file(config_path)
    else:
        config = SparseConfig(method=method, knobs=_parse_knobs(knobs))
    if min_kv_len is not None:
        try:  # SparseConfig checks the value, as it does for the Python API
            config.min_kv_len = min_kv_len
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--min-kv-len") from None
    config.record = True
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    limit = _position_limit(model_path)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise click.BadParameter(f"the prompt has {ids.shape[1]} tokens and --max-new-tokens is {max_new_tokens}, over "
                                 f"the model's {limit} positions (max_position_embeddings)", param_hint="--prompt-file")
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    steps = ["load", "dense prefill", "sparse prefill", "generate"]
    timings = {}
    with click.progressbar(steps, label="sparse-attn generate", item_show_func=lambda s: s or "") as bar:
        for step in bar:
            start = time.perf_counter()
            if step == "load":
                model = load_model(model_path, dtype=torch_dtype, device=device)
            elif step == "dense prefill":
                with torch.no_grad():
                    model(ids)
            elif step == "sparse prefill":
                state = patch(model, config=config)
                with torch.no_grad():
                    model(ids)
            else:
                state.records.clear()
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timings[step] = time.perf_counter() - start
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    click.echo(f"\nprompt tokens: {ids.shape[1]}")
    click.echo(f"prefill dense: {timings['dense prefill'] * 1e3:.1f} ms   sparse ({config.method}): "
               f"{timings['sparse prefill'] * 1e3:.1f} ms (first sparse call includes compilation)")
    for row in state.summary():
        click.echo(f"  layer {row['layer']}: density {row['density']:.3f}, estimate {row['estimate_ms']:.1f} ms, "
                   f"{'; '.join(row['reasons'])}")
    click.echo(f"output: {text}")


def _csv(value: str) -> list:
    return [v.strip() for v in value.split(",") if v.strip()]


def _choices(value: str, allowed: list, param_hint: str) -> list:
    """A comma-separated list, each item one of ``allowed``."""
    items = _csv(value)
    unknown = [v for v in items if v not in allowed]
    if not items or unknown:
        raise click.BadParameter(f"{', '.join(unknown) or 'nothing'} given; choose from {', '.join(allowed)} "
                                 "(comma-separated)", param_hint=param_hint)
    return items


def _lengths(value: str, param_hint: str = "--lengths", example: str = "1024,2048") -> list:
    """Comma-separated token counts (prompt lengths, decode budgets), each a positive int."""
    try:
        lengths = [int(v) for v in _csv(value)]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"{value!r}: give positive token counts, comma-separated (e.g. {example})",
                                 param_hint=param_hint)
    return lengths


def _check_out_dir(out: str, what: str) -> None:
    """BadParameter naming --out unless the directory of ``out`` exists."""
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise click.BadParameter(f"{out_dir} is not a directory: {what} cannot be written there", param_hint="--out")


def _check_positions(path: str, lengths: list) -> None:
    """BadParameter naming --lengths when the longest length is over the model's positions."""
    limit = _position_limit(path)
    if limit is not None and max(lengths) > limit:
        raise click.BadParameter(f"{max(lengths)} is over the model's {limit} positions (max_position_embeddings)",
                                 param_hint="--lengths")


def _read_text(path, param_hint: str, purpose: str):
    """The contents of the text file ``path`` (None: None); BadParameter naming ``param_hint`` when it
    does not exist or is empty."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise click.BadParameter(f"{path} does not exist", param_hint=param_hint)
    with open(path) as fh:
        text = fh.read()
    if not text.strip():
        raise click.BadParameter(f"{path} is empty; give a file with {purpose} text", param_hint=param_hint)
    return text


def _decode_options(ctx, methods, budgets, page, sink, recent, bounds="exact"):
    """The decode axis's checked options: ``(methods, budgets)``, ``([], [])`` without
    ``--decode-methods``. Every (method, budget) is checked by SparseConfig (one validation for the API
    and the CLI), its error naming the option at fault."""
    from click.core import ParameterSource

    from .eval.runner import DECODE_METHODS, decode_config, decode_knobs

    if not methods.strip():
        given = [f"--decode-{name}" for name in ("budgets", "page", "sink", "recent", "bounds")
                 if ctx.get_parameter_source(f"decode_{name}") == ParameterSource.COMMANDLINE]
        if given:
            raise click.BadParameter("the decode axis runs only with --decode-methods (e.g. quest,pooled,sink_window)",
                                     param_hint=given[0])
        return [], []
    method_list = _choices(methods, list(DECODE_METHODS), "--decode-methods")
    budget_list = _lengths(budgets, "--decode-budgets", "128,512,2048")
    try:  # the page size, with a budget that holds any sink and recent
        decode_config(method_list[0], decode_knobs(method_list[0], 1 << 30, page, sink, recent, bounds),
                      recall_every=None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--decode-page") from None
    for method in method_list:
        for budget in budget_list:
            try:
                decode_config(method, decode_knobs(method, budget, page, sink, recent, bounds), recall_every=None)
            except ValueError as exc:
                raise click.BadParameter(f"{method} at budget {budget}: {exc}", param_hint="--decode-budgets") from None
    return method_list, budget_list


def _sweeps(specs, method_list, defaults, block_size: int) -> dict:
    """The knob rows per method: ``defaults`` with each ``METHOD:KNOB=V1,V2`` spec replacing its
    method's rows by one per value (the method's other knobs as in its first default row), each
    row checked by SparseConfig."""
    from .integrations.hf import SparseConfig

    sweeps = dict(defaults)
    for spec in specs:
        method, sep, rest = spec.partition(":")
        knob, eq, values = rest.partition("=")
        if not sep or not eq or not knob or not values:
            raise click.BadParameter(f"expected METHOD:KNOB=V1,V2,..., got {spec!r}", param_hint="--sweep")
        if method not in method_list:
            raise click.BadParameter(f"{method!r} is not among --methods ({', '.join(method_list) or 'none'})",
                                     param_hint="--sweep")
        parsed = []
        for raw in values.split(","):
            try:
                parsed.append(json.loads(raw))
            except json.JSONDecodeError:
                parsed.append(raw)
        base = {name: value for name, value in defaults[method][0].items() if name != knob}
        sweeps[method] = [{**base, knob: value} for value in parsed]
        for row in sweeps[method]:
            try:
                SparseConfig(method=method, knobs={**row, "block_size": block_size})
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--sweep") from None
    return sweeps


@main.command("eval")
@click.option("--model", "model_path", default="canary", show_default=True,
              help="local transformers model directory, or 'canary' for the shipped canary model")
@click.option("--methods", default="xattention,flexprefill,vertical_slash", show_default=True,
              help="comma-separated methods, each over its knob range; 'none': the model's own attention only")
@click.option("--lengths", default="1024,2048", show_default=True)
@click.option("--tasks", default="passkey,multikey,multivalue,vartrack", show_default=True)
@click.option("--samples", default=2, show_default=True, type=click.IntRange(min=1),
              help="samples per task and length")
@click.option("--block-size", default="64", show_default=True, type=click.Choice(["16", "32", "64", "128", "256"]))
@click.option("--out", default="results/eval", show_default=True, help="output prefix (.json, .md, .png)")
@click.option("--device", default=None)
@click.option("--decode-methods", default="", show_default="none",
              help="decode axis: page-selection methods for the generated tokens after a dense prefill "
                   "(comma-separated: quest, pooled, sink_window); none: no decode axis")
@click.option("--decode-budgets", default="128,256,512,1024,2048", show_default=True,
              help="decode axis: tokens each decode step reads per KV head (comma-separated)")
@click.option("--decode-page", default=16, show_default=True, type=int,
              help="decode axis: page size in tokens (a power of two, 16-256)")
@click.option("--decode-sink", default=None, type=click.IntRange(min=0),
              help="decode axis: first tokens always read (default: one page)")
@click.option("--decode-recent", default=None, type=click.IntRange(min=0),
              help="decode axis: last tokens always read (default: one page; sink_window: the rest of the budget)")
@click.option("--decode-bounds", default="exact", show_default=True, type=click.Choice(["exact", "int8"]),
              help="decode axis: how the page index keeps Quest's bounds (int8: half the bytes to score pages)")
@click.option("--sweep", "sweep_specs", multiple=True, metavar="METHOD:KNOB=V1,V2,...",
              help="sweep these values of one knob of a method instead of its default range (its other knobs "
                   "as in its default range's first row), e.g. seer:threshold=0.005,0.002; repeatable")
@click.option("--profiles", default="", show_default="none",
              help="profiles (sparse-attn profile) to evaluate, each as a row of its own with its per-layer "
                   "choices (comma-separated paths)")
@click.pass_context
def eval_command(ctx, model_path, methods, lengths, tasks, samples, block_size, out, device, decode_methods,
                 decode_budgets, decode_page, decode_sink, decode_recent, decode_bounds, sweep_specs, profiles):
    """Accuracy vs density vs speed: dense and each method over its knob range; with --decode-methods,
    also accuracy of sparse decode (after a dense prefill) per method and budget."""
    import datetime

    import torch
    from transformers import AutoTokenizer

    from .eval.report import write_report
    from .eval.runner import SWEEPS, evaluate
    from .integrations.hf import SparseConfig, load_model
    from .eval.tasks import TASKS

    method_list = [] if methods == "none" else _choices(methods, sorted(SWEEPS), "--methods")
    sweeps = _sweeps(sweep_specs, method_list, SWEEPS, int(block_size))
    task_list = _choices(tasks, list(TASKS), "--tasks")
    length_list = _lengths(lengths)
    decode_list, budget_list = _decode_options(ctx, decode_methods, decode_budgets, decode_page, decode_sink,
                                               decode_recent, decode_bounds)
    profile_list = [p.strip() for p in profiles.split(",") if p.strip()]
    for profile in profile_list:  # each read now: a missing file or one that is no profile names --profiles
        try:
            SparseConfig.from_profile(profile)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--profiles") from None
    block_size = int(block_size)
    path, device = _model_dir(model_path), _device(device)
    limit = _position_limit(path)
    if limit is not None and max(length_list) > limit:
        raise click.BadParameter(f"{max(length_list)} is over the model's {limit} positions (max_position_embeddings): "
                                 f"prompts that long are out of its range", param_hint="--lengths")
    from .dsa.checkpoint import is_dsa_model
    from .nsa.checkpoint import is_nsa_model

    own = "NSA" if is_nsa_model(path) else "DSA" if is_dsa_model(path) else None
    if own and (method_list or decode_list):
        raise click.BadParameter(f"this model attends with its own {own} layers, which the methods do not replace: "
                                 "pass --methods none (its own attention is the 'dense' row) and no --decode-methods",
                                 param_hint="--methods")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_model(path, dtype=dtype, device=device)
    rows = evaluate(model, tokenizer, method_list, length_list, task_list, samples, block_size,  # progress on stderr
                    sweeps=sweeps, decode_methods=decode_list, decode_budgets=budget_list, decode_page=decode_page,
                    decode_sink=decode_sink, decode_recent=decode_recent, decode_bounds=decode_bounds,
                    profiles=profile_list)
    meta = {"model": model_path, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": datetime.date.today().isoformat(), "block_size": block_size, "samples_per_task": samples}
    if decode_list:
        meta["decode_page"] = decode_page
        meta["decode_bounds"] = decode_bounds
    result = write_report(rows, meta, out)
    click.echo(result["summary"])
    click.echo(result["table"])
    click.echo(f"\nwrote {out}.json, {out}.md" + "".join(f", {p}" for p in result["plots"]))


@main.command("train-gates")
@click.option("--model", "model_path", required=True,
              help="local transformers model directory, or 'canary' for the shipped canary model")
@click.option("--out", required=True, help="the gates file to write (.safetensors; its .json is written beside it)")
@click.option("--lengths", default="1024,2048", show_default=True, help="prompt lengths (comma-separated)")
@click.option("--minutes", required=True, type=click.FloatRange(0, min_open=True), help="wall-time budget")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="stop after this many steps (default: time)")
@click.option("--text", "text_path", default=None, type=click.Path(dir_okay=False),
              help="train on windows of this text file (default: retrieval episodes and the bundled corpus)")
@click.option("--block-size", default="64", show_default=True, type=click.Choice(["16", "32", "64", "128", "256"]))
@click.option("--gate-dim", default=None, type=click.IntRange(min=2), help="gate width (even; default: head_dim)")
@click.option("--lr", default=2e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--resume", is_flag=True, help="continue from OUT.ckpt")
@click.option("--init", "init_path", default=None,
              help="start from these trained gates (a .safetensors; 'canary': the canary's), e.g. to train them "
                   "further at longer lengths; their block size and width are kept")
@click.option("--device", default=None)
def train_gates_command(model_path, out, lengths, minutes, steps, text_path, block_size, gate_dim, lr, resume,
                        init_path, device):
    """Distill SeerAttention-style gates from a frozen model (its block attention mass, KL loss) and
    write them for patch(model, method="seer", gates=OUT)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.hf.train_gates import checkpoint_path, train_gates

    length_list = _lengths(lengths)
    if not out.endswith(".safetensors"):
        raise click.BadParameter(f"{out!r} does not end in .safetensors", param_hint="--out")
    _check_out_dir(out, "the gates")
    if resume and not checkpoint_path(out).is_file():
        raise click.BadParameter(f"no checkpoint {checkpoint_path(out)} to resume from", param_hint="--resume")
    if gate_dim is not None and gate_dim % 2:
        raise click.BadParameter(f"{gate_dim} is odd; give an even width (RoPE rotates pairs)", param_hint="--gate-dim")
    text = _read_text(text_path, "--text", "training")
    path, device = _model_dir(model_path), _device(device)
    _check_positions(path, length_list)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if text is not None and len(tokenizer(text, add_special_tokens=False).input_ids) < max(length_list):
        raise click.BadParameter(f"{text_path} is shorter than the longest length, {max(length_list)} tokens",
                                 param_hint="--text")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device)
    init = None
    if init_path is not None:
        if resume:
            raise click.BadParameter("give --init or --resume, not both (--resume continues OUT.ckpt)",
                                     param_hint="--init")
        from .methods.seer_gate import resolve_gates

        if not resolve_gates(init_path).is_file():
            raise click.BadParameter(f"{init_path!r} is not a gates file", param_hint="--init")
        init = init_path
    summary = train_gates(model, tokenizer, out, length_list, minutes, steps=steps, text=text,
                          block_size=int(block_size), gate_dim=gate_dim, lr=lr, resume=resume, model_name=model_path,
                          init=init)
    click.echo(f"{summary['steps']} steps, {summary['tokens']} tokens in {summary['seconds']:.0f} s; KL "
               f"{summary['first_loss']:.4f} (first steps) -> {summary['last_loss']:.4f} (last steps)")
    click.echo(f"wrote {out}: patch(model, method='seer', gates={out!r}, block_size={block_size})")


def _check_seer_gates(gates: str, model_path: str, block_size: int) -> None:
    """BadParameter naming --gates unless ``gates`` is a gates file of ``block_size`` trained for the
    model at ``model_path`` (read from its config alone)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from .methods import get_method

    try:
        get_method("seer", gates=gates, block_size=block_size).check_model(
            SimpleNamespace(config=AutoConfig.from_pretrained(model_path)))
    except ValueError as exc:  # not a gates file, another block size, another model's
        raise click.BadParameter(str(exc), param_hint="--gates") from None


@main.command("profile")
@click.option("--model", "model_path", required=True,
              help="local transformers model directory, or 'canary' for the shipped canary model")
@click.option("--out", required=True, help="the profile to write (JSON), read by patch(model, profile=...)")
@click.option("--methods", default="xattention,flexprefill,vertical_slash,pooled_topp", show_default=True,
              help="methods to try (comma-separated)")
@click.option("--lengths", default="4096", show_default=True, help="calibration prompt lengths (comma-separated)")
@click.option("--target-recall", default=0.95, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="attention recall each layer's choice must reach on every KV head")
@click.option("--samples", default=2, show_default=True, type=click.IntRange(min=1),
              help="calibration prompts per length")
@click.option("--prompt-file", default=None, type=click.Path(dir_okay=False),
              help="calibration text (windows of it); default: the retrieval tasks' prompts")
@click.option("--block-size", default="64", show_default=True, type=click.Choice(["16", "32", "64", "128", "256"]))
@click.option("--min-kv-len", default=None, type=click.IntRange(min=0),
              help="the config's min_kv_len (default: SparseConfig's)")
@click.option("--gates", default=None,
              help="seer's gates file, trained for this model (sparse-attn train-gates; 'canary': the canary's): "
                   "needed when --methods names seer, whose threshold is then chosen per layer and KV head")
@click.option("--device", default=None)
def profile_command(model_path, out, methods, lengths, target_recall, samples, prompt_file, block_size, min_kv_len,
                    gates, device):
    """Profile once, serve many: measure density and attention recall per layer and KV head at each
    value of each method's main knob, and write the cheapest SparseConfig meeting --target-recall."""
    import torch
    from transformers import AutoTokenizer

    from .integrations.hf import load_model
    from .integrations.hf.profile import PROFILE_SWEEPS, calibration_prompts, profile_model, seer_sweep, write_profile

    method_list = _choices(methods, sorted([*PROFILE_SWEEPS, "seer"]), "--methods")
    sweeps = dict(PROFILE_SWEEPS)
    if "seer" in method_list:
        if gates is None:
            raise click.BadParameter("--methods names seer: give its gates file (--gates PATH, or 'canary')",
                                     param_hint="--gates")
        sweeps["seer"] = seer_sweep(gates)
    length_list = _lengths(lengths, example="4096,16384")
    _check_out_dir(out, "the profile")
    text = _read_text(prompt_file, "--prompt-file", "calibration")
    path, device = _model_dir(model_path), _device(device)
    _check_positions(path, length_list)
    if "seer" in method_list:  # the gates checked against the model's config before its weights load
        _check_seer_gates(gates, path, int(block_size))
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        prompts = calibration_prompts(tokenizer, length_list, samples, text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompt-file" if text is not None else "--lengths") from None
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(path, dtype=dtype, device=device)
    profile = profile_model(model, prompts=prompts, methods=method_list, sweeps=sweeps, target_recall=target_recall,
                            block_size=int(block_size), min_kv_len=min_kv_len, progress=True, model_name=model_path)
    write_profile(profile, out)
    for layer in profile["layers"]:
        knobs = ", ".join(f"{k}={v}" for k, v in layer["knobs"].items())
        if layer["method"] != "dense" and layer["dense_heads"]:
            knobs += f"{', ' if knobs else ''}dense KV heads {layer['dense_heads']}"
        click.echo(f"layer {layer['layer']}: {layer['method']}{f' ({knobs})' if knobs else ''}, "
                   f"density {layer['density']:.3f}, recall >= {min(layer['kv_head_recall']):.3f}")
    click.echo(f"wrote {out}: patch(model, profile={out!r})")


if __name__ == "__main__":
    main()
