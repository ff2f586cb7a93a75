"""Decode through a learned gate: patch(model, decode={"method": "seer", "gates": PATH, ...}) scores
each step's pages with the layer's decode gate (sparse_attn.methods.seer.decode_page_shares) and
reads them through the page index; the gates are checked against the config and the model."""

import pytest
import torch
import transformers

from sparse_attn import patch, unpatch
from sparse_attn.integrations.hf import SparseConfig
from sparse_attn.integrations.hf.config import SparseConfigError
from sparse_attn.methods.seer_gate import GatesError, SeerGates

COMMON = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
GEN = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": 6, "min_new_tokens": 6}


def _tiny(seed=0, **changes):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**COMMON, **changes})
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


@pytest.fixture(scope="module")
def gates_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gates") / "gates.safetensors"
    SeerGates.for_model(_tiny(), block_size=32, gate_dim=16).save(path)
    return str(path)


def _ids(length=200):
    return torch.randint(1, COMMON["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))


def test_seer_decode_reads_the_pages_its_gate_picks(gates_file):
    model = _tiny()
    state = patch(model, method="dense", record=True,
                  decode={"method": "seer", "gates": gates_file, "budget": 64, "page": 16, "sink": 16, "recent": 16})
    model.generate(_ids(), **GEN)
    steps = [r for r in state.records if r["decode"]]
    assert steps and all(r["sparse"] for r in steps)
    assert all(r["density"] < 0.4 and r["reason"] == "decode pages: seer budget 64" for r in steps)
    unpatch(model)


def test_gates_are_checked_naming_the_key(gates_file, tmp_path):
    with pytest.raises(SparseConfigError, match="needs gates"):
        SparseConfig(decode={"method": "seer", "budget": 256})
    with pytest.raises(SparseConfigError, match="gates="):
        SparseConfig(decode={"method": "seer", "budget": 256, "gates": str(tmp_path / "missing.safetensors")})
    with pytest.raises(SparseConfigError, match="page=64"):
        SparseConfig(decode={"method": "seer", "budget": 512, "page": 64, "gates": gates_file})
    other = _tiny(num_hidden_layers=3)
    with pytest.raises(GatesError):
        patch(other, method="dense", decode={"method": "seer", "budget": 256, "gates": gates_file})


def test_the_gate_summaries_kept_across_steps_pick_what_pooling_the_whole_cache_picks(gates_file, monkeypatch):
    """The decode gate reads key summaries appended step by step (rebuilt for each new prompt, here
    two prompts of one length back to back): the same tokens and selections as pooling the cache
    at every step."""
    import sparse_attn.integrations.hf.patching as patching

    def run():
        model = _tiny()
        state = patch(model, method="dense", record=True, decode={
            "method": "seer", "gates": gates_file, "budget": 64, "page": 16, "sink": 16, "recent": 16})
        out = [model.generate(_ids().roll(shift, 1), **GEN) for shift in (0, 7)]
        densities = [r["density"] for r in state.records if r["decode"]]
        unpatch(model)
        return out, densities

    with_summaries = run()
    monkeypatch.setattr(patching, "_sync_gate_summaries", lambda *args: None)
    pooling_the_cache = run()
    assert all(torch.equal(a, b) for a, b in zip(with_summaries[0], pooling_the_cache[0]))
    assert with_summaries[1] == pooling_the_cache[1] and len(with_summaries[1]) == 2 * 5 * 2  # prompts x steps x layers
