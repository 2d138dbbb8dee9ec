"""Four things (four-things-bn.txt §3.1-3.4) on scikit-learn's digits, on CPU in a few minutes.

Trains a small CNN on the 8x8 digits upsampled to 32x32 with stock BatchNorm, Ghost BN
(§3.2), Batch-Group Norm (§3.4) and Group Norm (``bgn:examples=1``) at batch sizes 32 and 2,
with weight decay on γ/β on or off (§3.3, ``bnrewrite.param_groups``), then tunes the
inference example weight α (§3.1) on a validation split and reports test accuracy of the
folded model at α=0 and at the tuned α.

    OMP_NUM_THREADS=2 .venv/bin/python examples/four_things_digits.py [--epochs 6] [--seeds 1]

Digits is tiny (1,797 images) and easy, so differences of a few tenths of a percent are
noise; the table prints the spread over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite


def load_digits_32(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    idx = list(range(len(y)))
    train_idx, rest = train_test_split(idx, train_size=1000, stratify=y, random_state=seed)
    val_idx, test_idx = train_test_split(rest, train_size=300, stratify=y[rest], random_state=seed)
    pick = lambda ids: (x[ids], y[ids])  # noqa: E731
    return pick(train_idx), pick(val_idx), pick(test_idx)


def small_cnn() -> nn.Module:
    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return layers + ([nn.MaxPool2d(2)] if pool else [])

    return nn.Sequential(*block(1, 16, True), *block(16, 32, True), *block(32, 64, False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(recipe: str, batch: int, epochs: int, seed: int, train_data, norm_decay: float | None):
    torch.manual_seed(seed)
    model = bnrewrite.transform(small_cnn(), recipe)
    # linear learning-rate scaling from 0.05 at batch 32; 5e-4 decay on conv/linear weights
    lr = 0.05 * batch / 32
    groups = bnrewrite.param_groups(model, 5e-4, norm_weight_decay=norm_decay)
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    steps = epochs * (len(train_data[1]) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    x, y = train_data
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - batch + 1, batch):  # drop_last: no ragged last batch
            ids = order[i:i + batch]
            loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model, data) -> float:
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


GRID = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)

CONFIGS = [  # (batch, recipe, γ/β decay) -- None: same as the weights (on), 0: off
    (32, "bn", None), (32, "bn", 0.0), (32, "ghost:size=8", None), (32, "ghost:size=4", None),
    (32, "bgn:groups=8,examples=2", None), (32, "bgn:groups=8,examples=1", None),
    (2, "bn", None), (2, "bgn:groups=8,examples=2", None), (2, "bgn:groups=8,examples=1", None),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one epoch, one seed, two configs (smoke test)")
    args = parser.parse_args(argv)
    configs = CONFIGS
    if args.quick:
        args.epochs, args.seeds, configs = 1, 1, [CONFIGS[0], CONFIGS[7]]
    train_data, val, test = load_digits_32()
    print(f"digits 32x32: train {len(train_data[1])}, val {len(val[1])}, test {len(test[1])}; "
          f"{args.epochs} epochs, {args.seeds} seed(s); α grid {GRID} tuned on val accuracy")
    header = (f"{'batch':>5}  {'recipe':<26} {'γ/β decay':<9} {'test acc α=0':>14} {'α* (val)':>10} "
              f"{'test acc α*':>14} {'time':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for batch, recipe, norm_decay in configs:
        t0 = time.time()
        base, tuned, alphas = [], [], []
        for seed in range(args.seeds):
            model = train(recipe, batch, args.epochs, seed, train_data, norm_decay)
            base.append(accuracy(bnrewrite.fold_for_inference(model), test))
            curve = bnrewrite.tune_example_weight(model, val, metric="accuracy", grid=GRID)
            alphas.append(curve.best_alpha)
            tuned.append(accuracy(bnrewrite.fold_for_inference(model, example_weight=curve.best_alpha), test))
        fmt = lambda v: (f"{100 * statistics.mean(v):5.1f} ± {100 * (max(v) - min(v)) / 2:3.1f}"  # noqa: E731
                         if v else "n/a")
        decay = "on" if norm_decay is None else "off"
        row = (f"{batch:>5}  {recipe:<26} {decay:<9} {fmt(base):>14} {','.join(f'{a:g}' for a in alphas):>10} "
               f"{fmt(tuned):>14} {time.time() - t0:5.0f}s")
        rows.append(row)
        print(row, flush=True)
    print("\n± is half the range over seeds; α* is the best α on the validation split per seed "
          "(Batch-Group Norm sites weigh the example's moments pooled over their channel groups).")


if __name__ == "__main__":
    main()
