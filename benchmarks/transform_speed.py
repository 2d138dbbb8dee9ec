"""How long ``bnrewrite.transform`` takes on CPU (issue 2 target: resnet152 'bn' under 2 s).

Usage: python benchmarks/transform_speed.py [--models resnet152,densenet201] [--repeats 5]
Prints the median wall time of transform (deep copy + capture in train and eval mode + sites)
next to the time of a plain ``torch.fx.symbolic_trace`` of the same model, as a ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import bnrewrite


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="resnet152,resnet50,densenet201,efficientnet_b0")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipe", default="bn")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':20s} {'transform s':>12s} {'symbolic_trace s':>17s} {'ratio':>6s} {'target':>8s}")
    for name in args.models.split(","):
        model = torchvision.models.get_model(name, weights=None)
        t = median_seconds(lambda: bnrewrite.transform(model, args.recipe), args.repeats)
        s = median_seconds(lambda: torch.fx.symbolic_trace(model), args.repeats)
        target = "< 2 s" if name == "resnet152" else ""
        verdict = ("ok" if t < 2 else "MISSED") if target else ""
        print(f"{name:20s} {t:12.3f} {s:17.3f} {t / s:6.2f} {target:>6s} {verdict}")


if __name__ == "__main__":
    main()
