import itertools
import warnings

import pytest
import torch

from sparse_attn import (
    dense_layout,
    layout_from_mask_mod,
    neighborhood_layout,
    power_layout,
    sliding_window_layout,
    sparse_attention,
    strided_layout,
)
from sparse_attn.backends.reference import naive_masked_attention
from sparse_attn.patterns import neighborhood_1d, tile_tokens, untile_tokens
from utils import make_qkv, rel_error


def _attention_matches_golden(layout, heads, kv_heads):
    q, k, v = make_qkv(1, heads, kv_heads, layout.q_len, layout.kv_len, 32)
    out = sparse_attention(q, k, v, layout, backend="reference")
    ref, _ = naive_masked_attention(q, k, v, layout.to_token_mask())
    assert rel_error(out, ref) < 1e-10


@pytest.mark.parametrize("q_len,kv_len", [(300, 300), (100, 260), (1, 65)])
def test_dense_layout_is_causal_attention(q_len, kv_len):
    layout = dense_layout(q_len, kv_len, block_size=32)
    assert layout.density() == pytest.approx(1.0)
    q, k, v = make_qkv(1, 2, 2, q_len, kv_len, 16)
    out = sparse_attention(q, k, v, layout, backend="reference")
    mask = torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + (kv_len - q_len)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_error(out, ref) < 1e-10


def test_sliding_window_per_head_and_sinks():
    layout = sliding_window_layout(1000, window=[64, 256], sink=[0, 64], num_heads=2, block_size=32)
    dense = layout.to_dense()[0]
    nq = dense.shape[1]
    assert dense[0].diagonal().all() and dense[1].diagonal().all()
    assert not dense[0, nq - 1, 0] and dense[1, nq - 1, 0]  # sink only on head 1
    assert dense[1].sum() > dense[0].sum()  # wider window keeps more
    # The window covers every key within `window` tokens of each query.
    token = layout.to_token_mask()[0, 0]
    for i in range(0, 1000, 37):
        lo = max(0, i - 63)
        assert token[i, lo:i + 1].all()
    _attention_matches_golden(layout, 4, 2)


def test_strided_shards_cover_context_together():
    layout = strided_layout(640, stride=4, num_heads=4, local_blocks=2, block_size=32)
    dense = layout.to_dense()[0]
    reach = layout.causal_block_mask()
    assert torch.equal(dense.any(0), reach)  # union over heads = all reachable blocks
    for h in range(4):
        far = dense[h, -1, :15]
        kept = far.nonzero().flatten()
        assert ((kept % 4) == h).all()  # beyond the local window each head reads its own shard
    assert layout.density() < 0.5
    _attention_matches_golden(layout, 4, 4)


def test_power_layout_keeps_power_of_two_distances():
    layout = power_layout(64 * 40, block_size=64, local_blocks=1)
    dense = layout.to_dense()[0, 0]
    for qb in range(40):
        kept = set(dense[qb].nonzero().flatten().tolist())
        expect = {qb} | {qb - 2 ** i for i in range(8) if qb - 2 ** i >= 0}
        assert kept == expect
    # Receptive field: after d layers a block reaches back 2^d - 1 blocks (reachability power).
    reach = dense.clone()
    for _ in range(5):
        reach = (reach.float() @ dense.float() > 0) | reach
    assert reach[39].all()
    _attention_matches_golden(power_layout(500, block_size=32, sink=32), 2, 1)


def _brute_force_nd(grid, kernel, stride, dilation):
    """Token-level neighborhood via per-dimension product, written point by point."""
    masks = [neighborhood_1d(g, k, s, d) for g, k, s, d in zip(grid, kernel, stride, dilation)]
    coords = list(itertools.product(*[range(g) for g in grid]))
    n = len(coords)
    out = torch.zeros(n, n, dtype=torch.bool)
    for a, ca in enumerate(coords):
        for b, cb in enumerate(coords):
            out[a, b] = all(bool(m[x, y]) for m, x, y in zip(masks, ca, cb))
    return out


def test_neighborhood_1d_window_semantics():
    m = neighborhood_1d(10, 3)
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2]  # shifted inward at the border
    assert m[5].nonzero().flatten().tolist() == [4, 5, 6]
    assert m[9].nonzero().flatten().tolist() == [7, 8, 9]
    d = neighborhood_1d(12, 3, dilation=2)
    assert d[6].nonzero().flatten().tolist() == [4, 6, 8]
    s = neighborhood_1d(12, 3, stride=3)
    assert torch.equal(s[3], s[4]) and torch.equal(s[4], s[5])  # a stride group shares its window
    with pytest.raises(ValueError, match="exceeds"):
        neighborhood_1d(8, 5, dilation=2)


@pytest.mark.parametrize("grid,tile,kernel,stride,dilation", [
    ((64,), (16,), (7,), (1,), (1,)),
    ((8, 8), (4, 4), (3, 3), (1, 2), (2, 1)),
    ((4, 8, 8), (1, 4, 4), (3, 3, 5), (1, 1, 1), (1, 2, 1)),
])
def test_neighborhood_layout_is_block_cover(grid, tile, kernel, stride, dilation):
    layout = neighborhood_layout(grid, kernel, tile_shape=tile, stride=stride, dilation=dilation)
    token = _brute_force_nd(grid, kernel, stride, dilation)
    perm = torch.arange(token.shape[0]).view(1, -1, 1)
    perm = tile_tokens(perm, grid, tile)[0, :, 0]
    tiled = token[perm][:, perm]  # token mask in tile-major order
    block = tile[0] * (tile[1] if len(tile) > 1 else 1) * (tile[2] if len(tile) > 2 else 1)
    n = token.shape[0] // block
    expect = tiled.view(n, block, n, block).any(3).any(1)
    assert torch.equal(layout.to_dense()[0, 0], expect)
    assert not layout.causal


def test_tile_tokens_round_trip():
    x = torch.randn(2, 3, 4 * 8 * 8, 5)
    y = tile_tokens(x, (4, 8, 8), (2, 4, 4))
    assert torch.equal(untile_tokens(y, (4, 8, 8), (2, 4, 4)), x)
    assert torch.equal(y[0, 0, 1], x[0, 0, 1]) and torch.equal(y[0, 0, 4], x[0, 0, 8])


def test_mask_mod_matches_token_block_cover():
    doc = torch.randint(0, 3, (200,)).sort().values

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx) & ((kv_idx + h) % 2 == 0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = layout_from_mask_mod(document_causal, None, 2, 200, 200, block_size=16,
                                      chunk_elements=5000)
    assert layout.causal  # detected: the mask never looks ahead
    qi, ki = torch.arange(200)[:, None], torch.arange(200)[None, :]
    for h in range(2):
        token = document_causal(0, torch.tensor(h), qi, ki)
        padded = torch.nn.functional.pad(token, (0, 8, 0, 8))
        expect = padded.view(13, 16, 13, 16).any(3).any(1)
        assert torch.equal(layout.to_dense()[0, h], expect)


def test_mask_mod_causal_detection_and_warning():
    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 20)

    with pytest.warns(UserWarning, match="partly allowed"):
        layout = layout_from_mask_mod(sliding, None, None, 128, 128, block_size=16)
    assert layout.causal

    def bidirectional(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < 16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not layout_from_mask_mod(bidirectional, None, None, 64, 64, block_size=16).causal
        with pytest.raises(ValueError, match="causal=True"):
            layout_from_mask_mod(bidirectional, None, None, 64, 64, block_size=16, causal=True)


def test_mask_mod_exact_block_mask_needs_no_warning():
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layout = layout_from_mask_mod(causal, None, None, 100, 100, block_size=32)
    assert torch.equal(layout.to_dense(), dense_layout(100, block_size=32).to_dense())


def test_per_head_lists_are_checked():
    with pytest.raises(ValueError, match="window has 3 entries"):
        sliding_window_layout(128, window=[16, 16, 16], num_heads=2, block_size=16)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_random_layout_density_and_diagonal(density):
    from sparse_attn import random_layout

    layout = random_layout(4096, density=density, num_heads=4, block_size=64, seed=1)
    assert layout.density() == pytest.approx(density, abs=0.04)
    dense = layout.to_dense()[0]
    assert dense.diagonal(dim1=-2, dim2=-1).all()
    assert not torch.equal(dense[0], dense[1]) or density == 1.0  # heads differ


def test_mask_mod_may_depend_on_batch_and_head():
    lengths = torch.tensor([40, 100])

    def per_sequence_prefix(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx < lengths[b]) & ((h == 0) | (kv_idx >= 32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = layout_from_mask_mod(per_sequence_prefix, 2, 2, 128, 128, block_size=32)
    dense = layout.to_dense()
    assert layout.batch == 2 and layout.heads == 2
    assert not dense[0, 0, 3, 2] and dense[1, 0, 3, 2]  # keys 64..95 exist only in sequence 1
    assert dense[0, 0, 3, 0] and not dense[0, 1, 3, 0]  # head 1 skips the first 32 keys


def test_shared_block_grid_is_built_once_per_geometry_and_its_masks_equal_fresh_ones():
    from sparse_attn.patterns.grid import BlockGrid, shared_block_grid

    grid = shared_block_grid(300, 520, 64, True, "cpu")
    assert shared_block_grid(300, 520, (64, 64), True, torch.device("cpu")) is grid
    assert shared_block_grid(300, 521, 64, True, "cpu") is not grid
    fresh = BlockGrid(300, 520, 64, True, "cpu")
    assert torch.equal(grid.reachable, fresh.reachable)
    for sink, count in ((1, 1), (130, 3)):
        assert grid.sink_blocks(sink) is grid.sink_blocks(sink)  # kept with the grid
        assert torch.equal(grid.sink_blocks(sink), fresh.sink_blocks(sink))
        assert torch.equal(grid.recent_blocks(count), fresh.recent_blocks(count))
    assert torch.equal(grid.diagonal_blocks(), grid.recent_blocks(1))
