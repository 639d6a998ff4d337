"""Exact selection on torch tensors: top-k masks, global top-k across many tensors, order statistics,
quantiles, N:M and block masks.

Every function is exact and deterministic: masks keep exactly ``k`` elements, ties are broken by the
lowest flat index (tensor order first for many tensors), and the answer is the same on any thread
count. CPU tensors are read in place by the Rust core (zero-copy, GIL released, rayon-parallel);
CUDA tensors stay on their device and run the kernels in ``cuda/select.cu``.

Scores: ``by="abs"`` ranks by ``|x|`` (pruning), ``by="value"`` by ``x``. For ``by="value"``, ``-0.0``
ranks just below ``+0.0``; for ``by="abs"`` they are equal. NaN scores are refused with ``ValueError``
(a NaN has no rank; clean them first, e.g. ``torch.nan_to_num``). ``±inf`` are ordinary extremes.

Supported dtypes: float32, float64, float16, bfloat16 (the last two are read as raw bits, never
upcast). Non-contiguous inputs are copied once to a contiguous layout: the only copy made.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Sequence, overload

import numpy as np
import torch

from . import _core, _cuda
from ._arrays import DTYPE_TAGS, bits

__all__ = [
    "kth_largest",
    "quantile",
    "topk_mask",
    "global_topk_masks",
    "nm_mask",
    "block_topk_mask",
]

ScoreOrder = Literal["abs", "value"]
Interpolation = Literal["linear", "lower", "higher", "midpoint", "nearest"]
BlockNorm = Literal["l1", "l2", "max"]

_INTERPOLATIONS = ("linear", "lower", "higher", "midpoint", "nearest")


# ----------------------------------------------------------------------------------------- checks
def _check_tensor(x: object, arg: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPE_TAGS:
        raise TypeError(f"{arg} has dtype {x.dtype}; supported: float32, float64, float16, bfloat16")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{arg} is on device {x.device}; only cpu and cuda tensors are supported")
    return x.detach()


def _check_by(by: object) -> ScoreOrder:
    if by not in ("abs", "value"):
        raise ValueError(f"by must be 'abs' or 'value', got {by!r}")
    return "abs" if by == "abs" else "value"


def _check_int(value: object, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
    return int(value)


def _resolve_k(k: object, density: object, n: int, what: str = "elements") -> int:
    """Turn ``k`` or ``density`` (exactly one) into a count in ``[0, n]``; density rounds to nearest.
    ``what`` names the counted things in errors (elements, blocks)."""
    if (k is None) == (density is None):
        raise ValueError("pass exactly one of k or density")
    if k is not None:
        k = _check_int(k, "k")
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}] (number of {what}), got {k}")
        return k
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    density = float(density)
    if not 0.0 <= density <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(n, int(math.floor(density * n + 0.5)))


def _common_device(tensors: Sequence[torch.Tensor], arg: str) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{arg} are on different devices: {sorted(map(str, devices))}")
    return next(iter(devices)) if devices else torch.device("cpu")


def _flat_bits(x: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of a CPU tensor's data (copying only a non-contiguous tensor).

    float16/bfloat16 cross as int16 views of their bits: numpy has no bfloat16, and nothing is upcast.
    """
    flat = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
    if flat.data_ptr() % flat.element_size():  # e.g. torch.frombuffer(..., offset=1): numpy needs alignment
        flat = flat.clone()
    return bits(flat)


def _cuda_select():
    from . import _cuda_select as module

    return module


def _on_device(x: torch.Tensor) -> bool:
    """CUDA tensors, and CPU tensors inside ``sparsekit.testing.simulated_cuda()``, take the kernels."""
    return x.device.type == "cuda" or (x.device.type == "cpu" and _cuda.ACTIVE_SIMULATION.get() is not None)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``: through pinned memory without blocking the host on CUDA."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _check_out(out: object, like: torch.Tensor, arg: str) -> torch.Tensor:
    """A caller's mask buffer: a contiguous bool tensor shaped and placed like ``like``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != torch.bool:
        raise TypeError(f"{arg} must have dtype torch.bool, got {out.dtype}")
    if out.shape != like.shape:
        raise ValueError(f"{arg} has shape {tuple(out.shape)}, expected {tuple(like.shape)}")
    if out.device != like.device:
        raise ValueError(f"{arg} is on {out.device}, expected {like.device}")
    if not out.is_contiguous():
        raise ValueError(f"{arg} must be contiguous")
    return out


# ------------------------------------------------------------------------------------------- masks
def global_topk_masks(
    tensors: Sequence[torch.Tensor],
    *,
    k: int | None = None,
    density: float | None = None,
    by: ScoreOrder = "abs",
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """One exact top-k across many tensors, without concatenating or copying them.

    Args:
        tensors: tensors of one dtype on one device, any shapes (empty ones allowed).
        k: number of elements to keep in total, in ``[0, total]``.
        density: alternatively, the kept fraction in ``[0, 1]``; ``k = floor(density * total + 0.5)``.
        by: ``"abs"`` (default) ranks by magnitude, ``"value"`` by signed value.
        out: optional bool tensors (one per tensor, same shapes and device, contiguous) to write the masks
            into, so a training loop can reuse its buffers; they are returned.

    Returns:
        One ``torch.bool`` mask per tensor, shaped like it and on its device, with exactly ``k`` True
        in total. Equal to ``topk_mask`` on the flattened concatenation: ties go to the earlier tensor,
        then the lower flat index.

    Raises:
        TypeError: a non-tensor, unsupported dtype, or mixed dtypes.
        ValueError: NaN scores (naming ``tensors[i]``), k/density out of range, mixed devices, bad ``by``.
    """
    if isinstance(tensors, torch.Tensor):
        raise TypeError("tensors must be a sequence of tensors; for one tensor use topk_mask")
    xs = [_check_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    return _topk_masks(xs, k, density, by, out, [f"tensors[{i}]" for i in range(len(xs))])


def _topk_masks(
    xs: list[torch.Tensor], k: object, density: object, by: object, out: Sequence[torch.Tensor] | None, names: list[str]
) -> list[torch.Tensor]:
    """``global_topk_masks`` on checked tensors; ``names`` are the tensors' names for NaN errors."""
    order = _check_by(by)
    dtypes = {t.dtype for t in xs}
    if len(dtypes) > 1:
        raise TypeError(f"tensors must share one dtype, got {sorted(map(str, dtypes))}")
    _common_device(xs, "tensors")
    n = sum(t.numel() for t in xs)
    kk = _resolve_k(k, density, n)
    outs = None
    if out is not None:
        if isinstance(out, torch.Tensor) or len(out) != len(xs):
            raise ValueError(f"out must be a sequence of {len(xs)} bool tensors, one per tensor")
        outs = [_check_out(o, x, f"out[{i}]") for i, (o, x) in enumerate(zip(out, xs))]
    if not xs:
        return []
    try:
        if _on_device(xs[0]):
            return _cuda_select().topk_masks([t.contiguous() for t in xs], kk, order, out=outs)
        masks = outs if outs is not None else [torch.empty(t.shape, dtype=torch.bool) for t in xs]
        _core.topk_masks(
            [_flat_bits(t) for t in xs], [m.view(-1).numpy() for m in masks], DTYPE_TAGS[xs[0].dtype], kk, order
        )
    except ValueError as exc:
        raise _name_nan_tensor(exc, xs, names) from None
    return masks


def _name_nan_tensor(exc: ValueError, xs: list[torch.Tensor], names: list[str]) -> ValueError:
    """Rewrite a NaN error so it names the first tensor holding a NaN (searched only on that error)."""
    if "NaN" not in str(exc):
        return exc
    first = next((name for name, t in zip(names, xs) if bool(t.isnan().any())), None)
    if first is None:
        return exc
    return ValueError(f"{first} contains NaN; NaN scores cannot be ranked (replace them, e.g. with torch.nan_to_num)")


def topk_mask(
    x: torch.Tensor,
    k: int | None = None,
    *,
    density: float | None = None,
    by: ScoreOrder = "abs",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the ``k`` largest scores of ``x`` (exactly ``k`` True).

    Ties are broken by the lowest flat index, so the result equals keeping the first ``k`` entries of
    a stable descending sort. Pass ``density`` instead of ``k`` to keep a fraction, and ``out`` (a
    contiguous bool tensor shaped like ``x``) to write into an existing buffer.

    Raises:
        TypeError: ``x`` not a float tensor of a supported dtype, ``k`` not an int, ``out`` not bool.
        ValueError: NaN in ``x``, ``k`` outside ``[0, x.numel()]``, density outside ``[0, 1]``.
    """
    x = _check_tensor(x, "x")
    return _topk_masks([x], k, density, by, None if out is None else [out], ["x"])[0]


def nm_mask(
    x: torch.Tensor, n: int, m: int, *, dim: int = -1, by: ScoreOrder = "abs", out: torch.Tensor | None = None
) -> torch.Tensor:
    """N:M semi-structured mask: in each group of ``m`` consecutive elements along ``dim`` keep the
    ``n`` largest scores (2:4 for sparse tensor cores), ties to the lower index. ``out``: an optional
    contiguous bool tensor shaped like ``x`` to write into.

    Raises:
        ValueError: ``n`` outside ``[0, m]``, ``m < 1``, ``m`` not dividing ``x.shape[dim]``, NaN, bad dim.
    """
    x = _check_tensor(x, "x")
    by = _check_by(by)
    n, m, dim = _check_int(n, "n"), _check_int(m, "m"), _check_int(dim, "dim")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for a tensor of {x.dim()} dimensions")
    dim %= x.dim()
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}")
    if not 0 <= n <= m:
        raise ValueError(f"n must be in [0, m={m}], got {n}")
    length = x.shape[dim]
    if length % m:
        raise ValueError(f"m={m} does not divide x.shape[{dim}]={length}")
    mask = _check_out(out, x, "out") if out is not None else None
    if _on_device(x):
        return _cuda_select().nm_mask(x.contiguous(), n, m, dim, by, out=mask)
    inner = math.prod(x.shape[dim + 1 :])
    mask = mask if mask is not None else torch.empty(x.shape, dtype=torch.bool)
    _core.nm_mask(_flat_bits(x), mask.view(-1).numpy(), DTYPE_TAGS[x.dtype], length, inner, n, m, by)
    return mask


@overload
def block_topk_mask(
    x: torch.Tensor,
    block: tuple[int, int],
    *,
    k: int | None = ...,
    density: float | None = ...,
    norm: BlockNorm = ...,
    return_block_mask: Literal[False] = ...,
    out: torch.Tensor | None = ...,
) -> torch.Tensor: ...
@overload
def block_topk_mask(
    x: torch.Tensor,
    block: tuple[int, int],
    *,
    k: int | None = ...,
    density: float | None = ...,
    norm: BlockNorm = ...,
    return_block_mask: Literal[True],
    out: torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def block_topk_mask(
    x: torch.Tensor,
    block: tuple[int, int],
    *,
    k: int | None = None,
    density: float | None = None,
    norm: BlockNorm = "l2",
    return_block_mask: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` blocks (or a ``density`` fraction of blocks) of highest norm in a 2-D ``x``.

    Blocks are ``block = (bh, bw)`` tiles, which must divide ``x.shape``. ``norm`` is ``"l1"``,
    ``"l2"`` (ranked by the sum of squares, same order) or ``"max"`` (largest ``|x|``), accumulated in
    float64 in one fixed order on CPU and CUDA alike (per block row, lane ``j % 4`` sums its elements in
    index order, lanes combine as ``(l0 + l1) + (l2 + l3)``, rows add up in order), so both paths pick
    the same blocks. Equal norms are broken by the lower row-major block index. ``k`` counts blocks.
    ``out``: an optional contiguous bool tensor shaped like ``x`` for the element mask.

    Returns:
        The element mask (shape of ``x``); with ``return_block_mask=True`` also the
        ``(rows/bh, cols/bw)`` block mask.
    """
    x = _check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise TypeError(f"block must be a pair (bh, bw), got {block!r}")
    bh, bw = (_check_int(b, "block") for b in block)
    if bh < 1 or bw < 1:
        raise ValueError(f"block sizes must be positive, got ({bh}, {bw})")
    rows, cols = x.shape
    if rows % bh or cols % bw:
        raise ValueError(f"block ({bh}, {bw}) does not divide the shape ({rows}, {cols})")
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}")
    grid = (rows // bh, cols // bw)
    kk = _resolve_k(k, density, grid[0] * grid[1], what="blocks")
    mask = _check_out(out, x, "out") if out is not None else None
    if _on_device(x):
        mask, block_mask = _cuda_select().block_topk_mask(x.contiguous(), (bh, bw), kk, norm, out=mask)
    else:
        mask = mask if mask is not None else torch.empty(x.shape, dtype=torch.bool)
        block_mask = torch.empty(grid, dtype=torch.bool)
        _core.block_topk_mask(
            _flat_bits(x),
            mask.view(-1).numpy(),
            block_mask.view(-1).numpy(),
            DTYPE_TAGS[x.dtype],
            (rows, cols),
            (bh, bw),
            kk,
            norm,
        )
    return (mask, block_mask) if return_block_mask else mask


# ------------------------------------------------------------------------------ order statistics
def _kth_values(x: torch.Tensor, ranks: list[int], by: str) -> torch.Tensor:
    """The rank-th largest scores as a 1-D tensor of ``x``'s dtype on ``x``'s device."""
    if _on_device(x):
        return _cuda_select().kth_values(x.contiguous(), ranks, by)
    values = _core.kth_values([_flat_bits(x)], DTYPE_TAGS[x.dtype], ranks, by)
    return torch.tensor(values, dtype=torch.float64).to(x.dtype)  # exact: every value is one of x's


def kth_largest(x: torch.Tensor, k: int, *, by: ScoreOrder = "value") -> torch.Tensor:
    """The ``k``-th largest element (1-based), as ``torch.topk(x.flatten(), k).values[-1]``: a 0-d
    tensor of ``x``'s dtype on ``x``'s device (on CUDA the value never leaves the device).

    With ``by="abs"`` returns the ``k``-th largest magnitude. Works on any size.

    Raises:
        ValueError: ``k`` outside ``[1, x.numel()]`` (so also for an empty ``x``), NaN in ``x``.
    """
    x = _check_tensor(x, "x")
    by = _check_by(by)
    k = _check_int(k, "k")
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (number of elements), got {k}")
    return _kth_values(x, [k], by)[0]


def _check_levels(q: object, work: torch.dtype) -> torch.Tensor:
    """``q`` as a 1-D CPU tensor of levels in ``work``'s dtype, range-checked before any rounding (as
    torch does: ``1.00000001`` is refused, not rounded to 1)."""
    if isinstance(q, torch.Tensor):
        if q.dim() > 1 or not q.is_floating_point():
            raise ValueError(f"q must be a float or a 0-/1-D float tensor, got {q.dtype} of shape {tuple(q.shape)}")
        exact = q.detach().to("cpu").reshape(-1)
        bad = exact.isnan() | (exact < 0) | (exact > 1)
        if bad.any():
            raise ValueError(f"q values must be in [0, 1], got {exact[bad][0].item()!r}")
        return exact.to(work)
    if isinstance(q, numbers.Real) and not isinstance(q, bool):
        value = float(q)
        if not 0.0 <= value <= 1.0:  # also NaN
            raise ValueError(f"q must be in [0, 1], got {value!r}")
        return torch.tensor([value], dtype=work)
    raise TypeError(f"q must be a float or a tensor, got {type(q).__name__}")


def quantile(x: torch.Tensor, q: float | torch.Tensor, interpolation: Interpolation = "linear") -> torch.Tensor:
    """Quantile(s) of all elements of ``x``, as ``torch.quantile(x.flatten(), q, interpolation=...)``.

    Only the one or two order statistics each level needs are selected (no sort), so it works on any
    size. The arithmetic is torch's own recipe: ``q`` range-checked, then rounded to the input dtype,
    ranks in float64, interpolation weights and ``lerp`` in the input dtype, so float32/float64 results
    match ``torch.quantile`` bit for bit, with one exception: a zero result may carry the other sign than
    torch's. (Our order statistics rank ``-0.0`` just below ``+0.0``; ``torch.quantile`` sorts them as
    equal, so its sign of a zero depends on where the signed zeros sit in the input. The values compare
    equal.) float16/bfloat16 inputs (which ``torch.quantile`` refuses) interpolate in float32.

    Args:
        q: a float in ``[0, 1]`` or a 0-/1-D float tensor of levels.
        interpolation: ``"linear"``, ``"lower"``, ``"higher"``, ``"midpoint"`` or ``"nearest"``.

    Returns:
        A tensor of ``x``'s dtype on ``x``'s device: 0-d for a float ``q``, ``q``'s shape for a tensor
        ``q`` (on CUDA the values never leave the device).
    """
    x = _check_tensor(x, "x")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor is undefined")
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    levels = _check_levels(q, work)

    # torch's recipe (aten quantile): ranks in float64, gather the order statistics, lerp.
    ranks = levels.double() * (n - 1)
    if interpolation == "lower":
        ranks = ranks.floor()
    elif interpolation == "higher":
        ranks = ranks.ceil()
    elif interpolation == "nearest":
        ranks = ranks.round()
    below = ranks.long()
    above = ranks.ceil().long()
    positions = sorted(set(below.tolist()) | set(above.tolist()))
    values = _kth_values(x, [n - p for p in positions], "value").to(work)  # ascending position p = (n-p)-th largest
    slot = {p: i for i, p in enumerate(positions)}
    take = lambda idx: values[_to_device(torch.tensor([slot[p] for p in idx.tolist()]), values.device)]  # noqa: E731
    result = take(below)
    if interpolation in ("linear", "midpoint"):
        weights = torch.full_like(levels, 0.5) if interpolation == "midpoint" else (ranks - below).to(work)
        result = result.lerp(take(above), _to_device(weights, values.device))
    shape = q.shape if isinstance(q, torch.Tensor) else ()
    return result.to(x.dtype).reshape(shape)
