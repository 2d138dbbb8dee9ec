"""Where the time of one lowered BatchNorm+ReLU step goes: host (Python, dispatch, launches)
or device (kernels). Small ResNet shapes are host-bound when the host time per step exceeds the
device time; that is what the layer benchmark measures there, not kernel speed.

Usage: python benchmarks/kernel_overhead.py [--shape 128,256,14,14] [--dtype bf16]
       python benchmarks/kernel_overhead.py --host-only [--triton-launcher] [--phases] [--shape 2,8,4,4]  # no GPU

``--host-only`` measures the part of the host time that is this package's own Python: the
kernels run through the Triton path on CPU tensors with every launch replaced by a no-op
(so Triton's launcher and the kernels themselves are *not* counted), next to stock
``nn.BatchNorm2d`` + ``nn.ReLU`` on the same tiny CPU tensor, interleaved, best of ``--reps``.
``--host-only --triton-launcher`` counts Triton's whole launch path as well: the kernels are
compiled for sm_90 on the CPU and launched through Triton's own compiled C launcher onto a
stand-in ``libcuda`` (``benchmarks/fake_cuda.py``) whose ``cuLaunchKernelEx`` does nothing, so the
launcher's argument parsing and every tensor's ``data_ptr()`` are counted; each lowered layer runs
with this package's direct launches (:mod:`bnrewrite.runtime.kernels.launch`) and, as
``triton-path``, with every launch through ``kernel[grid](...)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def measure(name, mod, x, dy, params, iters=50):
    def step():
        y = mod(x)
        return torch.autograd.grad(y, [x] + params, dy)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    host_issue = (time.perf_counter() - start) / iters * 1e3  # host time to issue one step
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iters * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    device_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 10 / 1e3
    kernels = sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0) / 10
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    try:
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
        graphed = (time.perf_counter() - start) / iters * 1e3
    except Exception as exc:  # noqa: BLE001 - report, not fail
        graphed = float("nan")
        print(f"  ({name}: CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:80]})")
    print(f"{name:14s} wall {wall:7.3f} ms  host issue {host_issue:7.3f} ms  device {device_ms:7.3f} ms "
          f"({kernels:.0f} kernels)  cuda-graph replay {graphed:7.3f} ms")


class _EmptyBatchNormAct(torch.autograd.Function):
    """The floor of the eager lowered path: an ``autograd.Function`` taking the fused op's nine
    arguments and saving what it saves, with no kernels and no bookkeeping."""

    @staticmethod
    def forward(ctx, x, weight, bias, region, virtual_weight, eps, activation, slope, running):
        stats = x.new_empty((4, x.shape[1]), dtype=torch.float32)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.config = (list(region), virtual_weight, eps, activation, slope)
        ctx.set_materialize_grads(False)
        return torch.empty_like(x), stats

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        x, weight, bias, _stats = ctx.saved_tensors
        return (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)) + (None,) * 6


class _EmptyLayer(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return _EmptyBatchNormAct.apply(x, self.weight, self.bias, [0] * 9, 0.0, 1e-5, "relu", 0.0, None)[0]


class _LeanBatchNormAct(torch.autograd.Function):
    """``ours:bn single-pass`` with none of its per-step bookkeeping: the two compiled kernels that
    step launches, called through their C launchers with the argument lists prepared once (no
    plan lookup, no launch key, no checks of dtype, layout, alignment or device). Not a usable
    path -- it is right only for the one shape and set of tensors it was prepared for -- but what
    a step costs on the host when only the autograd node, the allocations and the two launches remain."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, tracked, lean):
        stats = torch.empty((4, x.shape[1]), dtype=torch.float32)
        y = torch.empty_like(x)
        lean.forward_launch((x, y, stats, weight, bias, running_mean, running_var, tracked))
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        ctx.lean = lean
        return y, stats

    @staticmethod
    def backward(ctx, grad_y, _grad_stats):
        x, weight, bias, stats = ctx.saved_tensors
        dw, db, dx = torch.empty(x.shape[1]), torch.empty(x.shape[1]), torch.empty_like(x)
        ctx.lean.backward_launch((grad_y, x, stats, weight, bias, dx, dw, db))
        return dx, dw, db, None, None, None, None


class _PreparedLaunch:
    """One kernel launch compiled through Triton's own path once, then made by calling its C
    launcher with a new head of tensors and the rest of the argument list as prepared."""

    def __init__(self, kernel, plan_launch, head, tail, **extra):
        from bnrewrite.runtime.kernels import launch

        meta = {**plan_launch.meta, **extra}
        self.compiled = kernel[plan_launch.grid](*head, *plan_launch.args, *tail, **meta)
        constexprs = launch._constexprs(kernel, len(head) + len(plan_launch.args) + len(tail), meta)
        self.grid = (*plan_launch.grid, 1, 1)[:3]
        self.rest = (*plan_launch.args, *tail, *constexprs)

    def __call__(self, head):
        compiled, (g0, g1, g2) = self.compiled, self.grid
        compiled.run(g0, g1, g2, 0, compiled.function, compiled.packed_metadata, None, None, None, *head,
                     *self.rest)


class _LeanLayer(nn.Module):
    """Runs :class:`_LeanBatchNormAct` on ``fused``'s tensors: the launches of ``fused``'s eager
    single-pass step (running statistics and ``num_batches_tracked`` updated in the forward launch)."""

    def __init__(self, fused: nn.Module, x: torch.Tensor, dy: torch.Tensor):
        super().__init__()
        from bnrewrite.runtime.kernels import _triton

        self.fused = fused
        region = fused._region(None, tuple(x.shape))[0]
        plan = _triton._single_pass_plan(*_triton._flags(x, region, 0.0, "relu", fused.weight, fused.bias), 2 ** 62)
        n, c = x.numel() // x.shape[1], x.shape[1]
        w, b, rm, rv, tracked = (fused._parameters[k] if k in fused._parameters else fused._buffers[k]
                                 for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
        stats = torch.empty((4, c))
        self.forward_launch = _PreparedLaunch(
            _triton._forward_single_pass_kernel, plan.forward, (x, torch.empty_like(x), stats, w, b, rm, rv, tracked),
            (0.0, float(fused.eps), 0.0, float(fused.momentum), n / (n - 1)), HAS_RUNNING=True, HAS_TRACKED=True)
        self.backward_launch = _PreparedLaunch(
            _triton._backward_single_pass_kernel, plan.backward,
            (dy, x, stats, w, b, torch.empty_like(x), torch.empty(c), torch.empty(c)),
            (0.0, *plan.counts, float(fused.eps), 0.0))

    def forward(self, x):
        params, buffers = self.fused._parameters, self.fused._buffers
        return _LeanBatchNormAct.apply(x, params["weight"], params["bias"], buffers["running_mean"],
                                       buffers["running_var"], buffers["num_batches_tracked"], self)[0]


def phases(modules: dict, x: torch.Tensor, dy: torch.Tensor, reps: int) -> None:
    """Forward and backward host time of each module, timed inside the same loop of steps (timed
    apart, each looks cheaper: the alternation is part of the cost), best of ``reps`` x 200."""
    from bnrewrite.runtime.kernels import _triton, launch

    print("forward / backward within one loop of steps (us/step, best total of the repetitions):")
    for name, (module, limit, direct) in modules.items():
        _triton.SINGLE_PASS_MAX, launch._ENABLED = limit, direct
        params = [x, *module.parameters()]
        best = (float("inf"), 0.0, 0.0)
        for _ in range(reps):
            forward = backward = 0.0
            for _ in range(200):
                t0 = time.perf_counter()
                y = module(x)
                t1 = time.perf_counter()
                torch.autograd.grad(y, params, dy)
                t2 = time.perf_counter()
                forward, backward = forward + t1 - t0, backward + t2 - t1
            best = min(best, (forward + backward, forward, backward))
        total, forward, backward = (v / 200 * 1e6 for v in best)
        print(f"{name:32s} forward {forward:6.1f}  backward {backward:6.1f}  total {total:6.1f}")


def host_only(shape: str, reps: int, triton_launcher: bool = False, with_phases: bool = False) -> None:
    """Python host time per forward+backward step of a lowered layer, Triton launches stubbed
    (``triton_launcher``: Triton's whole launch path runs, for kernels compiled for sm_90, down to
    the driver's launch call, which is the no-op)."""
    os.environ["BNREWRITE_TRITON_CPU"] = "1"
    import triton

    stubbed = [0]
    if triton_launcher:
        import contextlib

        import fake_cuda

        driver_scope = contextlib.ExitStack()  # held until this function returns
        driver_scope.enter_context(fake_cuda.fake_cuda_driver(90))
        launched = fake_cuda.launches
    else:
        def no_launch(self, grid):
            def launch(*args, **kwargs):
                stubbed[0] += 1
            return launch

        triton.runtime.jit.JITFunction.__getitem__ = no_launch
        launched = lambda: stubbed[0]  # noqa: E731
    from bnrewrite.runtime.kernels import FusedBatchNorm, lowered_class
    from bnrewrite.runtime.sampled import SampledBatchNorm

    torch.set_num_threads(1)
    n, c, h, w = map(int, shape.split(","))
    x = torch.randn(n, c, h, w).requires_grad_(True)
    dy = torch.randn_like(x)
    bn = nn.BatchNorm2d(c)
    fused = FusedBatchNorm.from_batchnorm(nn.BatchNorm2d(c))
    fs = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(c), strategy="fs", ratio=1 / 4)
    fs.__class__ = lowered_class(SampledBatchNorm)
    for module in (fused, fs):
        module.add_module("act", nn.ReLU())
        module._post_children = ("act",)
    from bnrewrite.runtime.kernels import _triton, launch

    # (module, SINGLE_PASS_MAX while it runs, direct launches): each lowered layer on both launch
    # sequences; with Triton's launcher, also with every launch through kernel[grid](...)
    split, single = 0, 2 ** 62
    modules = {"eager": (nn.Sequential(bn, nn.ReLU()), split, True)}
    if with_phases:
        modules["empty autograd.Function"] = (_EmptyLayer(c), split, True)
    for recipe, module in (("bn", fused), ("fs", fs)):
        for sequence, limit in (("split", split), ("single-pass", single)):
            # stubbed kernel[grid] returns no compiled kernel, so there is nothing to launch directly
            modules[f"ours:{recipe} {sequence}"] = (module, limit, triton_launcher)
            if triton_launcher:
                modules[f"ours:{recipe} {sequence} triton-path"] = (module, limit, False)
    best = dict.fromkeys(modules, float("inf"))
    per_step = {}
    for name, (module, limit, direct) in modules.items():
        _triton.SINGLE_PASS_MAX, launch._ENABLED = limit, direct
        module.train()
        for _ in range(50):
            torch.autograd.grad(module(x), [x, *module.parameters()], dy)
    for _ in range(reps):
        for name, (module, limit, direct) in modules.items():
            _triton.SINGLE_PASS_MAX, launch._ENABLED = limit, direct
            params = [x, *module.parameters()]
            before = launched()
            start = time.perf_counter()
            for _ in range(200):
                torch.autograd.grad(module(x), params, dy)
            best[name] = min(best[name], (time.perf_counter() - start) / 200 * 1e6)
            per_step[name] = (launched() - before) / 200
    what = ("Triton's whole launch path counted, its C launcher included; the driver's launch call and the "
            "kernels not" if triton_launcher else "Triton launches stubbed: launcher and kernels not counted")
    print(f"host-only, CPU, torch {torch.__version__}, shape {shape}, best of {reps}x200 steps ({what})")
    for name, us in best.items():
        print(f"{name:32s} {us:7.1f} us/step  x{us / best['eager']:.2f} eager  "
              f"({per_step[name]:.0f} {'no-op' if triton_launcher else 'stubbed'} launches/step)")
    if with_phases:
        rows = {k: v for k, v in modules.items() if "triton-path" not in k}
        if triton_launcher:  # after ours:bn single-pass ran: its compiled kernels are cached
            lean = _LeanLayer(fused, x, dy)
            _triton.SINGLE_PASS_MAX, launch._ENABLED = single, True
            # per step: its launch count, and the grid, block, shared memory, attributes and compiled
            # function of its forward and of its backward launch (the last launch of each direction)
            launches = []
            for layer in (fused, lean):
                before = launched()
                y = layer(x)
                forward_launch = fake_cuda.last_launch()
                torch.autograd.grad(y, [x, *layer.parameters()], dy)
                backward_launch = fake_cuda.last_launch()
                launches.append([launched() - before] + [[v for k, v in r.items() if k != "parameters"]
                                                         for r in (forward_launch, backward_launch)])
            assert launches[0] == launches[1], f"the lean step should make ours:bn single-pass's launches: {launches}"
            rows["lean bn single-pass"] = (lean, single, True)
        phases(rows, x, dy, reps)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default=None, help="N,C,H,W (default 128,256,14,14; 2,8,4,4 with --host-only)")
    p.add_argument("--host-only", action="store_true",
                   help="our Python host time per step on CPU, Triton launches stubbed (no GPU needed)")
    p.add_argument("--reps", type=int, default=30, help="--host-only: interleaved repetitions (best is kept)")
    p.add_argument("--triton-launcher", action="store_true",
                   help="--host-only: run Triton's whole launch path, its C launcher included (kernels compiled "
                        "for sm_90 on the CPU, a stand-in libcuda whose launch call does nothing; needs a C compiler)")
    p.add_argument("--phases", action="store_true",
                   help="--host-only: also split each step into forward and backward, next to an empty "
                        "autograd.Function with the fused op's arguments (the floor of the eager lowered path) "
                        "and, with --triton-launcher, ours:bn single-pass's two launches without its bookkeeping")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--profile", action="store_true", help="also print where ours:fs spends host time (cProfile)")
    args = p.parse_args()
    if args.host_only:
        host_only(args.shape or "2,8,4,4", args.reps, args.triton_launcher, args.phases)
        return
    args.shape = args.shape or "128,256,14,14"
    if not torch.cuda.is_available():
        print("kernel_overhead needs a CUDA device")
        return
    from bnrewrite.runtime.kernels import FusedBatchNorm, lowered_class
    from bnrewrite.runtime.sampled import SampledBatchNorm

    n, c, h, w = map(int, args.shape.split(","))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    fmt = torch.channels_last if args.dtype == "bf16" else torch.contiguous_format
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_(True)
    dy = torch.randn_like(x)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} shape {args.shape} {args.dtype}")
    bn = nn.BatchNorm2d(c).cuda()
    measure("eager", nn.Sequential(bn, nn.ReLU()).train(), x, dy, [bn.weight, bn.bias])
    fused = FusedBatchNorm.from_batchnorm(nn.BatchNorm2d(c).cuda())
    fused.add_module("act", nn.ReLU())
    fused._post_children = ("act",)
    fs = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(c).cuda(), strategy="fs", ratio=1 / 32)
    fs.__class__ = lowered_class(SampledBatchNorm)
    fs.add_module("act", nn.ReLU())
    fs._post_children = ("act",)
    from bnrewrite.runtime.kernels import _triton

    from bnrewrite.runtime.kernels import launch

    default_limit, direct = _triton.SINGLE_PASS_MAX, launch.enabled()
    for name, mod in (("ours:bn", fused), ("ours:fs", fs)):
        measure(name, mod.train(), x, dy, [mod.weight, mod.bias])
        if direct:  # the same layer with every launch through Triton's kernel[grid](...)
            launch._ENABLED = False
            measure(f"{name}@triton-path", mod, x, dy, [mod.weight, mod.bias])
            launch._ENABLED = True
        if _triton.single_pass(x):  # the same layer on the split kernels, for comparison
            _triton.SINGLE_PASS_MAX = 0
            measure(f"{name}@split", mod, x, dy, [mod.weight, mod.bias])
            _triton.SINGLE_PASS_MAX = default_limit
    if args.profile:
        import cProfile
        import pstats

        params = [x, fs.weight, fs.bias]
        with cProfile.Profile() as prof:
            for _ in range(100):
                torch.autograd.grad(fs(x), params, dy)
            torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
