"""Where the time of one lowered BatchNorm+ReLU step goes: host (Python, dispatch, launches)
or device (kernels). Small ResNet shapes are host-bound when the host time per step exceeds the
device time; that is what the layer benchmark measures there, not kernel speed.

Usage: python benchmarks/kernel_overhead.py [--shape 128,256,14,14] [--dtype bf16]
       python benchmarks/kernel_overhead.py --host-only [--triton-launcher] [--shape 2,8,4,4]   # no GPU

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


def host_only(shape: str, reps: int, triton_launcher: bool = False) -> None:
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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default=None, help="N,C,H,W (default 128,256,14,14; 2,8,4,4 with --host-only)")
    p.add_argument("--host-only", action="store_true",
                   help="our Python host time per step on CPU, Triton launches stubbed (no GPU needed)")
    p.add_argument("--reps", type=int, default=30, help="--host-only: interleaved repetitions (best is kept)")
    p.add_argument("--triton-launcher", action="store_true",
                   help="--host-only: run Triton's whole launch path, its C launcher included (kernels compiled "
                        "for sm_90 on the CPU, a stand-in libcuda whose launch call does nothing; needs a C compiler)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--profile", action="store_true", help="also print where ours:fs spends host time (cProfile)")
    args = p.parse_args()
    if args.host_only:
        host_only(args.shape or "2,8,4,4", args.reps, args.triton_launcher)
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
