"""Multi-rank: with torch.distributed initialised (2 gloo processes), every rank holds rank 0's masks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    from sparsekit.sparsity import DynamicSparsity, pack_mask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # different seeds per rank and different data: without the broadcast the masks would differ
        sp = DynamicSparsity(model, opt, density=0.2, method="set", update_every=2, seed=rank)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(8, 16, generator=g)), torch.randint(0, 8, (8,), generator=g)).backward()
            sp.step()
            opt.step()
        packed = torch.cat([pack_mask(sp.masks[layer.name]) for layer in sp.layers])
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed)
        out[rank] = bool(all(torch.equal(gathered[0], x) for x in gathered)) and sp.updates == 3
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_identical_masks():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        assert dict(out) == {0: True, 1: True}
