"""DynamicSparsity: one controller for masks that live through training.

Every mask decision goes through the selection engine (:mod:`sparsekit.select`): exact counts, ties to
the lower index, the same answer on any thread count. See docs/sparsity.md.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .. import _core
from .._arrays import DTYPE_TAGS, bits
from ..select import global_topk_masks, nm_mask, topk_mask
from .schedules import Constant, Schedule

__all__ = ["DynamicSparsity", "erk_counts", "pack_mask", "unpack_mask"]

ScoreFn = Callable[[str, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_METHODS = ("magnitude", "set", "rigl", "gradient_topk")
_DISTRIBUTIONS = ("uniform", "global", "erk")
_NEG = float("-inf")


def _cpu_flat(t: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the Rust path can borrow ``t`` in place: contiguous, on the CPU, of ``dtype``."""
    return t is not None and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bit-packed uint8 bytes (numpy ``packbits`` order, big-endian bits), on the CPU."""
    return torch.from_numpy(np.packbits(mask.detach().to("cpu").reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    n = math.prod(shape)
    unpacked = np.unpackbits(packed.to("cpu").numpy().astype(np.uint8), count=n)
    return torch.from_numpy(unpacked.astype(np.bool_)).reshape(shape)


def erk_counts(shapes: list[tuple[int, ...]], density: float, erk_power: float = 1.0) -> list[int]:
    """Erdős–Rényi-Kernel per-layer counts whose sum is exactly ``round(density * total)``.

    Layer ``l`` gets density ``eps * (sum(shape) / prod(shape)) ** erk_power``; layers whose density
    would exceed 1 are made dense and ``eps`` is solved again over the rest (RigL's redistribution
    rule). The real-valued counts are rounded by the largest-remainder method (ties to the earlier
    layer), so the overall density is exact.
    """
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    target = min(total, int(math.floor(density * total + 0.5)))
    raw = [(sum(s) / math.prod(s)) ** erk_power if math.prod(s) else 0.0 for s in shapes]
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in dense and sizes[i]]
        budget = target - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in free)
        eps = budget / denom if denom > 0 else 0.0
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    counts = [sizes[i] if i in dense else 0 for i in range(len(shapes))]
    real = {i: eps * raw[i] * sizes[i] for i in free}
    for i in free:
        counts[i] = min(sizes[i], int(math.floor(real[i])))
    left = target - sum(counts)
    order = sorted(free, key=lambda i: (-(real[i] - math.floor(real[i])), i))
    while left > 0:
        progressed = False
        for i in order:
            if left and counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return counts


class _Layer:
    """One sparsified parameter and its unit grid (elements, N:M groups or blocks)."""

    name: str
    param: torch.Tensor
    shape: tuple[int, ...]
    kind: str
    block: tuple[int, int] | None
    nm: tuple[int, int] | None
    matrix: tuple[int, int]
    units: int
    grid: tuple[int, int] | None

    def __init__(self, name: str, param: torch.Tensor, structure: Any) -> None:
        self.name = name
        self.param = param
        self.shape = tuple(param.shape)
        self.kind = "dense"
        self.block: tuple[int, int] | None = None
        self.nm: tuple[int, int] | None = None
        rows = self.shape[0] if param.dim() else 1
        cols = param.numel() // rows if rows else 0
        self.matrix = (rows, cols)
        if structure is None:
            self.units = param.numel()
        elif structure[0] == "nm":
            n, m = structure[1]
            if param.dim() < 2 or cols % m:
                raise ValueError(
                    f"structure: N:M {n}:{m} needs the input dimension of layer {name!r} "
                    f"(shape {self.shape}, {cols} inputs per row) to be a multiple of m={m}"
                )
            self.nm = (n, m)
            self.units = param.numel()
        else:
            bh, bw = structure[1]
            if param.dim() < 2 or rows % bh or cols % bw:
                raise ValueError(
                    f"structure: block ({bh}, {bw}) does not divide layer {name!r} (as a matrix {rows}x{cols})"
                )
            self.block = (bh, bw)
            self.units = (rows // bh) * (cols // bw)
        self.grid = (rows // self.block[0], cols // self.block[1]) if self.block else None

    def unit_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-unit float32 scores from an element tensor: |x|, summed over each block for blocks."""
        a = x.detach().abs().float()
        if self.block is None:
            return a.reshape(-1)
        bh, bw = self.block
        r, c = self.matrix
        return a.reshape(r // bh, bh, c // bw, bw).sum(dim=(1, 3)).reshape(-1)

    def expand(self, units: torch.Tensor) -> torch.Tensor:
        """Element mask from a flat unit mask."""
        if self.block is None:
            return units.reshape(self.shape)
        bh, bw = self.block
        assert self.grid is not None
        g = units.reshape(self.grid)
        return g.repeat_interleave(bh, 0).repeat_interleave(bw, 1).reshape(self.shape)

    def units_of(self, mask: torch.Tensor) -> torch.Tensor:
        """Flat unit mask of an element mask (a block is active when any of its elements is)."""
        if self.block is None:
            return mask.reshape(-1)
        bh, bw = self.block
        r, c = self.matrix
        return mask.reshape(r // bh, bh, c // bw, bw).any(dim=3).any(dim=1).reshape(-1)


def _check_density(value: object, arg: str = "density") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a float in (0, 1], got {type(value).__name__}")
    d = float(value)
    if not 0.0 < d <= 1.0:  # also NaN
        raise ValueError(f"{arg} must be in (0, 1], got {d}")
    return d


def _default_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.weight is not None:
            out.append((f"{mname}.weight" if mname else "weight", mod.weight))
    return out


class DynamicSparsity:
    """Keeps a set of parameters sparse through training and evolves their masks.

    Call order in a training loop (one call per step)::

        loss.backward()
        sparsity.step()        # after backward, before optimizer.step (reads the dense gradients)
        optimizer.step()       # a post-step hook re-zeroes masked weights

    With ``torch.amp.GradScaler``: ``scaler.scale(loss).backward(); scaler.unscale_(optimizer);
    sparsity.step(); scaler.step(optimizer); scaler.update()``. An update step whose gradients hold
    inf/NaN (a step GradScaler skips) leaves the masks alone and retries at the next step.

    Args:
        model_or_named_params: an ``nn.Module`` (default: the weights of its Linear/Conv layers; never
            biases, norms or embeddings) or an iterable / mapping of ``(name, parameter)``.
        optimizer: the ``torch.optim.Optimizer`` that owns those parameters (its state is reset for
            regrown connections and zeroed for dropped ones). ``None`` is allowed (no state handling).
        density: target fraction of kept weights in ``(0, 1]``.
        method: ``"magnitude"``, ``"set"``, ``"rigl"``, ``"gradient_topk"`` or a callable
            ``(name, weight, grad) -> scores`` (higher = keep; drop the lowest active, grow the highest
            inactive).
        schedule: a :class:`~sparsekit.sparsity.Schedule` (default ``Constant()``).
        distribution: ``"uniform"``, ``"global"`` or ``"erk"``.
        structure: ``None`` (unstructured), ``("nm", (n, m))`` / ``(n, m)`` with ``n < m`` for N:M along
            the input dimension, or ``("block", (bh, bw))`` for blocks.
        update_every: steps between mask updates.
        seed: seed of the controller's own generator (random init, SET regrowth).
        include: optional predicate ``(name, param) -> bool`` filtering the parameters of a module.
        infer_masks: take the masks from the parameters' zeros (an already-sparse checkpoint).
        on_update: optional logging hook called with :meth:`stats` after every mask update.
        rezero_after_step: also re-zero masked weights after every ``optimizer.step`` (a post-step hook).
            Not needed for SGD/Adam/AdamW/RMSprop/Adagrad: their gradients are masked before the step
            (pre-step hook) and their state is zero there, so masked weights stay exactly zero; turn it
            on for an optimizer that moves weights with zero gradient and zero state.
    """

    target: float
    method: str
    score_fn: ScoreFn | None
    schedule: Schedule
    distribution: str
    structure: Any
    update_every: int
    on_update: Callable[[dict[str, Any]], None] | None
    layers: list[_Layer]
    optimizer: torch.optim.Optimizer | None
    generator: torch.Generator
    step_count: int
    updates: int
    skipped_updates: int
    masks: dict[str, torch.Tensor]
    last_changed: dict[str, float]
    _hooks: list[Any]
    _off: dict[str, torch.Tensor]
    _keep: dict[str, torch.Tensor]
    _modules: dict[str, nn.Module]

    def __init__(
        self,
        model_or_named_params: nn.Module | Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        *,
        density: float,
        method: str | ScoreFn = "rigl",
        schedule: Schedule | None = None,
        distribution: str = "uniform",
        structure: Any = None,
        update_every: int = 100,
        seed: int = 0,
        include: Callable[[str, torch.Tensor], bool] | None = None,
        infer_masks: bool = False,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        rezero_after_step: bool = False,
    ) -> None:
        self.target = _check_density(density)
        if callable(method):
            self.method: str = "custom"
            self.score_fn: ScoreFn | None = method
        elif method in _METHODS:
            self.method, self.score_fn = str(method), None
        else:
            raise ValueError(f"method must be one of {_METHODS} or a callable, got {method!r}")
        if schedule is None:
            schedule = Constant()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sparsekit.sparsity.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = str(distribution)
        self.structure = self._check_structure(structure)
        if isinstance(update_every, bool) or not isinstance(update_every, numbers.Integral) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        self.update_every = int(update_every)
        self.on_update = on_update

        if isinstance(model_or_named_params, nn.Module):
            named = _default_params(model_or_named_params) if include is None else [
                (n, p) for n, p in model_or_named_params.named_parameters() if include(n, p)
            ]
            self._modules = {n: m for n, m in model_or_named_params.named_modules()}
        else:
            items = model_or_named_params.items() if isinstance(model_or_named_params, Mapping) else model_or_named_params
            named = [(str(n), p) for n, p in items]
            self._modules = {}
        if not named:
            raise ValueError("model_or_named_params: no parameters to sparsify")
        for n, p in named:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"parameter {n!r} must be a floating-point tensor")
        self.layers = [_Layer(n, p, self.structure) for n, p in named]
        if self.structure is not None and self.structure[0] == "nm":
            self._check_nm()

        self.optimizer = optimizer
        if optimizer is not None:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            for layer in self.layers:
                if id(layer.param) not in owned:
                    raise ValueError(f"optimizer does not own parameter {layer.name!r}")
            self._hooks = [optimizer.register_step_pre_hook(lambda *_: self._mask_grads())]
            if rezero_after_step:
                self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.generator = torch.Generator().manual_seed(int(seed))
        self.step_count = 0
        self.last_changed: dict[str, float] = {}
        self.updates = 0
        self.skipped_updates = 0
        self.masks: dict[str, torch.Tensor] = {}
        if infer_masks:
            for layer in self.layers:
                self.masks[layer.name] = layer.param.detach() != 0
        else:
            self._init_masks()
        self._refresh(reset_state=True)

    # ------------------------------------------------------------------------------------- checks
    @staticmethod
    def _check_structure(structure: Any) -> Any:
        if structure is None:
            return None
        if isinstance(structure, tuple) and len(structure) == 2 and isinstance(structure[0], str):
            kind, dims = structure
        elif isinstance(structure, tuple) and len(structure) == 2:
            kind, dims = "nm", structure
        else:
            raise ValueError(f"structure must be None, (n, m), ('nm', (n, m)) or ('block', (bh, bw)), got {structure!r}")
        if kind not in ("nm", "block"):
            raise ValueError(f"structure kind must be 'nm' or 'block', got {kind!r}")
        if not (isinstance(dims, tuple) and len(dims) == 2 and all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
            raise ValueError(f"structure sizes must be a pair of ints, got {dims!r}")
        a, b = dims
        if kind == "nm" and not 0 < a < b:
            raise ValueError(f"structure: N:M needs 0 < n < m, got {a}:{b}")
        if kind == "block" and (a < 1 or b < 1):
            raise ValueError(f"structure: block sizes must be positive, got ({a}, {b})")
        return (kind, (a, b))

    def _check_nm(self) -> None:
        n, m = self.structure[1]
        if self.distribution == "erk":  # global is fine: n/m in every layer meets the global count exactly
            raise ValueError(
                f"structure N:M fixes every layer's density at n/m={n}/{m}, which ERK's per-layer densities "
                "contradict; distribution must be 'uniform' or 'global' (the same masks: every layer at n/m)"
            )
        if abs(self.target - n / m) > 1e-12:
            raise ValueError(f"density must equal n/m={n / m} for structure N:M {n}:{m}, got {self.target}")
        if self.method in ("set", "rigl"):
            raise ValueError(
                f"method {self.method!r} is not supported with N:M (every group keeps exactly n; use "
                "'magnitude', 'gradient_topk' or a score function, which reselect each group)"
            )
        if not isinstance(self.schedule, Constant):
            raise ValueError("structure N:M needs a Constant schedule (the density is fixed at n/m)")

    # ------------------------------------------------------------------------------------- counts
    def _counts(self, density: float) -> list[int] | int:
        """Kept units per layer (uniform/erk), or the global total (global)."""
        units = [layer.units for layer in self.layers]
        if self.distribution == "global":
            return min(sum(units), int(math.floor(density * sum(units) + 0.5)))
        if self.distribution == "erk":
            if density >= 1.0:
                return units
            shapes = [layer.grid if layer.grid else layer.shape for layer in self.layers]
            return erk_counts([tuple(s) for s in shapes], density)
        return [min(u, int(math.floor(density * u + 0.5))) for u in units]

    def _select(self, scores: list[torch.Tensor], counts: list[int] | int) -> list[torch.Tensor]:
        """Top-k of unit scores per layer or globally (by value; -inf marks ineligible units)."""
        if isinstance(counts, int):
            return global_topk_masks(scores, k=counts, by="value")
        return [topk_mask(s, k, by="value") for s, k in zip(scores, counts)]

    # --------------------------------------------------------------------------------------- init
    def _init_masks(self) -> None:
        d = self.schedule.density(0, self.target)
        if self.structure is not None and self.structure[0] == "nm":
            n, m = self.structure[1]
            for layer in self.layers:
                w = layer.param.detach().reshape(layer.matrix)
                src = w if self.method == "magnitude" else torch.rand(layer.matrix, generator=self.generator)
                self.masks[layer.name] = nm_mask(src.float().to(w.device), n, m, dim=1).reshape(layer.shape)
            return
        if self.method == "magnitude":
            scores = [layer.unit_scores(layer.param) for layer in self.layers]
        else:
            scores = [torch.rand(layer.units, generator=self.generator) for layer in self.layers]
        units = self._select([s.to(layer.param.device) for s, layer in zip(scores, self.layers)], self._counts(d))
        for layer, u in zip(self.layers, units):
            self.masks[layer.name] = layer.expand(u)

    # -------------------------------------------------------------------------------------- apply
    def _refresh(self, reset_state: bool, old: dict[str, torch.Tensor] | None = None) -> None:
        """Zero masked weights and the optimizer state outside the masks. Off the CPU path, also cache the
        inverted and float masks the torch fallbacks of apply() and the gradient hook use."""
        self._cpu = all(
            layer.param.dtype in DTYPE_TAGS and _cpu_flat(layer.param, layer.param.dtype)
            and _cpu_flat(self.masks[layer.name], torch.bool)
            for layer in self.layers
        )
        if self._cpu:
            self._off, self._keep = {}, {}
        else:
            self._off = {layer.name: ~self.masks[layer.name] for layer in self.layers}
            self._keep = {layer.name: self.masks[layer.name].to(layer.param.dtype) for layer in self.layers}
        self.apply()
        if reset_state and self.optimizer is not None:
            for layer in self.layers:
                state = self.optimizer.state.get(layer.param, {})
                keep = self.masks[layer.name]
                if old is not None:  # regrown connections: reset; dropped ones: zeroed
                    keep = keep & old[layer.name]
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == layer.param.shape:
                        value.mul_(keep.to(value.dtype))

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero the masked weights (call it after touching the weights yourself; runs after every
        ``optimizer.step`` with ``rezero_after_step=True``)."""
        if self._cpu:  # one Rust pass per dtype, in place, no inverted mask
            self._zero_off([(layer.param, self.masks[layer.name]) for layer in self.layers])
            return
        for layer in self.layers:
            layer.param.data.masked_fill_(self._off[layer.name], 0)

    @staticmethod
    def _zero_off(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``x[~mask] = 0`` in place for contiguous CPU tensors (grouped by dtype for the Rust call)."""
        for dtype in {x.dtype for x, _ in pairs}:
            group = [(x, m) for x, m in pairs if x.dtype == dtype]
            _core.sparsity_zero_off([bits(x) for x, _ in group], [bits(m) for _, m in group], DTYPE_TAGS[dtype])

    @torch.no_grad()
    def _mask_grads(self) -> None:
        """Zero the gradients of masked weights before ``optimizer.step`` (a pre-step hook), so no
        optimizer state ever builds up there: a masked weight cannot be revived by a stale moment."""
        if self._cpu:
            grads = [(layer.param.grad, self.masks[layer.name]) for layer in self.layers if layer.param.grad is not None]
            fast = [(g, m) for g, m in grads if _cpu_flat(g, g.dtype) and g.dtype in DTYPE_TAGS]
            self._zero_off(fast)
            for g, m in grads:
                if not (_cpu_flat(g, g.dtype) and g.dtype in DTYPE_TAGS):
                    g.mul_(m.to(g.dtype))
            return
        pairs = [(layer.param.grad, self._keep[layer.name]) for layer in self.layers if layer.param.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [k if k.dtype == g.dtype else k.to(g.dtype) for g, k in pairs])

    # --------------------------------------------------------------------------------------- step
    def step(self) -> bool:
        """Advance one training step; update the masks when due. Returns whether they were updated.

        Call after ``backward()`` and before ``optimizer.step()``. Between updates it only counts.
        """
        self.step_count += 1
        t = self.step_count
        if t % self.update_every and not self._pending:
            return False
        if not self.schedule.updates_at(t):
            return False
        grads = [layer.param.grad for layer in self.layers]
        if any(g is not None for g in grads):
            finite = torch.stack([torch.isfinite(g).all() for g in grads if g is not None]).all()
            if not bool(finite):
                self._pending = True
                self.skipped_updates += 1
                return False
        self._pending = False
        self._update(t)
        return True

    _pending = False
    _cpu = False

    def _grad(self, layer: _Layer) -> torch.Tensor:
        g = layer.param.grad
        if g is None:
            raise ValueError(
                f"parameter {layer.name!r} has no gradient at a {self.method!r} update (step {self.step_count}); "
                "call sparsity.step() after loss.backward()"
            )
        return g

    @torch.no_grad()
    def _update(self, t: int) -> None:
        if self._fused_ok():
            self._update_fused(t)
            self.updates += 1
            if self.on_update is not None:
                self.on_update(self.stats())
            return
        old = dict(self.masks)  # this path replaces the mask tensors (the fused one writes them in place)
        if self.structure is not None and self.structure[0] == "nm":
            self._update_nm()
        else:
            self._update_units(t)
        self.updates += 1
        if self._distributed():
            self._broadcast_masks()
        self.last_changed = {}
        for layer in self.layers:
            new, before = self.masks[layer.name], old[layer.name]
            n = max(1, new.numel())
            if self.method == "magnitude" and self.structure is None:  # prune only: new is a subset of old
                self.last_changed[layer.name] = (int(torch.count_nonzero(before)) - int(torch.count_nonzero(new))) / n
                continue
            grown = new & ~before
            n_grown = int(torch.count_nonzero(grown))
            if n_grown:
                layer.param.data.masked_fill_(grown, 0)  # regrown connections start at zero
            # |old \ new| = |old| - |new| + |new \ old|
            changed = int(torch.count_nonzero(before)) - int(torch.count_nonzero(new)) + 2 * n_grown
            self.last_changed[layer.name] = changed / n
        self._refresh(reset_state=True, old=old)
        if self.on_update is not None:
            self.on_update(self.stats())

    # -------------------------------------------------------------------------- fused (CPU) update
    def _states(self, layer: _Layer) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(layer.param, {})
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == layer.param.shape]

    def _fused_ok(self) -> bool:
        """The one-call Rust update serves unstructured built-in methods on contiguous CPU tensors of one
        dtype (optimizer state and gradients alike), on one rank; anything else takes the torch path."""
        if not self._cpu or self.structure is not None or self.method == "custom" or self._distributed():
            return False
        dtype = self.layers[0].param.dtype
        for layer in self.layers:
            if layer.param.dtype != dtype or not all(_cpu_flat(v, dtype) for v in self._states(layer)):
                return False
            if self.method in ("rigl", "gradient_topk") and layer.param.grad is not None and not _cpu_flat(layer.param.grad, dtype):
                return False
        return True

    def _update_fused(self, t: int) -> None:
        """One Rust call: keep the top |w| among the active, grow the top grow scores among the rest,
        write the masks in place, zero dropped / newly grown weights and their optimizer state. Same
        counts, scores and tie order as the torch path (tests/test_sparsity_fused.py compares them)."""
        counts = self._counts(self.schedule.density(t, self.target))
        masks = [self.masks[layer.name] for layer in self.layers]
        active = [int(a) for a in _core.sparsity_count([bits(m) for m in masks])]
        grow_src: list[torch.Tensor] = []
        if self.method == "magnitude":
            keep = min(counts, sum(active)) if isinstance(counts, int) else [min(k, a) for k, a in zip(counts, active)]
            grow: list[int] | int = 0 if isinstance(keep, int) else [0] * len(keep)
        elif self.method == "gradient_topk":  # the mask becomes the top-k |grad| of all connections
            keep = 0 if isinstance(counts, int) else [0] * len(counts)
            grow = counts
            grow_src = [self._grad(layer) for layer in self.layers]
        else:
            frac = self.schedule.fraction(t)
            if isinstance(counts, int):
                kept_total = min(counts, sum(active))
                keep = kept_total - int(math.floor(frac * kept_total + 0.5))
                grow = counts - keep
            else:
                caps = [min(k, a) for k, a in zip(counts, active)]
                keep = [c - int(math.floor(frac * c + 0.5)) for c in caps]
                grow = [k - kk for k, kk in zip(counts, keep)]
            if self.method == "rigl":
                grow_src = [self._grad(layer) for layer in self.layers]
            else:  # SET: the same draws from the controller's generator as the torch path
                grow_src = [torch.rand(layer.units, generator=self.generator) for layer in self.layers]
        dtype = self.layers[0].param.dtype
        states, owners = [], []
        for i, layer in enumerate(self.layers):
            for v in self._states(layer):
                states.append(bits(v))
                owners.append(i)
        glob = isinstance(counts, int)
        keeps = [keep] if isinstance(keep, int) else keep
        grows = [grow] if isinstance(grow, int) else grow
        try:
            out = _core.sparsity_update(
                [bits(layer.param) for layer in self.layers], [bits(m) for m in masks], [bits(g) for g in grow_src],
                states, owners, DTYPE_TAGS[dtype], DTYPE_TAGS[grow_src[0].dtype] if grow_src else DTYPE_TAGS[dtype], keeps, grows, glob,
            )
        except ValueError as exc:
            if "NaN" not in str(exc):
                raise
            bad = next((layer.name for layer in self.layers if bool(layer.param.isnan().any())), None)
            what = f"weight {bad!r}" if bad else "a grow score (gradient)"
            raise ValueError(f"{what} contains NaN at a mask update (step {t}); NaN cannot be ranked") from None
        self.last_changed = {
            layer.name: (dropped + grown) / max(1, layer.param.numel()) for layer, (_, grown, dropped) in zip(self.layers, out)
        }

    def _update_nm(self) -> None:
        n, m = self.structure[1]
        for layer in self.layers:
            if self.method == "magnitude":
                src = layer.param.detach()
            elif self.method == "gradient_topk":
                src = self._grad(layer)
            else:
                assert self.score_fn is not None
                src = self.score_fn(layer.name, layer.param.detach(), layer.param.grad).detach()
            self.masks[layer.name] = nm_mask(
                src.reshape(layer.matrix).float(), n, m, dim=1, by="value" if self.method == "custom" else "abs"
            ).reshape(layer.shape)

    def _update_units(self, t: int) -> None:
        density = self.schedule.density(t, self.target)
        counts = self._counts(density)
        active = [layer.units_of(self.masks[layer.name]) for layer in self.layers]
        if self.method == "magnitude":  # prune only: keep the largest |w| among the active units
            counts = self._cap(counts, active)
            new = self._keep_top(active, counts)
        elif self.method == "gradient_topk":
            new = self._select([layer.unit_scores(self._grad(layer)) for layer in self.layers], counts)
        else:
            new = self._drop_grow(t, counts, active)
        for layer, u in zip(self.layers, new):
            self.masks[layer.name] = layer.expand(u)

    def _keep_top(self, active: list[torch.Tensor], counts: list[int] | int) -> list[torch.Tensor]:
        """The ``counts`` largest-|w| units among the active ones. Masked weights are exactly zero, so
        while enough active weights are nonzero the weights are ranked in place (by |w|, zero-copy);
        otherwise inactive units are excluded explicitly."""
        if all(layer.block is None for layer in self.layers) and len({layer.param.dtype for layer in self.layers}) == 1:
            nnz = [int(torch.count_nonzero(layer.param.detach())) for layer in self.layers]
            enough = sum(nnz) >= counts if isinstance(counts, int) else all(z >= k for z, k in zip(nnz, counts))
            if enough:
                ws = [layer.param.detach().reshape(-1) for layer in self.layers]
                if isinstance(counts, int):
                    return global_topk_masks(ws, k=counts, by="abs")
                return [topk_mask(w, k, by="abs") for w, k in zip(ws, counts)]
        scores = [torch.where(a, layer.unit_scores(layer.param), _NEG) for a, layer in zip(active, self.layers)]
        return self._select(scores, counts)

    def _grow_by_grad(self, kept: list[torch.Tensor], grow_k: list[int] | int) -> list[torch.Tensor] | None:
        """RigL's grow step ranked on the gradients with the kept units zeroed (one pass, then |g| in
        place); None when too few nonzero candidates remain (then the explicit path runs)."""
        cands = [self._grad(layer).detach().reshape(-1).masked_fill(kp, 0) for layer, kp in zip(self.layers, kept)]
        if len({c.dtype for c in cands}) != 1:
            return None
        nnz = [int(torch.count_nonzero(c)) for c in cands]
        if isinstance(grow_k, int):
            if sum(nnz) < grow_k:
                return None
            return global_topk_masks(cands, k=grow_k, by="abs")
        if any(z < k for z, k in zip(nnz, grow_k)):
            return None
        return [topk_mask(c, k, by="abs") for c, k in zip(cands, grow_k)]

    def _cap(self, counts: list[int] | int, active: list[torch.Tensor]) -> list[int] | int:
        """Prune-only: never more than what is active."""
        if isinstance(counts, int):
            return min(counts, int(sum(int(torch.count_nonzero(a)) for a in active)))
        return [min(k, int(torch.count_nonzero(a))) for k, a in zip(counts, active)]

    def _drop_grow(self, t: int, counts: list[int] | int, active: list[torch.Tensor]) -> list[torch.Tensor]:
        frac = self.schedule.fraction(t)
        if self.method == "custom":
            assert self.score_fn is not None
            raw = [
                self.score_fn(layer.name, layer.param.detach(), layer.param.grad).detach().float()
                for layer in self.layers
            ]
            keep_scores = [layer.unit_scores(r) if layer.block else r.reshape(-1) for r, layer in zip(raw, self.layers)]
        else:
            keep_scores = [layer.unit_scores(layer.param) for layer in self.layers]
        n_active = [int(torch.count_nonzero(a)) for a in active]
        if isinstance(counts, int):
            kept_total = min(counts, sum(n_active))
            keep_k: list[int] | int = kept_total - int(math.floor(frac * kept_total + 0.5))
        else:
            keep_k = [min(k, na) - int(math.floor(frac * min(k, na) + 0.5)) for k, na in zip(counts, n_active)]
        if self.method == "custom":
            kept = self._select([torch.where(a, s, _NEG) for a, s in zip(active, keep_scores)], keep_k)
        else:
            kept = self._keep_top(active, keep_k)
        if self.method == "rigl":
            grow_src = [layer.unit_scores(self._grad(layer)) for layer in self.layers]  # blocks, or too few candidates
        elif self.method == "set":
            grow_src = [torch.rand(layer.units, generator=self.generator).to(layer.param.device) for layer in self.layers]
        else:
            grow_src = keep_scores
        grow_k = counts - keep_k if isinstance(counts, int) else [k - kk for k, kk in zip(counts, keep_k)]  # type: ignore[operator,arg-type]
        if self.method == "rigl" and all(layer.block is None for layer in self.layers):
            fast = self._grow_by_grad(kept, grow_k)
            if fast is not None:
                return [kp | g for kp, g in zip(kept, fast)]
        grown = self._select([torch.where(kp, _NEG, s) for kp, s in zip(kept, grow_src)], grow_k)
        return [kp | g for kp, g in zip(kept, grown)]

    # ---------------------------------------------------------------------------------- multi-rank
    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1

    def _broadcast_masks(self) -> None:
        """Rank 0's masks, bit-packed into one uint8 buffer, broadcast to every rank."""
        import torch.distributed as dist

        packed = [pack_mask(self.masks[layer.name]) for layer in self.layers]
        sizes = [p.numel() for p in packed]
        buf = torch.cat(packed)
        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = buf.to(device)
        dist.broadcast(buf, src=0)
        buf = buf.cpu()
        offset = 0
        for layer, size in zip(self.layers, sizes):
            self.masks[layer.name] = unpack_mask(buf[offset : offset + size], layer.shape).to(layer.param.device)
            offset += size

    # ------------------------------------------------------------------------------------- queries
    def density(self) -> float:
        """Overall density of the masks (kept / total elements)."""
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())
        return kept / max(1, sum(m.numel() for m in self.masks.values()))

    @property
    def block_masks(self) -> dict[str, torch.Tensor]:
        """With block structure: name -> ``[rows/bh, cols/bw]`` bool block mask (for block-sparse matrices)."""
        if self.structure is None or self.structure[0] != "block":
            raise ValueError("block_masks needs structure=('block', (bh, bw))")
        return {layer.name: layer.units_of(self.masks[layer.name]).reshape(layer.grid or ()) for layer in self.layers}

    def stats(self) -> dict[str, Any]:
        """Per-layer density, fraction of each mask changed at the last update, overall density and the
        FLOP fraction of the sparse model relative to dense (Linear/Conv: FLOPs scale with kept weights;
        parameters outside the controller count as dense when they belong to a Linear/Conv)."""
        layers = {layer.name: float(self.masks[layer.name].float().mean()) for layer in self.layers}
        dense_flops = sparse_flops = 0.0
        for layer in self.layers:
            n = layer.param.numel()
            dense_flops += n
            sparse_flops += float(torch.count_nonzero(self.masks[layer.name]))
        return {
            "step": self.step_count,
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "density": self.density(),
            "target_density": self.schedule.density(self.step_count, self.target),
            "layer_density": layers,
            "changed_fraction": dict(self.last_changed),
            "flop_fraction": sparse_flops / max(1.0, dense_flops),
        }

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed uint8), shapes, step position, RNG state and configuration."""
        return {
            "masks": {layer.name: pack_mask(self.masks[layer.name]) for layer in self.layers},
            "shapes": {layer.name: layer.shape for layer in self.layers},
            "step": self.step_count,
            "updates": self.updates,
            "pending": self._pending,
            "rng": self.generator.get_state(),
            "method": self.method,
            "distribution": self.distribution,
            "density": self.target,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the masks are re-applied to the weights).

        Raises:
            ValueError: the state belongs to a different model (layer names or shapes differ).
        """
        if not isinstance(state, Mapping) or "masks" not in state or "shapes" not in state:
            raise ValueError("state: not a DynamicSparsity state_dict")
        ours = {layer.name: layer.shape for layer in self.layers}
        theirs = {str(k): tuple(v) for k, v in state["shapes"].items()}
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise ValueError(f"state: from a different model (missing layers {missing}, unexpected {extra})")
        for name, shape in ours.items():
            if theirs[name] != shape:
                raise ValueError(f"state: layer {name!r} has shape {theirs[name]} in the state, {shape} in the model")
        for layer in self.layers:
            self.masks[layer.name] = unpack_mask(state["masks"][layer.name], layer.shape).to(layer.param.device)
        self.step_count = int(state["step"])
        self.updates = int(state.get("updates", 0))
        self._pending = bool(state.get("pending", False))
        self.generator.set_state(state["rng"])
        self._refresh(reset_state=False)

    def remove(self) -> None:
        """Detach the optimizer hook (masks stay as they are)."""
        if self.optimizer is not None:
            for hook in self._hooks:
                hook.remove()

    def __repr__(self) -> str:
        return (
            f"DynamicSparsity(method={self.method!r}, density={self.target}, distribution={self.distribution!r}, "
            f"structure={self.structure!r}, schedule={self.schedule!r}, layers={len(self.layers)})"
        )
