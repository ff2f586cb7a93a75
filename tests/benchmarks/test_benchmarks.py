"""The benchmark harness's timing helpers (CPU: the GPU timer is replaced by a call counter)."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_attention.py"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_attention():
    return load_benchmark("bench_attention")


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


@pytest.fixture(scope="module")
def gpu_power(bench_attention):
    import sys

    return sys.modules["gpu_power"]  # imported by bench_attention from benchmarks/


def test_sustained_reports_time_energy_and_clock_per_call(gpu_power):
    """A fake meter that draws 300 W at 1500 MHz: joules per call must equal 300 W x time per call."""
    import time

    t0 = time.perf_counter()

    def reader():
        return 300.0 * (time.perf_counter() - t0) * 1e3, 1500.0  # millijoules, MHz

    def work():
        time.sleep(0.002)

    result = gpu_power.sustained(work, seconds=0.1, reader=reader, sample_every=0.005)
    assert result["calls"] >= 3
    assert result["ms"] == pytest.approx(2.0, rel=0.8)
    assert result["watts"] == pytest.approx(300.0, rel=0.05)
    assert result["joules"] == pytest.approx(0.3 * result["ms"], rel=0.05)
    assert result["sm_mhz"] == 1500.0


def test_sustained_without_meter_reports_time_only(gpu_power):
    result = gpu_power.sustained(lambda: None, seconds=0.01)
    assert set(result) == {"ms", "calls"} and result["ms"] >= 0


def test_abba_orders_runs_and_averages_each_pair(gpu_power):
    order = []
    values = iter([1.0, 10.0, 30.0, 3.0])  # A, B, B, A

    def measure(run):
        order.append(run())
        return {"ms": next(values), "joules": None}

    result = gpu_power.abba({"ours": lambda: "ours", "flex": lambda: "flex"}, measure)
    assert order == ["ours", "flex", "flex", "ours"]
    assert result == {"ours": {"ms": 2.0, "joules": None}, "flex": {"ms": 20.0, "joules": None}}


def test_sustained_columns_in_row_and_table(bench_attention):
    row = {"seq": 8, "layout": "x", "density": 0.5, "mode": "bwd", "ours_ms": 1.0, "flex_ms": 1.1,
           "cudnn_dense_ms": None, "flash_dense_ms": None, "ours_tflops": 1.0, "flex_tflops": 1.0,
           "speedup_vs_flex": 1.1, "ours_over_cudnn_dense": None, "check_ok": True, "rounds": 1,
           "sustained": {"ours": {"ms": 2.0, "joules": 1.5, "sm_mhz": 1600.0},
                         "flex": {"ms": 2.2, "joules": 1.4, "sm_mhz": 1650.0}}}
    line = bench_attention.format_row(row)
    assert line.endswith("| 2.00 | 1.100 | 1.50/1.40 | 1600/1650 |")
    meta = {"device": "d", "torch": "t", "triton": "r", "date": "x", "matmul_tflops": 1.0, "copy_gbs": 1.0,
            "sustain_s": 2.0}
    table = bench_attention.format_table([row], meta).splitlines()
    assert table[2].count("|") == table[3].count("|") == line.count("|")


def test_ncu_summary_reads_the_shipped_profile():
    """``ncu_attention.py --summarize`` on the raw ncu page shipped in docs/results: one block per
    kernel with its duration, registers and largest stall reasons."""
    module = load_benchmark("ncu_attention")
    raw = BENCH.parents[1] / "docs" / "results" / "ncu_attention32k_d0.1_h100_2026-11-24_raw.csv.gz"
    text = module.summarize(str(raw))
    blocks = text.split("== ")[1:]
    assert [b.split("\n")[0] for b in blocks][:3] == ["_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"]
    dkdv = blocks[2]
    assert "ms=3.484" in dkdv and "regs=255" in dkdv
    stalls = dict(item.split("=") for item in dkdv.split("stalls (warps per issue): ")[1].split(", "))
    assert len(stalls) == 6 and max(stalls, key=lambda name: float(stalls[name])) == "wait"


@pytest.fixture(scope="module")
def bench_varlen():
    return load_benchmark("bench_varlen")


def test_varlen_sequence_lengths_are_seeded_and_sum_to_the_total(bench_varlen):
    lengths = bench_varlen.sequence_lengths(1000, 6, seed=3)
    assert len(lengths) == 6 and sum(lengths) == 1000 and min(lengths) > 0
    assert lengths == bench_varlen.sequence_lengths(1000, 6, seed=3) != bench_varlen.sequence_lengths(1000, 6, seed=4)


def test_varlen_flex_mask_is_what_varlen_attention_computes(bench_varlen):
    """Flex's document mask over the packed sequence keeps exactly the pairs each sequence's own
    cropped layout keeps (causal inside the sequence, nothing across sequences)."""
    from sparse_attn import random_layout

    lengths = [50, 17, 70]
    layout = random_layout(max(lengths), density=0.4, num_heads=1, batch=len(lengths), block_size=16, seed=2)
    mask_mod = bench_varlen.document_mask_mod(layout, lengths, "cpu")
    total = sum(lengths)
    idx = torch.arange(total)
    got = mask_mod(0, 0, idx[:, None], idx[None, :])
    want = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths):
        want[start:start + n, start:start + n] = layout.crop(i, n, n).to_token_mask()[0, 0]
        start += n
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < sum(n * (n + 1) // 2 for n in lengths)  # sparse, and not empty


@pytest.fixture(scope="module")
def bench_trainable():
    return load_benchmark("bench_trainable")


def test_trainable_table_shows_times_speedups_errors_and_skips(bench_trainable):
    timing = {"fwd_ms": 2.0, "fwdbwd_ms": 6.0}
    row = {"seq": 8192, "kv_heads": 8, "moba_density": 0.25, "moba_estimate_ms": 0.4,
           "cudnn": dict(timing), "flash": {"fwd_ms": 2.5, "fwdbwd_ms": 7.0},
           "flex causal": {"fwd_ms": 4.0, "fwdbwd_ms": 12.0, "fwd_speedup": 0.5, "fwdbwd_speedup": 0.5},
           "moba": {"fwd_ms": 1.0, "fwdbwd_ms": 2.0, "fwd_speedup": 2.0, "fwdbwd_speedup": 3.0},
           "moba on flex": {"error": "OutOfMemoryError: ..."},
           "nsa": {"skipped": "not run"}, "dsa": {"fwd_ms": 0.5, "fwdbwd_ms": 3.0, "fwd_speedup": 4.0,
                                                  "fwdbwd_speedup": 2.0}, "dsa_select_ms": 0.7}
    text = bench_trainable.table([row], {"gpu": "X", "torch": "t", "triton": "r", "heads": 32, "dim": 128})
    lines = text.splitlines()
    fwd = next(line for line in lines if line.startswith("| 8192 | 8 | fwd |"))
    # a row without some attention (an older run's) shows "-" there
    assert "| 1.00 (2.00x) |" in fwd and "| error | skipped | - | - | 0.50 (4.00x) | 0.250 | 0.40 | 0.70 | - |" in fwd
    assert any(line.startswith("| 8192 | 8 | fwdbwd |") and "2.00 (3.00x)" in line for line in lines)
    assert "8192/8 moba on flex: OutOfMemoryError" in text and "8192/8 nsa: not run" in text


def test_trainable_training_table_shows_tokens_per_second_speedups_and_errors(bench_trainable):
    row = {"seq": 8192, "dense": {"step_ms": 100.0, "tokens_per_s": 81920.0},
           "moba": {"step_ms": 50.0, "tokens_per_s": 163840.0, "speedup": 2.0}, "nsa": {"error": "RuntimeError: x"},
           "dsa": {"step_ms": 80.0, "tokens_per_s": 102400.0, "speedup": 1.25}}
    text = bench_trainable.train_table([row], {"gpu": "X", "torch": "t", "triton": "r"})
    assert "| 8192 | 81,920 | 163,840 (2.00x) | error | 102,400 (1.25x) |" in text
    assert "8192 nsa: RuntimeError: x" in text


@pytest.mark.parametrize("attention", ["dense", "moba", "nsa", "dsa"])
def test_trainable_training_step_runs_each_attention_on_cpu(bench_trainable, attention):
    """The training step the benchmark times, on CPU in float32 at 160 tokens (DSA with a budget below
    the length, so its sparse path and indexer loss run)."""
    model = bench_trainable.training_model(attention, 160, "cpu", dtype=torch.float32, dsa_top_k=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 259, (1, 160))
    losses = [bench_trainable.training_step(model, ids, optimizer) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    with pytest.raises(ValueError, match="attention must be one of"):
        bench_trainable.training_model("ring", 160, "cpu")


def test_trainable_decode_table_shows_step_times_speedups_and_errors(bench_trainable):
    row = {"seq": 131072, "kv_heads": 8, "cudnn": {"step_ms": 0.2}, "flash": {"step_ms": 0.25},
           "nsa step, kept compression": {"step_ms": 0.1, "step_speedup": 2.0},
           "nsa step, compressing the cache": {"error": "OutOfMemoryError: ..."},
           "dsa step": {"step_ms": 0.05, "step_speedup": 4.0}}
    text = bench_trainable.decode_table([row], {"gpu": "X", "torch": "t", "triton": "r", "heads": 32, "dim": 128})
    line = next(line for line in text.splitlines() if line.startswith("| 131072 | 8 |"))
    assert line == "| 131072 | 8 | 0.20 | 0.25 | 0.10 (2.00x) | error | 0.05 (4.00x) |"
    assert "131072/8 nsa step, compressing the cache: OutOfMemoryError" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_trainable_says_it_could_not_run_without_a_gpu(bench_trainable, capsys):
    assert bench_trainable.main(["--lengths", "128"]) == 2
    assert "nothing was measured" in capsys.readouterr().err


def test_decode_generate_table_shows_cache_speedup_and_host_time():
    """bench_decode's generate() table: the cache kind, the speed-up, and the host / GPU-done time of
    one decode forward for dense and sparse ('-' where not measured, as with a static cache)."""
    bench_decode = load_benchmark("bench_decode")
    row = {"context": 32768, "batch": 1, "layers": 4, "cache": "dynamic", "decode_method": "quest",
           "decode_budget": 2048, "decode_page": 64, "dense_ms_per_token": 4.0, "sparse_ms_per_token": 5.0,
           "dense_tokens_per_s": 250.0, "sparse_tokens_per_s": 200.0, "speedup": 0.8,
           "dense_host_ms": 1.5, "sparse_host_ms": 4.6, "dense_forward_ms": 3.9, "sparse_forward_ms": 4.8}
    static = {**row, "cache": "static"}
    for key in ("dense_host_ms", "sparse_host_ms", "dense_forward_ms", "sparse_forward_ms"):
        static.pop(key)
    lines = bench_decode.generate_table([row, static], {"gpu": "X", "torch": "t", "triton": "r"}).splitlines()
    assert "| 32768 | 1 | 4 | dynamic | quest budget 2048 page 64 | 4.00 | 5.00 | 250.0 | 200.0 | 0.80x | " \
           "1.50 / 4.60 | 3.90 / 4.80 |" in lines
    assert any(line.startswith("| 32768 | 1 | 4 | static |") and line.endswith("| - / - | - / - |") for line in lines)
