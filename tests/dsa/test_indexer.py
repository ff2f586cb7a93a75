"""The lightning indexer: scores and chunked top-k selection against a brute-force loop, RoPE on the
leading dims only, the distillation loss against its definition (dense and on selected keys), and a
short distillation that lowers the loss and selects keys holding more attention than random lists."""

import math

import pytest
import torch

from sparse_attn.dsa import DSAConfig, LightningIndexer, index_scores, indexer_kl_loss, select_tokens, token_mask


def _inputs(batch=2, q_len=11, seq=19, heads=3, dim=8, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    return (torch.randn(batch, q_len, heads, dim, generator=gen), torch.randn(batch, q_len, heads, generator=gen),
            torch.randn(batch, seq, dim, generator=gen))


def test_scores_and_selection_match_a_brute_force_loop():
    q_index, weights, k_index = _inputs()
    scores = index_scores(q_index, weights, k_index)
    b, t, s = 1, 4, 7
    want = sum(float(weights[b, t, j]) * max(0.0, float(q_index[b, t, j] @ k_index[b, s])) for j in range(3))
    assert math.isclose(float(scores[b, t, s]), want, rel_tol=1e-5)
    for chunk in (None, 1, 4):
        chosen = select_tokens(q_index, weights, k_index, 5, chunk_rows=chunk)
        assert chosen.shape == (2, 11, 5) and chosen.dtype == torch.int32
        for b in range(2):
            for t in range(11):
                pos = 19 - 11 + t
                order = sorted(range(pos + 1), key=lambda key: (-float(scores[b, t, key]), key))
                assert chosen[b, t].tolist() == sorted(order[:5])
    # Equal scores (relu's zeros, +0.0 and -0.0 alike) go to the earlier keys.
    tied = select_tokens(q_index, -torch.ones_like(weights), torch.zeros_like(k_index), 5)
    assert tied[:, -1].tolist() == [[0, 1, 2, 3, 4]] * 2
    few = select_tokens(q_index[:, :1], weights[:, :1], k_index[:, :3], 5)  # 3 keys, a position with 3 past keys
    assert few.tolist() == [[[0, 1, 2]], [[0, 1, 2]]]
    short = select_tokens(q_index[:, :3], weights[:, :3], k_index[:, :4], 3)  # positions 1..3: 2, 3, 3 keys
    assert short[0].tolist() == [[0, 1, -1], *short[0, 1:].tolist()] and (short[:, 1:] >= 0).all()


def test_rope_turns_the_leading_dims_only_and_keys_are_layer_normed():
    config = DSAConfig(index_heads=2, index_head_dim=8, rope_dim=4, top_k=4)
    indexer = LightningIndexer(16, config)
    hidden = torch.randn(1, 5, 16)
    angles = torch.arange(5.0)[None, :, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])  # a rotary table of 8 dims
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    plain, turned = indexer.keys(hidden), indexer.keys(hidden, cos, sin)
    torch.testing.assert_close(turned[..., 4:], plain[..., 4:])
    torch.testing.assert_close(turned[..., :4].norm(dim=-1), plain[..., :4].norm(dim=-1))  # rotations
    assert not torch.allclose(turned[:, 1:, :4], plain[:, 1:, :4])
    torch.testing.assert_close(plain.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)
    q, w = indexer.queries(hidden, cos, sin)
    assert q.shape == (1, 5, 2, 8) and w.shape == (1, 5, 2)
    with pytest.raises(ValueError, match="DSAConfig.rope_dim must be even"):
        DSAConfig(rope_dim=3)
    with pytest.raises(ValueError, match="DSAConfig.top_k must be an int >= 1"):
        DSAConfig(top_k=0)


def test_the_loss_is_the_kl_of_the_head_summed_attention():
    gen = torch.Generator().manual_seed(2)
    q_index, weights, k_index = _inputs(batch=1, q_len=6, seq=6, gen=gen)
    q, k = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 6, 8, generator=gen)
    scale = 0.4
    causal = torch.ones(6, 6).tril().bool()
    probs = torch.softmax((q.view(1, 2, 2, 6, 8) @ k[:, :, None].transpose(-1, -2) * scale)
                          .masked_fill(~causal, float("-inf")), -1).sum((1, 2)) / 4
    log_q = torch.log_softmax(index_scores(q_index, weights, k_index).masked_fill(~causal, float("-inf")), -1)
    want = torch.where(causal, probs * (probs.log() - log_q), 0.0).sum() / 6
    for chunk in (None, 2):
        loss = indexer_kl_loss(q_index, weights, k_index, q, k, scale=scale, chunk_rows=chunk)
        torch.testing.assert_close(loss, want)
    lists = torch.tensor([[[0, -1], [0, 1], [1, 2], [0, 3], [2, 4], [5, 1]]], dtype=torch.int32)
    kept = token_mask(lists, 6)
    p_sel = torch.softmax((q.view(1, 2, 2, 6, 8) @ k[:, :, None].transpose(-1, -2) * scale)
                          .masked_fill(~kept[:, None, None], float("-inf")), -1).sum((1, 2)) / 4
    log_sel = torch.log_softmax(index_scores(q_index, weights, k_index).masked_fill(~kept, float("-inf")), -1)
    want_sel = torch.where(kept, p_sel * (p_sel.clamp_min(1e-30).log() - log_sel), 0.0).sum() / 6
    torch.testing.assert_close(indexer_kl_loss(q_index, weights, k_index, q, k, scale=scale, indices=lists), want_sel)
    with pytest.raises(ValueError, match=r"indices must have shape \(1, 6, K\)"):
        indexer_kl_loss(q_index, weights, k_index, q, k, indices=lists[:, :3])


@pytest.mark.parametrize("chunk", [None, 3])
def test_sparse_loss_with_odd_lists_matches_the_masked_formula_and_stays_finite(chunk):
    """Lists with -1 entries, repeats, keys after the token and a token whose list allows nothing:
    the sparse-stage loss and its gradients equal the formula over the dense mask of the allowed
    keys (token_mask), and the token allowed nothing adds 0 and no NaN gradient."""
    gen = torch.Generator().manual_seed(7)
    seq, q_len = 9, 7
    q_index, weights, k_index = _inputs(batch=2, q_len=q_len, seq=seq, gen=gen)
    q, k = torch.randn(2, 4, q_len, 8, generator=gen), torch.randn(2, 1, seq, 8, generator=gen)
    lists = torch.randint(-1, seq, (2, q_len, 4), generator=gen, dtype=torch.int32)
    lists[0, 0] = torch.tensor([5, 8, -1, 7])  # position 2: nothing it may read
    lists[1, 3] = torch.tensor([1, 1, 4, 1])  # repeats
    scale = 0.3
    inputs = [t.clone().requires_grad_(True) for t in (q_index, weights, k_index)]
    loss = indexer_kl_loss(*inputs, q, k, scale=scale, indices=lists, chunk_rows=chunk)
    loss.backward()

    ref_inputs = [t.clone().requires_grad_(True) for t in (q_index, weights, k_index)]
    kept = token_mask(lists, seq)
    p_sel = torch.softmax((q.view(2, 1, 4, q_len, 8) @ k[:, :, None].transpose(-1, -2) * scale)
                          .masked_fill(~kept[:, None, None], float("-inf")), -1).nan_to_num().sum((1, 2)) / 4
    logits = index_scores(*ref_inputs).masked_fill(~kept, float("-inf"))
    log_sel = torch.log_softmax(torch.where(kept.any(-1, keepdim=True), logits, 0.0), -1)
    want = torch.where(kept, p_sel * (p_sel.clamp_min(1e-30).log() - log_sel), 0.0).sum() / (2 * q_len)
    want.backward()
    assert not kept[0, 0].any() and torch.isfinite(loss)
    torch.testing.assert_close(loss, want)
    for got, ref in zip(inputs, ref_inputs):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, ref.grad)


def test_distillation_lowers_the_loss_and_beats_random_selection():
    """Keys of a few 'topics' (shared directions) and queries that attend their own topic: an
    indexer trained 60 steps on the attention target picks keys with more attention mass than random
    lists of the same size."""
    gen = torch.Generator().manual_seed(5)
    seq, hidden_size, dim = 64, 32, 16
    topics = torch.randn(4, hidden_size, generator=gen)
    labels = torch.randint(0, 4, (2, seq), generator=gen)
    hidden = topics[labels] + 0.3 * torch.randn(2, seq, hidden_size, generator=gen)
    proj_q, proj_k = torch.randn(hidden_size, 2 * dim, generator=gen), torch.randn(hidden_size, dim, generator=gen)
    q = (hidden @ proj_q).view(2, seq, 2, dim).transpose(1, 2) * 0.5  # 2 query heads, 1 KV head
    k = (hidden @ proj_k)[:, None] * 0.5
    indexer = LightningIndexer(hidden_size, DSAConfig(index_heads=2, index_head_dim=16, rope_dim=0, top_k=8))
    opt = torch.optim.Adam(indexer.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        q_index, weights = indexer.queries(hidden)
        loss = indexer_kl_loss(q_index, weights, indexer.keys(hidden), q, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        q_index, weights = indexer.queries(hidden)
        chosen = select_tokens(q_index, weights, indexer.keys(hidden), 8)
        causal = torch.ones(seq, seq).tril().bool()
        probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(dim)).masked_fill(~causal, float("-inf")), -1)
        probs = probs.mean(1)  # (B, S, S)
        mass = (probs * token_mask(chosen, seq)).sum(-1)[:, 16:].mean()
        random = torch.stack([torch.stack([torch.cat([torch.randperm(t + 1, generator=gen)[:8],
                                                      torch.full((max(0, 7 - t),), -1)]) for t in range(seq)])
                              for _ in range(2)])
        random_mass = (probs * token_mask(random.int(), seq)).sum(-1)[:, 16:].mean()
    assert float(mass) > float(random_mass) + 0.3  # about 0.78 against 0.18
