import os

import pytest
import torch

from sparse_attn import BlockSparseLayout
from sparse_attn.methods import METHODS, CostModel, attend, get_method
from sparse_attn.methods.primitives.block_mass import block_mass, block_mass_reference
from sparse_attn.methods.primitives.line_scores import line_scores
from sparse_attn.methods.primitives.top_p import select_top_p, top_p_mask
from sparse_attn.metrics import attention_recall, output_relative_error
from sparse_attn.options import KernelOptions
from planted import needed_density, planted, planted_recall
from utils import import_cycles, import_graph

# The estimator-kernel tests run on the GPU when there is one (TRITON_INTERPRET=0), else in Triton's
# CPU interpreter. On a GPU, fp32 dots run in TF32 (10-bit mantissa), hence the looser fp32 tolerance.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
FP32_ATOL = 1e-5 if KERNEL_DEVICE == "cpu" else 2e-3
TRITON = KernelOptions(estimator_kernels="triton")  # the Triton estimator kernels (the interpreter on CPU)
TORCH = KernelOptions(estimator_kernels="torch")  # the PyTorch references

SMALL = {"flexprefill": {"min_budget": 64}, "vertical_slash": {"vertical_size": 64, "slash_size": 64}}


def _method(name, **knobs):
    return get_method(name, block_size=32, **{**SMALL.get(name, {}), **knobs})


# Methods that estimate with their default knobs on any shapes (not those that need trained gates).
UNTRAINED = sorted(n for n, cls in METHODS.items() if not getattr(cls, "needs_gates", False))


@pytest.mark.parametrize("name", UNTRAINED)
@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len", [
    (1, 4, 2, 300, 300), (2, 4, 1, 129, 129), (2, 2, 2, 100, 333),  # last: chunked prefill
])
@pytest.mark.parametrize("granularity", ["kv", "head"])
def test_every_method_returns_a_valid_causal_layout(name, batch, heads, kv_heads, q_len, kv_len, granularity):
    q = torch.randn(batch, heads, q_len, 32)
    k = torch.randn(batch, kv_heads, kv_len, 32)
    method = _method(name, granularity=granularity)
    layout, report = method.estimate(q, k, return_report=True)
    assert isinstance(layout, BlockSparseLayout)
    layout.validate()
    assert layout.causal and layout.q_len == q_len and layout.kv_len == kv_len
    assert layout.batch == batch
    assert layout.heads == (kv_heads if granularity == "kv" else heads)
    dense = layout.to_dense()
    reach = layout.causal_block_mask()
    assert not (dense & ~reach).any(), "kept a block no query can reach"
    diag = torch.zeros_like(reach)
    nq = reach.shape[0]
    for qb in range(nq):
        diag[qb, reach[qb].nonzero().max()] = True
    assert (dense | ~diag).all(), "diagonal block missing"
    assert dense[..., 0].all(), "sink block missing"
    assert report.method == name and report.seconds >= 0 and 0 < report.density <= 1


KNOBS = [
    ("pooled_topp", "top_p", [0.3, 0.7, 0.95]),
    ("pooled_topk", "top_k", [1, 3, 6]),
    ("oracle", "top_p", [0.3, 0.7, 0.95]),
    ("xattention", "threshold", [0.3, 0.7, 0.95]),
    ("vertical_slash", "vertical_size", [8, 64, 256]),
    ("flexprefill", "gamma", [0.3, 0.7, 0.95]),
    ("sliding_window", "window", [32, 128, 512]),
]


@pytest.mark.parametrize("name,knob,values", KNOBS)
def test_density_moves_monotonically_with_knob(name, knob, values):
    q, k, _ = planted("band", q_len=768, dim=32, gain=1.0)
    densities = []
    for value in values:
        extra = {"slash_size": 8} if name == "vertical_slash" else {}
        layout = _method(name, sink=0, **{knob: value, **extra}).estimate(q, k)
        densities.append(layout.density())
    assert densities == sorted(densities), densities
    assert densities[0] < densities[-1], densities


# Which planted structures each estimator is built to find, with knobs suited to the structure.
# Pooled scores average a block's keys and XAttention's antidiagonals divide a single line's logit by
# the stride, so thin columns/diagonals of moderate strength (gain 16) are beyond them by design;
# XAttention does find strong columns (gain 64).
VS = "vertical_slash"
CASES = [
    ("vertical", 16, "oracle", {"top_p": 0.97}),
    ("vertical", 16, "flexprefill", {"gamma": 0.97}),
    ("vertical", 16, VS, {"vertical_size": 4, "slash_size": 1}),
    ("vertical", 64, "xattention", {"threshold": 0.97}),
    ("slash", 16, "oracle", {"top_p": 0.97}),
    ("slash", 16, "flexprefill", {"gamma": 0.97}),
    ("slash", 16, VS, {"vertical_size": 1, "slash_size": 1}),
    ("band", 16, "oracle", {"top_p": 0.97}),
    ("band", 16, "flexprefill", {"gamma": 0.97}),
    ("band", 16, VS, {"vertical_size": 1, "slash_size": 64}),
    ("band", 16, "xattention", {"threshold": 0.97}),
    ("band", 16, "pooled_topp", {"top_p": 0.97}),
    ("needle", 16, "oracle", {"top_p": 0.97}),
    ("needle", 16, "flexprefill", {"gamma": 0.97}),
    ("needle", 16, VS, {"vertical_size": 64, "slash_size": 1}),
    ("needle", 16, "xattention", {"threshold": 0.97}),
]


@pytest.mark.parametrize("structure,gain,name,knobs", CASES, ids=lambda c: str(c))
def test_planted_structure_is_recovered(structure, gain, name, knobs):
    q, k, planted_mask = planted(structure, q_len=1024, dim=64, gain=gain)
    extra = {"min_budget": 64, "line_search": "union"} if name == "flexprefill" else {}
    layout = get_method(name, block_size=64, sink=0, **knobs, **extra).estimate(q, k)
    recall = planted_recall(q, k, layout, planted_mask)
    assert recall >= 0.95, (structure, name, recall)
    # ... at about the density the structure needs (slack: block rounding, and rows that have no
    # planted key spread their mass over other blocks).
    need = needed_density(layout, planted_mask)
    assert layout.density() <= need + 0.15, (layout.density(), need)


@pytest.mark.parametrize("structure", ["vertical", "slash", "band", "needle"])
def test_flexprefill_paper_line_search_recovers_planted_mass(structure):
    """The paper's rule (columns and diagonals each reach gamma alone) recovers the planted mass too;
    it is the cheap rule, not the tight one, so its density is no lower than the union search's."""
    q, k, planted_mask = planted(structure, q_len=1024, dim=64, gain=16)
    kwargs = dict(block_size=64, sink=0, gamma=0.97, min_budget=64)
    separate = get_method("flexprefill", **kwargs).estimate(q, k)
    union = get_method("flexprefill", line_search="union", **kwargs).estimate(q, k)
    assert planted_recall(q, k, separate, planted_mask) >= 0.95
    assert separate.density() >= union.density() - 1e-9
    with pytest.raises(ValueError, match="line_search"):
        get_method("flexprefill", line_search="greedy")


def test_gqa_native_selection_merges_group_heads():
    q, k, _ = planted("band", heads=4, kv_heads=2, q_len=512, dim=32)
    per_head = _method("oracle", granularity="head", top_p=0.9).estimate(q, k).to_dense()
    per_group = _method("oracle", granularity="kv", top_p=0.9).estimate(q, k).to_dense()
    assert torch.equal(per_group, per_head.view(1, 2, 2, *per_head.shape[2:]).any(2))


def test_per_head_and_per_layer_knobs():
    q, k, _ = planted("band", heads=4, kv_heads=2, q_len=512, dim=32, gain=1.0)
    method = _method("pooled_topk", granularity="head", sink=0, top_k=[1, 1, 4, 4],
                     per_layer={3: {"top_k": 8}})
    density = method.estimate(q, k).density_per_head()[0]
    assert density[2] > density[0] and density[3] > density[1]
    assert method.estimate(q, k, layer_idx=3).density() > method.estimate(q, k, layer_idx=0).density()
    with pytest.raises(ValueError, match="per-head knob has 3 values"):
        _method("pooled_topk", top_k=[1, 2, 3]).estimate(q, k)


def test_batch_elements_get_their_own_layouts():
    q0, k0, _ = planted("vertical", q_len=512, dim=32, seed=1)
    q1, k1, _ = planted("band", q_len=512, dim=32, seed=2)
    q, k = torch.cat([q0, q1]), torch.cat([k0, k1])
    layout = _method("oracle", top_p=0.9).estimate(q, k)
    alone = _method("oracle", top_p=0.9).estimate(q1, k1)
    assert torch.equal(layout.to_dense()[1], alone.to_dense()[0])
    assert not torch.equal(layout.to_dense()[0], layout.to_dense()[1])


def test_chunked_prefill_matches_the_tail_of_full_prefill():
    q, k, _ = planted("band", q_len=640, dim=32)
    full = _method("oracle", top_p=0.9).estimate(q, k).to_dense()
    chunk = _method("oracle", top_p=0.9).estimate(q[:, :, -320:], k).to_dense()
    assert torch.equal(chunk, full[:, :, -10:])


def test_unknown_method_and_knob_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match="no knob"):
        get_method("xattention", gamma=0.3)
    with pytest.raises(ValueError, match="granularity"):
        get_method("oracle", granularity="row")
    with pytest.raises(ValueError, match="exceeds kv_len"):
        _method("oracle").estimate(torch.randn(1, 2, 64, 16), torch.randn(1, 2, 32, 16))


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,q_block,kv_block,causal", [
    (4, 2, 70, 100, 16, 32, True), (2, 2, 64, 64, 16, 16, False), (2, 1, 33, 200, 32, 16, True),
    (2, 1, 150, 150, 8, 8, True),  # several small blocks per 64-row tile, causal tile skipping
    (1, 1, 130, 300, 128, 64, True),  # oracle-sized blocks, q shorter than kv
])
@pytest.mark.parametrize("passes", ["one", "two", "one, a head per launch"])
def test_block_mass_kernel_matches_reference(heads, kv_heads, q_len, kv_len, q_block, kv_block, causal, passes):
    config = dict(one_pass=passes != "two")
    if passes == "one, a head per launch":  # the scratch holds exactly one (batch, head): 2 x heads launches
        one_head = q_len * (-(-kv_len // kv_block) + -(-kv_len // 128) + 2)  # block sums, tile maxima, row stats
        config["buffer_floats"] = one_head
    q = torch.randn(2, heads, q_len, 32, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, 32, dtype=torch.float64)
    want = block_mass_reference(q, k, q_block, kv_block, 0.2, causal)
    q, k = q.float(), k.float()
    got = block_mass(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), q_block, kv_block, 0.2, causal, kernel_options=TRITON,
                     **config)
    assert torch.allclose(got.cpu(), want.float(), atol=FP32_ATOL)
    rows = want.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    # The reference agrees with a dense softmax computed directly.
    want = want.float()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(heads // kv_heads, 1)) * 0.2
    if causal:
        scores = scores.masked_fill(torch.arange(kv_len)[None] > torch.arange(q_len)[:, None] + kv_len - q_len,
                                    float("-inf"))
    probs = torch.softmax(scores, -1)
    first = probs[:, :, :q_block, :kv_block].sum(-1).mean(-1)
    assert torch.allclose(want[:, :, 0, 0], first, atol=1e-5)


def test_antidiagonal_reshape_sums_each_tiles_antidiagonal():
    """q_r[a] . k_r[b] is the sum of the (a, b) stride x stride score tile's antidiagonal, the paper's
    score (query a*s + s-1-i against key b*s + i), also for lengths that are not stride multiples
    (zero padding) and a query chunk shorter than the keys; q_r is a view of q when no padding is needed."""
    from sparse_attn.methods.xattention import antidiagonal_reshape

    stride = 4
    q, k = torch.randn(1, 2, 18, 8, dtype=torch.float64), torch.randn(1, 1, 30, 8, dtype=torch.float64)
    q_r, k_r = antidiagonal_reshape(q, k, stride)
    scores = torch.einsum("bhad,bhcd->bhac", q_r, k_r.expand(-1, 2, -1, -1))
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, 2))
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, 2))
    for a in range(5):
        for b in range(8):
            want = sum(q_pad[0, :, a * stride + stride - 1 - i] @ k_pad[0, 0, b * stride + i] for i in range(stride))
            torch.testing.assert_close(scores[0, :, a, b], want)
    q_view, _ = antidiagonal_reshape(q[:, :, :16], k, stride)
    assert q_view.data_ptr() == q.data_ptr()


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-3), (torch.float16, 5e-4)])
@pytest.mark.parametrize("stride", [4, 8])  # rows of 128 (unrolled head-dim loop) and 256 (rolled loop)
@pytest.mark.parametrize("one_pass", [True, False])
def test_block_mass_kernel_on_xattention_inputs(dtype, atol, stride, one_pass):
    """XAttention's reshaped rows (stride x head_dim wide, 64-token blocks) in half precision: the
    kernel's block masses (one pass or two) match the float64 reference within the stated tolerance."""
    from sparse_attn.methods.xattention import antidiagonal_reshape

    q = torch.randn(1, 2, 300, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 300, 32, dtype=torch.float64)
    q_r, k_r = antidiagonal_reshape(q, k, stride)
    block = 64 // stride
    want = block_mass_reference(q_r, k_r, block, block, 0.25 / stride, True)
    got = block_mass(q_r.to(KERNEL_DEVICE, dtype), k_r.to(KERNEL_DEVICE, dtype), block, block, 0.25 / stride, True,
                     kernel_options=TRITON, one_pass=one_pass).cpu()
    assert (got - want.float()).abs().max() < atol
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-3)


@pytest.mark.parametrize("heads,kv_heads,q_len,kv_len,rows", [
    (4, 2, 200, 300, 64),  # GQA, a query chunk against a longer cache, keys not a tile multiple
    (2, 2, 150, 150, 37),  # rows not a power of two
    (3, 1, 20, 140, 64),  # fewer queries than rows
])
@pytest.mark.parametrize("chunked", [False, True])
def test_line_scores_kernel_matches_reference(heads, kv_heads, q_len, kv_len, rows, chunked):
    """Column and diagonal sums of the last rows' attention: the two-pass Triton kernel against the
    float64 reference (softmax of the full rows, then sums), with the skew buffer for all heads at
    once or for one (batch, head) per launch; every row's mass is 1, so the sums total ``rows``."""
    from sparse_attn.methods.primitives.line_scores import last_rows_line_scores

    config = {}
    if chunked:
        config["buffer_floats"] = min(rows, q_len) * (kv_len + min(rows, q_len))
    q = torch.randn(2, heads, q_len, 32, dtype=torch.float64)
    k = torch.randn(2, kv_heads, kv_len, 32, dtype=torch.float64)
    want_v, want_s = last_rows_line_scores(q, k, rows, 0.3)
    got_v, got_s = line_scores(q.float().to(KERNEL_DEVICE), k.float().to(KERNEL_DEVICE), rows, 0.3,
                               kernel_options=TRITON, **config)
    assert got_v.shape == got_s.shape == (2, heads, kv_len)
    assert torch.allclose(got_v.cpu(), want_v.float(), atol=FP32_ATOL)
    assert torch.allclose(got_s.cpu(), want_s.float(), atol=FP32_ATOL)
    total = torch.full((2, heads), float(min(rows, q_len)), dtype=torch.float64)
    assert torch.allclose(got_s.cpu().double().sum(-1), total, atol=1e-3)
    assert torch.allclose(want_v.sum(-1), total)


def test_line_scores_kernel_writes_every_entry_it_reads(monkeypatch):
    """Scratch and outputs come from torch.empty: filled with NaN first, none may leak into the sums
    (the skew buffer's ends are written by the first and last key tiles, not zero-filled)."""
    from sparse_attn.methods.primitives.line_scores import last_rows_line_scores

    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    q, k = torch.randn(1, 2, 130, 32), torch.randn(1, 1, 130, 32)
    got_v, got_s = line_scores(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), 48, 0.3, kernel_options=TRITON)
    monkeypatch.setattr(torch, "empty", real_empty)
    want_v, want_s = last_rows_line_scores(q, k, 48, 0.3)
    assert torch.allclose(got_v.cpu(), want_v, atol=FP32_ATOL) and torch.allclose(got_s.cpu(), want_s, atol=FP32_ATOL)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-3), (torch.float16, 5e-4)])
def test_line_scores_kernel_in_half_precision(dtype, atol):
    from sparse_attn.methods.primitives.line_scores import last_rows_line_scores

    q = torch.randn(1, 4, 160, 64, dtype=torch.float64)
    k = torch.randn(1, 2, 160, 64, dtype=torch.float64)
    q_h, k_h = q.to(dtype), k.to(dtype)
    want_v, want_s = last_rows_line_scores(q_h.double(), k_h.double(), 64, 0.125)  # same rounded inputs
    got_v, got_s = line_scores(q_h.to(KERNEL_DEVICE), k_h.to(KERNEL_DEVICE), 64, 0.125, kernel_options=TRITON)
    assert (got_v.cpu() - want_v).abs().max() < atol
    assert (got_s.cpu() - want_s).abs().max() < atol


@pytest.mark.parametrize("n_cols", [5, 37, 130])
def test_top_p_kernel_matches_reference(n_cols):
    scores = torch.rand(3, 4, n_cols)
    p = torch.rand(3, 4)
    got = top_p_mask(scores.to(KERNEL_DEVICE), p.to(KERNEL_DEVICE), min_keep=2, kernel_options=TRITON).cpu()
    want = select_top_p(scores, p[..., None], 2)
    assert torch.equal(got, want)
    kept_share = (scores * got).sum(-1) / scores.sum(-1)
    assert (kept_share >= p - 1e-6).all()


def test_attention_recall_is_exact_on_rows():
    q, k = torch.randn(1, 2, 96, 16), torch.randn(1, 1, 96, 16)
    dense = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    dense[..., 0] = True
    layout = BlockSparseLayout.from_dense(dense, 96, 96, 32)
    rows = torch.tensor([5, 40, 95])
    recall = attention_recall(q, k, layout, rows=rows)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.expand(-1, 2, -1, -1)) / 4.0
    scores = scores.masked_fill(torch.arange(96)[None] > torch.arange(96)[:, None], float("-inf"))
    probs = torch.softmax(scores, -1)[:, :, rows]
    assert torch.allclose(recall, probs[..., :32].sum(-1).mean(-1), atol=1e-6)


def test_output_error_zero_for_dense_layout():
    q, k, v = torch.randn(1, 2, 80, 16), torch.randn(1, 1, 80, 16), torch.randn(1, 1, 80, 16)
    layout = _method("dense").estimate(q, k)
    assert float(output_relative_error(q, k, v, layout).max()) < 1e-6


def test_cost_model_falls_back_to_dense_and_says_why():
    q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    out, report = attend(q, k, v, _method("oracle"), cost_model=CostModel())
    assert not report.used_sparse and "min_kv_len" in report.reason
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1),
                                                           v.expand(-1, 2, -1, -1), is_causal=True)
    assert torch.allclose(out, ref, atol=1e-6)
    model = CostModel(min_kv_len=0)
    out, report = attend(q, k, v, _method("dense"), cost_model=model)
    assert not report.used_sparse and "dense" in report.reason  # density 1 never pays
    model = CostModel(min_kv_len=0, sparse_fixed_ms=0.0, sparse_slowdown=1.0, dense_tflops=1e-6)
    out, report = attend(q, k, v, _method("sliding_window", window=32), cost_model=model)
    assert report.used_sparse and report.density < 1
    big = CostModel()
    assert big.choose(0.1, 1.0, 1, 32, 131072, 131072, 128)[0]
    assert not big.choose(0.1, 1.0, 1, 32, 4096, 4096, 128)[0]


def test_calibrate_measures_this_device():
    from sparse_attn.methods.cost import calibrate

    model = calibrate("cpu", seq_len=256, heads=2, kv_heads=1, dim=16, repeats=1)
    assert model.device_name == "cpu"
    assert model.dense_tflops > 0 and model.sparse_slowdown > 0 and model.sparse_fixed_ms >= 0
    assert set(model.measured) >= {"dense_ms", "sparse_d1_ms", "sparse_d0.1_ms"}


def test_quest_bound_is_an_upper_bound_and_finds_a_decode_needle():
    from sparse_attn.methods import Quest

    q, k, planted_mask = planted("needle", q_len=1024, dim=64)
    q_last = q[:, :, -1:]  # one decode step against 1024 cached keys
    layout = get_method("quest", block_size=64, sink=0, top_k=2).estimate(q_last, k)
    assert layout.q_len == 1 and layout.density() <= 3 / 16
    assert planted_recall(q_last, k, layout, planted_mask[-1:]) >= 0.95
    # The page bound is >= every true score inside the page.
    grid_scores = torch.einsum("bhd,bhkd->bhk", q_last[:, ::2, 0].float(), k.float())  # head 0 of each group
    kmax = k.float().view(1, 2, 16, 64, 64).amax(3)
    kmin = k.float().view(1, 2, 16, 64, 64).amin(3)
    qh = q_last[:, ::2, 0].float()
    bound = (qh.clamp(min=0)[:, :, None] * kmax + qh.clamp(max=0)[:, :, None] * kmin).sum(-1)
    assert (bound.repeat_interleave(64, -1) >= grid_scores - 1e-4).all()
    assert Quest.name == "quest"


def test_flexprefill_union_head_chunking_does_not_change_the_layout():
    q, k, _ = planted("slash", heads=8, kv_heads=4, q_len=512, dim=32)
    knobs = dict(block_size=32, min_budget=64, gamma=0.9, line_search="union")
    whole = get_method("flexprefill", kv_groups_per_chunk=4, **knobs).estimate(q, k).to_dense()
    assert torch.equal(get_method("flexprefill", kv_groups_per_chunk=1, **knobs).estimate(q, k).to_dense(), whole)


@pytest.mark.parametrize("name,knobs", [("vertical_slash", dict(vertical_size=40, slash_size=60)),
                                        ("flexprefill", dict(min_budget=64, gamma=0.9))])
@pytest.mark.parametrize("structure", ["vertical", "slash"])
def test_line_methods_choose_the_same_blocks_with_the_triton_steps(name, knobs, structure):
    """vertical-slash and FlexPrefill with every estimator step in Triton (line_scores, pooling,
    top-p; the interpreter on CPU) keep exactly the blocks the PyTorch references keep."""
    q, k, _ = planted(structure, heads=4, kv_heads=2, q_len=300, dim=32)
    method = get_method(name, block_size=32, **knobs)
    reference = method.estimate(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), kernel_options=TORCH).to_dense()
    with_triton = method.estimate(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), kernel_options=TRITON).to_dense()
    assert torch.equal(with_triton, reference)
    assert 0 < reference.float().mean() < 1


@pytest.mark.parametrize("length,block", [(100, 16), (64, 32), (33, 64)])
def test_mean_pool_kernel_matches_reference(length, block):
    from sparse_attn.methods.primitives.mean_pool import block_mean_pool, mean_pool

    x = torch.randn(2, 3, length, 32)
    got = block_mean_pool(x.to(KERNEL_DEVICE), block, kernel_options=TRITON).cpu()
    want = mean_pool(x, block)
    assert got.shape == want.shape == (2, 3, -(-length // block), 32)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(want[:, :, 0], x[:, :, :block].mean(2), atol=1e-6)
    assert torch.allclose(want[:, :, -1], x[:, :, (want.shape[2] - 1) * block:].mean(2), atol=1e-6)


def test_estimator_kernels_refuse_cpu_without_the_interpreter(monkeypatch):
    from sparse_attn.backends.triton import runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)  # as if TRITON_INTERPRET were not set
    q = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        block_mass(q, q, 16, 16, 0.25, kernel_options=TRITON)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        top_p_mask(torch.rand(2, 8), 0.5, kernel_options=TRITON)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        line_scores(q, q, 8, 0.25, kernel_options=TRITON)
    assert block_mass(q, q, 16, 16, 0.25).shape == (1, 1, 2, 2)  # automatic choice: the reference
    assert line_scores(q, q, 8, 0.25)[0].shape == (1, 1, 32)


@pytest.mark.parametrize("q_len,kv_len,blocks", [(200, 200, (32, 32)), (100, 333, (16, 64)), (77, 500, (32, 16))])
def test_line_helpers_match_token_level_brute_force(q_len, kv_len, blocks):
    """diagonal_sums and lines_to_blocks (prefix-count form) against token-by-token constructions."""
    from sparse_attn.methods.primitives.line_scores import diagonal_sums
    from sparse_attn.methods.selection import lines_to_blocks
    from sparse_attn.patterns.grid import BlockGrid

    gen = torch.Generator().manual_seed(q_len)
    rows = 9
    attn = torch.rand(2, 3, rows, kv_len, generator=gen, dtype=torch.float64)
    expected = torch.zeros(2, 3, kv_len, dtype=torch.float64)
    for r in range(rows):
        pos = kv_len - rows + r
        for j in range(kv_len):
            expected[..., max(pos - j, 0)] += attn[..., r, j]
    torch.testing.assert_close(diagonal_sums(attn), expected)

    grid = BlockGrid(q_len, kv_len, blocks, True)
    vertical = torch.rand(2, 3, kv_len, generator=gen) < 0.03
    slash = torch.rand(2, 3, kv_len, generator=gen) < 0.03
    q_abs = torch.arange(kv_len - q_len, kv_len)[:, None]
    keys = torch.arange(kv_len)[None, :]
    distance = (q_abs - keys).clamp(min=0)
    tokens = (keys <= q_abs) & (vertical[:, :, None, :] | slash[:, :, distance])  # (2, 3, Sq, Skv)
    bq, bk = blocks
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    padded = torch.nn.functional.pad(tokens, (0, nk * bk - kv_len, 0, nq * bq - q_len))
    expected_blocks = padded.view(2, 3, nq, bq, nk, bk).any(5).any(3)
    assert torch.equal(lines_to_blocks(grid, vertical, slash), expected_blocks)


@pytest.mark.parametrize("n,k", [(400, 7), (400, 90), (400, 300), (37, 5)])
def test_select_top_k_partial_and_full_sort_paths_keep_the_largest(n, k):
    """``select_top_k`` keeps exactly the k largest per row (per-row k, with a validity mask), by
    partial selection for small k and by a full sort otherwise."""
    from sparse_attn.methods.selection import select_top_k

    gen = torch.Generator().manual_seed(n + k)
    scores = torch.rand(2, 3, n, generator=gen, dtype=torch.float64)  # distinct values: no ties
    per_row = torch.randint(0, k + 1, (2, 3), generator=gen)
    valid = torch.rand(2, 3, n, generator=gen) < 0.8
    for kk, mask, k_max in ((per_row, None, None), (per_row, valid, None), (k, None, None), (per_row, None, k)):
        kept = select_top_k(scores, kk, valid=mask, k_max=k_max)  # k_max: the bound given on the host
        masked = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
        counts = torch.as_tensor(kk).expand(2, 3)
        for b in range(2):
            for h in range(3):
                top = torch.argsort(masked[b, h], descending=True)[:int(counts[b, h])]
                expected = torch.zeros(n, dtype=torch.bool)
                expected[top] = True
                if mask is not None:
                    expected &= mask[b, h]
                assert torch.equal(kept[b, h], expected)


@pytest.mark.parametrize("q_len,kv_len,rows", [(50, 50, 8), (30, 97, 16), (5, 40, 8)])
def test_last_rows_attention_matches_masked_softmax(q_len, kv_len, rows):
    """Exact attention of the last rows (GQA, bottom-right causal alignment) against a float64 softmax."""
    from sparse_attn.methods.primitives.line_scores import last_rows_attention

    gen = torch.Generator().manual_seed(kv_len)
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k = torch.randn(1, 2, kv_len, 16, generator=gen)
    got = last_rows_attention(q, k, rows, 0.25, causal=True)
    used = min(rows, q_len)
    k_full = k.double().repeat_interleave(2, dim=1)
    scores = q[:, :, q_len - used:].double() @ k_full.transpose(-1, -2) * 0.25
    q_pos = torch.arange(kv_len - used, kv_len)[:, None]
    scores = scores.masked_fill(torch.arange(kv_len)[None, :] > q_pos, float("-inf"))
    torch.testing.assert_close(got.double(), torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)


def test_methods_have_no_import_cycles():
    """No import cycle runs through sparse_attn.methods, counting imports inside functions too."""
    from pathlib import Path

    import sparse_attn

    graph = import_graph(Path(sparse_attn.__file__).parent)
    assert "sparse_attn.methods.primitives.block_mass.kernel" in graph["sparse_attn.methods.primitives.block_mass"][0]
    cycles = [c for c in import_cycles(graph) if any(m.startswith("sparse_attn.methods") for m in c)]
    assert not cycles, cycles


def test_methods_import_no_private_names_from_other_subpackages():
    """sparse_attn.methods uses only the public names and modules of the rest of the package."""
    from pathlib import Path

    import sparse_attn

    graph = import_graph(Path(sparse_attn.__file__).parent)
    private = [(module, target, name) for module, (_, names) in graph.items()
               if module.startswith("sparse_attn.methods") for target, name in names
               if target.startswith("sparse_attn.") and not target.startswith("sparse_attn.methods")
               and (name.startswith("_") or "._" in f".{target}")]
    assert not private, private


def test_importing_and_estimating_on_cpu_needs_no_triton():
    """With Triton impossible to import, sparse_attn imports and every method estimates on CPU tensors
    (the automatic choice: the PyTorch references); no estimator kernel module is imported."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib.abc
        import sys

        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "triton":
                    raise ImportError(name + " is blocked")

        sys.meta_path.insert(0, NoTriton())
        import torch
        from sparse_attn.methods import METHODS, get_method

        q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 1, 100, 16)
        for name in sorted(METHODS):
            if not getattr(METHODS[name], "needs_gates", False):
                get_method(name, block_size=32).estimate(q, k)
        loaded = [m for m in sys.modules if m.split(".")[0] == "triton" or m.endswith((".kernel", ".score_tiles"))]
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_estimate_returns_a_report_only_when_asked_and_keeps_no_state():
    q, k, _ = planted("band", heads=4, kv_heads=2, q_len=300, dim=32)
    method = _method("flexprefill", per_layer={1: {"gamma": 0.5}})
    layout = method.estimate(q, k)
    assert isinstance(layout, BlockSparseLayout)
    again, report = method.estimate(q, k, 1, return_report=True)
    assert not hasattr(method, "last_report") and not hasattr(method, "last_pattern")
    assert report.layer_idx == 1 and report.method == "flexprefill" and (report.q_len, report.kv_len) == (300, 300)
    assert report.density == pytest.approx(again.density())
    assert report.density_per_head == pytest.approx(again.density_per_head().mean(0).tolist())
    assert report.details["query_aware"].shape == (1, 4) and report.details["query_aware"].dtype == torch.bool
    _, report = _method("oracle").estimate(q, k, return_report=True)
    assert report.details == {}


def test_kernel_options_choose_the_estimator_steps(monkeypatch):
    """``estimator_kernels``: "torch" runs the references, "triton" the kernels (the interpreter on
    CPU), "auto" the kernels on CUDA tensors and the references on CPU; passed to estimate or attend,
    or the default of a ``kernel_options`` block."""
    import sparse_attn.methods.primitives.block_mass as block_mass_module
    from sparse_attn.options import kernel_options

    calls = []
    reference = block_mass_module.block_mass_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return reference(*args, **kwargs)

    monkeypatch.setattr(block_mass_module, "block_mass_reference", counted)
    q, k = torch.randn(1, 2, 128, 16, device=KERNEL_DEVICE), torch.randn(1, 1, 128, 16, device=KERNEL_DEVICE)
    method = _method("oracle")

    def reference_calls(**kwargs):
        calls.clear()
        method.estimate(q, k, **kwargs)
        return len(calls)

    assert reference_calls() == (0 if q.is_cuda else 1)
    assert reference_calls(kernel_options=TORCH) == 1
    triton_layout = method.estimate(q, k, kernel_options=TRITON).to_dense()
    assert reference_calls(kernel_options=TRITON) == 0
    assert torch.equal(triton_layout, method.estimate(q, k, kernel_options=TORCH).to_dense())
    with kernel_options(estimator_kernels="triton"):
        assert reference_calls() == 0
        assert reference_calls(kernel_options=TORCH) == 1
    calls.clear()
    attend(q, k, k, method, kernel_options=TRITON)
    assert not calls
    attend(q, k, k, method, kernel_options=TORCH)
    assert calls
