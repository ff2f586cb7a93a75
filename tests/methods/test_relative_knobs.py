"""Count knobs given as shares of the length (a float in (0, 1)) or as counts (an int), and the
report's ``knob_dense`` naming the knobs that keep every block by themselves."""

import re

import pytest
import torch

from sparse_attn.methods import METHODS, KnobError, get_method
from sparse_attn.methods.knobs import resolve_count
from sparse_attn.methods.vertical_slash import MINFERENCE_LENGTH

COUNT_KNOBS = [(name, knob) for name, cls in sorted(METHODS.items())
               for knob, spec in sorted(cls.knob_specs().items()) if spec.share_of is not None]


def _random_qk(length, heads=2, kv_heads=1, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, length, dim, generator=gen), torch.randn(1, kv_heads, length, dim, generator=gen))


def _density(name, length, **knobs):
    q, k = _random_qk(length)
    return get_method(name, block_size=64, sink=0, **knobs).estimate(q, k).density()


def test_the_count_knobs_are_the_ones_the_length_scales():
    assert COUNT_KNOBS == [("flexprefill", "min_budget"), ("pooled_topk", "top_k"), ("quest", "top_k"),
                           ("seer", "top_k"), ("sliding_window", "window"), ("vertical_slash", "slash_size"),
                           ("vertical_slash", "vertical_size")]


def test_resolve_count_keeps_ints_and_scales_shares():
    assert resolve_count(1000, 8192) == 1000
    assert resolve_count(0, 8192) == 0
    assert resolve_count(0.25, 1000) == 250
    assert resolve_count(0.1, 30) == 3  # nearest, not rounded up by float error
    assert resolve_count(1e-6, 100) == 1  # a share keeps at least one
    assert resolve_count([0.5, 7], 64) == [32, 7]


def test_vertical_slash_defaults_are_minference_counts_at_128k_and_shares_elsewhere():
    method = get_method("vertical_slash")
    assert method.count(method.vertical_size, MINFERENCE_LENGTH) == 1000
    assert method.count(method.slash_size, MINFERENCE_LENGTH) == 6096
    assert method.count(method.vertical_size, 8192) == 62
    assert method.count(method.slash_size, 8192) == 381


@pytest.mark.parametrize("name,share,count", [
    ("vertical_slash", {"vertical_size": 0.004, "slash_size": 0.004}, {"vertical_size": 4, "slash_size": 4}),
    ("pooled_topk", {"top_k": 0.25}, {"top_k": 4}),
    ("quest", {"top_k": 0.25}, {"top_k": 4}),
    ("sliding_window", {"window": 0.25}, {"window": 256}),
])
def test_a_share_keeps_the_density_across_lengths_where_a_count_does_not(name, share, count):
    # At 1024 tokens (16 key blocks) the share and the count are the same number.
    short_share, long_share = _density(name, 1024, **share), _density(name, 4096, **share)
    short_count, long_count = _density(name, 1024, **count), _density(name, 4096, **count)
    assert short_share == pytest.approx(short_count)
    assert abs(long_share - short_share) < 0.1, (short_share, long_share)
    assert long_count < 0.6 * short_count, (short_count, long_count)


@pytest.mark.parametrize("name,knob", COUNT_KNOBS, ids=[f"{n}.{k}" for n, k in COUNT_KNOBS])
@pytest.mark.parametrize("value", [1.0, 1.5, -0.5, 0.0, -3, float("inf"), float("nan")])
def test_bad_shares_and_negative_counts_raise_naming_the_knob(name, knob, value):
    with pytest.raises(KnobError, match=re.escape(f"{name}: {knob}={value!r} ")) as info:
        get_method(name, **{knob: value})
    assert "or a share in (0, 1)" in str(info.value)


def test_a_float_count_is_refused_as_a_share_out_of_range():
    with pytest.raises(KnobError, match=re.escape(
            "vertical_slash: vertical_size=1000.0 is not >= 0, or a share in (0, 1): a float is a share of the "
            "key length, in (0, 1); a count is an int")):
        get_method("vertical_slash", vertical_size=1000.0)
    with pytest.raises(KnobError, match=re.escape("pooled_topk: top_k[1]=2.0 is not >= 1, or a share in (0, 1)")):
        get_method("pooled_topk", top_k=[0.5, 2.0])
    with pytest.raises(KnobError, match=re.escape("quest: per_layer[3]: top_k=0 is not >= 1")):
        get_method("quest", per_layer={3: {"top_k": 0}})
    assert get_method("pooled_topk", top_k=[0.5, 2]).top_k == [0.5, 2]  # per head, shares and counts mixed


KNOB_DENSE = [
    ("vertical_slash", {"slash_size": 512}, ("slash_size",)),
    ("vertical_slash", {"vertical_size": 0.99}, ("vertical_size",)),
    ("vertical_slash", {"vertical_size": 512, "slash_size": 512}, ("vertical_size", "slash_size")),
    ("pooled_topk", {"top_k": 100}, ("top_k",)),
    ("quest", {"top_k": 0.99}, ("top_k",)),
    ("sliding_window", {"window": 512}, ("window",)),
    ("flexprefill", {"tau": 1.0, "min_budget": 512}, ("min_budget",)),
]


@pytest.mark.parametrize("name,knobs,expected", KNOB_DENSE, ids=[f"{n}-{k}" for n, k, _ in KNOB_DENSE])
def test_the_report_names_the_knob_that_keeps_every_block(name, knobs, expected):
    q, k = _random_qk(512)
    layout, report = get_method(name, block_size=64, **knobs).estimate(q, k, return_report=True)
    assert report.density == 1.0
    assert report.knob_dense == expected


@pytest.mark.parametrize("name,knobs", [
    ("vertical_slash", {"vertical_size": 0.01, "slash_size": 0.03}),  # dense on random scores, not by the counts
    ("xattention", {"threshold": 1.0}),
    ("flexprefill", {"tau": 1.0, "min_budget": 0.5, "gamma": 1.0}),
    ("sliding_window", {"window": 0.5}),
    ("pooled_topk", {"top_k": 0.25}),
])
def test_no_knob_is_named_when_the_scores_or_nothing_made_it_dense(name, knobs):
    q, k = _random_qk(1024)
    _, report = get_method(name, block_size=64, **knobs).estimate(q, k, return_report=True)
    if name in ("vertical_slash", "xattention"):
        assert report.density == 1.0
    assert report.knob_dense == ()


def test_a_count_is_dense_by_knob_at_a_short_length_and_not_at_a_long_one():
    method = get_method("pooled_topk", block_size=64, top_k=6)
    _, short = method.estimate(*_random_qk(256), return_report=True)  # 4 key blocks: 6 keeps them all
    _, long = method.estimate(*_random_qk(2048), return_report=True)  # 32 key blocks
    assert short.knob_dense == ("top_k",) and long.knob_dense == ()
    assert short.density == 1.0 and long.density < 0.6
