"""Context-parallel attention on 2 and 4 CPU processes (gloo) against single-process sparse_attention
on the whole sequence: outputs and q/k/v gradients, causal and not, GQA 2, batch 2, float64 on the
reference backend and float16/bfloat16 on the Triton kernels; partition balance and which shards
travel."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_attn import BlockSparseLayout, LayoutError, sliding_window_layout, sparse_attention
from sparse_attn.distributed import PartitionPlan, context_parallel_attention, local_layout, plan_partition
from utils import TOLERANCE, random_layout, rel_error

B, H, HKV, D, BLOCK = 2, 4, 2, 8, 16


def _layouts(world: int) -> dict:
    """Layouts every rank builds identically (seeded), keyed by name."""
    seq = 32 * world
    torch.manual_seed(1)
    layouts = {
        "random_causal": random_layout(B, HKV, seq, seq, BLOCK, causal=True, density=0.5),
        "random_full": random_layout(1, H, seq, seq, BLOCK, causal=False, density=0.4),
        "window_causal": sliding_window_layout(seq, window=24, sink=16, num_heads=1, block_size=BLOCK),
        # A partial last block (seq - 7 tokens) that lower ranks read too.
        "random_full_tail": random_layout(B, 1, seq - 7, seq - 7, BLOCK, causal=False, density=0.5),
    }
    # Rank 0's rows read rank 1's shard; rank 1's rows read only their own shard.
    local = torch.zeros(seq // BLOCK, seq // BLOCK, dtype=torch.bool)
    for r in range(world):
        rows = slice(r * 32 // BLOCK, (r + 1) * 32 // BLOCK)
        local[rows, rows] = True
    local[0, -1] = True
    layouts["local_full"] = BlockSparseLayout.from_dense(local, seq, seq, BLOCK, causal=False)
    return layouts


def _compare(layout, rank, world, *, use_plan=True, dtype=torch.float64, backend="reference", dim=D,
             backward=True):
    """This rank's output (and, with ``backward``, q/k/v gradients) of context_parallel_attention vs
    the whole-sequence call (same backend and dtype) on q/k/v of head dim ``dim``."""
    seq = layout.q_len
    torch.manual_seed(2)
    q = torch.randn(B, H, seq, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, seq, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, seq, dim, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, H, seq, dim, dtype=dtype)
    plan = plan_partition(layout, world) if use_plan else plan_partition(layout, world, balance="tokens")
    shards = [plan.shard(t.detach(), rank).clone().requires_grad_(backward) for t in (q, k, v)]
    with torch.set_grad_enabled(backward):
        ref = sparse_attention(q, k, v, layout, backend=backend)
        out = context_parallel_attention(*shards, layout, plan=plan if use_plan else None, backend=backend)
    tol = TOLERANCE[dtype]
    assert rel_error(out, plan.shard(ref, rank)) < tol
    if not backward:
        return plan
    ref.backward(grad_out)
    out.backward(plan.shard(grad_out, rank))
    for name, full, shard in zip("qkv", (q, k, v), shards):
        err = rel_error(shard.grad, plan.shard(full.grad, rank))
        assert err < tol, f"rank {rank}: d{name} relative error {err:.2e}"
    return plan


def _errors(rank, world):
    layout = _layouts(world)["random_causal"]
    plan = plan_partition(layout, world)
    q, k, v = (torch.randn(B, h, plan.shard_lengths[rank], D, dtype=torch.float64) for h in (H, HKV, HKV))
    with pytest.raises(ValueError, match="k_shard/v_shard hold"):
        context_parallel_attention(q, k[:, :, 1:], v[:, :, 1:], layout, plan=plan)
    with pytest.raises(ValueError, match="the plan gives rank"):
        context_parallel_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], layout, plan=plan)
    short = plan_partition(random_layout(B, HKV, 32 * world + 32, 32 * world + 32, BLOCK), world)
    with pytest.raises(LayoutError, match="plan was built for seq_len"):
        context_parallel_attention(q, k, v, layout, plan=short)
    with pytest.raises(ValueError, match="plan is for"):
        context_parallel_attention(q, k, v, layout, plan=plan_partition(layout, world * 2))


def _worker(rank, world, store, fp16):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        layouts = _layouts(world)
        _compare(layouts["random_causal"], rank, world)
        _compare(layouts["random_full"], rank, world, use_plan=False)
        if world == 2:
            _compare(layouts["window_causal"], rank, world)
            _compare(layouts["random_full_tail"], rank, world)
        received = []
        real = dist.all_to_all_single

        def recording(output, *args, **kwargs):
            received.append(output.shape[0])
            return real(output, *args, **kwargs)

        dist.all_to_all_single = recording
        try:
            plan = _compare(layouts["local_full"], rank, world)
        finally:
            dist.all_to_all_single = real
        assert plan.needs[rank] == ((0, world - 1) if rank == 0 else (rank,))
        # Forward: rank 0 receives the 16 rows of the one block of rank world-1 it reads, the others
        # nothing; backward: the gradient of those rows goes back to rank world-1 alone.
        assert received == [plan.received_tokens()[rank], 16 if rank == world - 1 else 0]
        assert plan.received_tokens()[rank] == (16 if rank == 0 else 0)
        if world == 2:
            _errors(rank, world)
        if fp16:  # the Triton forward and backward (interpreter on CPU) in float16 and bfloat16
            for dtype in (torch.float16, torch.bfloat16):
                _compare(_layouts(world)["window_causal"], rank, world, dtype=dtype, backend="triton", dim=16)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_process_outputs_and_gradients(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), world == 2), nprocs=world, join=True)


def test_uninitialized_group_raises():
    layout = random_layout(1, 1, 64, 64, BLOCK)
    q = torch.randn(1, 1, 32, D)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        context_parallel_attention(q, q, q, layout)


def test_layout_must_cover_the_whole_sequence():
    with pytest.raises(LayoutError, match="q_len == kv_len"):
        plan_partition(random_layout(1, 1, 64, 128, BLOCK), 2)
    with pytest.raises(ValueError, match="fewer than world_size"):
        plan_partition(random_layout(1, 1, 64, 64, BLOCK), 8)
    with pytest.raises(ValueError, match="multiple of"):
        PartitionPlan.from_shard_lengths(random_layout(1, 1, 64, 64, BLOCK), [24, 40])


def test_partition_balances_a_skewed_layout_better_than_equal_tokens():
    seq = 512
    nb = seq // BLOCK
    dense = torch.zeros(nb, nb, dtype=torch.bool)
    dense[: nb // 4, : nb // 2] = True  # the first quarter of the rows: 8x the work of the others
    dense[nb // 4:, :2] = True
    layout = BlockSparseLayout.from_dense(dense, seq, seq, BLOCK, causal=False)
    blocks, tokens = plan_partition(layout, 4), plan_partition(layout, 4, balance="tokens")
    assert tokens.shard_lengths == (128, 128, 128, 128)
    assert sum(blocks.kept_blocks) == sum(tokens.kept_blocks) == int(dense.sum())
    assert tokens.balance > 2.5  # one rank gets all the heavy rows
    assert blocks.balance < 1.1
    assert blocks.shard_lengths[0] < blocks.shard_lengths[-1]


def test_plan_sends_only_the_key_blocks_a_rank_reads():
    layout = sliding_window_layout(256, window=32, sink=16, num_heads=1, block_size=BLOCK)
    plan = plan_partition(layout, 4, balance="tokens")
    # Rank 3 (rows 12-15) reads the sink block 0 of rank 0, blocks 10-11 of rank 2 and its own 12-15.
    assert plan.kv_blocks[3] == (0, 10, 11, 12, 13, 14, 15)
    assert plan.needs == ((0,), (0, 1), (0, 1, 2), (0, 2, 3))
    assert plan.received_tokens() == (0, 48, 48, 48)
    assert plan.received_bytes(2, 2, 8, torch.float16) == tuple(t * 2 * 2 * 16 * 2 for t in (0, 48, 48, 48))
    packed = local_layout(layout, plan, 3)
    assert (packed.q_len, packed.kv_len) == (64, 112)
    # Row 0 of rank 3 (global block 12) keeps the sink, blocks 10-11 and itself: buffer blocks 0-3.
    assert packed.kv_indices[0, 0, 0, : packed.kv_num_blocks[0, 0, 0]].tolist() == [0, 1, 2, 3]
