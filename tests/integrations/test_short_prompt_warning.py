"""patch() says once, with the reason, when prompts stay dense for being shorter than min_kv_len."""

import warnings

import pytest
import torch

import sparse_attn

transformers = pytest.importorskip("transformers")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def test_first_dense_prefill_for_length_warns_once():
    model = tiny_llama()
    sparse_attn.patch(model, method="xattention", min_kv_len=256)
    ids = torch.randint(0, 64, (1, 100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(ids)
            model(ids)
    said = [w for w in caught if "min_kv_len=256" in str(w.message)]
    assert len(said) == 1 and "100-token prefill runs dense" in str(said[0].message)
    sparse_attn.unpatch(model)


def test_long_enough_prompts_do_not_warn():
    model = tiny_llama()
    sparse_attn.patch(model, method="xattention", min_kv_len=64, block_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 128)))
    assert not [w for w in caught if "min_kv_len" in str(w.message)]


def test_a_dense_prefill_method_says_nothing():
    """method="dense" (e.g. with sparse decode only) asks for no sparse prefill: no warning."""
    model = tiny_llama()
    sparse_attn.patch(model, method="dense", decode={"method": "quest", "budget": 32, "page": 16, "sink": 0,
                                                     "recent": 16})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(torch.randint(0, 64, (1, 40)))
    assert not [w for w in caught if "min_kv_len" in str(w.message)]
    sparse_attn.unpatch(model)
