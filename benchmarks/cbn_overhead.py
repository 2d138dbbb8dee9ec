"""Step time and memory of ``cbn`` / ``naive-cbn`` relative to stock BatchNorm (paper §4.4, Table 8).

One training step = forward + cross-entropy + backward + SGD(momentum) step, timed on the
device given (CPU by default) after warm-up; the median of ``--steps`` steps is reported.

Memory is counted, not sampled: parameters + gradients + optimizer state + the tensors
autograd saves for backward (via ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by
storage) + the CBN history buffers. Peak allocator memory is not portable across devices,
this count is.

    OMP_NUM_THREADS=1 python benchmarks/cbn_overhead.py [--device cpu] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision
from torch import nn

import bnrewrite


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(model, x, y) -> int:
    seen: dict[tuple, int] = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=False)
    return sum(seen.values())


def history_bytes(model) -> int:
    return sum(_bytes(b for n, b in m.named_buffers(recurse=False) if n.startswith("cbn_"))
               for m in model.modules() if getattr(m, "is_bnrewrite_norm", False))


def measure(build, recipe, shape, steps, device, classes=10) -> dict:
    torch.manual_seed(0)
    model = build()
    if recipe != "bn":
        model = bnrewrite.transform(model, recipe, example_inputs=(torch.randn(*shape),))
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(max(10, steps // 5)):  # fills the CBN window too
        step()
    times = []
    for _ in range(steps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    memory = {"params_grads_optimizer": 2 * _bytes(params) + _bytes(state),
              "saved_activations": saved_bytes(model, x, y), "history": history_bytes(model)}
    memory["total"] = sum(memory.values())
    return {"step_ms": 1e3 * statistics.median(times), "memory": memory}


def digits_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(64, 10))


CASES = {
    "digits_cnn b4 8x8": (digits_cnn, (4, 1, 8, 8)),
    "resnet18 b4 32x32": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 32, 32)),
    "resnet18 b4 112x112": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (4, 3, 112, 112)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--recipes", default="bn,naive-cbn,cbn")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"device={args.device} threads={args.threads}; k = auto = 4 at batch 4")
    print(f"{'case':22} {'recipe':10} {'step ms':>8} {'x BN':>6} {'memory MB':>10} {'x BN':>6} {'history MB':>11}")
    for case, (build, shape) in CASES.items():
        base = None
        for recipe in args.recipes.split(","):
            r = measure(build, recipe, shape, args.steps, args.device)
            base = base or r
            row = {"case": case, "recipe": recipe, **r, "time_ratio": r["step_ms"] / base["step_ms"],
                   "memory_ratio": r["memory"]["total"] / base["memory"]["total"]}
            rows.append(row)
            print(f"{case:22} {recipe:10} {r['step_ms']:8.2f} {row['time_ratio']:6.2f} "
                  f"{r['memory']['total'] / 2**20:10.2f} {row['memory_ratio']:6.2f} "
                  f"{r['memory']['history'] / 2**20:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
