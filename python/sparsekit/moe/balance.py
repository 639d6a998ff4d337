"""Load balancing for MoE: :class:`LoadBalancer` (per-expert counters in Rust, aux-loss-free bias updates,
counts all-reduced across data-parallel ranks) and the published balance losses as plain functions."""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import _core
from ._routing import RoutingPlan

METHODS = ("aux_free", "aux_loss", "none")


class LoadBalancer:
    """Per-expert load counters and the aux-loss-free bias update (DeepSeek-V3).

    ``observe(plan)`` adds the plan's kept counts to this step's total on the plan's device (no host
    sync, micro-batches accumulate); ``step(bias)`` once per optimizer step all-reduces the E-vector of
    counts over ``process_group`` (if given), records it in the Rust counters (step counts and EMA with
    weight ``ema`` on the past) and, for ``method="aux_free"``, updates ``bias`` in place:
    ``b_i += rate * sign(mean(c) - c_i)`` in float32. ``stats()`` reports max/mean load, coefficient of
    variation, entropy, dropped fraction and unused experts of the last step and of the EMA.
    """

    def __init__(self, n_experts: int, *, method: str = "aux_free", rate: float = 1e-3, ema: float = 0.9,
                 process_group: Any = None) -> None:  # fmt: skip
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.n_experts, self.method, self.rate, self.process_group = n_experts, method, float(rate), process_group
        self._counters = _core.BalanceCounters(n_experts, float(ema))
        self._pending: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None

    def observe(self, plan: RoutingPlan) -> None:
        """Accumulate one routed batch's kept counts and dropped slots (device tensors, no sync)."""
        c = plan.counts.detach()
        d = plan.dropped.detach().reshape(1)
        self._pending = c.clone() if self._pending is None else self._pending + c
        self._dropped = d.clone() if self._dropped is None else self._dropped + d

    def step(self, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """End of an optimizer step: reduce the counts across ranks, update the counters and (aux_free)
        the bias in place. Returns this step's global counts (None if nothing was observed)."""
        if self._pending is None or self._dropped is None:
            return None
        both = torch.cat([self._pending, self._dropped]).to(torch.int64)
        self._pending = self._dropped = None
        if self.process_group is not None:
            import torch.distributed as dist

            group = None if self.process_group is True else self.process_group
            dist.all_reduce(both, group=group)  # one all-reduce of an (E+1)-vector
        counts, dropped = both[:-1], both[-1]
        host = counts.cpu()
        self._counters.update(host.tolist(), int(dropped))
        if self.method == "aux_free" and bias is not None:
            if tuple(bias.shape) != (self.n_experts,):
                raise ValueError(f"bias must have shape ({self.n_experts},), got {tuple(bias.shape)}")
            with torch.no_grad():
                if bias.device.type == "cpu" and bias.dtype == torch.float32 and bias.is_contiguous():
                    _core.aux_free_update(bias.numpy(), host.to(torch.float64).numpy(), self.rate)
                else:
                    c = counts.to(torch.float32)
                    bias += (self.rate * torch.sign(c.mean() - c)).to(bias.dtype)
        return counts

    def step_counts(self) -> list[float]:
        """Counts per expert of the last recorded step."""
        return list(self._counters.step_counts())

    def ema_counts(self) -> list[float]:
        """EMA of the counts per expert."""
        return list(self._counters.ema_counts())

    def stats(self) -> dict[str, float]:
        """Imbalance of the last step and of the EMA (max/mean, cv, entropy, unused, dropped fraction)."""
        out: dict[str, float] = {}
        for name, c in (("", self.step_counts()), ("ema_", self.ema_counts())):
            mx, cv, ent, unused = _core.balance_stats(c)
            out.update({f"{name}max_over_mean": mx, f"{name}cv": cv, f"{name}entropy": ent, f"{name}unused": float(unused)})
        out["dropped_fraction"] = self._counters.dropped_fraction()
        out["steps"] = float(self._counters.steps)
        return out


# ------------------------------------------------------------------------------------ losses
def _slot_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    one = torch.zeros(expert_ids.shape[:-1] + (n_experts,), dtype=torch.float32, device=expert_ids.device)
    return one.scatter_add(-1, expert_ids, torch.ones_like(expert_ids, dtype=torch.float32))


def switch_loss(probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` with ``f_i = c_i / (k*T)`` (share
    of routed slots, no gradient) and ``P_i`` the mean router probability of expert ``i``."""
    T, k = expert_ids.shape
    f = _slot_counts(expert_ids, n_experts).sum(0) / (k * T)
    P = probs.float().mean(0)
    return n_experts * (f * P).sum()


def gshard_loss(probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """GShard auxiliary loss ``E * sum_e (c_e / T) * m_e`` with ``c_e`` tokens whose top-1 expert is
    ``e`` and ``m_e`` the mean gate value of ``e`` (Lepikhin et al. 2020, mean(c/S * m) * E^2)."""
    T = expert_ids.shape[0]
    c = _slot_counts(expert_ids[:, :1], n_experts).sum(0) / T
    return n_experts * (c * probs.float().mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def sequence_aux_loss(scores: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, alpha: float = 1.0) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss, averaged over sequences: per sequence
    ``alpha * sum_i f_i P_i``, ``f_i = E/(k*S) * #{t: i in topk_t}``, ``P_i = mean_t s'_{i,t}``,
    ``s' = s / sum_j s_j``. ``scores [B, S, E]``, ``expert_ids [B, S, k]``."""
    B, S, k = expert_ids.shape
    f = _slot_counts(expert_ids, n_experts).sum(1) * (n_experts / (k * S))
    sn = scores.float() / scores.float().sum(-1, keepdim=True)
    P = sn.mean(1)
    return alpha * (f * P).sum(-1).mean()


def device_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int, n_devices: int,
                        alpha: float = 1.0) -> torch.Tensor:  # fmt: skip
    """DeepSeek-V2 device-level balance loss ``alpha * sum_d f'_d P'_d``: experts split evenly over
    ``n_devices``, ``f'_d`` the mean of ``f_i = E/(k*T) * c_i`` over device d's experts, ``P'_d`` the sum
    of their mean probabilities."""
    if n_experts % n_devices:
        raise ValueError(f"n_devices={n_devices} must divide n_experts={n_experts}")
    T, k = expert_ids.shape
    f = _slot_counts(expert_ids, n_experts).sum(0) * (n_experts / (k * T))
    P = probs.float().mean(0)
    fd = f.view(n_devices, -1).mean(-1)
    Pd = P.view(n_devices, -1).sum(-1)
    return alpha * (fd * Pd).sum()


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    """Routing-entropy regulariser: mean over tokens of ``-sum_i p_i log p_i``."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()


__all__ = ["LoadBalancer", "device_balance_loss", "entropy_loss", "gshard_loss", "sequence_aux_loss", "switch_loss", "z_loss"]
