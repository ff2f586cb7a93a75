"""NSA's selected branch with block reads shared by nearby tokens (:mod:`sparse_attn.nsa.shared_reads`):
the tiles' unions and token masks against the selection they come from, the Triton kernels (CPU
interpreter here) against the plain-PyTorch reference, outputs, LSE and gradients (through the LSE
too), across GQA ratios, dtypes, selection blocks and lengths that are not tile or block multiples,
with empty and dense selections; and NSAAttention giving the same results either way."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparse_attn import KernelOptions
from sparse_attn.nsa import NSAAttention, NSAConfig
from sparse_attn.nsa.shared_reads import (shared_reads_attention, shared_reads_reference, shared_tiles,
                                          tile_tokens)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")


def _selection(batch, kv_heads, seq, block, take, seed, device=DEVICE):
    """Random earlier-block choices like NSA's: block 0 and each token's previous block forced, then
    ``take`` random others; as bools ``(B, Hkv, S, Ns)`` and as indices ``(B, Hkv, S, n)`` (-1: none)."""
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(seq / block)
    own = torch.arange(seq) // block
    scores = torch.rand(batch, kv_heads, seq, nb, generator=gen)
    scores[..., 0] = 2.0
    prev = (own - 1).clamp(min=0)
    scores.scatter_(-1, prev.expand(batch, kv_heads, seq)[..., None], 2.0)
    scores = scores.masked_fill(torch.arange(nb)[None, :] >= own[:, None], -1.0)
    n = min(take + 2, nb)
    top = scores.topk(n, -1)
    blocks = torch.where(top.values >= 0, top.indices, -1)
    chosen = torch.zeros(batch, kv_heads, seq, nb + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(blocks >= 0, blocks, nb), True)  # "none" lands in a dropped column
    return chosen[..., :nb].to(device), blocks.to(torch.int32).to(device)


def test_tile_tokens_keep_about_64_rows_and_divide_the_block():
    assert [tile_tokens(g, 64) for g in (1, 2, 4, 8, 16, 64, 128)] == [16, 16, 16, 8, 4, 1, 1]
    assert tile_tokens(1, 16) == 16 and tile_tokens(4, 32) == 16 and tile_tokens(2, 16) == 16


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_tiles_hold_the_union_of_their_tokens_blocks_with_token_masks(tokens):
    chosen, blocks = _selection(2, 2, 203, 16, 3, seed=1)
    own = torch.arange(203, device=chosen.device) // 16
    earlier = chosen & (torch.arange(chosen.shape[-1], device=chosen.device)[None, :] < own[:, None])
    from_bools, from_indices = shared_tiles(chosen, None, 203, 16, tokens), shared_tiles(None, blocks, 203, 16, tokens)
    for name in ("counts", "tile_counts", "selections"):  # the sparse build (indices) equals the dense one
        assert torch.equal(getattr(from_bools, name), getattr(from_indices, name)), name
    for name, counts in (("blocks", "counts"), ("masks", "counts"), ("tiles", "tile_counts"),
                         ("tile_masks", "tile_counts")):
        a, b, n = getattr(from_bools, name), getattr(from_indices, name), getattr(from_bools, counts)
        width = int(n.max())
        used = torch.arange(width, device=n.device) < n[..., None]  # the padding slots may differ
        assert torch.equal(a[..., :width][used], b[..., :width][used]), name
    for tiles in (from_bools, from_indices):
        for b in range(2):
            for h in range(2):
                for tile in range(math.ceil(203 / tokens)):
                    n = int(tiles.counts[b, h, tile])
                    got = {int(j): int(m) for j, m in zip(tiles.blocks[b, h, tile, :n], tiles.masks[b, h, tile, :n])}
                    want = {}
                    for t in range(tokens):
                        s = tile * tokens + t
                        if s < 203:
                            for j in earlier[b, h, s].nonzero().flatten().tolist():
                                want[j] = want.get(j, 0) | (1 << t)
                    assert got == want
                    assert tiles.blocks[b, h, tile, :n].tolist() == sorted(want)
                    for j, m in want.items():  # the transposed lists agree
                        row = tiles.tiles[b, h, j, :int(tiles.tile_counts[b, h, j])].tolist()
                        assert tile in row and int(tiles.tile_masks[b, h, j, row.index(tile)]) == m


CASES = [  # (heads, kv_heads, seq, dim, select_block, take)
    (4, 2, 203, 32, 16, 3),    # G = 2, 16 tokens per tile
    (8, 1, 150, 64, 32, 2),    # G = 8, 8 tokens per tile
    (16, 1, 100, 16, 16, 1),   # G = 16, 4 tokens per tile
    (2, 2, 77, 32, 16, 0),     # G = 1: only the forced blocks
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,seq,dim,block,take", CASES)
def test_kernels_match_the_reference_outputs_lse_and_gradients(dtype, heads, kv_heads, seq, dim, block, take):
    torch.manual_seed(0)
    batch, scale = 2, dim ** -0.5
    q = torch.randn(batch, seq, heads, dim, device=DEVICE, dtype=dtype).transpose(1, 2)  # strided, as HF passes it
    k = torch.randn(batch, kv_heads, seq, dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, dim, device=DEVICE, dtype=dtype)
    chosen, blocks = _selection(batch, kv_heads, seq, block, take, seed=2)
    tiles = shared_tiles(None, blocks, seq, block, tile_tokens(heads // kv_heads, block))
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = shared_reads_attention(qs, ks, vs, tiles, block, scale)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = shared_reads_reference(qr, kr, vr, chosen, block, scale)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # tokens of block 0 read no earlier block
    assert torch.isinf(lse[:, :, :block]).all() and (out[:, :, :block] == 0).all()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite].float(), atol=2e-2, rtol=1e-3)
    gen = torch.Generator().manual_seed(3)
    d_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    d_lse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    ((out.float() * d_out).sum() + (torch.where(finite, lse, 0.0) * d_lse).sum()).backward()
    ((ref_out.float() * d_out).sum() + (torch.where(finite, ref_lse, 0.0) * d_lse).sum()).backward()
    for got, want in ((qs.grad, qr.grad), (ks.grad, kr.grad), (vs.grad, vr.grad)):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_a_selection_of_every_earlier_block_is_causal_attention_before_the_own_block():
    q = torch.randn(1, 4, 96, 32, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(1, 2, 96, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
    chosen = torch.ones(1, 2, 96, 6, dtype=torch.bool, device=DEVICE)
    tiles = shared_tiles(chosen, None, 96, 16, 16)
    out, _ = shared_reads_attention(q, k, v, tiles, 16, 32 ** -0.5)
    mask = (torch.arange(96)[None, :] // 16 < torch.arange(96)[:, None] // 16).to(DEVICE)
    rows = slice(16, 96)  # block 0's tokens have no earlier block
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, rows].float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
        attn_mask=mask[rows])
    torch.testing.assert_close(out[:, :, rows].float(), dense, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("heads,kv_heads,seq", [(4, 1, 90), (2, 2, 61)])
def test_nsa_attention_gives_the_same_results_with_shared_reads_and_per_token(heads, kv_heads, seq):
    torch.manual_seed(0)
    config = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32,
                       window_block=16)
    module = NSAAttention(config, heads, kv_heads, 32, gate_bias=(0.5, 1.0, 0.5)).to(DEVICE)
    q = torch.randn(1, heads, seq, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, kv_heads, seq, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    v = torch.randn(1, kv_heads, seq, 32, device=DEVICE, dtype=torch.float16, requires_grad=True)
    results = []
    for choice in ("shared_reads", "per_token"):
        out = module(q, k, v, backend="triton", kernel_options=KernelOptions(nsa_selected=choice))
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.float(), y.float(), atol=5e-2, rtol=5e-2)


def test_shared_reads_that_cannot_run_say_why():
    config = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32,
                       window_block=16)
    module = NSAAttention(config, 4, 2, 32).to(DEVICE)
    q = torch.randn(1, 4, 64, 32, device=DEVICE)
    k = v = torch.randn(1, 2, 64, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"nsa_selected='shared_reads'\) cannot run this call: dtype torch.float32"):
        module(q, k, v, kernel_options=KernelOptions(nsa_selected="shared_reads"))
    torch.testing.assert_close(module(q, k, v), module(q, k, v, kernel_options=KernelOptions(nsa_selected="per_token")))
    with pytest.raises(ValueError, match="KernelOptions.nsa_selected must be one of"):
        KernelOptions(nsa_selected="shared")


def test_tokens_per_read_counts_the_selections_each_union_block_serves():
    chosen = torch.ones(1, 1, 96, 6, dtype=torch.bool, device=DEVICE)  # every earlier block
    tiles = shared_tiles(chosen, None, 96, 16, 16)
    assert int(tiles.selections) == 16 * (0 + 1 + 2 + 3 + 4 + 5) and tiles.tokens_per_read() == 16.0
    lonely = shared_tiles(_lonely(1), None, 96, 16, 16)
    assert lonely.tokens_per_read() == 1.0
    # 16 tokens x 4 heads = 64 rows a tile against 16 a token: shared reads pay from 4 tokens per read
    assert tiles.pay(4) and not lonely.pay(4) and lonely.pay(1)  # 1 head: 16 rows either way


def _lonely(kv_heads):
    """96 tokens in blocks of 16: token t of block j >= 1 selects earlier block t if t < j, so no two
    tokens of a 16-token tile share a block."""
    lonely = torch.zeros(1, kv_heads, 96, 6, dtype=torch.bool, device=DEVICE)
    for s in range(16, 96):
        if s % 16 < s // 16:
            lonely[0, :, s, s % 16] = True
    return lonely


def test_auto_reads_shared_only_where_nearby_tokens_share_blocks(monkeypatch):
    import sparse_attn.nsa.module as module_file

    calls = []
    real = module_file.shared_reads_attention
    monkeypatch.setattr(module_file, "shared_reads_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = NSAConfig(compress_block=16, compress_stride=8, select_block=16, select_blocks=4, window=32,
                       window_block=16)
    module = NSAAttention(config, 4, 2, 32).to(DEVICE)
    q = torch.randn(1, 4, 96, 32, device=DEVICE, dtype=torch.float16)
    k = v = torch.randn(1, 2, 96, 32, device=DEVICE, dtype=torch.float16)
    shared = torch.ones(1, 2, 96, 6, dtype=torch.bool, device=DEVICE)
    alone = _lonely(2)  # one token per block read
    for selection, used in ((shared, [1]), (alone, [])):
        calls.clear()
        module(q, k, v, backend="triton", selection=selection)
        assert calls == used
    calls.clear()
    module(q, k, v, backend="triton", selection=alone, kernel_options=KernelOptions(nsa_selected="shared_reads"))
    assert calls == [1]
