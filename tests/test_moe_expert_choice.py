"""route_expert_choice against a plain-Python transcription (per expert: sort tokens by (-score, index),
take C), the RoutingPlan contract, permute/unpermute on its plan, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import moe


def _check_against_reference(logits: torch.Tensor, cf: float, score: str) -> None:
    T, E = logits.shape
    plan = moe.route_expert_choice(logits, cf, score=score)
    s = (torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)).tolist()
    C = min(T, math.ceil(T * cf / E))
    want = torch.zeros(T, E, dtype=torch.bool)
    for e in range(E):
        for t in sorted(range(T), key=lambda t: (-s[t][e], t))[:C]:
            want[t, e] = True
    assert plan.capacity == C and plan.k == E and torch.equal(plan.kept, want)
    assert torch.equal(plan.counts, torch.full((E,), C)) and torch.equal(plan.offsets, torch.arange(E + 1) * C)
    slots = [t * E + e for e in range(E) for t in range(T) if want[t, e]]
    slots += [sl for sl in range(T * E) if not want.view(-1)[sl]]
    assert plan.order.tolist() == slots
    assert torch.equal(plan.order[plan.inverse], torch.arange(T * E)) and int(plan.dropped) == T * E - E * C


@pytest.mark.parametrize("T,E,cf,score", [(20, 4, 1.0, "softmax"), (33, 5, 2.0, "sigmoid"), (7, 3, 10.0, "softmax")])
def test_matches_python_reference(T, E, cf, score):
    logits = torch.randint(-2, 3, (T, E), generator=torch.Generator().manual_seed(T)).float()  # many ties
    _check_against_reference(logits, cf, score)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), E=st.integers(1, 9), cf=st.floats(0.05, 12.0), score=st.sampled_from(["softmax", "sigmoid"]),
       levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_matches_python_reference_property(T, E, cf, score, levels, seed):
    # few distinct logit values (down to one) so ties, ties at the C-th score included, are common
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, levels, (T, E), generator=gen).float() - levels / 2
    _check_against_reference(logits, cf, score)


def test_permute_unpermute_and_gradients():
    logits = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 3, dtype=torch.float64)

    def f(lg):  # type: ignore[no-untyped-def]
        plan = moe.route_expert_choice(lg, 1.5)
        return moe.unpermute(moe.permute(x, plan) * 2.0, plan)

    plan = moe.route_expert_choice(logits, 1.5)
    ref = 2.0 * (plan.weights * plan.kept).sum(1, keepdim=True) * x  # each chosen expert: 2 * x, weighted
    torch.testing.assert_close(f(logits), ref)
    assert torch.autograd.gradcheck(f, (logits,))


def test_bad_input():
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.route_expert_choice(torch.randn(4, 2), 0.0)
    with pytest.raises(ValueError, match="score"):
        moe.route_expert_choice(torch.randn(4, 2), 1.0, score="relu")
    with pytest.raises(ValueError, match="logits"):
        moe.route_expert_choice(torch.randn(4), 1.0)
    with pytest.raises(TypeError, match="logits"):
        moe.route_expert_choice(torch.zeros(4, 2, dtype=torch.int64), 1.0)
    y = torch.randn(4, 2)
    y[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        moe.route_expert_choice(y, 1.0)
