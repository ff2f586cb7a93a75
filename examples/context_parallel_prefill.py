"""A transformers model's prefill with the sequence split over the ranks torchrun starts.

    torchrun --nproc-per-node 2 examples/context_parallel_prefill.py --check          # CPU, gloo, the canary
    torchrun --nproc-per-node 8 examples/context_parallel_prefill.py --model PATH --seq 262144 --method xattention

Every rank loads the same model (``canary``: the shipped one, or a local transformers directory) and
the same seeded token ids, runs its shard of the sequence through
``sparse_attn.distributed.context_parallel_prefill`` (each attention layer estimated on the shards and
attended with context parallelism) and gets the whole sequence's logits. Rank 0 prints the split and
the time; with --check (short sequences) it also compares the logits with the model patched with the
same method on one process.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import sparse_attn
from sparse_attn.distributed import context_parallel_prefill
from sparse_attn.eval.canary import resolve_model
from sparse_attn.integrations.hf import SparseConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="canary")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--method", default="xattention")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--check", action="store_true", help="compare with the patched model on one process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=dtype).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    with torch.no_grad():
        context_parallel_prefill(model, ids[:, : 2 * args.block * dist.get_world_size()], args.method,
                                 block_size=args.block)  # warm-up (compiles the kernels)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits, plan = context_parallel_prefill(model, ids, args.method, block_size=args.block)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if rank == 0:
        print(f"{args.seq} tokens over {dist.get_world_size()} ranks, shards {list(plan.shard_lengths)}, "
              f"{args.method}: {1000 * seconds:.1f} ms")
    if args.check and rank == 0:
        sparse_attn.patch(model, config=SparseConfig(method=args.method, knobs={"block_size": args.block},
                                                     fallback="never", min_kv_len=0))
        with torch.no_grad():
            want = model(ids).logits
        sparse_attn.unpatch(model)
        err = float((logits.float() - want.float()).norm() / want.float().norm())
        same = float((logits.argmax(-1) == want.argmax(-1)).float().mean())
        print(f"logits vs one process: relative error {err:.2e}, same next-token choice at {100 * same:.1f}% "
              "of positions")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
