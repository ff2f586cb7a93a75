"""Sustained timing with energy and clocks: what a long training or prefill run sees.

``triton.testing.do_bench`` times a call over ~0.2 s. Over seconds of back-to-back work an H100
reaches its power cap (700 W) and lowers its SM clock (NVML reports "SW power cap"): on a 128K
backward the clock falls from 1980 MHz to ~1550-1700 MHz (docs/benchmarks.md). Then
speed follows energy per call, not just cycles per call, so two kernels that are level in cycles
can differ in time. ``sustained`` runs a call back to back for a few seconds and reports time per
call together with the joules it took (NVML's energy counter) and the mean SM clock.
"""

from __future__ import annotations

import statistics
import threading
import time


def nvml_reader(device_index: int = 0):
    """A callable returning ``(energy in millijoules since driver load, SM clock in MHz)`` for one
    GPU, or None (with the reason printed) when NVML or its energy counter is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception as exc:  # no nvidia-ml-py, no driver support: say so, time without energy
        print(f"gpu_power: no NVML energy counter ({type(exc).__name__}: {exc}); sustained runs report time only")
        return None

    def read():
        return (float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)),
                float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)))

    return read


def sustained(fn, seconds: float, reader=None, sync=None, sample_every: float = 0.02) -> dict:
    """Run ``fn`` back to back for about ``seconds`` (after one warm call that sizes the loop) and
    return ``ms`` per call, plus, with a ``reader`` (see ``nvml_reader``), ``joules`` per call,
    mean ``watts`` and the mean SM clock ``sm_mhz`` sampled every ``sample_every`` seconds from a
    side thread. ``sync`` waits for the device (``torch.cuda.synchronize``); None on CPU."""
    sync = sync or (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    calls = max(3, int(seconds / max(time.perf_counter() - start, 1e-6)))
    clocks, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            clocks.append(reader()[1])
            stop.wait(sample_every)

    sampler = threading.Thread(target=sample, daemon=True) if reader else None
    energy_start = reader()[0] if reader else None
    if sampler:
        sampler.start()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    elapsed = time.perf_counter() - start
    result = {"ms": elapsed / calls * 1e3, "calls": calls}
    if reader:
        joules = (reader()[0] - energy_start) / 1e3
        stop.set()
        sampler.join()
        result.update(joules=joules / calls, watts=joules / elapsed,
                      sm_mhz=statistics.fmean(clocks) if clocks else None)
    return result


def abba(runs: dict, measure) -> dict:
    """Measure two named callables in the order A, B, B, A and average each one's two results (key
    by key), so a drift in temperature or clock over the four runs falls on both alike."""
    (name_a, run_a), (name_b, run_b) = runs.items()
    results = {name_a: [], name_b: []}
    for name, run in ((name_a, run_a), (name_b, run_b), (name_b, run_b), (name_a, run_a)):
        results[name].append(measure(run))
    return {name: {key: (statistics.fmean(r[key] for r in pair) if pair[0][key] is not None else None)
                   for key in pair[0]} for name, pair in results.items()}
