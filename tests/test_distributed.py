"""Synchronised sampled statistics (bn-sampling §4.3): 2 gloo processes on 127.0.0.1 give the
same statistics, outputs, gradients and running statistics as one process on the whole batch."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bnrewrite.runtime.sampled import SampledBatchNorm

WORLD = 2
LOCAL = 3  # examples per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module(num_virtual=0, sync=True, track_running_stats=True):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, track_running_stats=track_running_stats).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return SampledBatchNorm.from_batchnorm(bn, strategy="fs", ratio=1 / 4, seed=0, stream=5, sync=sync,
                                           num_virtual=num_virtual, beta=0.5 if num_virtual else 0.0)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * LOCAL, 4, 8, 8, generator=g, dtype=torch.float64) * 2 + 1
    virtual = torch.randn(WORLD, 4, 8, 8, generator=g, dtype=torch.float64)
    dy = torch.randn(WORLD * LOCAL + WORLD, 4, 8, 8, generator=g, dtype=torch.float64)
    return x, virtual, dy


def _step(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    mean, var, count = module.last_statistics
    return {"y": y.detach(), "dx": x.grad, "dw": module.weight.grad, "db": module.bias.grad, "mean": mean,
            "var": var, "count": count, "rm": module.running_mean.clone(), "rv": module.running_var.clone()}


def _penalty_step(module, x, dy):
    """An input-gradient penalty through the synced statistics: its gradient is taken with
    create_graph=True (the backward all-reduces), then differentiated again (all-reducing again)."""
    x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad((module(x) * dy).sum(), x, create_graph=True)
    (dw,) = torch.autograd.grad(dx.square().sum(), [module.weight])  # (β does not reach dx)
    return {"dx": dx.detach(), "dw": dw}


def _func_step(x, dy, tangent, sync=True):
    """torch.func through the synced statistics: reverse mode (grad, the buffers passed in) and
    forward mode (jvp along ``tangent``, without running statistics: a transform refuses in-place
    updates of captured buffers, stock BatchNorm's too)."""
    module = _module(sync=sync)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(x, params, buffers):
        return (torch.func.functional_call(module, (params, buffers), (x,)) * dy).sum()

    dx, dparams = torch.func.grad(loss, argnums=(0, 1))(x, params, dict(module.named_buffers()))
    plain = _module(sync=sync, track_running_stats=False)
    _, derivative = torch.func.jvp(lambda x: (plain(x) * dy).sum(), (x,), (tangent,))
    return {"dx": dx, "dw": dparams["weight"], "jvp": derivative}


def _worker(rank, port, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, virtual, dy = _data()
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {"fs": _step(_module(), x[mine], dy[WORLD:][mine])}
        # fs+vdn: each rank holds one virtual row; their statistics are all-reduced separately
        local = torch.cat([virtual[rank:rank + 1], x[mine]])
        local_dy = torch.cat([dy[rank:rank + 1], dy[WORLD:][mine]])
        results["fs+vdn"] = _step(_module(num_virtual=1), local, local_dy)
        results["penalty"] = _penalty_step(_module(), x[mine], dy[WORLD:][mine])
        results["func"] = _func_step(x[mine], dy[WORLD:][mine], dy[:WORLD * LOCAL][mine])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_synced_sampled_statistics_equal_single_process_large_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, virtual, dy = _data()

    single = _step(_module(sync=False), x, dy[WORLD:])
    for r, res in enumerate(ranks):
        got = res["fs"]
        torch.testing.assert_close(got["mean"], single["mean"])
        torch.testing.assert_close(got["var"], single["var"])
        assert got["count"] == single["count"] == WORLD * LOCAL * 16  # 4x4 patch (1/4 of 8x8) per example
        torch.testing.assert_close(got["y"], single["y"][r * LOCAL:(r + 1) * LOCAL])
        torch.testing.assert_close(got["dx"], single["dx"][r * LOCAL:(r + 1) * LOCAL])
        torch.testing.assert_close(got["rm"], single["rm"])
        torch.testing.assert_close(got["rv"], single["rv"])
    # the loss is the sum of the ranks' losses: parameter gradients add up (DDP would average them)
    torch.testing.assert_close(ranks[0]["fs"]["dw"] + ranks[1]["fs"]["dw"], single["dw"])
    torch.testing.assert_close(ranks[0]["fs"]["db"] + ranks[1]["fs"]["db"], single["db"])

    # second derivatives through the all-reduce: each rank's share of the whole batch's penalty
    single = _penalty_step(_module(sync=False), x, dy[WORLD:])
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["penalty"]["dx"], single["dx"][r * LOCAL:(r + 1) * LOCAL])
    torch.testing.assert_close(ranks[0]["penalty"]["dw"] + ranks[1]["penalty"]["dw"], single["dw"])

    # torch.func.grad and jvp through the all-reduce (its setup_context-style twin)
    single = _step(_module(sync=False), x, dy[WORLD:])
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["func"]["dx"], single["dx"][r * LOCAL:(r + 1) * LOCAL])
    torch.testing.assert_close(ranks[0]["func"]["dw"] + ranks[1]["func"]["dw"], single["dw"])
    # each rank's loss moves with every rank's tangent: the ranks' jvps add up to the whole batch's
    torch.testing.assert_close(ranks[0]["func"]["jvp"] + ranks[1]["func"]["jvp"],
                               (single["dx"] * dy[:WORLD * LOCAL]).sum())

    # one process with both virtual rows at the front of the whole batch
    single = _step(_module(num_virtual=WORLD, sync=False), torch.cat([virtual, x]), dy)
    for r, res in enumerate(ranks):
        got = res["fs+vdn"]
        torch.testing.assert_close(got["mean"], single["mean"])
        torch.testing.assert_close(got["var"], single["var"])
        torch.testing.assert_close(got["y"][1:], single["y"][WORLD + r * LOCAL:WORLD + (r + 1) * LOCAL])
        torch.testing.assert_close(got["y"][:1], single["y"][r:r + 1])
        torch.testing.assert_close(got["dx"][1:], single["dx"][WORLD + r * LOCAL:WORLD + (r + 1) * LOCAL])
        torch.testing.assert_close(got["dx"][:1], single["dx"][r:r + 1])
        torch.testing.assert_close(got["rv"], single["rv"])


def _offset_data(dtype, offset):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(WORLD * LOCAL, 4, 8, 8, generator=g, dtype=torch.float64) + offset).to(dtype)


OFFSET_CASES = [(torch.bfloat16, 100.0), (torch.float32, 1000.0)]


def _offset_worker(rank, port, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = []
        for dtype, offset in OFFSET_CASES:
            x = _offset_data(dtype, offset)[rank * LOCAL:(rank + 1) * LOCAL]
            module = _module().float().train()
            module(x)
            mean, var, count = module.last_statistics
            results.append((mean, var, count))
        torch.save(results, os.path.join(out_dir, f"offset{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_synced_statistics_keep_float32_precision_for_offset_and_16_bit_inputs(tmp_path):
    """Values far from 0: the synced statistics match float64 statistics of the union of the
    ranks' samples as closely as the unsynced ones do, not rounded to bfloat16 (the mean of
    values near 100 is off by up to 0.25 in bfloat16) nor cancelled in float32 (Σx²/n − mean²
    of values near 1000 with unit variance loses ~10% of the variance)."""
    mp.spawn(_offset_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"offset{r}.pt") for r in range(WORLD)]
    for i, (dtype, offset) in enumerate(OFFSET_CASES):
        # the same sample, on the float64 values of the whole batch, in one process
        single = _module(sync=False)
        single(_offset_data(dtype, offset).double())
        ref_mean, ref_var, ref_count = single.last_statistics
        for r in range(WORLD):
            mean, var, count = ranks[r][i]
            assert count == ref_count
            assert mean.dtype == torch.float32 and var.dtype == torch.float32
            assert (mean.double() - ref_mean).abs().max() < 2e-4 * offset / 100, (dtype, mean, ref_mean)
            assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-3, (dtype, var, ref_var)


def _subgroup_worker(rank, port, out_dir):
    """Each rank's SyncBatchNorm synchronises over its own one-rank subgroup only: the sampler
    with sync=true must reduce over that group, i.e. compute the rank's own sample statistics,
    not those of the whole world."""
    import bnrewrite

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
        torch.manual_seed(0)
        net = nn.Sequential(nn.SyncBatchNorm(4, process_group=groups[rank])).double()
        x, _, dy = _data()
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for sync in (True, False):
            model = bnrewrite.transform(net, f"fs:ratio=1/4,sync={str(sync).lower()}")
            sampled = model.get_submodule("0")
            if sync:
                results["group_is_subgroup"] = sampled.process_group is groups[rank]
            results[sync] = _step(sampled, x[mine], dy[WORLD:][mine])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_sampler_uses_the_sync_batchnorms_process_group(tmp_path):
    mp.spawn(_subgroup_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["group_is_subgroup"]
        assert res[True]["count"] == res[False]["count"] == LOCAL * 16  # this rank's sample only
        torch.testing.assert_close(res[True]["mean"], res[False]["mean"])
        torch.testing.assert_close(res[True]["var"], res[False]["var"])
        torch.testing.assert_close(res[True]["y"], res[False]["y"])


def _empty_rank_worker(rank, port, out_dir):
    """Rank 1's first batch is empty: it still joins rank 0's all-reduce (with a zero count, as
    SyncBatchNorm does), so rank 0's first step takes its own sample's statistics and the second
    step pairs with the second step. Before, rank 1 skipped the collective: rank 0's first step
    was paired with rank 1's second (wrong statistics), and its second step then hung."""
    import datetime

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # a hang becomes gloo's timeout error, not a test that never ends
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, virtual, dy = _data()
        mine = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results = {}
        for nv in (0, 1):
            module = _module(num_virtual=nv)
            steps = []
            for step in range(2):
                if step == 0 and rank == 1:
                    batch, grad = x[:0], dy[:0]  # an empty batch adds no virtual rows either
                else:
                    batch = torch.cat([virtual[rank:rank + nv], x[mine]])
                    grad = torch.cat([dy[rank:rank + nv], dy[WORLD:][mine]])
                steps.append(_step(module, batch, grad))
            results[nv] = steps
        torch.save(results, os.path.join(out_dir, f"empty{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_rank_with_an_empty_batch_still_joins_the_all_reduce(tmp_path):
    mp.spawn(_empty_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"empty{r}.pt") for r in range(WORLD)]
    x, virtual, dy = _data()
    for nv in (0, 1):
        alone = _step(_module(num_virtual=nv, sync=False), torch.cat([virtual[:nv], x[:LOCAL]]),
                      torch.cat([dy[:nv], dy[WORLD:][:LOCAL]]))
        both = _step(_module(num_virtual=nv * WORLD, sync=False), torch.cat([virtual[:nv * WORLD], x]),
                     torch.cat([dy[:nv * WORLD], dy[WORLD:]]))
        first, second = ranks[0][nv][0], ranks[1][nv][0]
        assert second["y"].shape == (0, 4, 8, 8) and second["dx"].shape == (0, 4, 8, 8)
        for res in (first, second):  # rank 0's sample is the union: rank 1 counts 0
            torch.testing.assert_close(res["mean"], alone["mean"])
            torch.testing.assert_close(res["var"], alone["var"])
            assert res["count"] == alone["count"]
        torch.testing.assert_close(first["y"], alone["y"])
        for key in ("rm", "rv"):  # every rank updates its running statistics with the union's
            torch.testing.assert_close(second[key], first[key])
        for r in range(WORLD):
            got = ranks[r][nv][1]
            torch.testing.assert_close(got["mean"], both["mean"])
            torch.testing.assert_close(got["var"], both["var"])
            assert got["count"] == both["count"]
            rows = slice(WORLD * nv + r * LOCAL, WORLD * nv + (r + 1) * LOCAL)
            torch.testing.assert_close(got["y"][nv:], both["y"][rows])
