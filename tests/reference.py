"""Independent eager references for the selection ops (plain numpy sorts, no sparsekit code).

Scores follow the documented semantics: ``by="abs"`` ranks |x| with -0.0 == +0.0; ``by="value"``
ranks x with -0.0 just below +0.0. Ties go to the lower global index.
"""

from __future__ import annotations

import numpy as np
import torch


def _scores(t: torch.Tensor, by: str) -> tuple[np.ndarray, np.ndarray]:
    v = t.detach().reshape(-1).to(torch.float64).numpy()
    if by == "abs":
        return np.abs(v), np.zeros(v.shape)
    return v, (~np.signbit(v)).astype(np.float64)  # +0.0 outranks -0.0


def topk_order(tensors: list[torch.Tensor], by: str) -> np.ndarray:
    """Global indices sorted by descending score, ties by ascending index."""
    parts = [_scores(t, by) for t in tensors]
    primary = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0)
    secondary = np.concatenate([s for _, s in parts]) if parts else np.zeros(0)
    index = np.arange(primary.size)
    return np.lexsort((index, -secondary, -primary))


def global_topk_masks(tensors: list[torch.Tensor], k: int, by: str) -> list[torch.Tensor]:
    order = topk_order(tensors, by)
    flat = np.zeros(order.size, dtype=bool)
    flat[order[:k]] = True
    out, start = [], 0
    for t in tensors:
        out.append(torch.from_numpy(flat[start : start + t.numel()].copy()).reshape(t.shape))
        start += t.numel()
    return out


def nm_mask(x: torch.Tensor, n: int, m: int, dim: int, by: str) -> torch.Tensor:
    moved = x.movedim(dim, -1)
    groups = moved.reshape(-1, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool)
    for g in range(groups.shape[0]):
        keep = topk_order([groups[g]], by)[:n]
        mask[g, torch.from_numpy(keep)] = True
    return mask.reshape(moved.shape).movedim(-1, dim)


def block_scores(x: torch.Tensor, bh: int, bw: int, norm: str) -> torch.Tensor:
    rows, cols = x.shape
    tiles = x.to(torch.float64).abs().reshape(rows // bh, bh, cols // bw, bw)
    if norm == "max":
        return tiles.amax(dim=(1, 3))
    return (tiles if norm == "l1" else tiles * tiles).sum(dim=(1, 3))


def block_topk_mask(x: torch.Tensor, bh: int, bw: int, k: int, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    scores = block_scores(x, bh, bw, norm)
    block_mask = global_topk_masks([scores], k, "value")[0]
    return block_mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1), block_mask


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_tensor(got: torch.Tensor, want: torch.Tensor, *, zero_sign: bool = True) -> bool:
    """Same dtype, shape and device, and the same bits (so NaN equals NaN and -0.0 differs from +0.0).
    ``zero_sign=False`` lets zeros of either sign match (the documented ``quantile`` exception)."""
    if not isinstance(got, torch.Tensor) or (got.dtype, got.shape, got.device) != (want.dtype, want.shape, want.device):
        return False
    same_bits = got.view(_INT_OF[got.dtype]) == want.view(_INT_OF[want.dtype])
    if not zero_sign:
        same_bits |= (got == 0) & (want == 0)
    return bool(same_bits.all())


def within_one_ulp(got: torch.Tensor, want: torch.Tensor, floor: float) -> bool:
    """Every element of ``got`` within one ulp of ``want``'s dtype (``eps * max(|want|, floor)``): what two
    float32-accumulated results rounded once to float16/bfloat16 may differ by."""
    ulp = torch.finfo(want.dtype).eps * want.double().abs().clamp_min(floor)
    return bool(((got.double() - want.double()).abs() <= ulp).all())
