"""Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens by score.

Unsuitable for causal decoders: whether a token is chosen depends on the scores of later tokens in the
batch, which a decoder generating one token at a time does not have (and which leaks the future in
training). Plain torch ops, so it runs on any device without a host sync and autograd reaches the logits.
"""

from __future__ import annotations

import math

import torch

from ._routing import RoutingPlan, _raise_flag


def route_expert_choice(logits: torch.Tensor, capacity_factor: float, *, score: str = "softmax") -> RoutingPlan:
    """Expert-choice plan of ``logits [T, E]``: expert ``e`` takes the ``C = min(T, ceil(T*capacity_factor/E))``
    tokens of highest score ``s[:, e]`` (softmax over experts, or sigmoid), ties to the lower token index.

    The plan keeps :class:`RoutingPlan`'s contract with ``k = E`` slots per token (slot ``t*E + e`` is
    token ``t`` at expert ``e``; ``expert_ids[t] = 0..E-1``): ``kept[t, e]`` says whether expert ``e``
    chose token ``t``, ``weights = scores = s`` (gradients reach the logits), ``counts = C`` for every
    expert, ``order`` lists each expert's tokens in token order, then the unchosen slots in slot order;
    ``capacity = C``. Usable by :func:`permute` / :func:`unpermute` (note that ``permute`` then returns
    ``T*E`` rows, the first ``E*C`` of them the experts' inputs). Documented as unsuitable for causal decoders.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point torch.Tensor")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be 2-D [tokens, experts] with E >= 1, got shape {tuple(logits.shape)}")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0 \
            or not math.isfinite(capacity_factor):  # fmt: skip
        raise ValueError(f"capacity_factor must be a positive finite number, got {capacity_factor!r}")
    T, E = logits.shape
    C = min(T, int(math.ceil(T * capacity_factor / E)))
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = torch.softmax(logits.to(ct), -1) if score == "softmax" else torch.sigmoid(logits.to(ct))
    sd = s.detach()
    _raise_flag(sd.isnan().any().to(torch.int64).reshape(1), "logits contains NaN (or +inf / an all -inf row under softmax)", logits)
    dev = logits.device
    experts = torch.arange(E, device=dev)
    # each expert's top-C tokens by selection, not a sort: the C-th largest score, every score above it,
    # and of the scores equal to it the earliest tokens (+0.0 folds -0.0 into +0.0)
    st = sd.t() + 0.0  # [E, T]
    if T > 0:
        kth = torch.topk(st, C, dim=1).values[:, C - 1 :]
        above, tied = st > kth, st == kth
        chosen = above | (tied & (torch.cumsum(tied, 1) <= C - above.sum(1, keepdim=True)))
    else:
        chosen = torch.zeros(E, 0, dtype=torch.bool, device=dev)
    kept = chosen.t().contiguous()  # [T, E]
    # the plan's order by a counting placement, no sort: expert e's j-th chosen token (in token order)
    # goes to e*C + j, the unchosen slots after all of them in slot order
    n = T * E
    flat = kept.reshape(-1)
    chosen_at = (experts[:, None] * C + torch.cumsum(chosen, 1) - 1).t().reshape(-1)
    inverse = torch.where(flat, chosen_at, E * C + torch.cumsum(~flat, 0) - 1)
    order = torch.empty_like(inverse).scatter_(0, inverse, torch.arange(n, device=dev))
    counts = torch.full((E,), C, dtype=torch.int64, device=dev)
    offsets = torch.arange(E + 1, device=dev) * C
    dropped = torch.tensor(n - E * C, dtype=torch.int64, device=dev)
    ids = experts.expand(T, E).contiguous()
    return RoutingPlan(ids, s.to(logits.dtype), sd, order, inverse, counts, offsets, kept, dropped, C, E, E)


__all__ = ["route_expert_choice"]
