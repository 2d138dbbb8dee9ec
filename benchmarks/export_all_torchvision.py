"""Fold and export every torchvision classification model with BatchNorm to ONNX, and check each
with onnxruntime (issue 4 acceptance; CI exports one or two models per family, this does all 58).

Random weights with randomised running statistics and affine parameters (so folding matters).
Prints one line per model: fold error (relative to eval), ONNX BatchNormalization nodes (and the model's own other normalisation nodes), onnxruntime
error (``max|ort - torch| / max(max|torch|, 0.01)``) and the exporter used.

Usage: python benchmarks/export_all_torchvision.py [--models resnet18 ...] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bnrewrite  # noqa: E402
from bnrewrite.testing import randomize_batchnorm  # noqa: E402


def bn_models() -> list[str]:
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None)
        except NotImplementedError:  # regnet sizes itself with .tolist(): build it for real below
            model = None
        if model is None or any(isinstance(m, _BatchNorm) for m in model.modules()):
            names.append(name)
    return names


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    return randomize_batchnorm(model, seed=0)


def check(name: str) -> dict:
    torch.manual_seed(0)
    model = randomise(torchvision.models.get_model(name, weights=None))
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return {"model": name, "skipped": "no BatchNorm"}
    size = 75 if name.startswith("inception") else 224 if name.startswith("maxvit") else 32
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        fold_err = ((want - folded(x)).abs().max() / want.abs().max()).item()
    del model
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        report = bnrewrite.export_onnx(folded, (x[:1],), os.path.join(tmp, f"{name}.onnx"))
    norm = dict(report.normalisation_nodes)
    return {"model": name, "fold_rel_err": fold_err, "bn_nodes": norm.pop("BatchNormalization", 0),
            "other_norm_nodes": norm,  # e.g. maxvit's own LayerNorms, which are not BatchNorm
            "ort_rel_err": report.max_rel_error, "batch_sizes": report.batch_sizes,
            "exporter": getattr(report, "exporter", None), "export_s": round(time.time() - start, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    names = args.models or bn_models()
    rows, failures = [], 0
    for name in names:
        try:
            row = check(name)
        except Exception as exc:  # noqa: BLE001 - report every model, then fail at the end
            row = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        ok = "error" not in row and (row.get("skipped") or (
            row["fold_rel_err"] <= 1e-5 and row["bn_nodes"] == 0 and row["ort_rel_err"] <= 1e-4))
        failures += not ok
        rows.append(row)
        if "error" in row or "skipped" in row:
            print(f"{name:22s} {row.get('error') or row.get('skipped')}", flush=True)
        else:
            print(f"{name:22s} fold {row['fold_rel_err']:.1e}  BN nodes {row['bn_nodes']}  other norm {row['other_norm_nodes'] or '-'}  "
                  f"ort {row['ort_rel_err']:.1e}  batches {row['batch_sizes']}  {row['export_s']:6.1f}s  "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"{len(rows) - failures}/{len(rows)} models fold within 1e-5, export with no BatchNormalization node and "
          f"match onnxruntime within 1e-4")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
