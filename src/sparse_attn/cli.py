"""``sparse-attn`` command line: ``demo`` (static patterns vs dense) and ``generate`` (a local HF model,
sparse prefill vs dense, then generation)."""

from __future__ import annotations

import json
import time

import click


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


@click.group()
def main():
    """Block-sparse attention: patterns, methods, and sparse prefill for transformers models."""


@main.command()
@click.option("--seq-len", default=4096, show_default=True)
@click.option("--heads", default=8, show_default=True)
@click.option("--kv-heads", default=2, show_default=True)
@click.option("--dim", default=64, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available)")
@click.option("--show", is_flag=True, help="draw each layout")
def demo(seq_len, heads, kv_heads, dim, device, show):
    """Run each static pattern on random inputs: density, error vs dense, backend, time."""
    import torch

    from .demo import run_demo

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run_demo(seq_len, heads, kv_heads, dim, device, show)
    click.echo(f"\nseq_len={seq_len} heads={heads}/{kv_heads} dim={dim} on {device}")
    click.echo(f"{'pattern':<14}{'density':>9}{'rel.err vs dense':>18}{'backend':>11}{'ms':>10}")
    for name, density, err, backend, ms in rows:
        click.echo(f"{name:<14}{density:>9.3f}{err:>18.3e}{backend:>11}{ms:>10.1f}")


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="local transformers model directory (config, weights, tokenizer)")
@click.option("--method", default="xattention", show_default=True)
@click.option("--knob", "knobs", multiple=True, help="method knob NAME=VALUE (JSON value), repeatable")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="SparseConfig JSON/YAML file (instead of --method/--knob)")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--min-kv-len", default=None, type=int, help="override the dense-below length")
@click.option("--device", default=None)
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
def generate(model_path, method, knobs, config_path, prompt_file, max_new_tokens, min_kv_len, device, dtype):
    """Prefill PROMPT dense and sparse (timed), then generate with the sparse model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.hf import SparseConfig, patch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    steps = ["load", "dense prefill", "sparse prefill", "generate"]
    timings = {}
    with click.progressbar(steps, label="sparse-attn generate", item_show_func=lambda s: s or "") as bar:
        for step in bar:
            start = time.perf_counter()
            if step == "load":
                tokenizer = AutoTokenizer.from_pretrained(model_path)
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype,
                                                             attn_implementation="sdpa").to(device).eval()
                with open(prompt_file) as fh:
                    ids = tokenizer(fh.read(), return_tensors="pt").input_ids.to(device)
            elif step == "dense prefill":
                with torch.no_grad():
                    model(ids)
            elif step == "sparse prefill":
                if config_path:
                    config = SparseConfig.from_file(config_path)
                else:
                    config = SparseConfig(method=method, knobs=_parse_knobs(knobs))
                if min_kv_len is not None:
                    config.min_kv_len = min_kv_len
                config.record = True
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


def _csv(value: str, cast=str) -> list:
    return [cast(v) for v in value.split(",") if v.strip()]


@main.command("eval")
@click.option("--model", "model_path", default="canary", show_default=True,
              help="local transformers model directory, or 'canary' for the shipped canary model")
@click.option("--methods", default="xattention,flexprefill,vertical_slash", show_default=True)
@click.option("--lengths", default="1024,2048", show_default=True)
@click.option("--tasks", default="passkey,multikey,multivalue,vartrack", show_default=True)
@click.option("--samples", default=2, show_default=True, help="samples per task and length")
@click.option("--block-size", default=64, show_default=True)
@click.option("--out", default="results/eval", show_default=True, help="output prefix (.json, .md, .png)")
@click.option("--device", default=None)
def eval_command(model_path, methods, lengths, tasks, samples, block_size, out, device):
    """Accuracy vs density vs speed: dense and each method over its knob range."""
    import datetime

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval.canary import resolve_model
    from .eval.report import write_report
    from .eval.runner import SWEEPS, evaluate

    try:
        path = resolve_model(model_path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    method_list, length_list, task_list = _csv(methods), _csv(lengths, int), _csv(tasks)
    configs = 1 + sum(len(SWEEPS.get(m, [])) for m in method_list)
    total = configs * len(length_list) * len(task_list) * samples
    with click.progressbar(length=total, label="sparse-attn eval") as bar:
        rows = evaluate(model, tokenizer, method_list, length_list, task_list, samples, block_size,
                        progress=bar.update)
    meta = {"model": model_path, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "date": datetime.date.today().isoformat(), "block_size": block_size, "samples_per_task": samples}
    result = write_report(rows, meta, out)
    click.echo(result["table"])
    click.echo(f"\nwrote {out}.json, {out}.md" + "".join(f", {p}" for p in result["plots"]))


if __name__ == "__main__":
    main()
