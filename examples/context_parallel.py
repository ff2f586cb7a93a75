"""Context-parallel block-sparse attention over the ranks torchrun starts.

    torchrun --nproc-per-node 2 examples/context_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/context_parallel.py --seq 262144 --heads 32 --kv-heads 8 --dim 128

Every rank builds the same layout and plan, takes its rows of the same seeded q/k/v, runs the forward
and backward, and rank 0 prints the plan (balance, received bytes). With --check (small sequences
only) the last rank also compares its rows and gradients with single-process sparse_attention on the
whole sequence.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

from sparse_attn import sliding_window_layout, sparse_attention
from sparse_attn.distributed import context_parallel_attention, plan_partition


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--check", action="store_true", help="compare with single-process sparse_attention")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32

    layout = sliding_window_layout(args.seq, window=args.window, sink=args.block, num_heads=args.kv_heads,
                                   block_size=args.block, device=device)
    plan = plan_partition(layout, world)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, args.heads, args.seq, args.dim, generator=generator, device=device, dtype=dtype)
    k = torch.randn(1, args.kv_heads, args.seq, args.dim, generator=generator, device=device, dtype=dtype)
    v = torch.randn(1, args.kv_heads, args.seq, args.dim, generator=generator, device=device, dtype=dtype)
    shards = [plan.shard(t, rank).clone().requires_grad_(True) for t in (q, k, v)]

    start = time.perf_counter()
    out = context_parallel_attention(*shards, layout, plan=plan)
    out.float().square().sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rank == 0:
        summary = plan.summary()
        received = plan.received_bytes(1, args.kv_heads, args.dim, dtype)
        print(f"{world} ranks, {args.seq} tokens, density {layout.density():.3f}, {seconds:.3f} s forward+backward")
        print(f"shards {summary['shard_lengths']}, kept blocks {summary['kept_blocks']}, "
              f"balance {summary['balance']:.3f}, received MB {[round(b / 2**20, 2) for b in received]}")
    last = world - 1
    if args.check and rank == last:  # the last rank reads keys and values of other ranks
        full = [t.clone().requires_grad_(True) for t in (q, k, v)]
        ref = sparse_attention(*full, layout)
        ref.float().square().sum().backward()
        errors = {"output": _rel(out, plan.shard(ref, last))}
        errors.update({f"d{n}": _rel(s.grad, plan.shard(f.grad, last)) for n, s, f in zip("qkv", shards, full)})
        print(f"rank {last} vs single process, relative errors: "
              + ", ".join(f"{name} {value:.2e}" for name, value in errors.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
