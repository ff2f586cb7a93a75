"""context_parallel_estimate on 2 and 4 CPU processes (gloo): the global layout equals the
single-device estimate (causal, GQA 2, batch 2, a length that is not a block multiple), and
context-parallel attention under it equals whole-sequence attention; refused methods and errors."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_attn import sparse_attention
from sparse_attn.distributed import context_parallel_attention, context_parallel_estimate, plan_partition
from sparse_attn.methods import get_method
from utils import TOLERANCE, rel_error

B, H, HKV, D, BLOCK = 2, 4, 2, 16, 16
METHODS = {
    "xattention": dict(stride=4, threshold=0.5),
    "pooled_topp": dict(top_p=0.5),
    "pooled_topk": dict(top_k=0.2, dense_above=0.75),  # a share of the key blocks; on 2 ranks one group made dense
    "oracle": dict(top_p=0.5),
    "sliding_window": dict(window=20),
}


def _inputs(world):
    seq = 32 * world + 5  # the last shard ends in a partial block
    torch.manual_seed(3)
    q = torch.randn(B, H, seq, D, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, seq, D, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _shard(x, rank, world):
    return x[:, :, 32 * rank:32 * (rank + 1) if rank < world - 1 else x.shape[2]]


def _worker(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        q, k, v = _inputs(world)
        q_r, k_r, v_r = (_shard(t, rank, world) for t in (q, k, v))
        for name, knobs in METHODS.items():
            method = get_method(name, block_size=BLOCK, sink=16, **knobs)
            ref = method.estimate(q, k)
            layout, report = context_parallel_estimate(method, q_r, k_r, return_report=True)
            assert torch.equal(layout.to_dense(), ref.to_dense()), f"{name}: rank {rank} layout differs"
            assert 0.0 < ref.density() < 1.0, f"{name}: a trivial layout"
            static = name == "sliding_window"
            assert report["received_key_bytes"] == (0 if static else 32 * rank * B * HKV * D * 8)
            if world > 2 and name != "xattention":
                continue  # attention under the other layouts: on 2 ranks
            out = context_parallel_attention(q_r, k_r, v_r, layout, backend="reference")
            full = sparse_attention(q, k, v, ref, backend="reference")
            assert rel_error(out, _shard(full, rank, world)) < TOLERANCE[torch.float64], f"{name}: output"
        if world == 2:
            _errors(rank, world, q_r, k_r)
    finally:
        dist.destroy_process_group()


def _errors(rank, world, q_r, k_r):
    for name in ("vertical_slash", "flexprefill", "random"):
        with pytest.raises(ValueError, match=f"method '{name}' is not supported"):
            context_parallel_estimate(get_method(name, block_size=BLOCK), q_r, k_r)
    method = get_method("oracle", block_size=BLOCK)
    with pytest.raises(ValueError, match="k_shard holds"):
        context_parallel_estimate(method, q_r, k_r[:, :, 1:])
    with pytest.raises(TypeError, match="method must be"):
        context_parallel_estimate("oracle", q_r, k_r)
    with pytest.raises(ValueError, match="multiple of the method's block_size=64"):
        context_parallel_estimate(get_method("oracle", block_size=64), q_r, k_r)
    plan = plan_partition(get_method("dense", block_size=BLOCK).estimate(torch.zeros(1, 1, 69, D),
                                                                           torch.zeros(1, 1, 69, D)), world)
    if plan.shard_lengths[rank] != q_r.shape[2]:
        with pytest.raises(ValueError, match="the plan gives rank"):
            context_parallel_estimate(method, q_r, k_r, plan=plan)


@pytest.mark.parametrize("world", [2, 4])
def test_global_layout_and_attention_match_single_device(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


def test_uninitialized_group_raises():
    q = torch.randn(1, 1, 32, D)
    with pytest.raises(RuntimeError, match="before context_parallel_estimate"):
        context_parallel_estimate(get_method("oracle", block_size=BLOCK), q, q)
