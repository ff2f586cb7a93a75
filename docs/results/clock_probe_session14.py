"""Session-14 probe (archived, not part of the library): the 128K/32K d=0.1 backward timed isolated
(1 s idle before each call), sustained (back to back, ~3 s) and by do_bench, ours vs Flex, with
phase timestamps to align nvidia-smi's clock/power samples. Run from the repository root on a GPU:

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu,\
clocks_event_reasons.active --format=csv,noheader -lms 50 > $OUT/smi.csv & SMI=$!
    PYTHONPATH=src python3 docs/results/clock_probe_session14.py 32768 131072; kill $SMI

benchmarks/gpu_power.py and ``bench_attention.py --sustain`` replaced it (NVML energy counter)."""
import json, os, sys, time
import torch
sys.path.insert(0, "src")
from sparse_attn import random_layout, sparse_attention
from sparse_attn.backends.flex import _compiled_flex
import torch._functorch.config as fc
fc.donated_buffer = False
import triton

out_dir = os.environ.get("OUT", "/tmp")
res = {"phases": []}
flex = _compiled_flex()
for L in [int(x) for x in sys.argv[1:]] or [131072]:
    torch.manual_seed(0)
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    layout = random_layout(L, density=0.1, num_heads=32, block_size=128, seed=1, device="cuda")
    bm = layout.to_flex_block_mask(num_heads=32)
    runs = {"ours": lambda: sparse_attention(q, k, v, layout, backend="triton"),
            "flex": lambda: flex(q, k, v, block_mask=bm, enable_gqa=True)}
    outs = {}
    for name, run in runs.items():
        o = run(); g = torch.randn_like(o)
        for _ in range(2):
            torch.autograd.grad(o, (q, k, v), g, retain_graph=True)
        outs[name] = (o, g)
    torch.cuda.synchronize()
    n_sus = max(5, int(3000 / (L / 131072) ** 2 / 100))
    for rnd in range(2):
        for name, (o, g) in outs.items():
            bwd = lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True)
            iso = []
            t0 = time.time()
            for _ in range(5):
                time.sleep(1.0)
                a, b = torch.cuda.Event(True), torch.cuda.Event(True)
                a.record(); bwd(); b.record(); torch.cuda.synchronize()
                iso.append(a.elapsed_time(b))
            t1 = time.time()
            ev = [torch.cuda.Event(True) for _ in range(n_sus + 1)]
            ev[0].record()
            for i in range(n_sus):
                bwd(); ev[i + 1].record()
            torch.cuda.synchronize()
            sus = [ev[i].elapsed_time(ev[i + 1]) for i in range(n_sus)]
            t2 = time.time()
            time.sleep(1.0)
            db = triton.testing.do_bench(bwd, warmup=25, rep=200, return_mode="median")
            t3 = time.time()
            row = dict(length=L, round=rnd, impl=name, isolated_ms=iso, sustained_ms=sus, do_bench_ms=db,
                       t_iso=(t0, t1), t_sus=(t1, t2), t_dobench=(t2 + 1.0, t3))
            res["phases"].append(row)
            print(f"L={L} r{rnd} {name}: isolated {sorted(iso)[2]:.2f} ms, sustained first {sus[0]:.2f} "
                  f"median {sorted(sus)[len(sus)//2]:.2f} last {sus[-1]:.2f}, do_bench {db:.2f}", flush=True)
    del q, k, v, outs
json.dump(res, open(os.path.join(out_dir, "clock_probe.json"), "w"), indent=1)
