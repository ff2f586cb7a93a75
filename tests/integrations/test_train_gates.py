"""Distilling seer gates from a frozen tiny Llama: targets, loss, checkpoints and the CLI command."""

import json

import pytest
import torch
import utils
from click.testing import CliRunner

from sparse_attn.integrations.hf.train_gates import (capture_qk, checkpoint_path, distill_loss, gate_targets,
                                                     kl_loss, train_gates)
from sparse_attn.methods.seer_gate import SeerGates
from sparse_attn.methods.selection import select_top_k

TEXT = " ".join(f"line {i}: the {['red', 'blue', 'green'][i % 3]} key opens door {i * 7 % 13}." for i in range(400))


def tiny_llama(layers=2, seed=0, sharpen=8.0):
    """A random tiny Llama whose attention is far from uniform (its Q and K projections scaled up)."""
    model = utils.tiny_llama(300, layers=layers, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparse_attn.eval.canary import canary_dir

    return AutoTokenizer.from_pretrained(str(canary_dir()))


def test_targets_equal_a_dense_softmax_block_mass():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 72, 16)  # chunked prefill: the last 40 of 72 positions
    got = gate_targets(q, k, 16)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / 4
    allowed = torch.arange(72)[None, :] <= torch.arange(32, 72)[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)  # (B, H, 40, 72)
    rows = torch.nn.functional.pad(probs, (0, 8)).view(2, 4, 40, 5, 16).sum(-1)
    per_block = torch.nn.functional.pad(rows, (0, 0, 0, 8)).view(2, 4, 3, 16, 5).sum(3)
    per_block = per_block / torch.tensor([16.0, 16.0, 8.0])[:, None]
    want = per_block.view(2, 2, 2, 3, 5).mean(2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, 3))


def test_kl_loss_is_zero_at_the_target_and_positive_elsewhere():
    target = torch.tensor([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]])
    logits = torch.log(target).masked_fill(target == 0, float("-inf"))
    assert float(kl_loss(logits, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_loss(torch.zeros(2, 3).masked_fill(target == 0, float("-inf")), target)) > 0.05


def test_capture_records_every_layers_queries_and_keys_and_restores_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        want = model(ids).logits
        with capture_qk(model) as captured:
            got = model(ids).logits
    assert sorted(captured) == [0, 1]
    assert captured[0][0].shape == (1, 4, 48, 16) and captured[0][1].shape == (1, 2, 48, 16)
    torch.testing.assert_close(got, want)
    assert model.config._attn_implementation == "sdpa"


def _recall(keep, target):
    return float((target * keep).sum(-1).mean())


def test_short_distillation_lowers_the_loss_and_beats_random_selection(tmp_path, tokenizer):
    model = tiny_llama()
    out = tmp_path / "gates.safetensors"
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[:, 500:756]
    with torch.no_grad(), capture_qk(model) as captured:
        model(ids)
    untrained = SeerGates.for_model(model, block_size=16, gate_dim=16)
    before = distill_loss(untrained, captured, 16).item()
    summary = train_gates(model, tokenizer, out, [256], minutes=5, steps=40, text=TEXT, block_size=16, gate_dim=16,
                          lr=1e-2, progress=False)
    assert summary["steps"] == 40 and summary["tokens"] == 40 * 256
    assert summary["last_loss"] < 0.7 * summary["first_loss"]
    gates = SeerGates.load(out, model=model)
    after = float(distill_loss(gates, captured, 16))
    assert after < 0.7 * before
    # Recall at 4 of 16 key blocks per query block: the gate's choice closes most of the gap between a
    # random choice and the best one (the 4 blocks of most mass).
    recalls, random_recalls, best_recalls = [], [], []
    for layer, (q, k) in captured.items():
        target = gate_targets(q, k, 16)
        logits = gates.gates[layer](gates.unrotate(q, 0), gates.unrotate(k, 0), 16)
        valid = torch.isfinite(logits)
        recalls.append(_recall(select_top_k(logits, 4, valid=valid), target))
        noise = torch.rand(logits.shape, generator=torch.Generator().manual_seed(layer))
        random_recalls.append(_recall(select_top_k(noise, 4, valid=valid), target))
        best_recalls.append(_recall(select_top_k(target.masked_fill(~valid, -1.0), 4, valid=valid), target))
    gained, possible = sum(recalls) - sum(random_recalls), sum(best_recalls) - sum(random_recalls)
    assert possible > 0.05 and gained > 0.6 * possible, (recalls, random_recalls, best_recalls)


def test_training_resumes_from_its_checkpoint(tmp_path, tokenizer):
    model = tiny_llama(layers=1)
    out = tmp_path / "gates.safetensors"
    first = train_gates(model, tokenizer, out, [128], minutes=5, steps=3, text=TEXT, block_size=16, progress=False)
    assert checkpoint_path(out).is_file() and first["steps"] == 3
    again = train_gates(model, tokenizer, out, [128], minutes=5, steps=5, text=TEXT, block_size=16, progress=False,
                        resume=True)
    assert again["steps"] == 5 and again["tokens"] == 5 * 128
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["training"]["steps"] == 5
    with pytest.raises(ValueError, match="is for model .* not this one"):
        train_gates(tiny_llama(layers=2), tokenizer, out, [128], minutes=5, steps=6, text=TEXT, block_size=16,
                    progress=False, resume=True)


def test_training_starts_from_given_gates(tmp_path, tokenizer):
    """init=GATES: the first step starts from those gates (its loss is theirs, below fresh gates'),
    their block size and width are kept, and the total time counts their training."""
    model = tiny_llama(layers=1)
    first = tmp_path / "first.safetensors"
    trained = train_gates(model, tokenizer, first, [128], minutes=5, steps=12, text=TEXT, block_size=16,
                          gate_dim=8, progress=False)
    out = tmp_path / "more.safetensors"
    more = train_gates(model, tokenizer, out, [128], minutes=5, steps=2, text=TEXT, block_size=64, progress=False,
                       init=first)
    spec = SeerGates.read_spec(out)
    assert (spec.block_size, spec.gate_dim) == (16, 8)
    fresh = train_gates(model, tokenizer, tmp_path / "fresh.safetensors", [128], minutes=5, steps=2, text=TEXT,
                        block_size=16, gate_dim=8, progress=False)
    assert more["first_loss"] < fresh["first_loss"]
    assert more["init"] == str(first) and more["total_seconds"] >= trained["total_seconds"]
    with pytest.raises(ValueError, match="init gates .* were trained for model"):
        train_gates(tiny_llama(layers=2), tokenizer, tmp_path / "x.safetensors", [128], minutes=5, steps=1,
                    text=TEXT, progress=False, init=first)


@pytest.mark.parametrize("args,option,message", [
    (["--out", "g.bin"], "--out", "does not end in .safetensors"),
    (["--out", "/nonexistent/dir/g.safetensors"], "--out", "is not a directory"),
    (["--lengths", "0"], "--lengths", "give positive token counts"),
    (["--minutes", "0"], "--minutes", "0"),
    (["--steps", "0"], "--steps", "0"),
    (["--text", "/nonexistent.txt"], "--text", "does not exist"),
    (["--resume"], "--resume", "no checkpoint"),
    (["--init", "/nonexistent.safetensors"], "--init", "is not a gates file"),
    (["--gate-dim", "7"], "--gate-dim", "is odd"),
    (["--model", "/nonexistent"], "--model", "is not a directory"),
])
def test_train_gates_command_errors_name_the_option(tmp_path, args, option, message):
    from sparse_attn.cli import main

    base = {"--model": "canary", "--out": str(tmp_path / "g.safetensors"), "--minutes": "1"}
    for name, value in zip(args[::2], args[1::2]):
        base[name] = value
    argv = ["train-gates"] + [x for kv in base.items() for x in kv] + [a for a in args if a == "--resume"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert option in result.output and message in result.output, result.output


def test_train_gates_command_writes_gates_for_the_model(tmp_path):
    from sparse_attn.cli import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "g.safetensors"
    result = CliRunner().invoke(main, ["train-gates", "--model", "canary", "--out", str(out), "--lengths", "128",
                                       "--minutes", "1", "--steps", "2", "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert "2 steps, 256 tokens" in result.output
    spec = SeerGates.read_spec(out)
    assert (spec.layers, spec.heads, spec.kv_heads, spec.block_size) == (4, 6, 2, 64)
