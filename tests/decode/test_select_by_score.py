"""Page selection from given page scores (select_pages_by_score), and the seer decode gate's page
shares feeding it: the same pages as select_pages when given the method's own scores, the budget,
sink and recent pages kept, shares that sum to one over each sequence's pages, input checks."""

import pytest
import torch

from sparse_attn.decode import PageIndex, page_mass, select_pages, select_pages_by_score
from sparse_attn.integrations.hf.train_gates import capture_qk
from sparse_attn.methods.seer import decode_page_shares
from sparse_attn.methods.seer_gate import SeerGates
from sparse_attn.options import KernelOptions
from utils import tiny_llama

TORCH = KernelOptions(estimator_kernels="torch")


def _case(lengths=(150, 37), heads=4, kv_heads=2, dim=32, capacity=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(lengths), kv_heads, capacity, dim, generator=gen)
    q = torch.randn(len(lengths), heads, 1, dim, generator=gen)
    return q, PageIndex.build(k, 16, lengths=list(lengths), capacity=capacity)


def test_given_the_methods_own_scores_the_selection_is_select_pages():
    q, index = _case()
    knobs = dict(budget=64, sink=16, recent=16)
    score = page_mass(q, index, method="quest", kernel_options=TORCH).flatten(2, 3).sum(2)
    got = select_pages_by_score(score, index, **knobs)
    want = select_pages(q, index, method="quest", kernel_options=TORCH, **knobs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_best_scored_pages_and_the_forced_ones_are_kept():
    _, index = _case(lengths=(160,))
    score = torch.zeros(1, 2, index.max_pages)
    score[0, 0, 4], score[0, 1, 6] = 1.0, 1.0
    pages, counts = select_pages_by_score(score, index, budget=48, sink=16, recent=16)
    assert pages[0, 0].tolist() == [0, 4, 9] and pages[0, 1].tolist() == [0, 6, 9] and counts.tolist() == [[3, 3]]


def test_scores_are_compared_at_bfloat16_precision_with_ties_in_page_order():
    """Keys order as the scores (negative ones and +-inf included); scores that agree to a
    bfloat16's precision tie, and the lower page wins a tie at the budget's edge; negative scores
    are ranked, -inf ones never chosen."""
    from sparse_attn.decode.select import compared_key

    values = torch.tensor([float("-inf"), -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 2.0, 3e38,
                           float("inf")])
    keys = compared_key(values)
    assert keys.dtype == torch.int64 and (keys[1:] >= keys[:-1]).all()
    assert keys[-1] == 0x7F80 and keys[2] < keys[3] < keys[4] <= keys[7] < keys[8] < keys[9] < keys[10]
    near = torch.tensor([1.0, 1.0 + 2 ** -10, 1.0 + 2 ** -6])
    assert compared_key(near).tolist()[0] == compared_key(near).tolist()[1] < compared_key(near).tolist()[2]

    _, index = _case(lengths=(160,))
    score = torch.full((1, 2, index.max_pages), -5.0)
    score[0, 0, 7], score[0, 0, 3] = 1.0 + 2 ** -10, 1.0  # a near-tie: page 3 wins by page order
    score[0, 1, :] = float("-inf")
    score[0, 1, 2] = -4.0  # the only finite score of head 1
    pages, counts = select_pages_by_score(score, index, budget=16, sink=0, recent=0)
    assert pages[0, 0].tolist() == [3] and counts.tolist() == [[1, 1]] and pages[0, 1].tolist() == [2]


def test_bad_scores_are_refused_naming_score():
    _, index = _case()
    for bad in (torch.zeros(2, 2, 3), torch.zeros(2, 2, index.max_pages, dtype=torch.int64), "x"):
        with pytest.raises(ValueError, match="score"):
            select_pages_by_score(bad, index, budget=64)


def _gates_and_qk(layer: int, seed: int):
    """Fresh gates (blocks of 32) for a tiny Llama and the post-RoPE q, k of ``layer`` on 2 x 200
    random tokens."""
    model = tiny_llama(vocab_size=64, layers=2, positions=512)
    gates = SeerGates.for_model(model, block_size=32, gate_dim=16)
    ids = torch.randint(0, 64, (2, 200), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), capture_qk(model) as captured:
        model(ids)
    return (gates, *captured[layer])


def test_seer_decode_shares_cover_each_sequences_pages():
    gates, q, k = _gates_and_qk(1, seed=1)
    index = PageIndex.build(k, 16, lengths=[200, 90], capacity=256)
    step_q = torch.stack([q[0, :, 199:200], q[1, :, 89:90]])  # each sequence's last query row
    shares = decode_page_shares(gates, 1, step_q, k, index)
    assert shares.shape == (2, 2, index.max_pages)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, 2), atol=1e-5, rtol=0)
    assert (shares[1, :, 6:] == 0).all()  # 90 tokens fill pages 0-5
    # Each sequence scores as it would alone: its own query position and only its own keys.
    alone = decode_page_shares(gates, 1, step_q[1:], k[1:, :, :90],
                               PageIndex.build(k[1:, :, :90], 16, lengths=[90], capacity=256))
    torch.testing.assert_close(shares[1:], alone, atol=1e-6, rtol=1e-5)
    pages, counts = select_pages_by_score(shares, index, budget=64, sink=16, recent=16)
    assert counts.tolist() == [[4, 4], [4, 4]] and (pages[1] < 6).all()
    with pytest.raises(ValueError, match="layer"):
        decode_page_shares(gates, 2, step_q, k, index)


def test_gate_key_summaries_kept_by_appends_give_the_shares_of_the_whole_cache():
    """Summaries built from 150 keys, then appended 1, 9 and 16 keys at a time (crossing gate blocks
    of 32): at every length the decode gate's page shares equal those pooled from the cache."""
    from sparse_attn.methods.seer_gate import GateKeySummaries, pooled_keys

    gates, q, k = _gates_and_qk(0, seed=2)
    summaries = GateKeySummaries(gates, k, 150)
    length = 150
    for step in (1, 9, 16, 16):
        summaries.append(gates, k[:, :, length:length + step])
        length += step
        assert summaries.length == length
        torch.testing.assert_close(summaries.pooled(), pooled_keys(gates.unrotate(k[:, :, :length], 0), 32),
                                   atol=1e-5, rtol=1e-5)
        index = PageIndex.build(k[:, :, :length], 16, capacity=256)
        step_q = q[:, :, length - 1:length]
        want = decode_page_shares(gates, 0, step_q, k[:, :, :length], index)
        got = decode_page_shares(gates, 0, step_q, k[:, :, :length], index, summaries=summaries)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
