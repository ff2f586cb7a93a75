"""Per-KV-head decisions: dense_heads, dense_above and the cost model give some KV groups full causal
rows inside the one layout of a call; mixed layouts run against a float64 golden."""

import pytest
import torch

from sparse_attn import BlockSparseLayout, LayoutError, sparse_attention
from sparse_attn.backends.reference import naive_masked_attention
from sparse_attn.methods import CostModel, KnobError, attend, get_method
from utils import TOLERANCE, rel_error


def _golden(q, k, v, layout):
    return naive_masked_attention(q.double(), k.double(), v.double(), layout.to_token_mask(), None)[0]


def _qkv(batch, heads, kv_heads, q_len, kv_len, dim=16, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(batch, heads, q_len, dim, generator=gen, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, dim, generator=gen, dtype=dtype),
            torch.randn(batch, kv_heads, kv_len, dim, generator=gen, dtype=dtype))


def _rows(layout, kv_heads):
    """``(B, Hkv, NQ, NK)``: the layout's block mask per KV group (any query head of the group)."""
    dense = layout.to_dense()
    return dense.view(dense.shape[0], kv_heads, -1, *dense.shape[2:]).any(2)


@pytest.mark.parametrize("granularity", ["kv", "head"])
@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len", [
    (2, 4, 2, 100, 100),  # GQA, batch 2, 100 tokens in blocks of 16 (not a multiple)
    (1, 6, 3, 70, 333),  # chunked prefill: 70 queries at the end of 333 keys
    (2, 2, 2, 129, 129),  # no GQA
])
def test_dense_heads_get_full_causal_rows_and_the_mixed_layout_matches_the_golden(
        granularity, batch, heads, kv_heads, q_len, kv_len):
    q, k, v = _qkv(batch, heads, kv_heads, q_len, kv_len)
    base = get_method("pooled_topk", top_k=1, sink=0, block_size=16, granularity=granularity)
    mixed = get_method("pooled_topk", top_k=1, sink=0, block_size=16, granularity=granularity, dense_heads=[1])
    plain_layout = base.estimate(q, k)
    layout, report = mixed.estimate(q, k, return_report=True)
    reach = layout.causal_block_mask()
    rows, plain = _rows(layout, kv_heads), _rows(plain_layout, kv_heads)
    assert torch.equal(rows[:, 1], reach.expand_as(rows[:, 1]))  # KV head 1: every reachable block
    others = [g for g in range(kv_heads) if g != 1]
    assert torch.equal(rows[:, others], plain[:, others])  # the others keep their selection
    assert not rows[:, others].all()  # and stay sparse
    assert layout.heads == plain_layout.heads
    assert report.full_heads == (1,)
    assert report.density_per_kv_head[1] == pytest.approx(1.0)
    assert max(report.density_per_kv_head[g] for g in others) < 1.0
    assert report.density == pytest.approx(layout.density())
    want = _golden(q, k, v, layout)
    assert rel_error(sparse_attention(q, k, v, layout, backend="reference"), want) < TOLERANCE[torch.float64]
    half = [t.half() for t in (q, k, v)]  # the Triton kernels (the interpreter on CPU) take 16-bit inputs
    out = sparse_attention(*half, layout, backend="triton")
    assert rel_error(out, _golden(*half, layout)) < TOLERANCE[torch.float16]
    # The full group's query heads get exact causal attention.
    group = heads // kv_heads
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
        attn_mask=torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + kv_len - q_len)
    out = sparse_attention(q, k, v, layout, backend="reference")
    assert torch.allclose(out[:, group:2 * group], dense[:, group:2 * group], atol=1e-10)


def test_dense_above_fills_the_kv_groups_whose_density_reaches_it():
    q, k, _ = _qkv(2, 4, 2, 160, 160)
    method = get_method("pooled_topk", top_k=[1, 0.8], sink=0, block_size=16)
    _, plain = method.estimate(q, k, return_report=True)
    assert plain.density_per_kv_head[0] < 0.5 < plain.density_per_kv_head[1] < 1.0 and plain.full_heads == ()
    method.dense_above = 0.5
    layout, report = method.estimate(q, k, return_report=True)
    assert report.full_heads == (1,)
    assert report.density_per_kv_head == pytest.approx([plain.density_per_kv_head[0], 1.0])
    assert torch.equal(_rows(layout, 2)[:, 1], layout.causal_block_mask().expand(2, -1, -1))
    method.dense_above = 0.1  # every group: the whole layout is full
    _, report = method.estimate(q, k, return_report=True)
    assert report.full_heads == (0, 1) and report.density == pytest.approx(1.0)


def test_full_heads_report_groups_their_scores_made_dense():
    q, k, _ = _qkv(1, 4, 2, 96, 96)
    _, report = get_method("pooled_topk", top_k=[1, 100], sink=0, block_size=16).estimate(q, k, return_report=True)
    assert report.full_heads == (1,) and report.density_per_kv_head[1] == pytest.approx(1.0)


def test_dense_heads_naming_a_missing_kv_head_raise_naming_the_knob():
    q, k, _ = _qkv(1, 4, 2, 64, 64)
    method = get_method("xattention", block_size=16, stride=4, dense_heads=[0, 2])
    with pytest.raises(ValueError, match=r"xattention: dense_heads=\[0, 2\] names KV head\(s\) \[2\]; the call has "
                                         r"2 KV heads \(0..1\)"):
        method.estimate(q, k)
    with pytest.raises(KnobError, match=r"xattention: dense_heads=\[1, 1\] names a KV head twice"):
        get_method("xattention", dense_heads=[1, 1])
    one = get_method("pooled_topk", top_k=1, sink=0, block_size=16, dense_heads=1)  # one int: that KV head
    assert one.estimate(q, k, return_report=True)[1].full_heads == (1,)


def test_cost_model_gives_full_rows_to_groups_that_would_not_pay_and_predicts_the_call():
    q, k, v = _qkv(1, 4, 2, 160, 160)
    method = get_method("pooled_topk", top_k=[1, 0.8], sink=0, block_size=16)
    # slowdown 1.39: full from 0.72; dense so slow that the measured estimate time cannot tip the call
    model = CostModel(min_kv_len=0, sparse_fixed_ms=0.0, dense_tflops=1e-8)
    assert model.full_head_density() == pytest.approx(1 / 1.39)
    out, report = attend(q, k, v, method, cost_model=model)
    assert report.used_sparse and report.full_heads == (1,)
    assert "1 of 2 KV heads full" in report.reason
    assert report.density_per_kv_head[1] == 1.0 and report.density_per_kv_head[0] < 0.5
    assert report.density == pytest.approx(report.layout.density())
    assert torch.equal(_rows(report.layout, 2)[:, 1], report.layout.causal_block_mask()[None])
    assert rel_error(out, _golden(q, k, v, report.layout)) < TOLERANCE[torch.float64]
    use, full, _ = model.choose_heads([0.1, 0.9], 0.0, 1, 4, 160, 160, 16)
    assert use and full == [False, True]
    use, full, reason = model.choose_heads([0.8, 0.9], 0.0, 1, 4, 160, 160, 16)
    assert not use and full == [True, True] and "2 of 2 KV heads full" in reason  # all full: dense pays more
    out, report = attend(q, k, v, get_method("pooled_topk", top_k=[0.8, 0.9], sink=0, block_size=16),
                         cost_model=model)
    assert not report.used_sparse and report.reason.startswith("dense:")


def test_with_full_rows_fills_the_marked_rows_per_sequence_and_refuses_bad_masks():
    dense = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    dense[..., 0] = True
    layout = BlockSparseLayout.from_dense(dense, 60, 60, 16)
    reach = layout.causal_block_mask()
    full = layout.with_full_rows(torch.tensor([[False, True], [True, False]]))
    got = full.to_dense()
    assert torch.equal(got[0, 1], reach) and torch.equal(got[1, 0], reach)
    assert torch.equal(got[0, 0], dense[0, 0]) and torch.equal(got[1, 1], dense[1, 1])
    shared = layout.with_full_rows(torch.tensor([False, True])).to_dense()
    assert torch.equal(shared[:, 1], reach.expand(2, -1, -1)) and torch.equal(shared[:, 0], dense[:, 0])
    for bad in (torch.tensor([True, False, True]), torch.tensor([1, 0]), [True, False],
                torch.zeros(3, 2, dtype=torch.bool)):
        with pytest.raises(LayoutError, match="heads must be a bool tensor"):
            layout.with_full_rows(bad)
