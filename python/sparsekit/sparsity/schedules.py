"""Schedules: map a training step to (density, update fraction).

Each schedule is bound to the controller's target density; ``schedule.density(step, target)`` gives the
density at ``step`` and ``schedule.fraction(step)`` the fraction of active connections that a drop/grow
update replaces. The update fraction decays by the cosine rule of RigL (Evci et al., 2020,
eq. 1): ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))`` for ``t < t_end``, then 0 (no more updates).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["Schedule", "Constant", "Progressive", "Cubic"]


def _check_real(value: object, arg: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a float, got {type(value).__name__}")
    v = float(value)
    if not lo <= v <= hi:
        raise ValueError(f"{arg} must be in [{lo}, {hi}], got {v}")
    return v


def _check_steps(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


class Schedule:
    """Base class: constant density, update fraction ``alpha`` decayed by cosine until ``t_end``.

    Args:
        alpha: initial update fraction in ``[0, 1]`` (RigL's default 0.3).
        t_end: last step with mask updates (RigL: 75% of training); ``None``: updates never stop and
            the fraction stays ``alpha``.
        decay: ``"cosine"`` (default) or ``"constant"``.
    """

    def __init__(self, alpha: float = 0.3, t_end: int | None = None, decay: str = "cosine") -> None:
        self.alpha = _check_real(alpha, "alpha", 0.0, 1.0)
        self.t_end = None if t_end is None else _check_steps(t_end, "t_end")
        if decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {decay!r}")
        self.decay = decay

    def density(self, step: int, target: float) -> float:
        """Density at ``step`` for a controller whose target density is ``target``."""
        return target

    def fraction(self, step: int) -> float:
        """Fraction of active connections replaced by an update at ``step`` (0 after ``t_end``)."""
        if self.t_end is None:
            return self.alpha
        if step >= self.t_end:
            return 0.0
        if self.decay == "constant":
            return self.alpha
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.t_end))

    def updates_at(self, step: int) -> bool:
        """Whether masks may still change at ``step``."""
        return self.t_end is None or step < self.t_end

    def _tail(self) -> str:
        return f"alpha={self.alpha}, t_end={self.t_end}, decay={self.decay!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._tail()})"


class Constant(Schedule):
    """The target density from step 0 on (RigL, SET, static masks)."""


class Progressive(Schedule):
    """Dense for the first ``warmup`` fraction of ``total_steps``, density falls linearly to the target
    over the next ``ramp`` fraction, then stays at the target. Update fraction as in :class:`Schedule`
    (``t_end`` defaults to ``total_steps``)."""

    def __init__(
        self, total_steps: int, warmup: float = 0.1, ramp: float = 0.3, alpha: float = 0.3, t_end: int | None = None,
        decay: str = "cosine",
    ) -> None:
        self.total_steps = _check_steps(total_steps, "total_steps")
        self.warmup = _check_real(warmup, "warmup", 0.0, 1.0)
        self.ramp = _check_real(ramp, "ramp", 0.0, 1.0)
        if self.warmup + self.ramp > 1.0:
            raise ValueError(f"warmup + ramp must be at most 1, got {self.warmup} + {self.ramp}")
        super().__init__(alpha, t_end if t_end is not None else self.total_steps, decay)

    def density(self, step: int, target: float) -> float:
        start = self.warmup * self.total_steps
        length = self.ramp * self.total_steps
        if step < start:
            return 1.0
        if length == 0 or step >= start + length:
            return target
        return 1.0 + (target - 1.0) * (step - start) / length

    def __repr__(self) -> str:
        return f"Progressive(total_steps={self.total_steps}, warmup={self.warmup}, ramp={self.ramp}, {self._tail()})"


class Cubic(Schedule):
    """Zhu & Gupta (2017) gradual pruning: sparsity ``s_t = s_f + (s_i - s_f) (1 - (t - t0)/(t1 - t0))^3``
    for ``t0 <= t <= t1`` (``s_i = 1 - initial_density``, ``s_f = 1 - target``), ``s_i`` before ``t0``,
    ``s_f`` after ``t1``."""

    begin: int
    end: int
    initial_density: float

    def __init__(
        self, begin: int, end: int, initial_density: float = 1.0, alpha: float = 0.3, t_end: int | None = None,
        decay: str = "cosine",
    ) -> None:
        if isinstance(begin, bool) or not isinstance(begin, numbers.Integral) or begin < 0:
            raise ValueError(f"begin must be a non-negative int, got {begin!r}")
        self.begin = int(begin)
        self.end = _check_steps(end, "end")
        if self.end <= self.begin:
            raise ValueError(f"end ({end}) must be after begin ({begin})")
        self.initial_density = _check_real(initial_density, "initial_density", 0.0, 1.0)
        super().__init__(alpha, t_end if t_end is not None else self.end, decay)

    def density(self, step: int, target: float) -> float:
        s_i, s_f = 1.0 - self.initial_density, 1.0 - target
        if step <= self.begin:
            return 1.0 - s_i
        if step >= self.end:
            return target
        frac = (step - self.begin) / (self.end - self.begin)
        return 1.0 - (s_f + (s_i - s_f) * (1.0 - frac) ** 3)

    def __repr__(self) -> str:
        return f"Cubic(begin={self.begin}, end={self.end}, initial_density={self.initial_density}, {self._tail()})"
