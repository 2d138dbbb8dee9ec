"""Issue 9: DistributedDataParallel wraps a transformed model (2 gloo processes on loopback).

Each rank trains on its own half of every batch; DDP all-reduces the gradients, so after the steps
both ranks hold identical parameters, and those equal one process that averages the two halves'
gradients itself (what DDP promises), for every recipe."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.test_ecosystem import RECIPES, batches, make


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out, broadcast_buffers):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for recipe in RECIPES:
            model = make(recipe)
            ddp = DDP(model, broadcast_buffers=broadcast_buffers)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            torch.manual_seed(100 + rank)
            for x, y in batches(2, batch=8):
                xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
                loss = F.cross_entropy(ddp(xs), ys)
                opt.zero_grad()
                loss.backward()
                opt.step()
            results[recipe] = [p.detach().clone() for p in model.parameters()]
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference(recipe, world):
    """Average of the per-half gradients, as DDP computes it, without DDP."""
    model = make(recipe)
    replicas = [make(recipe) for _ in range(world)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in batches(2, batch=8):
        grads = []
        for rank in range(world):
            replica = replicas[rank]
            with torch.no_grad():  # parameters are shared; buffers stay per rank, as under DDP
                for p_rep, p in zip(replica.parameters(), model.parameters()):
                    p_rep.copy_(p)
            torch.manual_seed(0)
            loss = F.cross_entropy(replica(x.chunk(world)[rank]), y.chunk(world)[rank])
            grads.append(torch.autograd.grad(loss, list(replica.parameters()), allow_unused=True))
        opt.zero_grad()
        for i, p in enumerate(model.parameters()):
            parts = [g[i] for g in grads if g[i] is not None]
            p.grad = sum(parts) / world if parts else None
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_ddp_two_gloo_processes(tmp_path, broadcast_buffers):
    """broadcast_buffers=False: running statistics stay per rank, as stock BN's do. True (DDP's
    default): rank 0's buffers reach every rank before each forward; the training statistics
    still come from each rank's batch, so the steps are the same, except where a variant's
    training forward normalises with its buffers (Extreme Norm's moving averages: rank 0's)."""
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), broadcast_buffers), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for recipe in RECIPES:
        for a, b in zip(r0[recipe], r1[recipe]):
            assert torch.equal(a, b), f"{recipe}: ranks diverged"
        if "vdn" in recipe:  # virtual rows come from each rank's own generator
            continue
        if broadcast_buffers and recipe.startswith(("two-tower", "brn")):  # rank 0's moving averages
            continue
        for a, ref in zip(r0[recipe], _single_process_reference(recipe, world)):
            torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-6, msg=recipe)
