"""Mixture of Experts: routing plans, dispatch/combine, the MoE layer, load balancing.

- :func:`route` -> :class:`RoutingPlan` (DeepSeek-V3 gate semantics; Rust on CPU, CUDA kernels on GPU);
  :func:`route_expert_choice` (each expert takes its top-C tokens; not for causal decoders).
- :func:`permute` / :func:`unpermute`: deterministic gather-based dispatch and combine.
- :class:`MoE`: SwiGLU experts over contiguous slices; ``balancer_step()``, ``last_counts()``.
- :class:`LoadBalancer` and the balance losses.
- :mod:`sparsekit.moe.expert_parallel`: ``MoE(..., expert_parallel_group=group)`` splits the experts over
  the ranks of a process group (tokens travel by all-to-all); :func:`all_to_all` is its differentiable
  exchange.
"""

from ._dispatch import permute, unpermute
from ._expert_choice import route_expert_choice
from ._routing import RoutingPlan, capacity_for, route, route_tables, route_topk
from .balance import (
    LoadBalancer,
    device_balance_loss,
    entropy_loss,
    gshard_loss,
    sequence_aux_loss,
    switch_loss,
    z_loss,
)
from . import expert_parallel
from .expert_parallel import all_to_all
from .layer import MoE, grouped_swiglu

__all__ = [
    "LoadBalancer",
    "MoE",
    "RoutingPlan",
    "all_to_all",
    "capacity_for",
    "device_balance_loss",
    "entropy_loss",
    "expert_parallel",
    "grouped_swiglu",
    "gshard_loss",
    "permute",
    "route",
    "route_expert_choice",
    "route_tables",
    "route_topk",
    "sequence_aux_loss",
    "switch_loss",
    "unpermute",
    "z_loss",
]
