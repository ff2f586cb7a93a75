"""The benchmark harness's timing helpers (CPU: the GPU timer is replaced by a call counter)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_attention.py"


@pytest.fixture(scope="module")
def bench_attention():
    spec = importlib.util.spec_from_file_location("bench_attention_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_alternates_runs_every_round(bench_attention):
    order = []
    runs = {"ours": lambda: order.append("ours") or 1.0, "flex": lambda: order.append("flex") or 2.0}
    times = bench_attention.interleaved(runs, rounds=3)
    assert order == ["ours", "flex"] * 3
    assert times == {"ours": [1.0, 1.0, 1.0], "flex": [2.0, 2.0, 2.0]}


def test_round_summary_medians_and_ratio_range(bench_attention):
    summary = bench_attention.round_summary(ours=[1.0, 2.0, 4.0], flex=[1.5, 2.0, 3.0])
    assert summary["ours_ms"] == 2.0 and summary["flex_ms"] == 2.0
    assert summary["ratio_min"] == pytest.approx(0.75) and summary["ratio_max"] == pytest.approx(1.5)


@pytest.mark.parametrize("mode, forwards_timed", [("fwd", 2), ("bwd", 0), ("fwdbwd", 2)])
def test_timed_modes_run_what_they_name(bench_attention, monkeypatch, mode, forwards_timed):
    """``bwd`` times gradients of one retained graph: no forward inside the timed calls."""
    calls = {"forward": 0}
    x = torch.randn(4, 3, requires_grad=True)

    def run():
        calls["forward"] += 1
        return (x * 2).sin()

    def fake_bench(fn, grad_to_none=None):
        before = calls["forward"]
        fn()
        fn()
        calls["timed_forwards"] = calls["forward"] - before
        return 1.0

    monkeypatch.setattr(bench_attention, "bench", fake_bench)
    assert bench_attention.timed(run, (x,), mode) == 1.0
    assert calls["timed_forwards"] == forwards_timed
    assert bench_attention.FLOP_FACTOR[mode] == {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]
