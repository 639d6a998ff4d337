"""Gradient communication over torch.distributed: bucket plans, GradientSync, compression."""

from ._plan import CommPlan, assign_shards, plan_buckets
from ._sync import GradientSync

__all__ = ["CommPlan", "GradientSync", "assign_shards", "plan_buckets"]
