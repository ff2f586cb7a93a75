"""Patched models on inputs and architectures the sparse path does not compute itself give the unpatched
model's outputs: a right-padded prompt in a static cache, a 4-D mask of one row broadcast over the
batch, attention sinks (gpt-oss), bidirectional encoders, and MLA (value head dim unlike the query's)
with a padded batch. Tiny random-weight models on CPU; the patch forces every block to be kept, so
any difference is the integration's."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import patch, unpatch  # noqa: E402
from utils import tiny_llama  # noqa: E402

FORCED_DENSE = dict(method="dense", min_kv_len=0, fallback="never", record=True)
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _model(config, implementation="sdpa", cls=transformers.AutoModelForCausalLM):
    torch.manual_seed(0)
    return cls.from_config(config, attn_implementation=implementation).float().eval()


def _patched_vs_unpatched(model, run, **patch_kwargs):
    """``(unpatched output, patched output, the patch's records)`` of ``run(model)``."""
    with torch.no_grad():
        want = run(model)
        state = patch(model, **{**FORCED_DENSE, **patch_kwargs})
        try:
            got = run(model)
        finally:
            unpatch(model)
    return want, got, state.records


@pytest.mark.parametrize("max_cache_len", [64, 8192])
def test_right_padded_prompt_in_a_static_cache(max_cache_len):
    """Every row ends in padding, so the mask does not tell the cache's filled length: the per-sequence
    run would place the queries past the prompt and return zeros; the mask's rows show they sit
    elsewhere, and the call runs dense, with the reason."""
    model = tiny_llama(96)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 12:] = 0
    mask[1, 15:] = 0

    def run(m):
        cache = transformers.StaticCache(config=m.config, max_cache_len=max_cache_len)
        return m(ids, attention_mask=mask, past_key_values=cache).logits

    want, got, records = _patched_vs_unpatched(model, run)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert records and all(not r["sparse"] and "causal with padding" in r["reason"] for r in records)


def test_one_mask_row_broadcast_over_the_batch():
    """A (1, 1, T, T) mask (the first 5 keys masked, then causal) applies to every sequence of the batch."""
    model = tiny_llama(96)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    mask[:, :5] = False
    want, got, records = _patched_vs_unpatched(model, lambda m: m(ids, attention_mask=mask[None, None]).logits)
    torch.testing.assert_close(got[:, 5:], want[:, 5:], atol=1e-5, rtol=1e-5)
    assert records and all(r["sparse"] for r in records)


def test_attention_sinks_run_the_models_own_attention():
    """gpt-oss adds a learned sink logit per head (``s_aux``), which neither the sparse kernels nor SDPA
    compute: its layers run the model's eager attention, given the mask it expects, prefill and decode."""
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    config = transformers.GptOssConfig(num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=128,
                                       layer_types=["full_attention", "full_attention"], **SMALL)
    model = _model(config, implementation="eager")
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "sinks"):
                module.sinks.normal_(0, 2.0)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    run = lambda m: m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,  # noqa: E731
                               output_scores=True, return_dict_in_generate=True)
    want, got, records = _patched_vs_unpatched(model, run)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert records and all(r["reason"].startswith("attention sinks") for r in records)


def test_bidirectional_encoder_runs_its_own_attention():
    """A BERT encoder's attention is not causal: the patched model runs its own (SDPA) attention."""
    model = _model(transformers.BertConfig(**SMALL), cls=transformers.AutoModel)
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    want, got, records = _patched_vs_unpatched(model, lambda m: m(ids).last_hidden_state)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert records and all(r["reason"].startswith("non-causal attention") for r in records)


def test_padded_batch_with_a_value_head_dim_unlike_the_querys():
    """DeepSeek-V3's MLA: keys of 24 dims, values of 16, a left-padded batch run per sequence."""
    config = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=2,
        n_group=1, topk_group=1)
    model = _model(config)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :6] = 0
    want, got, records = _patched_vs_unpatched(model, lambda m: m(ids, attention_mask=mask).logits)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)
    assert records and all(r["sparse"] for r in records)
