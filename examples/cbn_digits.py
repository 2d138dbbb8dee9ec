"""Cross-Iteration BN at tiny batches on scikit-learn digits (cross-iteration-bn.txt Table 3 trend).

Trains the same small CNN with stock BN, ``cbn`` and ``naive-cbn`` at batch 2 and 4, and stock
BN at batch 16 (the "enough examples" reference), for the same number of epochs, learning rate
scaled linearly with the batch (paper §4.1: lr ∝ batch), SGD momentum 0.9, weight decay 1e-4.
CBN uses the paper's window k = min(ceil(16/batch), 8) and a one-epoch burn-in (§3.3).
Reports held-out accuracy (eval mode: running statistics), mean ± std over seeds.

    OMP_NUM_THREADS=1 python examples/cbn_digits.py [--model cnn|mlp] [--epochs 4] [--seeds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import bnrewrite


def make_mlp() -> nn.Module:
    """BatchNorm1d over (N, C): one value per channel per example, so a batch of 2 gives each
    feature two values to normalise with — the regime where small-batch BN breaks down."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def data(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[te], y[te])


def train_eval(recipe: str, batch: int, epochs: int, seed: int, base_lr: float = 0.1,
               model_name: str = "cnn") -> float:
    (xtr, ytr), (xte, yte) = data()
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    steps_per_epoch = math.ceil(len(ytr) / batch)
    name, _, options = recipe.partition(":")
    if name in ("cbn", "naive-cbn") and "burnin=" not in options:
        # one epoch of stock BN first (§3.3)
        recipe = f"{name}:{options + ',' if options else ''}burnin={steps_per_epoch}"
    model = bnrewrite.transform(model, recipe, example_inputs=(xtr[:batch],))
    lr = base_lr * batch / 16
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):  # drop the last partial batch
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


MODELS = {"cnn": make_model, "mlp": make_mlp}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn",
                        help="cnn: 3 conv + BatchNorm2d; mlp: 2 Linear + BatchNorm1d (one value per channel)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [(recipe, batch) for batch in (2, 4)
            for recipe in ("bn", "naive-cbn", "cbn", "cbn:backward=renorm")] + [("bn", 16)]
    rows = []
    print(f"digits 8x8, {args.model}, {args.epochs} epochs, {args.seeds} seeds, lr = 0.1*batch/16, cosine; "
          "test accuracy")
    for recipe, batch in runs:
        t0 = time.time()
        accs = [train_eval(recipe, batch, args.epochs, seed, model_name=args.model) for seed in range(args.seeds)]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append({"recipe": recipe, "batch": batch, "accuracies": accs, "mean": mean, "std": std})
        print(f"  {recipe:19} batch {batch:2d}: {100 * mean:5.2f} ± {100 * std:4.2f} %  "
              f"({', '.join(f'{100 * a:.1f}' for a in accs)})  [{time.time() - t0:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
