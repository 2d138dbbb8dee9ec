"""Compile every Triton kernel launch of a training step for an NVIDIA GPU, on a machine without one.

Each lowered layer's forward (with the running-statistics update), backward and, for
Cross-Iteration BN, window forward is run on CPU tensors with every ``kernel[grid](...)``
launch replaced by Triton's ahead-of-time compile (``JITFunction.warmup``) for the target
architecture (default sm_90: H100/H200) and by ``ptxas``. Nothing runs on a device, so the
outputs are never read; what comes back is, per compiled kernel, what the GPU run would use:

* registers per thread, the per-thread stack frame (``STACK``: where ptxas puts the registers it
  spills) and local memory, static + dynamic shared memory
  (``cuobjdump --dump-resource-usage`` of the cubin Triton produced);
* the resident warps per SM that those allow (registers rounded as the hardware allocates them;
  65,536 registers, 228 KiB of shared memory, 64 warps and 32 blocks per SM on sm_90);
* the grid of the launch next to the SM count: the single-pass kernels run one program per block
  of channels, so a layer with few channel blocks leaves SMs idle.

The launch plans are those of a device with ``--sms`` SMs (132 on H100/H200 SXM), so the tiling is
the GPU's, not the CPU interpreter's. It needs triton (its bundled ptxas/cuobjdump) and nothing
else: this is how kernels that only ever ran in the interpreter are shown to compile for the GPU.

Example (the figures in benchmarks/RESULTS.md)::

    python benchmarks/kernel_resources.py --batches 128 256
    python benchmarks/kernel_resources.py --quick          # a few shapes, every kernel (CI)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESNET50_SHAPES = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7),
                   (2048, 7)]
CONFIGS = {"fp32-nchw": (torch.float32, torch.contiguous_format),
           "bf16-cl": (torch.bfloat16, torch.channels_last),
           "fp16-nchw": (torch.float16, torch.contiguous_format)}
RECIPES = {"bn": None,
           "fs": dict(strategy="fs", ratio=1 / 32),
           "bs": dict(strategy="bs", n=-1),  # N/32 rows: set per batch
           "vdn": dict(strategy="vdn", num_virtual=1),
           "fs+vdn": dict(strategy="fs", ratio=1 / 32, num_virtual=1, beta=0.5),
           "cbn": "window"}
# --quick: every kernel in both launch sequences, both layouts and all three storage dtypes
QUICK = [("fp32-nchw", (128, 256, 14, 14)), ("fp32-nchw", (32, 64, 56, 56)), ("bf16-cl", (128, 512, 7, 7)),
         ("bf16-cl", (32, 256, 28, 28)), ("fp16-nchw", (16, 64, 28, 28)), ("fp16-nchw", (64, 2048, 7, 7)),
         # >= 2**31 elements (64-bit offsets), split and single-pass (BatchNorm1d on (N, C)); as meta
         # tensors, which have a pointer (0) and no storage
         ("bf16-cl", (512, 64, 256, 256)), ("fp16-nchw", (128, 1 << 24))]
# per SM on sm_80/sm_90 (CUDA C programming guide, "Compute Capabilities" table)
SM_REGISTERS, SM_WARPS, SM_BLOCKS = 65536, 64, 32
SM_SHARED = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}


class _CompileOnlyDriver:
    """The few calls ``JITFunction.run(..., warmup=True)`` makes of Triton's active driver,
    answered for a fixed target instead of a device that is not there."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only_driver(arch: int):
    """Inside: Triton compiles for ``arch`` as if that device were present (no device is touched)."""
    from triton.runtime import driver

    saved = driver._active  # None on a machine without a GPU: reset_active() would raise there
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


@contextlib.contextmanager
def stubbed_c_launcher(arch: int, on_launch):
    """Inside: Triton compiles for ``arch`` and runs its whole launch path (binding, cache lookup,
    launch metadata), except that the C launcher call becomes ``on_launch(compiled_kernel, *its
    arguments)`` and no cubin is loaded onto a device."""
    from triton.compiler.compiler import CompiledKernel

    def no_module_load(self):
        if self.module is None:
            self.module, self.function = "compile-only", 0

    saved = CompiledKernel.__dict__["_init_handles"], CompiledKernel.__dict__["run"]
    CompiledKernel._init_handles = no_module_load
    CompiledKernel.run = property(lambda self: functools.partial(on_launch, self))
    try:
        with compile_only_driver(arch):
            yield
    finally:
        CompiledKernel._init_handles, CompiledKernel.run = saved


@contextlib.contextmanager
def compile_instead_of_launch(arch: int, sms: int):
    """Inside: every ``kernel[grid](...)`` of bnrewrite's kernels compiles for ``arch`` and records
    ``(kernel name, grid, constexpr options, CompiledKernel)`` in the yielded list; no launch."""
    from triton.runtime.jit import JITFunction

    from bnrewrite.runtime.kernels import _triton, launch

    if _triton.is_interpreted():
        raise SystemExit("kernel_resources compiles the kernels: run it without TRITON_INTERPRET")
    launches = []

    def getitem(self, grid):
        def compile_only(*args, **kwargs):
            kernel = self.warmup(*args, grid=grid, **kwargs)
            launches.append((self.__name__, tuple(grid), {k: v for k, v in kwargs.items() if k.isupper()},
                             kwargs.get("num_warps", 4), kernel))
        return compile_only

    saved_getitem, saved_programs, saved_direct = JITFunction.__getitem__, _triton._target_programs, launch._ENABLED
    JITFunction.__getitem__ = getitem
    _triton._target_programs = lambda x: 4 * sms  # the plans of a device with that many SMs
    launch._ENABLED = False  # every launch through kernel[grid], which is what is replaced here
    try:
        with compile_only_driver(arch):
            yield launches
    finally:
        JITFunction.__getitem__ = saved_getitem
        _triton._target_programs = saved_programs
        launch._ENABLED = saved_direct


def resource_usage(cubin: bytes) -> dict:
    """REG, SHARED, LOCAL, STACK of the one function in ``cubin`` (cuobjdump, bundled with triton)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def resident_warps(regs: int, shared: int, num_warps: int, arch: int) -> int:
    """Warps per SM the block's registers and shared memory allow (registers are allocated per
    warp in units of 256, i.e. per thread rounded up to a multiple of 8)."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(SM_BLOCKS, SM_WARPS // num_warps, SM_REGISTERS // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, SM_SHARED.get(arch, 100 * 1024) // shared)
    return blocks * num_warps


def layer_step(recipe: str, x: torch.Tensor):
    """One lowered training step of ``recipe`` on ``x``: forward with the running-statistics
    and ``num_batches_tracked`` update, backward (the launches only; nothing is read back)."""
    from bnrewrite.runtime.kernels import _triton, region_of
    from bnrewrite.runtime.sampled import SampledBatchNorm

    C = x.shape[1]
    w, b, rm, rv = (torch.empty(C, device=x.device) for _ in range(4))
    dy = torch.empty_like(x)
    if RECIPES[recipe] == "window":
        for h in (1, 3):  # past steps in the window; Triton turns an int argument equal to 1 into a constant
            past = torch.empty(h, C, device=x.device)
            y, stats = _triton.window_forward(x, w, b, past, past, 1e-5, "relu", 0.0)
            _triton.backward(dy, x, w, b, stats, region_of(None, x.shape)[0], 0.0, 1e-5, "relu", 0.0,
                             group_count=(h + 1.0) * x.shape[0] * x[0, 0].numel())
        return
    spec = None
    if RECIPES[recipe] is not None:
        options = dict(RECIPES[recipe])
        if options.get("n") == -1:
            options["n"] = max(2, x.shape[0] // 32)
        spec = SampledBatchNorm(C, **options).sample_spec(tuple(x.shape))
    region, wv, count = region_of(spec, x.shape)
    unbias = count / (count - 1) if count > 1 else 1.0
    tracked = torch.zeros((), dtype=torch.int64, device=x.device)  # num_batches_tracked, as the eager path passes it
    y, stats = _triton.forward(x, w, b, region, wv, 1e-5, "relu", 0.0, running=(rm, rv, 0.1, unbias), tracked=tracked)
    if recipe == "bn":  # under torch.compile the running update is a launch of its own
        _triton.update_running_stats(rm, rv, stats, 0.1, unbias)
    _triton.backward(dy, x, w, b, stats, region, wv, 1e-5, "relu", 0.0)


def collect(cases, recipes, arch: int, sms: int) -> list[dict]:
    """Compile the launches of every (config, batch, C, HW) case x recipe; one row per launch."""
    from bnrewrite.runtime.kernels import _triton

    rows = []
    seen = {}
    with compile_instead_of_launch(arch, sms) as launches:
        for config, shape in cases:
            dtype, fmt = CONFIGS[config]
            big = math.prod(shape) >= 2 ** 31
            x = torch.empty(shape, dtype=dtype, device="meta" if big else "cpu")
            if len(shape) == 4:
                x = x.to(memory_format=fmt)
            batch, channels, hw = shape[0], shape[1], shape[2] if len(shape) > 2 else 1
            single = _triton.single_pass(x)
            for recipe in recipes:
                launches.clear()
                t0 = time.time()
                layer_step(recipe, x)
                seconds = time.time() - t0
                for name, grid, meta, num_warps, kernel in launches:
                    key = id(kernel)
                    if key not in seen:
                        seen[key] = resource_usage(kernel.asm["cubin"])
                    use = seen[key]
                    shared = max(use["SHARED"], int(kernel.metadata.shared))
                    programs = 1
                    for g in grid:
                        programs *= g
                    rows.append({"config": config, "batch": batch, "C": channels, "HW": hw, "recipe": recipe,
                                 "path": "single-pass" if single else "split", "kernel": name, "grid": list(grid),
                                 "programs": programs, "num_warps": num_warps,
                                 "blocks": {k: v for k, v in meta.items() if k.startswith("BLOCK")},
                                 "regs": use["REG"], "local_bytes": use["LOCAL"], "stack_bytes": use["STACK"],
                                 "shared": shared,
                                 "warps_per_sm": resident_warps(use["REG"], shared, num_warps, arch),
                                 "compile_s": round(seconds, 2)})
    return rows


def print_rows(rows, sms: int) -> None:
    print(f"{'config':9s} {'N':>3s} {'C':>4s} {'HW':>3s} {'recipe':7s} {'path':11s} {'kernel':30s} "
          f"{'programs':>8s} {'waves':>5s} {'warps':>5s} {'regs':>4s} {'stack':>5s} {'smem':>6s} {'occ':>4s}")
    for r in rows:
        per_sm = max(1, r["warps_per_sm"] // r["num_warps"])
        waves = r["programs"] / (sms * per_sm)
        print(f"{r['config']:9s} {r['batch']:3d} {r['C']:4d} {r['HW']:3d} {r['recipe']:7s} {r['path']:11s} "
              f"{r['kernel']:30s} {r['programs']:8d} {waves:5.2f} {r['num_warps']:5d} {r['regs']:4d} "
              f"{r['local_bytes'] + r['stack_bytes']:5d} {r['shared']:6d} {100 * r['warps_per_sm'] / SM_WARPS:3.0f}%")


def summary(rows, sms: int) -> str:
    kernels = {}
    for r in rows:
        k = kernels.setdefault(r["kernel"], {"launches": 0, "regs": 0, "spill": 0, "min_programs": 1 << 62,
                                             "min_occ": 100})
        k["launches"] += 1
        k["regs"] = max(k["regs"], r["regs"])
        k["spill"] = max(k["spill"], r["local_bytes"] + r["stack_bytes"])
        k["min_programs"] = min(k["min_programs"], r["programs"])
        k["min_occ"] = min(k["min_occ"], 100 * r["warps_per_sm"] // SM_WARPS)
    lines = [f"{len(rows)} launches, {len({(r['kernel'], r['regs'], r['shared']) for r in rows})} distinct "
             f"compiled kernels; per kernel: max registers, max stack+local bytes per thread (spills), fewest programs (SMs: {sms}), "
             "lowest occupancy"]
    for name, k in sorted(kernels.items()):
        lines.append(f"  {name:32s} {k['launches']:4d} launches  regs<={k['regs']:3d}  spill<={k['spill']}  "
                     f"programs>={k['min_programs']}  occupancy>={k['min_occ']}%")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--configs", nargs="+", default=["fp32-nchw", "bf16-cl"], choices=list(CONFIGS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--quick", action="store_true", help="a few small cases that reach every kernel (CI)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="SMs of the device the launch plans are for")
    p.add_argument("--single-pass-tile", type=int, default=None,
                   help="elements per tile of the single-pass kernels (a power of two; default: the package's)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.single_pass_tile is not None:
        from bnrewrite.runtime.kernels import _triton

        if args.single_pass_tile < 16 or args.single_pass_tile & (args.single_pass_tile - 1):
            p.error("--single-pass-tile must be a power of two >= 16")
        _triton._SINGLE_PASS_TILE = args.single_pass_tile
    if args.quick:
        cases = QUICK
    else:
        cases = [(config, (batch, c, hw, hw)) for config in args.configs for batch in args.batches
                 for c, hw in RESNET50_SHAPES]
    t0 = time.time()
    rows = collect(cases, args.recipes, args.arch, args.sms)
    from bnrewrite.runtime.kernels import _triton

    print(f"target sm_{args.arch}, {args.sms} SMs; torch {torch.__version__}; single-pass tile "
          f"{_triton._SINGLE_PASS_TILE}; compiled in {time.time() - t0:.0f} s")
    print_rows(rows, args.sms)
    print(summary(rows, args.sms))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arch": args.arch, "sms": args.sms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
