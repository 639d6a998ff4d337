"""Gradient communication over torch.distributed: bucket plans, GradientSync, compression."""

from ._plan import CommPlan, assign_shards, chunk_bounds, plan_buckets
from ._compress import TopKCompression, masked_allreduce, pack_masked, register_comm_hook, unpack
from ._sync import GradientSync

__all__ = [
    "CommPlan",
    "GradientSync",
    "TopKCompression",
    "assign_shards",
    "chunk_bounds",
    "masked_allreduce",
    "pack_masked",
    "plan_buckets",
    "register_comm_hook",
    "unpack",
]
