"""Gradient communication over torch.distributed: bucket plans, GradientSync, compression."""

from ._plan import CommPlan, assign_shards, plan_buckets
from ._compress import TopKCompression, masked_allreduce, pack_masked, unpack
from ._sync import GradientSync

__all__ = [
    "CommPlan",
    "GradientSync",
    "TopKCompression",
    "assign_shards",
    "masked_allreduce",
    "pack_masked",
    "plan_buckets",
    "unpack",
]
