"""select_pages: static shapes, sorted pages and padding, sink and recent kept, the budget respected,
one selection per KV group (the group rule checked against page_mass), planted pages found by quest
and pooled, the oracle against a float64 brute force, and every input check."""

import math

import pytest
import torch

from sparse_attn.decode import PageIndex, PageSelection, page_mass, select_pages
from sparse_attn.methods import KnobError

SCORING = ["quest", "pooled", "oracle"]
METHODS = SCORING + ["sink_window"]


def setup(lengths=(200, 77, 16, 0), heads=4, kv_heads=2, rows=1, dim=16, page=16, capacity=256):
    k = torch.randn(len(lengths), kv_heads, capacity, dim)
    index = PageIndex.build(k, page, lengths=list(lengths), capacity=capacity)
    q = torch.randn(len(lengths), heads, rows, dim)
    return q, index, k


def forced_pages(length, page, sink, recent):
    if length == 0:
        return set()
    sink_pages = set(range(min(math.ceil(sink / page), math.ceil(length / page))))
    recent_pages = set(range(max(length - recent, 0) // page, math.ceil(length / page))) if recent else set()
    return sink_pages | recent_pages


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("budget,sink,recent", [(64, 16, 16), (100, 20, 5), (80, 0, 0), (128, 0, 40)])
def test_selection_invariants(method, rows, budget, sink, recent):
    """Static shapes, int32, sorted, padding repeats the last page, sink and recent kept, the budget
    respected, nothing past the length, all pages where the budget covers them."""
    lengths = (200, 77, 16, 0, 33)
    q, index, k = setup(lengths, rows=rows)
    pages, counts = select_pages(q, index, method=method, budget=budget, sink=sink, recent=recent, k_cache=k)
    width = math.ceil(budget / 16)
    assert pages.shape == (5, 2, width) and counts.shape == (5, 2)
    assert pages.dtype == torch.int32 and counts.dtype == torch.int32
    for b, length in enumerate(lengths):
        num_pages = math.ceil(length / 16)
        forced = forced_pages(length, 16, sink, recent)
        for h in range(2):
            n = int(counts[b, h])
            chosen = pages[b, h, :n].tolist()
            assert chosen == sorted(set(chosen))  # strictly increasing
            assert all(0 <= p < num_pages for p in chosen)  # never past the length
            assert forced <= set(chosen)
            pad = chosen[-1] if n else 0
            assert (pages[b, h, n:] == pad).all()
            if num_pages <= width:
                assert chosen == list(range(num_pages))  # the budget covers the sequence: all pages
            elif method == "sink_window":
                assert set(chosen) == forced
            else:
                assert n == width


@pytest.mark.parametrize("method", METHODS)
def test_budget_covering_the_cache_selects_every_page(method):
    q, index, k = setup((200, 77, 256, 1))
    pages, counts = select_pages(q, index, method=method, budget=256, sink=16, recent=16, k_cache=k)
    assert pages.shape == (4, 2, 16)
    assert counts.tolist() == [[13, 13], [5, 5], [16, 16], [1, 1]]
    assert torch.equal(pages[2], torch.arange(16, dtype=torch.int32).expand(2, 16))
    # A budget past the capacity keeps the width at the index's pages.
    pages, counts = select_pages(q, index, method=method, budget=10_000, sink=16, recent=16, k_cache=k)
    assert pages.shape == (4, 2, 16) and counts.tolist() == [[13, 13], [5, 5], [16, 16], [1, 1]]


@pytest.mark.parametrize("method", SCORING)
@pytest.mark.parametrize("group_score", ["mass", "max"])
@pytest.mark.parametrize("rows", [1, 4])
def test_one_selection_per_kv_group_by_the_group_rule(method, group_score, rows):
    """The free slots go to the pages with the best group score: page_mass summed (or maxed) over the
    group's heads and rows, the same for every head of the group."""
    lengths = (256, 150, 97)
    q, index, k = setup(lengths, heads=6, kv_heads=2, rows=rows)
    sink, recent, budget = 16, 20, 96
    pages, counts = select_pages(q, index, method=method, budget=budget, sink=sink, recent=recent, k_cache=k,
                                 group_score=group_score)
    share = page_mass(q, index, method=method, k_cache=k)  # (B, Hkv, G, Sq, Np)
    assert share.shape == (3, 2, 3, rows, 16)
    score = share.sum((2, 3)) if group_score == "mass" else share.amax((2, 3))
    for b, length in enumerate(lengths):
        forced = forced_pages(length, 16, sink, recent)
        for h in range(2):
            others = [p for p in range(math.ceil(length / 16)) if p not in forced]
            best = sorted(others, key=lambda p: -float(score[b, h, p]))[:6 - len(forced)]
            assert set(pages[b, h, :counts[b, h]].tolist()) == forced | set(best)

    # Reordering a group's heads changes nothing; another group's queries do not move this one's pages.
    perm = torch.tensor([2, 0, 1, 3, 4, 5])
    q2 = q[:, perm].clone()
    q2[:, 3:] = torch.randn_like(q2[:, 3:])
    pages2, counts2 = select_pages(q2, index, method=method, budget=budget, sink=sink, recent=recent, k_cache=k,
                                   group_score=group_score)
    assert torch.equal(pages2[:, 0], pages[:, 0]) and torch.equal(counts2[:, 0], counts[:, 0])


def test_group_rules_differ_as_documented():
    """One head sure of page A, the other heads of the group lukewarm on page B: ``max`` keeps A (the
    one head's choice), ``mass`` keeps B (more mass summed over the group)."""
    dim, page = 16, 16
    k = torch.zeros(1, 1, 128, dim)
    k[0, 0, 2 * page:3 * page, 0] = 1.0  # page 2: along e0
    k[0, 0, 5 * page:6 * page, 1] = 1.0  # page 5: along e1
    index = PageIndex.build(k, page)
    q = torch.zeros(1, 4, 1, dim)
    q[0, 0, 0, 0] = 40.0   # head 0: all its mass on page 2
    q[0, 1:, 0, 1] = 8.0   # heads 1-3: most of their mass on page 5
    kwargs = dict(budget=48, sink=16, recent=16)  # sink page 0, recent page 7, one free slot
    for method in SCORING:
        pages, counts = select_pages(q, index, method=method, group_score="max", k_cache=k, **kwargs)
        assert pages[0, 0, :counts[0, 0]].tolist() == [0, 2, 7], method
        pages, counts = select_pages(q, index, method=method, group_score="mass", k_cache=k, **kwargs)
        assert pages[0, 0, :counts[0, 0]].tolist() == [0, 5, 7], method


@pytest.mark.parametrize("method", ["quest", "pooled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_page_is_found(method, dtype):
    """A page whose keys line up with the queries (one token for quest's bound, the whole page for
    the pooled mean) wins the one free slot, in every sequence of a batch of different lengths."""
    lengths, dim, page = (256, 180, 129), 32, 16
    k = 0.1 * torch.randn(3, 2, 256, dim)
    q = 0.1 * torch.randn(3, 4, 1, dim)
    planted = [9, 4, 6]
    for b, p in enumerate(planted):
        direction = torch.randn(dim)
        direction /= direction.norm()
        q[b, :, 0] += 3.0 * direction
        if method == "quest":
            k[b, :, p * page + 7] = 4.0 * direction
        else:
            k[b, :, p * page:(p + 1) * page] += 2.0 * direction
    index = PageIndex.build(k.to(dtype), page, lengths=list(lengths), capacity=256)
    # sink page 0 and recent page (the last: recent=1 spans one page), one free slot
    pages, counts = select_pages(q.to(dtype), index, method=method, budget=48, sink=16, recent=1)
    for b, length in enumerate(lengths):
        last = (length - 1) // page
        for h in range(2):
            assert pages[b, h, :counts[b, h]].tolist() == [0, planted[b], last]


def test_quest_bound_is_an_upper_bound():
    q, index, k = setup((256, 100), rows=2)
    kmin, kmax = index.kmin.double(), index.kmax.double()
    qg = q.double().view(2, 2, 2, 2, 16)
    bound = torch.einsum("bngsd,bnpd->bngsp", qg.clamp(min=0), kmax.nan_to_num(posinf=0, neginf=0)) + \
        torch.einsum("bngsd,bnpd->bngsp", qg.clamp(max=0), kmin.nan_to_num(posinf=0, neginf=0))
    logits = torch.einsum("bngsd,bnkd->bngsk", qg, k.double())
    for b, length in enumerate((256, 100)):
        for p in range(math.ceil(length / 16)):
            true_max = logits[b, ..., p * 16:min((p + 1) * 16, length)].amax(-1)
            assert (bound[b, ..., p] >= true_max - 1e-9).all()


@pytest.mark.parametrize("rows", [1, 5])
def test_oracle_picks_the_true_top_mass_pages(rows):
    """Against a float64 brute force with causal rows: the oracle's pages capture the most group mass
    any selection of that size with the sink and recent pages can."""
    lengths, page, dim = (256, 170, 90), 16, 16
    q, index, k = setup(lengths, heads=4, kv_heads=2, rows=rows, dim=dim)
    q = 2.0 * q  # sharper attention: distinct page masses
    sink, recent, budget = 16, 16, 112
    pages, counts = select_pages(q, index, method="oracle", budget=budget, sink=sink, recent=recent, k_cache=k)
    scale = dim ** -0.5
    for b, length in enumerate(lengths):
        for h in range(2):
            qs = q[b, 2 * h:2 * h + 2].double()  # (G, Sq, D)
            logits = qs @ k[b, h, :length].double().T * scale  # (G, Sq, L)
            pos = torch.arange(length)
            visible = pos[None, :] <= (length - rows + torch.arange(rows))[:, None]
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
            mass = torch.nn.functional.pad(probs, (0, -length % page)).view(2, rows, -1, page).sum((0, 1, 3))
            forced = forced_pages(length, page, sink, recent)
            others = sorted((p for p in range(len(mass)) if p not in forced), key=lambda p: -float(mass[p]))
            best = forced | set(others[:budget // page - len(forced)])
            chosen = set(pages[b, h, :counts[b, h]].tolist())
            assert chosen == best
            assert float(mass[list(chosen)].sum()) == pytest.approx(float(mass[list(best)].sum()), abs=1e-6)


def test_page_mass_matches_the_documented_formulas():
    q, index, k = setup((256, 100), rows=2)
    scale = 0.3
    tokens = index.page_tokens().double()
    qg = q.double().view(2, 2, 2, 2, 16)
    kmax = index.kmax.double().nan_to_num(posinf=0, neginf=0)
    kmin = index.kmin.double().nan_to_num(posinf=0, neginf=0)
    bound = torch.einsum("bngsd,bnpd->bngsp", qg.clamp(min=0), kmax) + \
        torch.einsum("bngsd,bnpd->bngsp", qg.clamp(max=0), kmin)
    pooled = torch.einsum("bngsd,bnpd->bngsp", qg, index.ksum.double() / tokens.clamp(min=1)[:, None, :, None])
    for method, score in (("quest", bound), ("pooled", pooled)):
        expected = torch.softmax(score * scale + tokens.log()[:, None, None, None, :], -1)
        got = page_mass(q, index, method=method, scale=scale)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
        assert (got[1, ..., 7:] == 0).all()  # past the length
    oracle = page_mass(q, index, method="oracle", k_cache=k)
    torch.testing.assert_close(oracle.sum(-1), torch.ones(2, 2, 2, 2))


def test_empty_and_single_page_sequences():
    q, index, k = setup((0, 1, 16, 17))
    for method in METHODS:
        pages, counts = select_pages(q, index, method=method, budget=32, sink=0, recent=16, k_cache=k)
        assert counts.tolist() == [[0, 0], [1, 1], [1, 1], [2, 2]]
        assert pages[0].tolist() == [[0, 0], [0, 0]] and pages[3].tolist() == [[0, 1], [0, 1]]


def test_selection_object_and_knobs():
    q, index, k = setup()
    selection = PageSelection(method="quest", budget=64, sink=16, recent=16)
    pages, counts = selection(q, index)
    pages2, counts2 = select_pages(q, index, method="quest", budget=64, sink=16, recent=16)
    assert torch.equal(pages, pages2) and torch.equal(counts, counts2)
    assert selection.budget_pages(16) == 4 and selection.sink_pages(16) == 1
    assert selection.recent_pages_max(16) == 2 and PageSelection("quest", 64, recent=0).recent_pages_max(16) == 0
    for page in (16, 64):  # the worst alignment of the recent window, brute-forced
        for recent in range(1, 3 * page):
            spans = max(len(forced_pages(end, page, 0, recent)) for end in range(recent, recent + page))
            assert PageSelection("quest", 64, recent=recent).recent_pages_max(page) == spans


def test_validation_errors():
    q, index, k = setup()
    good = dict(method="quest", budget=64, sink=16, recent=16)

    def raises(match, q=q, index=index, exc=ValueError, **changes):
        with pytest.raises(exc, match=match):
            select_pages(q, index, **{**good, **changes})

    for bad in (0, -16, 64.0, True, "64", None):
        raises("budget", budget=bad)
    raises("budget=8 is smaller than the index's page_size=16", budget=8)
    raises("budget=32 holds 2 page", budget=32, sink=16, recent=16)  # sink 1 page + recent up to 2 pages
    for name in ("sink", "recent"):
        raises(name, **{name: -1})
        raises(name, **{name: 1.5})
    raises("method", method="nope")
    raises("method", method=None)
    raises("group_score", group_score="mean")
    for bad in (0, -1.0, float("inf"), float("nan"), "x"):
        raises("scale", scale=bad)
    raises("no knob", top_k=3)
    with pytest.raises(KnobError):
        select_pages(q, index, **{**good, "budget": 0})

    raises("q must be", q=q[0])
    raises("q .* does not fit", q=q[:2])
    raises("q .* does not fit", q=torch.randn(4, 4, 1, 8))
    raises("not a multiple", q=torch.randn(4, 3, 1, 16))
    raises("not a multiple", q=torch.randn(4, 1, 1, 16))
    raises("query rows", q=torch.randn(4, 4, 0, 16))
    raises("query rows", q=torch.randn(4, 4, 17, 16))
    raises("dtype", q=q.double())
    raises("device", q=q.to("meta"))
    raises("index must be a PageIndex", index=k, exc=TypeError)

    raises("k_cache", method="oracle")
    raises("k_cache", method="oracle", k_cache=k[:, :1])
    raises("k_cache", method="oracle", k_cache=k[..., :8])
    raises("k_cache has dtype", method="oracle", k_cache=k.double())
    raises("k_cache holds 100 positions", method="oracle", k_cache=k[:, :, :100])
    raises("k_cache is on", method="oracle", k_cache=k.to("meta"))
    with pytest.raises(ValueError, match="method"):
        page_mass(q, index, method="sink_window")
    with pytest.raises(ValueError, match="scale"):
        page_mass(q, index, method="quest", scale=-1.0)
    with pytest.raises(ValueError, match="page_size"):
        PageIndex.build(k, 24)
