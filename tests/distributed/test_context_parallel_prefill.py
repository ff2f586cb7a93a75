"""context_parallel_prefill on 2 and 3 CPU processes (gloo): a tiny Llama's logits, with the
sequence split over the ranks, equal the same model patched with the method on one process, for a
static pattern and a dynamic method at a length that is not a block multiple; errors."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_attn
from sparse_attn.distributed import context_parallel_prefill, plan_partition
from sparse_attn.integrations.hf import SparseConfig
from sparse_attn.patterns.dense import dense_layout
from utils import tiny_llama

BLOCK = 16
METHODS = {"sliding_window": dict(window=24, sink=16), "xattention": dict(stride=4, threshold=0.6),
           "dense": {}}


def _model():
    return tiny_llama(vocab_size=64, hidden_size=64, heads=4, kv_heads=2, layers=2).double()


def _ids(world):
    return torch.randint(0, 64, (2, 48 * world + 7), generator=torch.Generator().manual_seed(world))


def _single_process(name, knobs, ids):
    model = _model()
    sparse_attn.patch(model, config=SparseConfig(method=name, knobs={"block_size": BLOCK, **knobs},
                                                 fallback="never", min_kv_len=0, backend="reference"))
    with torch.no_grad():
        return model(ids).logits


def _worker(rank, world, store, want):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, ids = _model(), _ids(world)
        for name, knobs in METHODS.items():
            with torch.no_grad():
                logits, plan = context_parallel_prefill(model, ids, name, backend="reference", block_size=BLOCK,
                                                        **knobs)
            assert plan.bounds[0] == 0 and plan.bounds[-1] == ids.shape[1]
            err = float((logits - want[name]).abs().max() / want[name].abs().max())
            assert err < 1e-10, f"{name}: rank {rank} logits differ by {err}"
            assert model.config._attn_implementation == "sdpa"
        local, plan = context_parallel_prefill(model, ids, "dense", backend="reference", block_size=BLOCK,
                                               gather_logits=False)
        assert local.shape[1] == plan.shard_lengths[rank]
        if rank == 0:
            with pytest.raises(ValueError, match="knobs .* go with a method name"):
                context_parallel_prefill(model, ids, sparse_attn.get_method("dense"), block_size=BLOCK)
        with pytest.raises(ValueError, match="method 'vertical_slash' cannot be estimated on sequence shards"):
            context_parallel_prefill(model, ids, "vertical_slash")
        bad = plan_partition(dense_layout(ids.shape[1] + 16, block_size=BLOCK), world)
        with pytest.raises(ValueError, match="plan splits"):
            context_parallel_prefill(model, ids, "dense", plan=bad, block_size=BLOCK)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_prefill_equals_the_single_process_patched_model(world, tmp_path):
    ids = _ids(world)
    want = {name: _single_process(name, knobs, ids) for name, knobs in METHODS.items()}
    for name in ("sliding_window", "xattention"):  # sparse layouts that change the logits
        assert (want[name] - want["dense"]).abs().max() > 1e-3, name
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), want), nprocs=world, join=True)


def test_without_torch_distributed_it_says_so():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        context_parallel_prefill(_model(), _ids(2), "dense")


def test_models_whose_attention_depends_on_more_than_positions_are_refused():
    model = _model()
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding-window attention"):
        context_parallel_prefill(model, _ids(2), "dense")
    model = _model()
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        context_parallel_prefill(model, _ids(2), "dense")
