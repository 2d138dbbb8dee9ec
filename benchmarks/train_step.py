"""Training throughput (images/s) and peak memory of torchvision models: stock vs bnrewrite.

AMP bf16 autocast, channels-last, SGD with momentum, random data (ImageNet-sized). Variants,
all in one run so the ratios compare like with like:

* ``stock eager`` / ``stock compiled`` (``torch.compile``, inductor default mode; ``--compile-modes
  default reduce-overhead`` adds CUDA-graph runs, compared with stock in the same mode);
* ``<recipe> eager`` / ``<recipe> compiled``: ``bnrewrite.transform(model, recipe)`` on the CUDA
  model, lowered to the fused Triton ops (``lower="auto"``), e.g. ``bn`` (stock statistics,
  BN+ReLU fused), ``fs`` (FS 1/32), ``bs:n=4`` (BS 4/128), ``vdn``, ``fs+vdn``. Compiled runs use
  ``compile_path="inductor"`` (the plain-torch computation, fused by inductor); ``--compile-paths
  inductor ops`` adds runs that trace our custom ops instead (``compiled/ops``).

Example (the numbers in benchmarks/RESULTS.md)::

    python benchmarks/train_step.py --models resnet50 --batch 128 --recipes bn fs bs:n=4 fs+vdn \\
        --compile stock fs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bnrewrite  # noqa: E402


def build(model_name: str, recipe: str | None, device, example, compile_path: str = "inductor"):
    model = getattr(torchvision.models, model_name)(weights=None).to(device).to(memory_format=torch.channels_last)
    if recipe is None:
        return model, None
    opts = {}
    if "vdn" in recipe:
        opts["data_stats"] = bnrewrite.dataset_stats(example.float().cpu())
    model = bnrewrite.transform(model, recipe, example_inputs=(example[:2],), lower="auto",
                                compile_path=compile_path, **opts)
    records = getattr(model, "bnrewrite_lowering", [])
    info = {"sites": len(records), "lowered": sum(r.lowered for r in records),
            "fused_activation": sum(r.activation is not None for r in records)}
    return model, info


def measure(model, x, target, steps: int, warmup: int, compile_mode: str | None):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step(m):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(x)
            loss = loss_fn(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(model)  # one eager step: materialises per-layer sample specs before any tracing
    runner = torch.compile(model, mode=compile_mode) if compile_mode else model
    t0 = time.time()
    for _ in range(warmup):
        step(runner)
    torch.cuda.synchronize()
    setup = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step(runner)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    return {"ms_per_step": ms, "images_per_s": x.shape[0] / ms * 1e3,
            "peak_GB": torch.cuda.max_memory_allocated() / 1e9, "setup_s": round(setup, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    p.add_argument("--batch", type=int, default=None, help="default: 128 (64 for densenet121)")
    p.add_argument("--recipes", nargs="+", default=["bn", "fs", "bs:n=4", "vdn", "fs+vdn"])
    p.add_argument("--compile", nargs="*", default=["stock", "bn", "fs"],
                   help="which variants also run compiled ('stock' or a recipe)")
    p.add_argument("--compile-modes", nargs="+", default=["default"],
                   help="torch.compile modes to run, e.g. default reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-paths", nargs="+", default=["inductor"], choices=["inductor", "ops"],
                   help="what lowered sites run under torch.compile: their plain-torch computation "
                        "(inductor's own kernels) and/or the bnrewrite custom ops")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("train_step needs a CUDA device")
        return 0
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    results = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    for model_name in args.models:
        batch = args.batch or (64 if model_name.startswith("densenet") else 128)
        x = torch.randn(batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (batch,), device=device)
        base = {}
        for recipe in [None] + args.recipes:
            label = recipe or "stock"
            runs = [("eager", "inductor")] + [(m, path) for m in args.compile_modes
                                              for path in (args.compile_paths if recipe else ["inductor"])]
            for mode, path in runs:
                if mode != "eager" and label not in args.compile:
                    continue
                torch._dynamo.reset()
                try:
                    model, info = build(model_name, recipe, device, x, path)
                    r = measure(model, x, target, args.steps, args.warmup, None if mode == "eager" else mode)
                except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
                    r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                    info = None
                mode = "compiled" if mode == "default" else mode
                r.update({"model": model_name, "batch": batch, "variant": label, "mode": mode, "lowering": info,
                          "compile_path": path if recipe and mode != "eager" else None})
                if label == "stock":
                    base[mode] = r.get("images_per_s")
                if "images_per_s" in r:
                    r["vs_stock_eager"] = r["images_per_s"] / base["eager"] if base.get("eager") else None
                    r["vs_stock_same_mode"] = (r["images_per_s"] / base[mode]
                                               if mode != "eager" and base.get(mode) else None)
                results.append(r)
                print(_line(r), flush=True)
                del model
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f,
                      indent=1)
    return 0


def _line(r):
    if "error" in r:
        return f"{r['model']:12s} {r['variant']:8s} {r['mode']:8s} ERROR {r['error']}"
    ratio = ""
    if r.get("vs_stock_eager"):
        ratio += f" x{r['vs_stock_eager']:.3f} vs stock eager"
    if r.get("vs_stock_same_mode"):
        ratio += f", x{r['vs_stock_same_mode']:.3f} vs stock {r['mode']}"
    low = r.get("lowering")
    low = f" lowered {low['lowered']}/{low['sites']} (+act {low['fused_activation']})" if low else ""
    mode = r["mode"] + (f"/{r['compile_path']}" if r.get("compile_path") else "")
    return (f"{r['model']:12s} N={r['batch']:3d} {r['variant']:8s} {mode:20s} {r['images_per_s']:8.1f} img/s "
            f"{r['ms_per_step']:7.2f} ms/step peak {r['peak_GB']:.2f} GB{ratio}{low} (setup {r['setup_s']}s)")


if __name__ == "__main__":
    raise SystemExit(main())
