"""Step time and memory of ``cbn`` / ``naive-cbn`` relative to stock BatchNorm (paper §4.4, Table 8).

One training step = forward + loss + backward + SGD(momentum) step, timed on the device given
(CPU by default) after warm-up; the median of ``--steps`` steps is reported. The recipes of a
case take their steps in turn (interleaved), so the ratios are side by side. Classification
cases use cross-entropy; the detection case (torchvision Mask R-CNN v2 with a BN backbone, FPN
and 4conv1fc/mask heads, batch 4: the paper's Table 8 setting at a smaller image size) uses the
sum of the model's own training losses on synthetic boxes and masks.

FLOPs are counted too (``torch.utils.flop_counter``: convolutions, matrix products and their
backward, as the paper's Table 8 FLOPs column; elementwise work is not counted) over one step.
Exact CBN's floor is one extra weight-gradient convolution per conv (App. B's ∂ν/∂θ), i.e. +1/3
of a conv's forward+backward FLOPs.

Memory is counted, not sampled: parameters + gradients + optimizer state + the tensors
autograd saves for backward (via ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
storage) + the CBN history buffers. Peak allocator memory is not portable across devices,
this count is.

    OMP_NUM_THREADS=1 python benchmarks/cbn_overhead.py [--device cpu] [--threads 1] [--lower fused] [--json out.json]
        [--recipes bn,cbn,cbn:store=inputs,...] [--cases "resnet18 b4 224x224"]

``cbn`` chooses its history store per site (``store=auto``); ``cbn:store=gradients`` and
``cbn:store=inputs`` force one for every site.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bnrewrite
from bnrewrite.runtime.cross_iteration import sq_mean_gradient


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def classification_batch(shape, device, classes=10):
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    return x, y


def classification_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def detection_batch(shape, device, objects=3):
    """Random images with ``objects`` random boxes each, their box masks and random labels."""
    n, c, h, w = shape
    images, targets = [], []
    for _ in range(n):
        corner = torch.rand(objects, 2) * torch.tensor([w, h]) * 0.6
        size = torch.rand(objects, 2) * torch.tensor([w, h]) * 0.3 + 8
        boxes = torch.cat([corner, corner + size], 1)
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        images.append(torch.rand(c, h, w, device=device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 91, (objects,), device=device),
                        "masks": masks.to(device)})
    return images, targets


def detection_loss(model, images, targets):
    return sum(model(images, targets).values())


def saved_bytes(model, x, y, loss_fn=classification_loss) -> int:
    seen: dict[tuple, int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, x, y)
    loss.backward()
    model.zero_grad(set_to_none=False)
    return sum(seen.values())


def step_flops(runner) -> int:
    """Matmul/conv FLOPs of one training step (forward, backward and CBN's own work)."""
    with FlopCounterMode(display=False) as counter:
        runner["step"]()
    return counter.get_total_flops()


def history_bytes(model) -> int:
    return sum(_bytes(b for n, b in m.named_buffers(recurse=False) if n.startswith("cbn_"))
               for m in model.modules() if getattr(m, "is_bnrewrite_norm", False))


def add_weight_gradient_hooks(model: nn.Module, include: str | None = None) -> None:
    """Stock BN plus the one computation exact CBN cannot skip: ∂ν/∂θ of App. B (one
    weight-gradient convolution, ``sq_mean_gradient`` as ``cbn`` runs it) once per step for
    every conv that feeds a BN (whose name matches ``include``, a glob). Its step time is the
    floor of exact ``cbn``."""
    def hook(conv, args, out):
        sq_mean_gradient(conv, args[0].detach(), out.detach())
    producers = {site.producer.name for site in bnrewrite.inspect_sites(model)
                 if site.producer is not None and site.producer.kind == "Conv2d"
                 and (include is None or fnmatch.fnmatch(site.name, include))}
    for name in producers:
        model.get_submodule(name).register_forward_hook(hook)


def build_runner(build, recipe, shape, device, task="classify", include=None, **options) -> dict:
    make_batch, loss_fn = TASKS[task]
    torch.manual_seed(0)
    model = build()
    if recipe == FLOOR:
        add_weight_gradient_hooks(model, include)
    elif recipe != "bn":
        # a detector's example input is a list of images plus targets; CBN's k and store are
        # then picked at the first training step instead
        example = (torch.randn(*shape),) if task == "classify" else None
        model = bnrewrite.transform(model, recipe, example_inputs=example, include=include, **options)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(1)  # every recipe trains on the same batch
    x, y = make_batch(shape, device)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model, x, y).backward()
        opt.step()

    return {"model": model, "opt": opt, "x": x, "y": y, "loss_fn": loss_fn, "step": step, "times": []}


def measure_case(build, recipes, shape, steps, device, lower="reference", task="classify", warmup=10,
                 include=None) -> dict:
    """Step times of every recipe, interleaved: step i of each recipe runs back to back, so a
    slow phase of a shared machine hits every recipe alike and the ratios stay comparable.
    ``lower``: the transform's ``lower=`` for the rewritten recipes ("fused": CBN's window
    normalisation on the Triton kernels where they run, i.e. on CUDA)."""
    runners = {r: build_runner(build, r, shape, device, task, include, lower=lower) if r not in ("bn", FLOOR)
               else build_runner(build, r, shape, device, task, include) for r in recipes}
    for _ in range(max(warmup, steps // 5)):  # warm-up; fills the CBN window too
        for runner in runners.values():
            runner["step"]()
    for i in range(steps):
        order = list(runners.values())
        for runner in order[i % len(order):] + order[:i % len(order)]:
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner["step"]()
            if device != "cpu":
                torch.cuda.synchronize()
            runner["times"].append(time.perf_counter() - t0)
    results = {}
    for recipe, runner in runners.items():
        model, opt = runner["model"], runner["opt"]
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        memory = {"params_grads_optimizer": 2 * _bytes(params) + _bytes(state),
                  "saved_activations": saved_bytes(model, runner["x"], runner["y"], runner["loss_fn"]),
                  "history": history_bytes(model)}
        memory["total"] = sum(memory.values())
        results[recipe] = {"step_ms": 1e3 * statistics.median(runner["times"]), "memory": memory,
                           "gflops": step_flops(runner) / 1e9}
    return results


FLOOR = "bn+wgrad"  # stock BN + App. B's weight-gradient convolution: the floor of exact cbn


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))


TASKS = {"classify": (classification_batch, classification_loss),
         "detect": (detection_batch, detection_loss)}


def mask_rcnn_v2(size):
    """torchvision's Mask R-CNN v2, untrained: BatchNorm in the ResNet-50 backbone (all stages
    trainable when no weights are given), in the FPN and in the 4conv1fc box head and the mask
    head, close to the paper's §4.2 / Table 8 detector (R50-FPN Mask R-CNN, 4conv1fc head)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=size, max_size=size)


CASES = {
    "digits_cnn b4 8x8": (digits_cnn, (4, 1, 8, 8)),
    "resnet18 b4 32x32": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 32, 32)),
    "resnet18 b4 112x112": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 112, 112)),
    # the paper's Table 3 setting (ImageNet-sized images, batch 4); not run by default (slow on a CPU)
    "resnet18 b4 224x224": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 224, 224)),
    # the paper's Table 8 detector at batch 4 (images 256² instead of COCO's ~800², for a CPU);
    # run it with --recipes "bn,bn+wgrad,naive-cbn:k=4,cbn:k=4" (the paper's window is 4 everywhere,
    # while k=auto would give the box head, whose batch is 512 RoIs per image, k = 1)
    "maskrcnn_v2 b4 256x256": (lambda: mask_rcnn_v2(256), (4, 3, 256, 256), "detect"),
    "maskrcnn_v2 b4 512x512": (lambda: mask_rcnn_v2(512), (4, 3, 512, 512), "detect"),
}
DEFAULT_CASES = ["digits_cnn b4 8x8", "resnet18 b4 32x32", "resnet18 b4 112x112"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps per recipe first (at least steps/5); they also fill the CBN window")
    parser.add_argument("--recipes",
                        default=f"bn,{FLOOR},naive-cbn,cbn:store=gradients,cbn:store=inputs,cbn,cbn:grad_stride=2",
                        help=f"comma-separated; '{FLOOR}' = stock BN + one weight-gradient conv per conv")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--lower", default="reference", choices=["reference", "fused"],
                        help="transform(..., lower=): 'fused' runs cbn's window normalisation on the Triton kernels")
    parser.add_argument("--include", help="rewrite only the BN sites matching this glob (transform's include=), "
                        "e.g. 'roi_heads.*': the paper's default COCO setting has normalizers in the heads only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"cbn_overhead --device {args.device} needs a CUDA device")
        return []
    torch.set_num_threads(args.threads)
    rows = []
    print(f"device={args.device} threads={args.threads} lower={args.lower} include={args.include}; "
          "k = auto = 4 at batch 4")
    print(f"{'case':22} {'recipe':17} {'step ms':>8} {'x BN':>6} {'GFLOP':>7} {'x BN':>6} "
          f"{'memory MB':>10} {'x BN':>6} {'history MB':>11}")
    recipes = args.recipes.split(",")
    for case in args.cases.split(","):
        build, shape, *task = CASES[case]
        results = measure_case(build, recipes, shape, args.steps, args.device, args.lower,
                               task[0] if task else "classify", args.warmup, args.include)
        base = results[recipes[0]]
        for recipe in recipes:
            r = results[recipe]
            row = {"case": case, "recipe": recipe, **r, "time_ratio": r["step_ms"] / base["step_ms"],
                   "flops_ratio": r["gflops"] / base["gflops"],
                   "memory_ratio": r["memory"]["total"] / base["memory"]["total"]}
            rows.append(row)
            print(f"{case:22} {recipe:17} {r['step_ms']:8.2f} {row['time_ratio']:6.2f} "
                  f"{r['gflops']:7.2f} {row['flops_ratio']:6.2f} "
                  f"{r['memory']['total'] / 2**20:10.2f} {row['memory_ratio']:6.2f} "
                  f"{r['memory']['history'] / 2**20:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
