"""Context-parallel block-sparse attention over ``torch.distributed`` (see docs/distributed.md)."""

from .context_parallel import context_parallel_attention, local_layout
from .estimate import ROW_LOCAL_METHODS, context_parallel_estimate
from .partition import PartitionPlan, plan_partition
from .prefill import context_parallel_prefill

__all__ = ["context_parallel_attention", "context_parallel_estimate", "context_parallel_prefill",
           "ROW_LOCAL_METHODS", "local_layout", "PartitionPlan", "plan_partition"]
