"""Extreme Normalization (extreme-normalization.txt §3, §5) on scikit-learn's digits, on CPU.

Trains a small convnet *without skip connections* (the paper deliberately avoids them) with

* ``bn`` at batch 32 and at batch 2 (the controls),
* ``two-tower`` at batch 2 (two-stage backpropagation, §3.4),
* ``brn:micro=2+rot`` at batch 2 (improved batch renormalization over micro-batches of 2 with the
  Hadamard rotation, §5),
* ``brn:micro=1+rot`` at batch 2 (per-example training: no interaction between examples),
* with ``--shrinkage`` also the paper's tuned shrinkage: ``brn:micro=2,r_m=0.5,r_v=0.5+rot`` and
  ``brn:micro=1,r_m=0,r_v=0.8+rot``,

each for the same number of epochs, after ``bnrewrite.warm_up_statistics`` (§5: forward passes
that only fill the moving averages). It reports test accuracy of the *folded* model (plain convs,
``fold_for_inference``) and the mean training-step time relative to ``bn`` at batch 2.

    OMP_NUM_THREADS=2 .venv/bin/python examples/extreme_digits.py [--epochs 3] [--seeds 1] [--shrinkage]

Digits is tiny (1,797 8x8 images) and easy: differences of a few tenths of a percent are noise.
Step times on a shared CPU are noisy too; the ratio is what to look at (the paper: about 2x
compute for two towers, none extra for brn).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite


def load_digits_16(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    idx = list(range(len(y)))
    train_idx, test_idx = train_test_split(idx, train_size=1200, stratify=y, random_state=seed)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def plain_cnn() -> nn.Module:
    """conv-BN-ReLU x4, no skip connections (like the paper's Inception-v3 choice)."""
    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*block(1, 16, False), *block(16, 32, True), *block(32, 32, False),
                         *block(32, 64, True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def run(recipe: str, batch: int, epochs: int, seed: int, train_data, test_data, warm_up: int):
    torch.manual_seed(seed)
    x, y = train_data
    model = bnrewrite.transform(plain_cnn(), recipe, example_inputs=(x[:batch],))
    gen = torch.Generator().manual_seed(seed)
    warm = [x[torch.randint(len(y), (batch,), generator=gen)] for _ in range(warm_up)]
    bnrewrite.warm_up_statistics(model, warm, steps=warm_up)
    lr = 0.05 * batch / 32  # linear scaling from 0.05 at batch 32
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(y) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    step_time = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch + 1, batch):
            ids = order[i:i + batch]
            start = time.perf_counter()
            loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_time += time.perf_counter() - start
            sched.step()
    model.eval()
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        tx, ty = test_data
        logits = folded(tx)
        gap = (logits - model(tx)).abs().max().item() / logits.abs().max().item()
        acc = (logits.argmax(1) == ty).float().mean().item()
    return acc, step_time / steps, gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--warm-up", type=int, default=200, help="EMA-only steps before training (§5: 200)")
    parser.add_argument("--shrinkage", action="store_true", help="also the paper's tuned r_m, r_v settings")
    args = parser.parse_args()
    train_data, test_data = load_digits_16()
    runs = [("bn", 32), ("bn", 2), ("two-tower", 2), ("brn:micro=2+rot", 2), ("brn:micro=1+rot", 2)]
    if args.shrinkage:
        runs += [("brn:micro=2,r_m=0.5,r_v=0.5+rot", 2), ("brn:micro=1,r_m=0,r_v=0.8+rot", 2)]
    results = {}
    for recipe, batch in runs:
        accs, times, gaps = [], [], []
        for seed in range(args.seeds):
            acc, step, gap = run(recipe, batch, args.epochs, seed, train_data, test_data, args.warm_up)
            accs.append(acc)
            times.append(step)
            gaps.append(gap)
        results[(recipe, batch)] = (accs, statistics.mean(times), max(gaps))
        print(f"done {recipe} @ batch {batch}", flush=True)
    base = results[("bn", 2)][1]
    print(f"\n{args.epochs} epochs, {args.seeds} seed(s), warm-up {args.warm_up} steps, threads "
          f"{torch.get_num_threads()}; test accuracy of the folded model")
    print(f"{'recipe':36s} {'batch':>5s} {'accuracy':>16s} {'step ms':>8s} {'vs bn@2':>8s} {'fold gap':>9s}")
    for (recipe, batch), (accs, step, gap) in results.items():
        spread = f"{100 * statistics.mean(accs):.1f}%" + (
            f" ±{100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else "")
        print(f"{recipe:36s} {batch:5d} {spread:>16s} {1000 * step:8.2f} {step / base:7.2f}x {gap:9.1e}")


if __name__ == "__main__":
    main()
