"""convert_llama (DSA): a tiny random Llama with DSA layers equals the dense model while the token
budget covers every key, keeps the dense projections, trains its indexers (dense warm-up, then sparse)
with the language loss reaching only the rest, decodes through the KV cache as full passes do, and
refuses beam search, padding and bad stages."""

import copy

import pytest
import torch

from sparse_attn.dsa import DSAConfig, DSALlamaAttention, convert_llama, indexer_loss, indexer_parameters, set_stage
from utils import tiny_llama

CONFIG = DSAConfig(index_heads=2, index_head_dim=16, rope_dim=8, top_k=12)


def _ids(length, batch=2, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_budget_covering_every_key_equals_the_dense_model():
    model = tiny_llama(64)
    ids = _ids(12)
    with torch.no_grad():
        dense = model(ids).logits
        converted = convert_llama(copy.deepcopy(model), CONFIG, stage="sparse", backend="reference")
        torch.testing.assert_close(converted(ids).logits, dense, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(converted(_ids(40)).logits, model(_ids(40)).logits, atol=1e-3)  # 40 > top_k
    layer = converted.model.layers[0].self_attn
    assert isinstance(layer, DSALlamaAttention) and layer.q_proj is not model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_warm_up_then_sparse_training_trains_the_indexers_only_by_their_loss():
    model = convert_llama(tiny_llama(64), CONFIG, layers=[1], backend="reference")
    assert not isinstance(model.model.layers[0].self_attn, DSALlamaAttention)
    for p in model.parameters():
        p.requires_grad_(False)
    params = indexer_parameters(model)
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.Adam(params, lr=3e-3)
    ids = _ids(48)
    losses = []
    for _ in range(15):  # the warm-up: dense attention, the indexer learns the dense distribution
        model(ids, use_cache=False)
        loss = indexer_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    set_stage(model, "sparse")
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    out = model(ids, labels=ids, use_cache=False)  # 48 tokens, 12 keys each: sparse
    sparse_loss = indexer_loss(model)
    assert float(sparse_loss.detach()) > 0
    out.loss.backward(retain_graph=True)  # the language loss does not reach the indexer
    assert all(p.grad is None for p in params)
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None
    model.zero_grad()
    sparse_loss.backward()  # nor the indexer loss the model
    assert all(p.grad is not None for p in params)
    assert model.model.layers[1].self_attn.q_proj.weight.grad is None


def test_generate_with_the_kv_cache_equals_full_passes():
    """Greedy decoding past the token budget: the indexer keys kept beside the cache give the logits
    full passes over the growing sequence give."""
    model = convert_llama(tiny_llama(64), CONFIG, stage="sparse", backend="reference")
    ids = _ids(20)
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, **options)
        uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=1e-4, rtol=1e-4)


def test_beam_search_padding_and_bad_stages_raise():
    model = convert_llama(tiny_llama(64), CONFIG, stage="sparse", backend="reference")
    with pytest.raises(ValueError, match="reordered or changed since the last step"):
        with torch.no_grad():
            model.generate(_ids(20), max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="causal mask only"):
        with torch.no_grad():
            model(_ids(8), attention_mask=torch.tensor([[0] * 2 + [1] * 6, [1] * 8]))
    with pytest.raises(ValueError, match="stage must be one of"):
        set_stage(model, "warmup")
    from sparse_attn.integrations.hf import patch

    with pytest.raises(ValueError, match=r"attend with their own module \(DSALlamaAttention"):
        patch(model, method="xattention")
    with pytest.raises(ValueError, match="no DSA layers"):
        set_stage(tiny_llama(64), "dense")
    with pytest.raises(ValueError, match=r"layers must hold layer indices in \[0, 2\)"):
        convert_llama(tiny_llama(64), CONFIG, layers=[2])
    with pytest.raises(ValueError, match=r"DSAConfig.rope_dim \(32\) must be at most the model's head_dim \(16\)"):
        convert_llama(tiny_llama(64), CONFIG.replace(index_head_dim=32, rope_dim=32))
    with pytest.raises(TypeError, match="config must be a DSAConfig"):
        convert_llama(tiny_llama(64), {"top_k": 4})


def test_a_saved_dsa_model_loads_with_its_indexers_and_stage(tmp_path):
    from sparse_attn.dsa import is_dsa_model, load_dsa_model, save_dsa_model
    from sparse_attn.integrations.hf import load_model

    model = convert_llama(tiny_llama(64), CONFIG, layers=[0], stage="sparse", backend="reference")
    with torch.no_grad():
        for p in indexer_parameters(model):
            p.add_(torch.randn_like(p))
    ids = _ids(40)
    with torch.no_grad():
        want = model(ids).logits
    save_dsa_model(model, tmp_path / "dsa")
    assert is_dsa_model(tmp_path / "dsa") and not is_dsa_model(tmp_path)
    for loaded in (load_dsa_model(tmp_path / "dsa", backend="reference"), load_model(tmp_path / "dsa")):
        assert isinstance(loaded.model.layers[0].self_attn, DSALlamaAttention)
        assert not isinstance(loaded.model.layers[1].self_attn, DSALlamaAttention)
        assert loaded.model.layers[0].self_attn.stage == "sparse" and not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want)
    with pytest.raises(ValueError, match="model has no DSA attention layer"):
        save_dsa_model(tiny_llama(64), tmp_path / "plain")
    with pytest.raises(ValueError, match="has no dsa.json"):
        load_dsa_model(tmp_path)


def test_sparse_attn_eval_runs_a_dsa_model_with_its_own_attention_and_refuses_methods(tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from sparse_attn.cli import main
    from sparse_attn.dsa import save_dsa_model
    from sparse_attn.eval.canary import canary_dir

    model = convert_llama(tiny_llama(259, positions=2048), CONFIG.replace(top_k=64), stage="sparse")
    save_dsa_model(model, tmp_path / "dsa")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(canary_dir() / name, tmp_path / "dsa" / name)
    common = ["eval", "--model", str(tmp_path / "dsa"), "--lengths", "512", "--tasks", "passkey", "--samples", "1",
              "--device", "cpu", "--out", str(tmp_path / "eval_dsa")]
    result = CliRunner().invoke(main, [*common, "--methods", "none"])
    assert result.exit_code == 0, result.output
    assert [row["method"] for row in json.loads((tmp_path / "eval_dsa.json").read_text())["rows"]] == ["dense"]
    result = CliRunner().invoke(main, [*common, "--methods", "xattention"])
    assert result.exit_code != 0 and "attends with its own DSA layers" in result.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_generate_through_the_triton_kernels_equals_full_passes():
    """float16 on a GPU (the Triton token-sparse kernels, lists split over programs in the decode
    steps): decoding through the cache gives the logits full passes give, step by step, as long as
    both picked the same tokens (at least the first four)."""
    model = convert_llama(tiny_llama(64, hidden_size=128, heads=8, kv_heads=2), CONFIG.replace(top_k=32),
                          stage="sparse").to("cuda", torch.float16)
    ids = _ids(80).cuda()
    options = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True,
                   return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(ids, **options)
        uncached = model.generate(ids, use_cache=False, **options)
    new_cached, new_uncached = cached.sequences[:, 80:], uncached.sequences[:, 80:]
    same = int((new_cached == new_uncached).all(0).int().cumprod(0).sum())  # steps before the first difference
    assert same >= 4
    for step in range(same):
        torch.testing.assert_close(cached.logits[step].float(), uncached.logits[step].float(), atol=2e-2, rtol=2e-2)
