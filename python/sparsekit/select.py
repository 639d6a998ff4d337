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

from . import _core

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

_DTYPE_TAGS = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_INTERPOLATIONS = ("linear", "lower", "higher", "midpoint", "nearest")


# ----------------------------------------------------------------------------------------- checks
def _check_tensor(x: object, arg: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPE_TAGS:
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


def _resolve_k(k: object, density: object, n: int) -> int:
    """Turn ``k`` or ``density`` (exactly one) into a count in ``[0, n]``; density rounds to nearest."""
    if (k is None) == (density is None):
        raise ValueError("pass exactly one of k or density")
    if k is not None:
        k = _check_int(k, "k")
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}] (number of elements), got {k}")
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
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.view(torch.int16)
    return flat.numpy()


def _cuda_select():
    from . import _cuda_select as module

    return module


# ------------------------------------------------------------------------------------------- masks
def global_topk_masks(
    tensors: Sequence[torch.Tensor],
    *,
    k: int | None = None,
    density: float | None = None,
    by: ScoreOrder = "abs",
) -> list[torch.Tensor]:
    """One exact top-k across many tensors, without concatenating or copying them.

    Args:
        tensors: tensors of one dtype on one device, any shapes (empty ones allowed).
        k: number of elements to keep in total, in ``[0, total]``.
        density: alternatively, the kept fraction in ``[0, 1]``; ``k = floor(density * total + 0.5)``.
        by: ``"abs"`` (default) ranks by magnitude, ``"value"`` by signed value.

    Returns:
        One ``torch.bool`` mask per tensor, shaped like it and on its device, with exactly ``k`` True
        in total. Equal to ``topk_mask`` on the flattened concatenation: ties go to the earlier tensor,
        then the lower flat index.

    Raises:
        TypeError: a non-tensor, unsupported dtype, or mixed dtypes.
        ValueError: NaN scores, k/density out of range, mixed devices, bad ``by``.
    """
    if isinstance(tensors, torch.Tensor):
        raise TypeError("tensors must be a sequence of tensors; for one tensor use topk_mask")
    xs = [_check_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    by = _check_by(by)
    dtypes = {t.dtype for t in xs}
    if len(dtypes) > 1:
        raise TypeError(f"tensors must share one dtype, got {sorted(map(str, dtypes))}")
    device = _common_device(xs, "tensors")
    n = sum(t.numel() for t in xs)
    kk = _resolve_k(k, density, n)
    if not xs:
        return []
    if device.type == "cuda":
        return _cuda_select().topk_masks([t.contiguous() for t in xs], kk, by)
    masks = [torch.empty(t.shape, dtype=torch.bool) for t in xs]
    _core.topk_masks(
        [_flat_bits(t) for t in xs], [m.view(-1).numpy() for m in masks], _DTYPE_TAGS[xs[0].dtype], kk, by
    )
    return masks


def topk_mask(
    x: torch.Tensor,
    k: int | None = None,
    *,
    density: float | None = None,
    by: ScoreOrder = "abs",
) -> torch.Tensor:
    """Boolean mask of the ``k`` largest scores of ``x`` (exactly ``k`` True).

    Ties are broken by the lowest flat index, so the result equals keeping the first ``k`` entries of
    a stable descending sort. Pass ``density`` instead of ``k`` to keep a fraction.

    Raises:
        TypeError: ``x`` not a float tensor of a supported dtype, ``k`` not an int.
        ValueError: NaN in ``x``, ``k`` outside ``[0, x.numel()]``, density outside ``[0, 1]``.
    """
    x = _check_tensor(x, "x")
    return global_topk_masks([x], k=k, density=density, by=by)[0]


def nm_mask(x: torch.Tensor, n: int, m: int, *, dim: int = -1, by: ScoreOrder = "abs") -> torch.Tensor:
    """N:M semi-structured mask: in each group of ``m`` consecutive elements along ``dim`` keep the
    ``n`` largest scores (2:4 for sparse tensor cores), ties to the lower index.

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
    if x.device.type == "cuda":
        return _cuda_select().nm_mask(x.contiguous(), n, m, dim, by)
    inner = math.prod(x.shape[dim + 1 :])
    mask = torch.empty(x.shape, dtype=torch.bool)
    _core.nm_mask(_flat_bits(x), mask.view(-1).numpy(), _DTYPE_TAGS[x.dtype], length, inner, n, m, by)
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
) -> tuple[torch.Tensor, torch.Tensor]: ...
def block_topk_mask(
    x: torch.Tensor,
    block: tuple[int, int],
    *,
    k: int | None = None,
    density: float | None = None,
    norm: BlockNorm = "l2",
    return_block_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` blocks (or a ``density`` fraction of blocks) of highest norm in a 2-D ``x``.

    Blocks are ``block = (bh, bw)`` tiles, which must divide ``x.shape``. ``norm`` is ``"l1"``,
    ``"l2"`` (ranked by the sum of squares, same order) or ``"max"`` (largest ``|x|``), accumulated in
    float64. Equal norms are broken by the lower row-major block index. ``k`` counts blocks.

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
    kk = _resolve_k(k, density, grid[0] * grid[1])
    if x.device.type == "cuda":
        mask, block_mask = _block_topk_on_device(x, (bh, bw), kk, norm)
    else:
        mask = torch.empty(x.shape, dtype=torch.bool)
        block_mask = torch.empty(grid, dtype=torch.bool)
        _core.block_topk_mask(
            _flat_bits(x),
            mask.view(-1).numpy(),
            block_mask.view(-1).numpy(),
            _DTYPE_TAGS[x.dtype],
            (rows, cols),
            (bh, bw),
            kk,
            norm,
        )
    return (mask, block_mask) if return_block_mask else mask


def _block_topk_on_device(
    x: torch.Tensor, block: tuple[int, int], k: int, norm: str, backend: object = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block top-k for CUDA tensors: float64 block norms by torch on the device, then the selection
    kernels over the norms (``backend`` lets tests run the kernels on the CPU shim). A NaN in ``x``
    makes its block's norm NaN (sum and amax propagate it), which the kernels refuse."""
    (bh, bw), (rows, cols) = block, x.shape
    tiles = x.reshape(rows // bh, bh, cols // bw, bw).abs().to(torch.float64)
    if norm == "max":
        scores = tiles.amax(dim=(1, 3))
    else:
        scores = (tiles if norm == "l1" else tiles * tiles).sum(dim=(1, 3))
    block_mask = _cuda_select().topk_masks([scores.contiguous()], k, "value", backend=backend)[0]
    return block_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1), block_mask


# ------------------------------------------------------------------------------ order statistics
def _kth_values(x: torch.Tensor, ranks: list[int], by: str) -> list[float]:
    if x.device.type == "cuda":
        return list(_cuda_select().kth_values(x.contiguous(), ranks, by))
    return list(_core.kth_values([_flat_bits(x)], _DTYPE_TAGS[x.dtype], ranks, by))


def kth_largest(x: torch.Tensor, k: int, *, by: ScoreOrder = "value") -> float:
    """Value of the ``k``-th largest element (1-based), as ``torch.topk(x.flatten(), k).values[-1]``.

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


@overload
def quantile(x: torch.Tensor, q: float, interpolation: Interpolation = ...) -> float: ...
@overload
def quantile(x: torch.Tensor, q: torch.Tensor, interpolation: Interpolation = ...) -> torch.Tensor: ...
def quantile(
    x: torch.Tensor, q: float | torch.Tensor, interpolation: Interpolation = "linear"
) -> float | torch.Tensor:
    """Quantile(s) of all elements of ``x``, exactly as ``torch.quantile(x.flatten(), q, interpolation=...)``.

    Only the one or two order statistics each level needs are selected (no sort), so it works on any
    size (older ``torch.quantile`` releases refuse more than 2**24 elements). The arithmetic is torch's own recipe:
    ``q`` rounded to the input dtype, ranks in float64, interpolation weights and ``lerp`` in the input
    dtype, so float32/float64 results match ``torch.quantile`` bit for bit. float16/bfloat16 inputs
    (which ``torch.quantile`` refuses) interpolate in float32.

    Args:
        q: a float in ``[0, 1]`` or a 0-/1-D float tensor of levels.
        interpolation: ``"linear"``, ``"lower"``, ``"higher"``, ``"midpoint"`` or ``"nearest"``.

    Returns:
        A float for a float ``q``; for a tensor ``q``, a tensor of ``q``'s shape, dtype of ``x``, on
        ``x``'s device.
    """
    x = _check_tensor(x, "x")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    n = x.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor is undefined")
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(q, torch.Tensor):
        if q.dim() > 1 or not q.is_floating_point():
            raise ValueError(f"q must be a float or a 0-/1-D float tensor, got {q.dtype} of shape {tuple(q.shape)}")
        levels = q.detach().to("cpu", work).reshape(-1)
    elif isinstance(q, numbers.Real) and not isinstance(q, bool):
        levels = torch.tensor([float(q)], dtype=work)
    else:
        raise TypeError(f"q must be a float or a tensor, got {type(q).__name__}")
    if levels.isnan().any() or (levels < 0).any() or (levels > 1).any():
        raise ValueError("q values must be in [0, 1]")

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
    values = _kth_values(x, [n - p for p in positions], "value")  # ascending position p = (n-p)-th largest
    lookup = dict(zip(positions, values))
    values_below = torch.tensor([lookup[p] for p in below.tolist()], dtype=work)
    if interpolation in ("linear", "midpoint"):
        values_above = torch.tensor([lookup[p] for p in above.tolist()], dtype=work)
        weights = torch.full_like(values_below, 0.5) if interpolation == "midpoint" else (ranks - below).to(work)
        values_below = values_below.lerp(values_above, weights)
    if isinstance(q, torch.Tensor):
        return values_below.to(x.dtype).reshape(q.shape).to(x.device)
    return float(values_below[0])
