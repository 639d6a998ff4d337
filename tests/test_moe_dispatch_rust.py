"""The Rust dispatch kernels (CPU permute / unpermute and their backwards) against plain torch gathers in
every dtype, their custom ops under opcheck, and a corrupt plan as a clear error."""

from __future__ import annotations

import pytest
import torch

from sparsekit import moe


def _plan(T=64, E=8, k=3, cf=None):
    return moe.route(torch.randn(T, E, generator=torch.Generator().manual_seed(4)), k, capacity_factor=cf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cf", [None, 0.8])
def test_fwd_bwd_match_torch_gathers(dtype, cf):
    plan = _plan(cf=cf)
    k = plan.k
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(64, 2, 5, generator=gen).to(dtype)
    g0 = torch.randn(64, 2, 5, generator=gen).to(dtype)
    w0 = (plan.weights * plan.kept).detach().to(dtype)

    def run(use_ours):  # type: ignore[no-untyped-def]
        x = x0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        if use_ours:
            out = moe.unpermute(moe.permute(x, plan) * 1.5, plan, w)
        else:  # independent reference: index_select / index_add_ in float64
            tok = plan.order // k
            xp = x.double().index_select(0, tok) * 1.5
            wr = (w.double() * plan.kept).reshape(-1).index_select(0, plan.order)  # unpermute drops by kept
            out = torch.zeros(x.shape, dtype=torch.float64).index_add_(0, tok, xp * wr[:, None, None])
        (out.double() * g0.double()).sum().backward()
        return out.double(), x.grad.double(), w.grad.double()

    tol = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **tol)


def test_opcheck_backward_ops():
    plan = _plan(T=10, E=4, k=2)
    g = torch.randn(20, 5)
    y = torch.randn(20, 5)
    gt = torch.randn(10, 5)
    w = plan.weights.detach().clone()
    torch.library.opcheck(torch.ops.sparsekit.moe_gather_sum.default, (g, plan.order, plan.inverse, 2))
    torch.library.opcheck(torch.ops.sparsekit.moe_unpermute_backward.default, (gt, y, w, plan.order, plan.inverse, 2))


def test_corrupt_plan_is_a_clear_error():
    plan = _plan(T=10, E=4, k=2)
    bad = plan._replace(order=plan.order + 100)
    with pytest.raises(ValueError, match="order"):
        moe.permute(torch.randn(10, 3), bad)
    bad = plan._replace(inverse=torch.zeros_like(plan.inverse))
    y = torch.randn(20, 3, requires_grad=True)
    out = moe.unpermute(y, bad)
    with pytest.raises(ValueError, match="inverse"):
        out.sum().backward()
