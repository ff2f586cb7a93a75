"""The pre-check (an estimate on sampled query blocks before the full one) and the decision cache:
diffuse attention skips the full estimate, planted sparse attention runs with the same layout as
without the pre-check, cached decisions are reused and invalidated."""

import math

import pytest
import torch

from sparse_attn.methods import CostModel, DecisionCache, KnobError, Precheck, attend, get_method
from sparse_attn.methods.base import Method
from sparse_attn.methods.precheck import _reachable, sample_density
from planted import planted

LENGTH, BLOCK = 1024, 32


@pytest.fixture
def estimates(monkeypatch):
    """The query lengths of every block selection a method runs (``estimate`` and the pre-check's
    ``keep_mask`` alike; full estimates have ``LENGTH`` rows)."""
    calls = []
    real = Method._keep

    def spy(self, q, k, *args, **kwargs):
        calls.append(q.shape[2])
        return real(self, q, k, *args, **kwargs)

    monkeypatch.setattr(Method, "_keep", spy)
    return calls


def _diffuse(length=LENGTH):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, length, 32, generator=gen) * 0.1
    k = torch.randn(1, 2, length, 32, generator=gen) * 0.1
    return q, k, torch.randn(1, 2, length, 32, generator=gen)


def _band():
    q, k, _ = planted("band", q_len=LENGTH, dim=32)
    return q, k, torch.randn_like(k)


CACHED = Precheck(cache=True)


def _xattention(**knobs):
    return get_method("xattention", block_size=BLOCK, stride=4, dense_above=0.6, **knobs)


def _sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                                            v.repeat_interleave(group, 1), is_causal=True)


def test_diffuse_attention_skips_the_full_estimate_and_runs_dense(estimates):
    q, k, v = _diffuse()
    out, report = attend(q, k, v, _xattention(), precheck=Precheck())
    assert not report.used_sparse and report.layout is None and report.estimate_ms == 0.0
    assert LENGTH not in estimates and len(estimates) == 4  # four sampled runs, no full estimate
    assert sum(estimates) == 4 * BLOCK  # max(runs, 1/32 of 32 query blocks) = 4 blocks, one per run
    pre = report.precheck
    assert pre.outcome == "dense" and pre.skipped_estimate and pre.ms > 0
    assert min(pre.density_per_kv_head) >= 0.6
    assert report.reason.startswith("dense: pre-check on") and "dense_above 0.6" in report.reason
    spans = Precheck().spans(LENGTH // BLOCK)
    reach = sum(_reachable(LENGTH, LENGTH, BLOCK, BLOCK, a, b) for a, b in spans)
    assert pre.share == pytest.approx(reach / _reachable(LENGTH, LENGTH, BLOCK, BLOCK, 0, LENGTH // BLOCK))
    assert pre.share < 0.2
    assert torch.allclose(out, _sdpa(q, k, v), atol=1e-6)


def test_with_a_cost_model_the_sample_is_predicted_like_the_call(estimates):
    q, k, v = _diffuse()
    model = CostModel(min_kv_len=0, sparse_fixed_ms=0.0, dense_tflops=1e-6)  # estimates cost nothing by comparison
    method = get_method("xattention", block_size=BLOCK, stride=4)
    _, report = attend(q, k, v, method, cost_model=model, precheck=Precheck())
    assert report.precheck.outcome == "dense" and LENGTH not in estimates
    assert "KV heads full" in report.reason and ">= dense" in report.reason
    estimates.clear()
    q, k, v = _band()
    _, report = attend(q, k, v, method, cost_model=model, precheck=Precheck())
    assert report.precheck.outcome == "estimate" and report.used_sparse and estimates.count(LENGTH) == 1


@pytest.mark.parametrize("name,knobs", [("xattention", {"stride": 4}), ("pooled_topp", {}), ("oracle", {})])
def test_planted_sparse_attention_runs_sparse_with_the_layout_it_has_without_the_precheck(estimates, name, knobs):
    q, k, v = _band()
    method = get_method(name, block_size=BLOCK, dense_above=0.6, **knobs)
    out, report = attend(q, k, v, method, precheck=Precheck())
    assert report.used_sparse and report.precheck.outcome == "estimate" and not report.precheck.skipped_estimate
    assert max(report.precheck.density_per_kv_head) < 0.6
    assert estimates.count(LENGTH) == 1 and len(estimates) == 5  # the sample, then the full estimate
    want_out, want = attend(q, k, v, method)
    assert want.precheck is None
    assert torch.equal(report.layout.to_dense(), want.layout.to_dense())
    assert torch.equal(out, want_out)


def test_a_call_too_short_to_sample_runs_the_estimate():
    q, k, v = _diffuse(4 * BLOCK)
    _, report = attend(q, k, v, _xattention(), precheck=Precheck())
    assert report.precheck.outcome == "short" and report.precheck.share == 0.0 and report.layout is not None


def test_decisions_are_cached_per_layer_and_length_bucket_and_invalidated(estimates):
    cache = DecisionCache()
    q, k, v = _diffuse()
    method = _xattention()
    _, report = attend(q, k, v, method, layer_idx=3, precheck=CACHED, decisions=cache)
    assert report.precheck.outcome == "dense" and len(cache) == 1
    short = [t[:, :, :900] for t in (q, k, v)]  # 900 tokens: bucket [512, 1024), 1024 is in [1024, 2048)
    _, report = attend(*short, method, layer_idx=3, precheck=CACHED, decisions=cache)
    assert report.precheck.outcome == "dense" and len(cache) == 2 and cache.hits == 0  # checked, not reused
    _, report = attend(*[t[:, :, :600] for t in (q, k, v)], method, layer_idx=3, precheck=CACHED,
                       decisions=cache)
    assert report.precheck.outcome == "cached dense" and cache.hits == 1  # 600 shares 900's bucket
    estimates.clear()
    out, report = attend(q, k, v, method, layer_idx=3, precheck=CACHED, decisions=cache)
    assert report.precheck.outcome == "cached dense" and report.precheck.skipped_estimate and estimates == []
    assert cache.hits == 2 and "decision cached for layer 3" in report.reason
    assert torch.allclose(out, _sdpa(q, k, v), atol=1e-6)
    # another layer, other knobs or no cache setting: not reused
    for other, kwargs in ((method, {"layer_idx": 4}), (_xattention(threshold=0.8), {"layer_idx": 3})):
        _, report = attend(q, k, v, other, precheck=CACHED, decisions=cache, **kwargs)
        assert report.precheck.outcome == "dense"
    _, report = attend(q, k, v, method, layer_idx=3, precheck=Precheck(cache=False), decisions=cache)
    assert report.precheck.outcome == "dense"
    cache.clear()
    assert len(cache) == 0 and cache.hits == 0
    _, report = attend(q, k, v, method, layer_idx=3, precheck=CACHED, decisions=cache)
    assert report.precheck.outcome == "dense"


def test_a_cached_sparse_decision_skips_the_sample_but_not_the_estimate(estimates):
    cache = DecisionCache()
    q, k, v = _band()
    method = _xattention()
    attend(q, k, v, method, layer_idx=0, precheck=CACHED, decisions=cache)
    estimates.clear()
    _, report = attend(q, k, v, method, layer_idx=0, precheck=CACHED, decisions=cache)
    assert report.precheck.outcome == "cached sparse" and report.used_sparse and estimates == [LENGTH]


def test_precheck_spans_are_disjoint_ordered_runs_ending_at_the_last_block():
    for blocks in (3, 5, 32, 100, 1024):
        for share, runs in ((1 / 32, 4), (0.1, 3), (0.01, 1), (0.5, 2)):
            spans = Precheck(share=share, runs=runs).spans(blocks)
            wanted = max(runs, math.ceil(share * blocks))
            if wanted >= blocks:
                assert spans is None
                continue
            assert spans[-1][1] == blocks and all(a < b for a, b in spans)
            assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))
            assert len(spans) <= runs and wanted <= sum(b - a for a, b in spans) < wanted + runs
    assert Precheck().spans(32) == [(7, 8), (15, 16), (23, 24), (31, 32)]
    assert Precheck(share=0.25, runs=2).spans(32) == [(12, 16), (28, 32)]
    assert Precheck().spans(4) is None


def test_precheck_settings_are_checked_naming_the_field():
    for kwargs, message in (({"share": 0}, "precheck: share=0 is outside (0, 1)"),
                            ({"share": 1}, "precheck: share=1 is outside (0, 1)"),
                            ({"runs": 0}, "precheck: runs=0 is not >= 1"),
                            ({"cache": "yes"}, "precheck: cache='yes' is not a bool")):
        with pytest.raises(KnobError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Precheck(**kwargs)
    with pytest.raises(KnobError, match=r"precheck: unknown key\(s\) \['rows'\]"):
        Precheck.from_dict({"rows": 3})
    settings = Precheck()
    with pytest.raises(KnobError, match="runs=-1"):
        settings.runs = -1
    assert settings.runs == 4


def test_the_decision_cache_is_on_by_default_and_rechecks_every_16th_call():
    assert Precheck().cache is True and Precheck().recheck_every == 16
    with pytest.raises(KnobError, match="precheck: recheck_every=0 is not >= 1"):
        Precheck(recheck_every=0)


@pytest.mark.parametrize("recheck_every", [1, 3])
def test_a_cached_decision_serves_recheck_every_minus_one_calls_then_one_decides_afresh(estimates, recheck_every):
    cache = DecisionCache()
    q, k, v = _diffuse()
    method = _xattention()
    settings = Precheck(recheck_every=recheck_every)
    outcomes = [attend(q, k, v, method, layer_idx=0, precheck=settings, decisions=cache)[1].precheck.outcome
                for _ in range(2 * recheck_every)]
    fresh = ["dense"] + ["cached dense"] * (recheck_every - 1)
    assert outcomes == fresh * 2 and cache.hits == 2 * (recheck_every - 1)
    # a sparse decision is re-checked the same way: the pre-check runs again on the 3rd call
    cache.clear()
    q, k, v = _band()
    estimates.clear()
    reports = [attend(q, k, v, method, layer_idx=0, precheck=Precheck(recheck_every=2), decisions=cache)[1]
               for _ in range(3)]
    assert [r.precheck.outcome for r in reports] == ["estimate", "cached sparse", "estimate"]
    assert all(r.used_sparse for r in reports)
    assert estimates.count(LENGTH) == 3 and len(estimates) > 3  # every call estimates; 1st and 3rd sample too


def test_with_a_cost_model_the_estimate_is_counted_as_free(monkeypatch):
    """The cost model judges the sampled densities with an estimate that costs nothing: the
    pre-check's own time (each sampled run pays the estimate's fixed costs) never sends a call that
    would pay sparse to dense."""
    seen = []
    real = CostModel.choose_heads

    def spy(self, density, estimate_ms, *args, **kwargs):
        seen.append(estimate_ms)
        return real(self, density, estimate_ms, *args, **kwargs)

    monkeypatch.setattr(CostModel, "choose_heads", spy)
    q, k, v = _band()
    attend(q, k, v, get_method("xattention", block_size=BLOCK, stride=4), cost_model=CostModel(min_kv_len=0),
           precheck=Precheck())
    assert seen and seen[0] == 0.0


@pytest.mark.parametrize("name,share,count", [("sliding_window", {"window": 0.25}, {"window": LENGTH // 4}),
                                              ("pooled_topk", {"top_k": 0.25}, {"top_k": LENGTH // BLOCK // 4})])
def test_count_knobs_given_as_shares_are_resolved_against_the_whole_call(name, share, count):
    """A sample is a shorter call: its shares would resolve to fewer keys; they resolve against
    the whole call, so the sample sees the counts the call has."""
    q, k, _ = _band()
    spans = Precheck().spans(LENGTH // BLOCK)
    by_share = sample_density(get_method(name, block_size=BLOCK, **share), q, k, None, spans)
    by_count = sample_density(get_method(name, block_size=BLOCK, **count), q, k, None, spans)
    assert torch.equal(by_share[0], by_count[0]) and by_share[1] == by_count[1]


def test_a_knob_that_keeps_every_block_is_named_when_the_precheck_decides_dense():
    q, k, v = _band()
    method = get_method("pooled_topk", block_size=BLOCK, top_k=LENGTH // BLOCK)  # every key block of every row
    _, report = attend(q, k, v, method, precheck=Precheck())
    assert report.precheck.outcome == "dense" and report.knob_dense == ("top_k",)
    _, report = attend(q, k, v, get_method("pooled_topk", block_size=BLOCK, top_k=2, dense_above=0.01),
                       precheck=Precheck())
    assert report.precheck.outcome == "dense" and report.knob_dense == ()


@pytest.mark.parametrize("q_len,kv_len,q_block,kv_block", [
    (100, 100, 16, 16), (37, 300, 16, 32), (256, 1000, 64, 64), (1, 513, 16, 64)])
def test_reachable_blocks_are_counted_on_the_host_as_the_mask_counts_them(q_len, kv_len, q_block, kv_block):
    from sparse_attn import BlockSparseLayout
    from sparse_attn.methods.precheck import _reachable

    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    layout = BlockSparseLayout.from_dense(torch.ones(1, 1, nq, nk, dtype=torch.bool), q_len, kv_len,
                                          (q_block, kv_block), causal=True)
    assert _reachable(q_len, kv_len, q_block, kv_block, 0, nq) == int(layout.causal_block_mask().sum())


@pytest.mark.parametrize("name", ["xattention", "flexprefill", "pooled_topp", "vertical_slash"])
def test_keep_mask_is_the_block_mask_of_the_estimates_layout(name):
    """``Method.keep_mask`` (what the pre-check counts) is the layout ``estimate`` builds, chunked
    prefill included."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 200, 16, generator=gen)
    k = torch.randn(1, 2, 330, 16, generator=gen)
    method = get_method(name, block_size=BLOCK)
    keep = method.keep_mask(q, k)
    layout = method.estimate(q, k)
    assert keep.dtype == torch.bool and torch.equal(keep, layout.to_dense() & layout.causal_block_mask())
