"""The SeerAttention gate module: pooled features, RoPE at pooled positions, causal block scores shared
by each KV group, the decode gate, and reading and writing gates files."""

import json

import pytest
import torch

from sparse_attn.methods.seer_gate import (GateSpec, GatesError, SeerGate, SeerGates, block_shares_to_pages,
                                           default_inv_freq, pooled_keys, rope)


def _spec(**overrides):
    base = dict(layers=2, heads=4, kv_heads=2, head_dim=16, block_size=16, gate_dim=8, rope_theta=10000.0,
                rope_scaling=1.0, model_hash="abc", model_name="tiny")
    return GateSpec(**{**base, **overrides})


def test_pooled_keys_are_the_max_min_and_mean_of_each_block():
    k = torch.randn(2, 3, 37, 8)
    got = pooled_keys(k, 16)
    assert got.shape == (2, 3, 3, 24)
    for b in range(3):
        part = k[:, :, b * 16:(b + 1) * 16]
        want = torch.cat([part.amax(2), part.amin(2), part.mean(2)], -1)
        torch.testing.assert_close(got[:, :, b], want)


def test_pooled_keys_leave_out_keys_past_each_length():
    k = torch.randn(2, 1, 32, 4)
    got = pooled_keys(k, 16, lengths=torch.tensor([20, 32]))
    part = k[0, :, 16:20]
    torch.testing.assert_close(got[0, :, 1], torch.cat([part.amax(1), part.amin(1), part.mean(1)], -1))
    torch.testing.assert_close(got[1], pooled_keys(k[1:], 16)[0])


def test_rope_matches_transformers_llama_and_inverts():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(1, 2, 10, 16)
    inv_freq = default_inv_freq(16, 500.0)
    pos = torch.arange(5, 15)
    angles = pos[:, None].float() * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    want, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(rope(x, pos, inv_freq), want)
    torch.testing.assert_close(rope(rope(x, pos, inv_freq), pos, inv_freq, inverse=True), x, atol=1e-5, rtol=1e-5)


def test_gate_rotates_pooled_features_at_each_blocks_first_position():
    torch.manual_seed(0)
    gate = SeerGate(4, 2, 16, 8)
    q, k = torch.randn(1, 4, 48, 16), torch.randn(1, 2, 48, 16)
    logits = gate(q, k, 16)
    pooled_q = q.view(1, 2, 2, 3, 16, 16).mean(4).transpose(2, 3).flatten(3)  # (B, Hkv, NQ, G*D)
    qf = rope(torch.einsum("bnqi,nio->bnqo", pooled_q, gate.q_weight), torch.tensor([0, 16, 32]), gate.inv_freq)
    kf = rope(torch.einsum("bnki,nio->bnko", pooled_keys(k, 16), gate.k_weight), torch.tensor([0, 16, 32]),
              gate.inv_freq)
    want = (qf @ kf.transpose(-1, -2)) / 8 ** 0.5
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    torch.testing.assert_close(logits[..., causal], want[..., causal])
    assert torch.isinf(logits[..., ~causal]).all()


def test_gate_scores_are_causal_per_kv_group_and_in_chunked_prefill():
    torch.manual_seed(0)
    gate = SeerGate(6, 2, 16, 8)
    q, k = torch.randn(2, 6, 40, 16), torch.randn(2, 2, 100, 16)  # chunked prefill: the last 40 positions
    logits = gate(q, k, 16)
    assert logits.shape == (2, 2, 3, 7)
    reach = torch.isfinite(logits)
    assert reach[..., 0].all() and not reach[:, :, 0, 6].any() and reach[:, :, 2, 6].all()
    # Keys after a query block's last position do not change its scores.
    k2 = k.clone()
    k2[:, :, 80:] = torch.randn(2, 2, 20, 16)
    torch.testing.assert_close(gate(q, k2, 16)[:, :, :1, :5], logits[:, :, :1, :5])


def test_gate_shares_the_group_query_heads_and_one_kv_head():
    torch.manual_seed(0)
    gate = SeerGate(4, 2, 16, 8)
    q, k = torch.randn(1, 4, 32, 16), torch.randn(1, 2, 32, 16)
    base = gate(q, k, 16)
    q2 = q.clone()
    q2[:, 2:] = torch.randn(1, 2, 32, 16)  # the second group's query heads
    k2 = k.clone()
    k2[:, 1] = torch.randn(1, 32, 16)  # the second KV head
    other = gate(q2, k2, 16)
    torch.testing.assert_close(other[:, 0], base[:, 0])
    assert not torch.allclose(other[:, 1][torch.isfinite(other[:, 1])], base[:, 1][torch.isfinite(base[:, 1])])


def test_decode_gate_is_the_prefill_gate_of_one_query_block():
    torch.manual_seed(0)
    gate = SeerGate(4, 2, 16, 8)
    k = torch.randn(1, 2, 64, 16)
    q = torch.randn(1, 4, 1, 16)  # the query at position 63
    probs = gate.decode_probs(q, k, 16)
    assert probs.shape == (1, 2, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2))
    # A prefill gate with a 1-row query block at position 63 scores the same blocks.
    qf = gate.query_features(q, 1, torch.tensor([63]))
    kf = gate.key_features(k, 16, torch.arange(4) * 16)
    want = torch.softmax(gate.scores(qf, kf, torch.ones(1, 4, dtype=torch.bool)), -1)[:, :, 0]
    torch.testing.assert_close(probs, want)


def test_decode_gate_leaves_out_blocks_past_each_length_and_pages_split_block_shares():
    torch.manual_seed(0)
    gate = SeerGate(4, 2, 16, 8)
    k = torch.randn(2, 2, 64, 16)
    q = torch.randn(2, 4, 1, 16)
    probs = gate.decode_probs(q, k, 32, lengths=torch.tensor([40, 64]))
    assert probs.shape == (2, 2, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2))
    # the first sequence's second block holds 8 tokens: pages of 16 get 8/8 and 0/8 of it
    tokens = torch.tensor([[16, 16, 8, 0], [16, 16, 16, 16]])
    pages = block_shares_to_pages(probs, 32, 16, tokens)
    torch.testing.assert_close(pages.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(pages[0, :, 2], probs[0, :, 1])
    torch.testing.assert_close(pages[1, :, 0], probs[1, :, 0] / 2)
    with pytest.raises(ValueError, match="block_size=16 is not a multiple of page_size=32"):
        block_shares_to_pages(probs, 16, 32, tokens)


def test_gates_round_trip_and_refuse_another_models_config(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(layers):
        config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
        return LlamaForCausalLM(config)

    model = tiny(2)
    gates = SeerGates.for_model(model, block_size=16, name="tiny-2")
    path = tmp_path / "gates.safetensors"
    meta = json.loads(gates.save(path, extra={"steps": 3}).read_text())
    assert meta["spec"]["model_name"] == "tiny-2" and meta["steps"] == 3
    loaded = SeerGates.load(path, model=model)
    for a, b in zip(gates.gates, loaded.gates):
        torch.testing.assert_close(b.q_weight, a.q_weight.to(torch.bfloat16).float())
        torch.testing.assert_close(b.k_weight, a.k_weight.to(torch.bfloat16).float())
    torch.testing.assert_close(loaded.model_inv_freq, model.model.rotary_emb.inv_freq)
    with pytest.raises(GatesError, match=r"trained for model tiny-2 \(config hash \w+\), not for model "
                                         r"LlamaForCausalLM \(config hash \w+\)"):
        SeerGates.load(path, model=tiny(3))
    with pytest.raises(GatesError, match="does not exist"):
        SeerGates.read_spec(tmp_path / "none.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(GatesError, match="has no gates.json next to it"):
        SeerGates.read_spec(path)


def test_unrotate_recovers_the_pre_rope_keys_of_a_llama_layer():
    gates = SeerGates(_spec(), default_inv_freq(16, 10000.0))
    x = torch.randn(1, 2, 12, 16)
    pos = torch.arange(30, 42)
    rotated = rope(x, pos, gates.model_inv_freq)
    torch.testing.assert_close(gates.unrotate(rotated, 30), x, atol=1e-5, rtol=1e-5)
