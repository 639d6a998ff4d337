"""The README's code examples run as written, on small stand-ins for the names they leave to the reader."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def one_rank_group():  # type: ignore[no-untyped-def]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_readme_examples_run(one_rank_group):  # type: ignore[no-untyped-def]
    blocks = _python_blocks()
    assert len(blocks) == 2, "update this test with the README's examples"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    g = torch.Generator().manual_seed(1)
    ns: dict = {
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.05),
        "weight": torch.randn(64, 64, generator=g),
        "total_steps": 6,
        "loader": [(torch.randn(32, 64, generator=g), torch.randn(32, 64, generator=g)) for _ in range(6)],
        "loss_fn": nn.functional.mse_loss,
        "block_mask": torch.tensor([[True, False], [True, True]]),
        "logits": torch.randn(32, 64, generator=g),
        "b": torch.zeros(64),
        "experts": lambda t: 2 * t,
    }
    exec(blocks[0], ns)  # noqa: S102 (the README's own code)
    # what the example claims, checked against plain torch
    assert sum(int(m.sum()) for m in ns["masks"]) == round(0.1 * sum(p.numel() for p in model.parameters()))
    assert torch.equal(ns["two_four"].reshape(-1, 4).sum(1), torch.full((64 * 16,), 2))
    for layer in ns["sp"].layers:
        assert torch.all(layer.param[~ns["sp"].masks[layer.name]] == 0)
    x, W, plan = ns["x"], ns["W"], ns["plan"]
    wd = ns["weight"] * ns["block_mask"].repeat_interleave(32, 0).repeat_interleave(32, 1)
    torch.testing.assert_close(sparsekit_bsr := ns["sparsekit"].ops.bsr_linear(x, W), x @ wd.T, rtol=1e-4, atol=1e-4)
    assert sparsekit_bsr.shape == (32, 64)
    # unpermute(2 * permute(x)) = 2 x times the sum of the token's kept weights
    kept_w = torch.zeros(32)
    slots = plan.order[: int(plan.offsets[-1])]
    kept_w.index_add_(0, slots // 8, plan.weights.reshape(-1)[slots])
    torch.testing.assert_close(ns["y"], 2 * x * kept_w[:, None], rtol=1e-5, atol=1e-5)

    exec(blocks[1], ns)  # noqa: S102 (the README's own code)
    assert int(ns["mask"].sum()) == 100 and ns["plan"].expert_ids.shape == (512, 2)
    torch.testing.assert_close(ns["y"], x @ wd.T, rtol=1e-4, atol=1e-4)
