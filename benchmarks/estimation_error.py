"""Estimation error of sampled BatchNorm statistics on real activations (bn-sampling §5.1, Fig. 7).

A DigitsCNN (examples/train_digits.py) is trained with stock BN on scikit-learn's digits; then,
for every training batch of one epoch, the input of every BN layer is recorded and the
statistics each strategy estimates from its sample are compared with the full-batch ones:

    E_mu = ||mu_s - mu||_2 / sqrt(C)      E_sigma = ||sigma_s - sigma||_2 / sqrt(C)

(the paper's errors, divided by sqrt(C) so layers of different width are comparable; also
reported relative to ||sigma||). Each batch gets a fresh draw of the sample indices, so the
numbers average over draws as well as batches. VDN's virtual rows are propagated through the
trained network with the real batch's statistics (``fs:ratio=1+vdn:beta=0``), so their
activations at each layer are what a VDN layer would see.

    python benchmarks/estimation_error.py            # ratios 1/64, 1/32, 1/16, 1/8
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings
from pathlib import Path

import torch

import bnrewrite
from bnrewrite.runtime.sampled import SampledBatchNorm, sampled_statistics

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module
    spec.loader.exec_module(module)
    return module


def record_bn_inputs(model, images, batch_size, num_virtual):
    """BN inputs per batch (virtual rows first) from a VDN-augmented copy that normalises with
    the real rows' full statistics: exactly the trained BN model on the real rows."""
    vdn = bnrewrite.transform(model, f"fs:ratio=1+vdn:n={num_virtual},beta=0",
                              data_stats=bnrewrite.dataset_stats(images))
    names = [n for n, m in vdn.named_modules() if isinstance(m, SampledBatchNorm)]
    records: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for n in names:
        vdn.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: records[n].append(args[0].detach()))
    vdn.train()
    gen = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(images), generator=gen)
    with torch.no_grad():
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            vdn(images[perm[i:i + batch_size]])
    return records


def strategy_errors(records, strategy, ratio, batch_size, num_virtual_recorded, seed=0):
    """Mean E_mu, E_sigma (per sqrt(C)) and relative errors over layers x batches, and the
    achieved sampling ratio."""
    e_mu, e_sigma, r_mu, r_sigma, achieved = [], [], [], [], []
    for layer, (name, batches) in enumerate(records.items()):
        c = batches[0].shape[1]
        kwargs = {"ns": dict(n=max(1, round(ratio * batch_size))), "bs": dict(n=max(1, round(ratio * batch_size))),
                  "fs": dict(ratio=ratio), "frs": dict(ratio=ratio), "vdn": {}}[strategy]
        bn = SampledBatchNorm(c, strategy=strategy, seed=seed, stream=layer, **kwargs)
        nv_used = max(1, round(ratio * batch_size)) if strategy == "vdn" else 0
        for x in batches:
            real = x[num_virtual_recorded:]
            dims = [0] + list(range(2, x.dim()))
            var, mean = torch.var_mean(real, dim=dims, unbiased=False)
            if strategy == "vdn":
                v = x[:nv_used]
                var_s, mean_s = torch.var_mean(v, dim=dims, unbiased=False)
                count = nv_used * math.prod(x.shape[2:])
            else:
                spec = bn.sample_spec(tuple(real.shape))
                mean_s, var_s, count = sampled_statistics(real, spec)
            sigma, sigma_s = var.sqrt(), var_s.sqrt()
            e_mu.append(float((mean_s - mean).norm() / math.sqrt(c)))
            e_sigma.append(float((sigma_s - sigma).norm() / math.sqrt(c)))
            r_mu.append(float((mean_s - mean).norm() / sigma.norm()))
            r_sigma.append(float((sigma_s - sigma).norm() / sigma.norm()))
            achieved.append(count / real[:, 0].numel())
            bn.new_epoch()  # a fresh draw for the next batch
    mean_of = lambda v: sum(v) / len(v)  # noqa: E731
    return {"E_mu": mean_of(e_mu), "E_sigma": mean_of(e_sigma), "rel_mu": mean_of(r_mu),
            "rel_sigma": mean_of(r_sigma), "ratio": mean_of(achieved)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the BN model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ratios", nargs="+", default=["1/64", "1/32", "1/16", "1/8"])
    parser.add_argument("--strategies", nargs="+", default=["ns", "bs", "fs", "frs", "vdn"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    td = _load_example()
    train, test = td.load_digits_32(0)
    torch.manual_seed(0)
    trained, model = td.train_recipe("bn", train, test, epochs=args.epochs, batch_size=args.batch_size,
                                     return_model=True)
    print(f"trained DigitsCNN with stock BN for {args.epochs} epochs: test accuracy {trained['test_acc'][-1]:.2f}%")
    ratios = [eval(r, {}) for r in args.ratios]  # noqa: S307 - "1/32" from the command line
    max_virtual = max(1, round(max(ratios) * args.batch_size))
    records = record_bn_inputs(model, train[0], args.batch_size, max_virtual)
    layers = ", ".join(f"{n} {tuple(b[0].shape[1:])}" for n, b in records.items())
    print(f"BN inputs of {len(next(iter(records.values())))} batches of {args.batch_size}; layers: {layers}\n")
    print("| ratio | strategy | achieved ratio | E_mu | E_sigma | E_mu/||sigma|| | E_sigma/||sigma|| |")
    print("|---|---|---|---|---|---|---|")
    table = {}
    for ratio, text in zip(ratios, args.ratios):
        for strategy in args.strategies:
            res = strategy_errors(records, strategy, ratio, args.batch_size, max_virtual)
            table[(text, strategy)] = res
            print(f"| {text} | {strategy} | {100 * res['ratio']:.2f}% | {res['E_mu']:.4f} | {res['E_sigma']:.4f} | "
                  f"{res['rel_mu']:.4f} | {res['rel_sigma']:.4f} |")
    print()
    for text in args.ratios:
        row = {s: table[(text, s)] for s in args.strategies}
        if {"fs", "bs", "ns"} <= set(row):
            fs_best = all(row["fs"][k] < min(row["bs"][k], row["ns"][k]) for k in ("E_mu", "E_sigma"))
            verdict = "FS beats BS and NS" if fs_best else "FS does NOT beat both BS and NS"
            print(f"ratio {text}: {verdict} on both E_mu and E_sigma "
                  f"(E_mu fs {row['fs']['E_mu']:.4f} / bs {row['bs']['E_mu']:.4f} / ns {row['ns']['E_mu']:.4f}; "
                  f"E_sigma fs {row['fs']['E_sigma']:.4f} / bs {row['bs']['E_sigma']:.4f} / "
                  f"ns {row['ns']['E_sigma']:.4f})")
    return table


if __name__ == "__main__":
    main()
