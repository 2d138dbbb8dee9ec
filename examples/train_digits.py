"""Train a small CNN on scikit-learn's handwritten digits with sampled BatchNorm recipes.

bn-sampling §5.1 on a laptop scale: the 8x8 digits (1797 real images shipped with
scikit-learn) are upsampled to 32x32, a 3-conv CNN with BatchNorm is trained with each recipe
at the paper's sampling ratios (3.1%: BS/NS 2 of 64 examples, FS a 1/32 patch; VDN 1 virtual
sample of 64 = 1.6%), and a table of test accuracy and time per epoch is printed. A PNG of the
training curves is saved when matplotlib is installed.

    python examples/train_digits.py --epochs 12 --out examples/out
    python examples/train_digits.py --recipes bn fs:ratio=1/16 "fs+vdn:n=2" --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite

DEFAULT_RECIPES = ["bn", "ns:n=2", "bs:n=2", "fs:ratio=1/32", "vdn:n=1", "fs:ratio=1/32+vdn:n=1"]


def load_digits_32(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's digits, scaled to [0, 1], upsampled to 32x32; a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=data.target)
    return (images[idx_train], labels[idx_train]), (images[idx_test], labels[idx_test])


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x3 (32x32 -> 16x16 -> 8x8), 2x2 max pool, linear on the 4x4 map."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width * 16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(images[i:i + 256]).argmax(1) == labels[i:i + 256]).sum())
                      for i in range(0, len(labels), 256))
    return 100.0 * correct / len(labels)


def train_recipe(recipe: str, train, test, *, epochs: int = 12, batch_size: int = 64, lr: float = 2e-3,
                 seed: int = 0, width: int = 16, return_model: bool = False):
    """Train one recipe from the same initial weights and data order; returns its curves
    (and the trained model with ``return_model=True``)."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    images, labels = train
    names = {part.split(":")[0].strip() for part in recipe.split("+")}
    options = {"seed": seed} if names & {"ns", "bs", "fs", "frs", "vdn"} else {}
    if "vdn" in names:
        options["data_stats"] = bnrewrite.dataset_stats(images)
    model = bnrewrite.transform(model, recipe, example_inputs=(images[:batch_size],), **options)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    order = torch.Generator().manual_seed(seed)
    history = {"recipe": recipe, "loss": [], "test_acc": [], "epoch_s": []}
    for _ in range(epochs):
        bnrewrite.new_epoch(model)  # the paper re-draws the sample indices once per epoch
        model.train()
        perm = torch.randperm(len(labels), generator=order)
        start, total, batches = time.perf_counter(), 0.0, 0
        for i in range(0, len(perm) - batch_size + 1, batch_size):  # drop_last: fixed batch size
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        history["epoch_s"].append(time.perf_counter() - start)
        sched.step()
        history["loss"].append(total / batches)
        history["test_acc"].append(evaluate(model, *test))
    history["sampling"] = sampling_summary(model, (batch_size,) + tuple(images.shape[1:]))
    return (history, model) if return_model else history


def sampling_summary(model: nn.Module, input_shape) -> str:
    """The mean sampling ratio over the BN sites, as `inspect` reports it."""
    info = getattr(model, "bnrewrite_info", None)
    ratios = []
    for site in info.sites if info else []:
        module = model.get_submodule(site["name"])
        if hasattr(module, "sample_spec") and site["input_shape"]:
            ratios.append(module.describe(tuple(site["input_shape"])).get("sampling_ratio"))
    ratios = [r for r in ratios if r is not None]
    return f"{100 * sum(ratios) / len(ratios):.1f}%" if ratios else "100%"


def run(recipes=DEFAULT_RECIPES, epochs: int = 12, seed: int = 0, batch_size: int = 64, width: int = 16,
        out_dir: str | None = None, verbose: bool = True) -> list[dict]:
    train, test = load_digits_32(seed)
    results = []
    for recipe in recipes:
        res = train_recipe(recipe, train, test, epochs=epochs, seed=seed, batch_size=batch_size, width=width)
        results.append(res)
        if verbose:
            print(f"{recipe:<24} acc {res['test_acc'][-1]:6.2f}%  ({sum(res['epoch_s']) / epochs:.2f} s/epoch)",
                  flush=True)
    if verbose:
        print()
        print(format_table(results))
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_digits.json").write_text(json.dumps(results, indent=1))
        path = plot(results, out / "train_digits.png")
        if verbose and path:
            print(f"\nplot: {path}")
    return results


def format_table(results: list[dict]) -> str:
    base = results[0]["test_acc"][-1] if results and results[0]["recipe"] == "bn" else None
    lines = [f"| recipe | BN sampling ratio | test acc (final) | best | vs bn | s/epoch |",
             "|---|---|---|---|---|---|"]
    for r in results:
        final = r["test_acc"][-1]
        delta = f"{final - base:+.2f}" if base is not None else "-"
        lines.append(f"| `{r['recipe']}` | {r['sampling']} | {final:.2f}% | {max(r['test_acc']):.2f}% | {delta} | "
                     f"{sum(r['epoch_s']) / len(r['epoch_s']):.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        epochs = range(1, len(r["loss"]) + 1)
        ax_loss.plot(epochs, r["loss"], label=r["recipe"])
        ax_acc.plot(epochs, r["test_acc"], label=r["recipe"])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="digits 32x32: training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy", ylim=(80, 100))
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, help="recipes to train (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="examples/out", help="output dir for the JSON and PNG ('' = none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.recipes, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, width=args.width,
        out_dir=args.out or None)


if __name__ == "__main__":
    main()
