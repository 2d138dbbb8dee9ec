"""bnrewrite.fold_for_inference vs torch.fx.experimental.optimization.fuse.

For each model (random weights, randomised BatchNorm statistics and affine parameters):

* sites: how many BatchNorm calls the model makes;
* fuse: how many of them ``torch.fx.experimental.optimization.fuse`` folds (it only fuses a
  Conv/Linear whose single user is a BatchNorm in a fully traceable model) and its max error;
* ours: how many fold into a neighbour, how many become a per-channel affine (Mul+Add), none
  left as BatchNorm, and the max error;
* latency: onnxruntime CPU latency of our folded export vs an export of the same model with
  every BatchNorm replaced by ``nn.Identity`` (the limit of folding), and their ratio.

Example (the numbers in README / benchmarks/RESULTS.md)::

    OMP_NUM_THREADS=1 python benchmarks/fold_compare.py --models resnet18 mobilenet_v2 \\
        efficientnet_b0 densenet121 regnet_x_400mf shufflenet_v2_x1_0 --size 160 --runs 50
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bnrewrite  # noqa: E402
from bnrewrite.testing import randomize_batchnorm  # noqa: E402

DEFAULT_MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "densenet121", "regnet_x_400mf",
                  "shufflenet_v2_x1_0"]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_batchnorm(model, seed, shift=0.1, var_range=(0.5, 1.5))


def count_bn_calls(model: nn.Module, x: torch.Tensor) -> int:
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in model.modules() if isinstance(m, _BatchNorm)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return len(calls)


def without_bn(model: nn.Module) -> nn.Module:
    """The same network with every BatchNorm swapped for nn.Identity (norm_layer=Identity)."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, _BatchNorm):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, nn.Identity())
    return out.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def ort_latency_ms(path: str, x: np.ndarray, runs: int, threads: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def compare(name: str, size: int, runs: int, threads: int, workdir: str) -> dict:
    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model(x)
    row = {"model": name, "sites": count_bn_calls(model, x)}

    from torch.fx.experimental.optimization import fuse
    try:
        fused = fuse(copy.deepcopy(model))
        with torch.no_grad():
            row["fuse_err"] = rel_err(want, fused(x))
        row["fuse_folded"] = row["sites"] - count_bn_calls(fused, x)
    except Exception as exc:  # noqa: BLE001 - fuse needs the whole model to trace
        row["fuse_folded"], row["fuse_err"] = 0, None
        row["fuse_failure"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"

    folded = bnrewrite.fold_for_inference(model)
    counts = folded.bnrewrite_fold_report.counts()
    with torch.no_grad():
        row["ours_err"] = rel_err(want, folded(x))
    row["ours_folded"] = counts.get("into-producer", 0) + counts.get("into-consumer", 0)
    row["ours_affine"] = counts.get("channel-affine", 0)
    row["ours_bn_left"] = sum(isinstance(m, _BatchNorm) for m in folded.modules())

    ours_path = os.path.join(workdir, f"{name}_folded.onnx")
    plain_path = os.path.join(workdir, f"{name}_nobn.onnx")
    report = bnrewrite.export_onnx(folded, (x,), ours_path, dynamic_batch=False)
    row["onnx_bn_nodes"] = report.node_counts.get("BatchNormalization", 0)
    row["ort_err"] = report.max_rel_error
    bnrewrite.export_onnx(without_bn(model), (x,), plain_path, dynamic_batch=False)
    xs = x.numpy()
    # interleave so that load changes on a shared machine hit both alike
    ours, plain = [], []
    for _ in range(3):
        ours.append(ort_latency_ms(ours_path, xs, runs, threads))
        plain.append(ort_latency_ms(plain_path, xs, runs, threads))
    row["ours_ms"], row["nobn_ms"] = min(ours), min(plain)
    row["ratio"] = row["ours_ms"] / row["nobn_ms"]
    return row


# ---------------------------------------------------------------------------- patterns
class _PreAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return self.conv(self.bn(x))


class _AfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x))


class _SharedConv(nn.Module):
    """One conv module called twice, once before a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: symbolic_trace fails on the whole model
            x = -x
        return self.bn(self.conv(x))


PATTERNS = {
    "Conv2d→BN2d": lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)),
    "depthwise Conv2d→BN2d": lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)),
    "ConvTranspose2d→BN2d": lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, stride=2), nn.BatchNorm2d(4)),
    "Linear→BN1d": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4)),
    "BN→Conv (pre-activation, pad 0)": _PreAct,
    "BN after add": _AfterAdd,
    "shared conv module": _SharedConv,
    "untraceable top level": _Untraceable,
}


def compare_patterns() -> list[dict]:
    from torch.fx.experimental.optimization import fuse

    rows = []
    x = torch.randn(2, 4, 4, 4)
    for name, build in PATTERNS.items():
        torch.manual_seed(0)
        model = randomise(build())
        with torch.no_grad():
            want = model(x)
        row = {"pattern": name}
        try:
            fused = fuse(copy.deepcopy(model))
            with torch.no_grad():
                row["fuse_err"] = rel_err(want, fused(x))
            row["fuse_bn_left"] = sum(isinstance(m, _BatchNorm) for m in fused.modules())
        except Exception as exc:  # noqa: BLE001
            row["fuse_err"], row["fuse_bn_left"] = None, f"fails ({type(exc).__name__})"
        folded = bnrewrite.fold_for_inference(model)
        with torch.no_grad():
            row["ours_err"] = rel_err(want, folded(x))
        row["ours"] = ", ".join(f"{n} {a}" for a, n in sorted(folded.bnrewrite_fold_report.counts().items()))
        rows.append(row)
    return rows


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2e}" if v < 0.01 else f"{v:.2f}"
    return str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=160, help="input resolution (batch 1)")
    parser.add_argument("--runs", type=int, default=50, help="timed onnxruntime runs per repeat (median)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    parser.add_argument("--patterns-only", action="store_true", help="only the small pattern table")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in ([] if args.patterns_only else args.models):
            rows.append(compare(name, args.size, args.runs, args.threads, workdir))
            print(f"done {name}", file=sys.stderr, flush=True)
    cols = ["model", "sites", "fuse_folded", "fuse_err", "ours_folded", "ours_affine", "ours_bn_left", "ours_err",
            "onnx_bn_nodes", "ort_err", "ours_ms", "nobn_ms", "ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    for r in rows:
        if "fuse_failure" in r:
            print(f"\nfuse failed on {r['model']}: {r['fuse_failure']}")
    patterns = compare_patterns()
    pcols = ["pattern", "fuse_bn_left", "fuse_err", "ours", "ours_err"]
    print("\n| " + " | ".join(pcols) + " |")
    print("|" + "---|" * len(pcols))
    for r in patterns:
        print("| " + " | ".join(fmt(r.get(c)) for c in pcols) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"models": rows, "patterns": patterns}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
