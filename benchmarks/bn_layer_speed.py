"""BatchNorm + ReLU layer speed on a GPU: stock (eager cuDNN / native, torch.compile) vs ours.

For every ResNet-50 BatchNorm shape (C x H x W at batch N) and two storage configs
(fp32 NCHW, bf16 channels-last with fp32 parameters as under AMP), times forward and
forward+backward (``torch.autograd.grad`` w.r.t. x, γ, β: no gradient accumulation pass)
with ``triton.testing.do_bench`` (median, L2 flushed between runs) for:

* ``eager``     nn.BatchNorm2d + nn.ReLU(inplace=True)
* ``compiled``  torch.compile of the same (inductor, default mode, static shapes)
* ``ours:bn``   FusedBatchNorm: full statistics + ReLU fused (bnrewrite::batch_norm_act)
* ``ours:fs``   FS 1/32 patch,   ``ours:bs`` BS N/32 rows (4/128),  ``ours:vdn`` 1 virtual row,
  ``ours:fs+vdn`` FS 1/32 mixed with 1 virtual row at β = 0.5 (bn-sampling.txt §4.1–4.2)

and, at shapes that take the single-pass kernels (``_triton.SINGLE_PASS_MAX``; ``--single-pass-max``
changes it), ``ours:bn@split`` and ``ours:fs@split``: the same
layers forced onto the split kernels (6 launches per step instead of 2), so both launch
sequences are compared in the same run.

It prints the ratios ours/eager and ours/compiled measured in the same run. Bandwidth:
a device-to-device copy gives the ceiling (bytes read + written / time); the normalise pass
alone (one read, one write) is reported against it.

Example (the numbers in benchmarks/RESULTS.md)::

    python benchmarks/bn_layer_speed.py --batches 128 256 --out bn_layer_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

RESNET50_SHAPES = [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7),
                   (2048, 7)]
CONFIGS = {"fp32-nchw": (torch.float32, torch.contiguous_format),
           "bf16-cl": (torch.bfloat16, torch.channels_last)}


def bench(fn, warmup=10, rep=40):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(256 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep=100)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_method(name: str, channels: int, batch: int, device):
    from bnrewrite.runtime.kernels import FusedBatchNorm, lowered_class
    from bnrewrite.runtime.sampled import SampledBatchNorm

    bn = nn.BatchNorm2d(channels).to(device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    if name in ("eager", "compiled"):
        mod = nn.Sequential(bn, nn.ReLU(inplace=True)).train()
        params = [bn.weight, bn.bias]
        if name == "compiled":
            mod = torch.compile(mod)
        return mod, params
    if name == "ours:bn":
        mod = FusedBatchNorm.from_batchnorm(bn)
    else:
        opts = {"ours:fs": dict(strategy="fs", ratio=1 / 32),
                "ours:bs": dict(strategy="bs", n=max(2, batch // 32)),
                "ours:vdn": dict(strategy="vdn", num_virtual=1),
                "ours:fs+vdn": dict(strategy="fs", ratio=1 / 32, num_virtual=1, beta=0.5)}[name]
        mod = SampledBatchNorm.from_batchnorm(bn, **opts)
        mod.__class__ = lowered_class(SampledBatchNorm)
    mod.add_module("act", nn.ReLU())
    mod._post_children = ("act",)
    return mod.train(), [mod.weight, mod.bias]


def run(args):
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    from bnrewrite.runtime.kernels import _triton

    copy_gbs = copy_bandwidth(device)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {copy_gbs:.0f} GB/s",
          flush=True)
    rows = []
    if args.single_pass_max is not None:
        _triton.SINGLE_PASS_MAX = args.single_pass_max
    default_limit = _triton.SINGLE_PASS_MAX
    print(f"single-pass kernels up to {default_limit} elements per program", flush=True)
    methods = ["eager"] + (["compiled"] if not args.no_compile else []) + [
        "ours:bn", "ours:fs", "ours:bs", "ours:vdn", "ours:fs+vdn", "ours:bn@split", "ours:fs@split"]
    for config in args.configs:
        dtype, fmt = CONFIGS[config]
        for batch in args.batches:
            for channels, hw in RESNET50_SHAPES:
                x = torch.randn(batch, channels, hw, hw, device=device, dtype=dtype).to(memory_format=fmt)
                x = (x * 1.5 + 0.3).requires_grad_(True)
                dy = torch.randn_like(x)
                nbytes = x.numel() * x.element_size()
                row = {"config": config, "batch": batch, "C": channels, "HW": hw, "MB": nbytes / 1e6}
                for name in methods:
                    if name == "compiled" and batch not in args.compile_batches:
                        continue
                    forced_split = name.endswith("@split")
                    if forced_split and not _triton.single_pass(x):
                        continue  # the default already runs the split kernels here
                    torch._dynamo.reset() if name == "compiled" else None
                    _triton.SINGLE_PASS_MAX = 0 if forced_split else default_limit
                    mod, params = make_method(name.removesuffix("@split"), channels, batch, device)

                    def fwd():
                        return mod(x)

                    def step():
                        y = mod(x)
                        return torch.autograd.grad(y, [x] + params, dy)

                    t0 = time.time()
                    step()
                    torch.cuda.synchronize()
                    row[f"{name} fwd"] = bench(fwd)
                    row[f"{name} fwdbwd"] = bench(step)
                    row[f"{name} setup_s"] = round(time.time() - t0, 1)
                    _triton.SINGLE_PASS_MAX = default_limit
                # the normalise pass alone, against the copy ceiling
                stats = torch.stack([torch.zeros(channels), torch.ones(channels), torch.zeros(channels),
                                     torch.zeros(channels)]).to(device)
                w = torch.ones(channels, device=device)
                xd = x.detach()
                ms = bench(lambda: _triton.normalize(xd, stats, w, w, 1e-5, "relu", 0.0))
                row["normalize ms"] = ms
                row["normalize GB/s"] = 2 * nbytes / ms / 1e6
                row["normalize % copy"] = 100 * row["normalize GB/s"] / copy_gbs
                rows.append(row)
                print(_line(row, methods), flush=True)
                del x, dy
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_GBps": copy_gbs,
            "rows": rows}


def _line(row, methods):
    base = row.get("eager fwdbwd")
    comp = row.get("compiled fwdbwd")
    parts = [f"{row['config']:9s} N={row['batch']:3d} {row['C']:4d}x{row['HW']:3d}² {row['MB']:7.1f}MB",
             f"eager {base:.3f}ms"]
    if comp:
        parts.append(f"compiled {comp:.3f}ms")
    for name in methods[1:]:
        t = row.get(f"{name} fwdbwd")
        if t is None or name == "compiled":
            continue
        r = f"{name[5:]} {t:.3f}ms x{t / base:.2f}"
        if comp:
            r += f"/{t / comp:.2f}"
        parts.append(r)
    parts.append(f"norm {row['normalize GB/s']:.0f}GB/s ({row['normalize % copy']:.0f}%)")
    return " | ".join(parts)


def summary(result):
    """Geometric-mean ratios per config and method (fwd+bwd and fwd) over the large shapes."""
    import math

    lines = []
    for config in sorted({r["config"] for r in result["rows"]}):
        for batch in sorted({r["batch"] for r in result["rows"]}):
            rows = [r for r in result["rows"] if r["config"] == config and r["batch"] == batch and r["MB"] >= 50]
            if not rows:
                continue
            for phase in ("fwdbwd", "fwd"):
                cells = []
                for name in ("ours:bn", "ours:fs", "ours:bs", "ours:vdn", "ours:fs+vdn"):
                    for base in ("eager", "compiled"):
                        vals = [r[f"{name} {phase}"] / r[f"{base} {phase}"] for r in rows
                                if f"{base} {phase}" in r and f"{name} {phase}" in r]
                        if vals:
                            gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
                            cells.append(f"{name[5:]}/{base[:4]} {gm:.2f}")
                lines.append(f"{config} N={batch} {phase} (geo-mean over {len(rows)} shapes >= 50 MB): "
                             + ", ".join(cells))
            bw = [r["normalize % copy"] for r in rows]
            lines.append(f"{config} N={batch} normalise pass: {min(bw):.0f}-{max(bw):.0f}% of copy bandwidth")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--compile-batches", type=int, nargs="+", default=[128, 256])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--single-pass-max", type=int, default=None,
                   help="elements per program up to which layers take the single-pass kernels (default: the package's)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bn_layer_speed needs a CUDA device")
        return 0
    result = run(args)
    text = summary(result)
    print(text)
    result["summary"] = text
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
