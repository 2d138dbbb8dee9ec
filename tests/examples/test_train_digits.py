"""Short version of examples/train_digits.py: sampled BN trains on real data (bn-sampling §5.1).

FS and FS+VDN must end within 2 accuracy points of stock BN on scikit-learn's digits (6 epochs,
fixed seeds, one thread). FS uses a 1/16 patch (6.25%) here: the digits have a blank border
where every example is 0, so a small patch that lands there for a whole epoch sees no variance
(see docs/sections/30-sampling.md); the full example also runs the paper's 1/32.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def train_digits():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module
    spec.loader.exec_module(module)
    return module


def test_fs_and_fs_vdn_within_two_points_of_bn(train_digits, tmp_path):
    torch.set_num_threads(1)
    recipes = ["bn", "fs:ratio=1/16", "fs:ratio=1/16+vdn:n=1"]
    results = train_digits.run(recipes, epochs=6, seed=0, out_dir=str(tmp_path), verbose=False)
    acc = {r["recipe"]: r["test_acc"][-1] for r in results}
    assert acc["bn"] > 95.0, acc
    assert acc["fs:ratio=1/16"] >= acc["bn"] - 2.0, acc
    assert acc["fs:ratio=1/16+vdn:n=1"] >= acc["bn"] - 2.0, acc
    assert [r["sampling"] for r in results] == ["100%", "6.2%", "6.2%"]
    assert (tmp_path / "train_digits.json").exists() and (tmp_path / "train_digits.png").exists()
    table = train_digits.format_table(results)
    assert "| `fs:ratio=1/16` |" in table and "s/epoch" in table
