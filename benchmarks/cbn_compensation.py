"""How well do CBN's window statistics track the truth? (cross-iteration-bn.txt §3.2, Fig. 3)

A two-layer conv net (conv1 → BN1 → ReLU → conv2 → BN2 → pool → linear) is trained with
``cbn`` on scikit-learn digits at batch 4 with SGD (momentum 0.9). At every step t after a
warm-up, for each BN site we compare two estimates of the statistics of the last k batches
under the *current* weights θ_t — the compensated one (Eqs. 7–11) and the naive one (same
window, no Taylor terms) — against the truth: the last k batches recomputed under θ_t.

* BN1: the producer input is the data, so the truth is exact; μ is linear in θ and Eq. 7 is
  exact, ν keeps the second-order error E[(Δθ·patch)²].
* BN2: its producer input depends on conv1/BN1, which also moved; the paper truncates the
  gradient at layer l (§3.2), so this measures the truncation too. Truth: the past batches
  go through the current conv1 and BN1 normalised with the statistics BN1 uses now.

Reported: mean relative error ‖est − true‖/‖true‖ of μ and σ², and ratio cbn/naive
(< 1: compensation helps). Both estimates come from the same trajectory and history.

    OMP_NUM_THREADS=1 python benchmarks/cbn_compensation.py [--steps 150] [--no-bias] [--grad-stride 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
from sklearn.datasets import load_digits
from torch import nn

import bnrewrite


class TwoLayer(nn.Module):
    def __init__(self, width=16, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _affine(bn, x, mean, var):
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + bn.eps) * bn.weight.reshape(shape) \
        + bn.bias.reshape(shape)


def _stats(x):
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def run(lr: float, k: int, steps: int, warmup: int, batch: int = 4, seed: int = 0, bias: bool = True,
        grad_stride: int = 1) -> dict:
    torch.manual_seed(seed)
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    model = bnrewrite.transform(TwoLayer(bias=bias), f"cbn:k={k},grad_stride={grad_stride}")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    captured: dict = {}

    def grab(name):
        def hook(module, args):
            captured[name] = {True: module.estimate(*args, compensate=True),
                              False: module.estimate(*args, compensate=False)}
        return hook

    hooks = [model.bn1.register_forward_pre_hook(grab("bn1")), model.bn2.register_forward_pre_hook(grab("bn2"))]
    errors = {(site, comp, stat): [] for site in ("bn1", "bn2") for comp in (True, False) for stat in ("mean", "var")}
    recent: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x, y = images[idx], labels[idx]
        recent = (recent + [x])[-k:]
        loss = nn.functional.cross_entropy(model(x), y)
        if step >= warmup and len(recent) == k:
            with torch.no_grad():
                h1 = [model.conv1(xb) for xb in recent]
                true1 = _stats(torch.cat(h1))
                # BN1 now normalises with the window statistics it just used (k > 1 after warm-up)
                m1, v1, _ = model.bn1.last_statistics
                h2 = [model.conv2(torch.relu(_affine(model.bn1, h, m1, v1))) for h in h1]
                true2 = _stats(torch.cat(h2))
            for site, truth in (("bn1", true1), ("bn2", true2)):
                for comp in (True, False):
                    mean, var = captured[site][comp]
                    errors[site, comp, "mean"].append(((mean - truth[0]).norm() / truth[0].norm()).item())
                    errors[site, comp, "var"].append(((var - truth[1]).norm() / truth[1].norm()).item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for h in hooks:
        h.remove()
    out = {"lr": lr, "k": k}
    for (site, comp, stat), vals in errors.items():
        out[f"{site}_{'cbn' if comp else 'naive'}_{stat}"] = sum(vals) / len(vals)
    for site in ("bn1", "bn2"):
        for stat in ("mean", "var"):
            out[f"{site}_ratio_{stat}"] = out[f"{site}_cbn_{stat}"] / out[f"{site}_naive_{stat}"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--lrs", default="0.003,0.01,0.03,0.1")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--no-bias", action="store_true", help="convolutions without bias (ResNet style)")
    parser.add_argument("--grad-stride", type=int, default=1,
                        help="cbn's grad_stride option (1 = exact App. B; s > 1 estimates ∂ν/∂θ from every s-th position)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [run(float(lr), int(k), args.steps, args.warmup, bias=not args.no_bias, grad_stride=args.grad_stride)
            for lr in args.lrs.split(",") for k in args.ks.split(",")]
    head = (f"{'lr':>6} {'k':>2} | {'BN1 μ err cbn/naive':>21} {'ratio':>6} | {'BN1 σ² err cbn/naive':>21} {'ratio':>6}"
            f" | {'BN2 μ err cbn/naive':>21} {'ratio':>6} | {'BN2 σ² err cbn/naive':>21} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for site in ("bn1", "bn2"):
            for stat in ("mean", "var"):
                cells.append(f"{r[f'{site}_cbn_{stat}']:9.2e}/{r[f'{site}_naive_{stat}']:9.2e}  "
                             f"{r[f'{site}_ratio_{stat}']:6.3f}")
        print(f"{r['lr']:>6} {r['k']:>2} | " + " | ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
