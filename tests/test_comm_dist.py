"""Multi-process (gloo) tests of GradientSync: one process group per world size, several checks inside."""

import multiprocessing as mp
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist

from sparsekit.comm import GradientSync


class Net(torch.nn.Module):
    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4 + extra)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))[:, :4]


def _data(step: int, n: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def _reference(steps: int, world: int, per: int, accum: int):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(steps):
        opt.zero_grad()
        for k in range(accum):
            x, y = _data(s * accum + k, per * world)
            (torch.nn.functional.mse_loss(m(x), y) / accum).backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


def _train(rank: int, world: int, steps: int, per: int, accum: int, cap: float):
    torch.manual_seed(0)
    m = Net()
    sync = GradientSync(m, bucket_cap_mb=cap)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for s in range(steps):
        opt.zero_grad()
        for k in range(accum):
            x, y = _data(s * accum + k, per * world)
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            loss = torch.nn.functional.mse_loss(m(xs), ys) / accum
            if k < accum - 1:
                with sync.no_sync():
                    loss.backward()
            else:
                loss.backward()
        sync.finish()
        opt.step()
    sync.remove()
    return [p.detach().clone() for p in m.parameters()]


def _worker(rank, world, path, q):
    try:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
        out = {}
        ref = _reference(3, world, 4, 1)
        got = _train(rank, world, 3, 4, 1, cap=0.0005)  # several buckets
        out["plain"] = max((a - b).abs().max().item() for a, b in zip(ref, got))
        ref = _reference(2, world, 4, 2)
        got = _train(rank, world, 2, 4, 2, cap=25)
        out["no_sync"] = max((a - b).abs().max().item() for a, b in zip(ref, got))
        # a rank with a different model: clear error on every rank, no hang
        torch.manual_seed(0)
        try:
            GradientSync(Net(extra=1 if rank == world - 1 else 0))
            out["mismatch"] = "no error"
        except RuntimeError as e:
            out["mismatch"] = str(e)
        dist.destroy_process_group()
        q.put((rank, out))
    except Exception:
        q.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    world = request.param
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pg")
        procs = [ctx.Process(target=_worker, args=(r, world, path, q)) for r in range(world)]
        for p in procs:
            p.start()
        res = dict(q.get(timeout=90) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    for r, v in res.items():
        assert isinstance(v, dict), f"rank {r} failed:\n{v}"
    return res


def test_matches_full_batch(results):
    for out in results.values():
        assert out["plain"] < 1e-5


def test_no_sync_accumulation(results):
    for out in results.values():
        assert out["no_sync"] < 1e-5


def test_mismatched_model_clear_error(results):
    for out in results.values():
        assert "different communication plans" in out["mismatch"]
