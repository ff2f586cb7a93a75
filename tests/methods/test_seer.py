"""The ``seer`` method: block selection from trained gates, through ``estimate`` and ``patch()``."""

import pytest
import torch
from integrations.test_train_gates import TEXT, tiny_llama

from sparse_attn.integrations.hf import patch, unpatch
from sparse_attn.integrations.hf.train_gates import capture_qk, train_gates
from sparse_attn.methods import KnobError, get_method


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import AutoTokenizer

    from sparse_attn.eval.canary import canary_dir

    tokenizer = AutoTokenizer.from_pretrained(str(canary_dir()))
    model = tiny_llama()
    out = tmp_path_factory.mktemp("gates") / "gates.safetensors"
    train_gates(model, tokenizer, out, [256], minutes=5, steps=15, text=TEXT, block_size=16, gate_dim=16, lr=1e-2,
                progress=False, model_name="tiny")
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[:, 100:356]
    return model, str(out), ids


def _qk(model, ids):
    with torch.no_grad(), capture_qk(model) as captured:
        model(ids)
    return captured


def test_density_follows_the_threshold_and_top_k(trained):
    model, gates, ids = trained
    q, k = _qk(model, ids)[1]
    densities = [get_method("seer", gates=gates, block_size=16, sink=0, threshold=t).estimate(q, k, 1).density()
                 for t in (0.0, 0.02, 0.1, 0.3)]
    assert densities[0] == 1.0 and densities == sorted(densities, reverse=True) and densities[-1] < 0.5
    kept = [get_method("seer", gates=gates, block_size=16, sink=0, top_k=n).estimate(q, k, 1) for n in (2, 4)]
    nk = kept[0].to_dense().sum(-1)  # key blocks kept per query block: top_k plus the diagonal at most
    assert int(nk.max()) <= 3 and int(kept[1].to_dense().sum(-1).max()) <= 5
    assert kept[0].density() < kept[1].density()


def test_top_p_density_grows_with_the_gate_mass_kept(trained):
    """``top_p``: density grows with p (p = 1 keeps every block), a group at 0 keeps the threshold rule,
    and top_p with top_k is refused."""
    model, gates, ids = trained
    q, k = _qk(model, ids)[1]
    densities = [get_method("seer", gates=gates, block_size=16, sink=0, top_p=p).estimate(q, k, 1).density()
                 for p in (0.5, 0.8, 0.95, 1.0)]
    assert densities == sorted(densities) and densities[0] < densities[2] and densities[-1] == 1.0
    # Per KV group: a group at top_p 0 keeps the threshold rule's blocks.
    mixed = get_method("seer", gates=gates, block_size=16, sink=0, top_p=[0.5, 0.0], threshold=0.05)
    by_p = get_method("seer", gates=gates, block_size=16, sink=0, top_p=0.5).estimate(q, k, 1).to_dense()
    by_threshold = get_method("seer", gates=gates, block_size=16, sink=0, threshold=0.05).estimate(q, k, 1).to_dense()
    got = mixed.estimate(q, k, 1).to_dense()
    half = got.shape[1] // 2
    assert torch.equal(got[:, :half], by_p[:, :half]) and torch.equal(got[:, half:], by_threshold[:, half:])
    with pytest.raises(KnobError, match="top_p"):
        get_method("seer", gates=gates, block_size=16, top_p=0.9, top_k=4)


def test_batches_and_chunked_prefill_keep_one_selection_per_sequence(trained):
    model, gates, ids = trained
    q, k = _qk(model, ids)[0]
    method = get_method("seer", gates=gates, block_size=16, threshold=0.05)
    whole = method.estimate(q, k, 0).to_dense()
    both = method.estimate(torch.cat([q, q.flip(2)]), torch.cat([k, k.flip(2)]), 0).to_dense()
    assert both.shape[0] == 2 and torch.equal(both[:1], whole)
    chunk = method.estimate(q[:, :, 128:], k, 0).to_dense()  # the last 128 queries against every key
    assert torch.equal(chunk[0], whole[0, :, 8:])


def test_report_names_top_k_when_it_keeps_every_block_and_times_the_estimate(trained):
    model, gates, ids = trained
    q, k = _qk(model, ids)[0]
    layout, report = get_method("seer", gates=gates, block_size=16, top_k=16).estimate(q, k, 0, return_report=True)
    assert report.density == 1.0 and report.knob_dense == ("top_k",) and report.seconds > 0
    assert report.method == "seer" and report.layer_idx == 0


def test_patched_model_is_close_to_dense_at_high_density_and_records_density(trained):
    model, gates, ids = trained
    with torch.no_grad():
        dense = model(ids).logits
        state = patch(model, method="seer", gates=gates, block_size=16, threshold=0.001, min_kv_len=0,
                      fallback="never", record=True)
        try:
            sparse = model(ids).logits
            assert all(r["sparse"] for r in state.records) and len(state.records) == 2
            assert min(r["density"] for r in state.records) > 0.5
            low = patch(model, method="seer", gates=gates, block_size=16, top_k=2, sink=0, min_kv_len=0,
                        fallback="never", record=True).records
            model(ids)
            assert max(r["density"] for r in low) < 0.5
        finally:
            unpatch(model)
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=0)


def test_gates_are_checked_when_built_and_patched(trained, tmp_path):
    model, gates, ids = trained
    with pytest.raises(KnobError, match=r"seer: gates='.*none.safetensors' is not a gates file: .* does not exist"):
        get_method("seer", gates=str(tmp_path / "none.safetensors"))
    with pytest.raises(KnobError, match=r"seer: block_size=64 differs from the block size the gates .* \(16\)"):
        get_method("seer", gates=gates, block_size=64)
    with pytest.raises(KnobError, match=r"seer: gates=None is required: pass gates=PATH"):
        patch(model, method="seer", block_size=16, min_kv_len=0)
    with pytest.raises(ValueError, match=r"gates=.* were trained for model tiny \(config hash \w+\), not for model"):
        patch(tiny_llama(layers=3), method="seer", gates=gates, block_size=16)
    with pytest.raises(ValueError, match="seer: layer_idx=None"):
        q, k = _qk(model, ids)[0]
        get_method("seer", gates=gates, block_size=16).estimate(q, k)


def test_the_json_beside_the_gates_names_them_too(trained):
    """The path ``SeerGates.save`` returns (the .json) works wherever the .safetensors does."""
    from sparse_attn.methods.seer_gate import gates_json_path

    model, gates, ids = trained
    q, k = _qk(model, ids)[1]
    by_weights = get_method("seer", gates=gates, block_size=16, top_k=2).estimate(q, k, 1)
    by_json = get_method("seer", gates=str(gates_json_path(gates)), block_size=16, top_k=2).estimate(q, k, 1)
    assert by_json.density() < 1.0
    assert torch.equal(by_json.to_dense(), by_weights.to_dense())


def test_shipped_canary_gates_fit_the_canary_model_and_the_eval_sweep():
    import types

    from transformers import AutoConfig

    from sparse_attn.eval.canary import canary_dir
    from sparse_attn.eval.runner import SWEEPS
    from sparse_attn.methods.seer import load_gates
    from sparse_attn.methods.seer_gate import resolve_gates

    canary = types.SimpleNamespace(config=AutoConfig.from_pretrained(str(canary_dir())))
    gates = load_gates("canary", model=canary)
    assert gates.spec.block_size == 64 and gates.spec.layers == 4
    assert resolve_gates("canary").stat().st_size < 1 << 20
    for knobs in SWEEPS["seer"]:
        get_method("seer", block_size=64, **knobs)
