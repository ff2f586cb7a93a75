import math

import pytest
import torch

from sparse_attn import BlockSparseLayout, LayoutError, sliding_window_layout
from utils import random_layout


@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)])
@pytest.mark.parametrize("q_len,kv_len", [(100, 100), (64, 200), (1, 33)])
def test_dense_round_trip(batch, heads, q_len, kv_len):
    nq, nk = math.ceil(q_len / 16), math.ceil(kv_len / 16)
    dense = torch.rand(batch, heads, nq, nk) < 0.4
    layout = BlockSparseLayout.from_dense(dense, q_len, kv_len, 16)
    assert torch.equal(layout.to_dense(), dense)
    assert layout.kv_num_blocks.dtype == torch.int32 and layout.kv_indices.dtype == torch.int32
    assert torch.equal(layout.kv_num_blocks, dense.sum(-1).int())


def test_token_mask_matches_definition():
    layout = random_layout(1, 2, 40, 70, block=16, causal=True)
    mask = layout.to_token_mask()
    dense = layout.to_dense()
    offset = 70 - 40
    for h in range(2):
        for i in range(40):
            for j in range(70):
                expect = bool(dense[0, h, i // 16, j // 16]) and j <= i + offset
                assert bool(mask[0, h, i, j]) == expect


def test_transpose_is_kv_major_of_dense():
    layout = random_layout(2, 3, 130, 200, block=16)
    kv_major = layout.transpose()
    dense_t = layout.to_dense().transpose(-1, -2)  # (B, H, NK, NQ)
    assert torch.equal(kv_major.q_num_blocks, dense_t.sum(-1).int())
    width = kv_major.q_indices.shape[-1]
    for b in range(2):
        for h in range(3):
            for kb in range(layout.num_kv_blocks):
                n = int(kv_major.q_num_blocks[b, h, kb])
                expect = dense_t[b, h, kb].nonzero().flatten().tolist()
                assert kv_major.q_indices[b, h, kb, :n].tolist() == expect
                assert n <= width


def test_split_full_partial_covers_layout():
    layout = random_layout(1, 2, 100, 150, block=16, density=0.7)
    p_cnt, p_idx, f_cnt, f_idx = layout.split_full_partial()
    assert torch.equal(p_cnt + f_cnt, layout.kv_num_blocks)
    partial = BlockSparseLayout(p_cnt, p_idx, 100, 150, 16, 16)
    full = BlockSparseLayout(f_cnt, f_idx, 100, 150, 16, 16)
    assert torch.equal(partial.to_dense() | full.to_dense(), layout.to_dense())
    # Full blocks need no mask: every token pair in them is allowed.
    token = full.to_token_mask()[0]
    dense_full = full.to_dense()[0]
    for h in range(2):
        for qb, kb in dense_full[h].nonzero().tolist():
            assert token[h, qb * 16:(qb + 1) * 16, kb * 16:(kb + 1) * 16].all()


@pytest.mark.parametrize("layout_heads", [1, 2, 4])
def test_flex_block_mask_round_trip(layout_heads):
    layout = random_layout(1, layout_heads, 100, 130, block=16)
    block_mask = layout.to_flex_block_mask(num_heads=4)
    back = BlockSparseLayout.from_flex_block_mask(block_mask)
    expected = layout.expand(heads=4).to_dense() if layout_heads != 1 else layout.to_dense()
    assert torch.equal(back.to_dense(), expected)
    # Flex's own token-level view agrees with ours on every head (h % H_mask indexing).
    flex_tokens = torch.zeros(block_mask.kv_num_blocks.shape[1], 100, 130, dtype=torch.bool)
    for h in range(flex_tokens.shape[0]):
        for i in range(100):
            qi = torch.tensor(i)
            ki = torch.arange(130)
            in_block = back.to_dense()[0, h, i // 16][ki // 16]
            flex_tokens[h, i] = in_block & block_mask.mask_mod(0, h, qi, ki)
    assert torch.equal(flex_tokens, back.to_token_mask()[0])


def test_union_and_intersection():
    a = random_layout(1, 2, 96, 96, block=16, empty_rows=False)
    b = random_layout(1, 1, 96, 96, block=16, empty_rows=False)
    da, db = a.to_dense(), b.to_dense().expand(-1, 2, -1, -1)
    assert torch.equal((a | b).to_dense(), da | db)
    assert torch.equal((a & b).to_dense(), da & db)
    with pytest.raises(LayoutError, match="q_block"):
        a | random_layout(1, 2, 96, 96, block=32)


def test_density_and_stats():
    full = BlockSparseLayout.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16)
    assert full.density() == pytest.approx(1.0)
    causal = BlockSparseLayout.from_dense(torch.tril(torch.ones(4, 4, dtype=torch.bool)), 64, 64, 16)
    assert causal.density() == pytest.approx(1.0)  # measured over causally reachable blocks
    diag = BlockSparseLayout.from_dense(torch.eye(4, dtype=torch.bool), 64, 64, 16)
    assert diag.density() == pytest.approx(4 / 10)
    stats = diag.stats()
    assert stats["grid"] == (4, 4) and stats["mean_blocks_per_row"] == 1.0


def test_to_string_small_and_pooled():
    small = BlockSparseLayout.from_dense(torch.eye(4, dtype=torch.bool), 64, 64, 16)
    text = small.to_string()
    assert "|#" in text and "density" in text
    big = sliding_window_layout(16384, window=1024, sink=128, block_size=64)
    pooled = big.to_string(max_cells=32)
    assert len(pooled.splitlines()) < 40


def test_long_layouts_stay_block_level():
    # 128K tokens: a token-level mask would be 2^34 entries; the layout needs (2048 x 2048) blocks.
    layout = sliding_window_layout(131072, window=4096, sink=64, num_heads=2, block_size=64)
    assert layout.kv_indices.shape[-1] <= 70
    kv_major = layout.transpose()
    assert int(kv_major.q_num_blocks.sum()) == int(layout.kv_num_blocks.sum())


def _bad(cnt, idx, **kw):
    args = dict(q_len=64, kv_len=64, q_block=16, kv_block=16)
    args.update(kw)
    return BlockSparseLayout(cnt, idx, **args)


def test_validation_errors():
    cnt = torch.full((1, 1, 4), 2, dtype=torch.int32)
    idx = torch.tensor([[0, 1]] * 4, dtype=torch.int32)[None, None]
    _bad(cnt, idx)  # valid
    with pytest.raises(LayoutError, match="out of range"):
        _bad(cnt, torch.where(idx == 1, 7, idx).int())
    with pytest.raises(LayoutError, match="strictly increasing"):
        _bad(cnt, idx.flip(-1).contiguous())
    with pytest.raises(LayoutError, match="int32"):
        _bad(cnt.long(), idx)
    with pytest.raises(LayoutError, match="kv_num_blocks"):
        _bad(torch.full((1, 1, 4), 3, dtype=torch.int32), idx)
    with pytest.raises(LayoutError, match="query blocks"):
        _bad(cnt, idx, q_len=200)
    with pytest.raises(LayoutError, match="q_block=48"):
        _bad(cnt, idx, q_block=48)
    with pytest.raises(LayoutError, match="bool"):
        BlockSparseLayout.from_dense(torch.ones(4, 4), 64, 64, 16)
    with pytest.raises(LayoutError, match="need"):
        BlockSparseLayout.from_dense(torch.ones(4, 5, dtype=torch.bool), 64, 64, 16)


def test_compatibility_errors():
    layout = random_layout(2, 3, 64, 64, block=16)
    with pytest.raises(LayoutError, match="heads"):
        layout.check_compatible(2, 8, 2, 64, 64, torch.device("cpu"))
    with pytest.raises(LayoutError, match="batch"):
        layout.check_compatible(4, 3, 3, 64, 64, torch.device("cpu"))
    with pytest.raises(LayoutError, match="q_len"):
        layout.check_compatible(2, 3, 3, 65, 64, torch.device("cpu"))
    meta = layout.to("meta")
    with pytest.raises(LayoutError, match="layout.to"):
        meta.check_compatible(2, 3, 3, 64, 64, torch.device("cpu"))
