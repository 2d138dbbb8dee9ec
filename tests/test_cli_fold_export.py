"""`bnrewrite fold`, `bnrewrite export` and `bnrewrite inspect model.onnx`, run in-process."""
import json

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from bnrewrite.cli import main

MODEL_FILE = '''
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
    return m
'''


@pytest.fixture
def model_spec(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    return f"{path}:small"


def test_fold_saves_a_model_without_batchnorm(tmp_path, model_spec, capsys):
    out = tmp_path / "folded.pt"
    assert main(["fold", model_spec, "--out", str(out), "--input-shape", "2,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert "into-producer" in text and "1 normalisation sites" in text and "max relative difference" in text
    folded = torch.load(out, weights_only=False)
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    import importlib.util

    spec = importlib.util.spec_from_file_location("net", model_spec.rpartition(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = module.small().eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), rtol=1e-5, atol=1e-6)


def test_fold_json_report(tmp_path, model_spec, capsys):
    assert main(["fold", model_spec, "--out", str(tmp_path / "f.pt"), "--input-shape", "2,3,8,8",
                 "--format", "json", "--example-weight", "0.5"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"example-weighted": 1} and data["example_weight"] == 0.5
    # the example-weighted output differs from plain eval on purpose: reported as a change, not an error
    assert data["max_rel_change_by_example_weighing"] > 0 and "max_rel_error_vs_unfolded" not in data


def test_fold_with_example_weighing_labels_the_difference_as_its_effect(tmp_path, model_spec, capsys):
    assert main(["fold", model_spec, "--out", str(tmp_path / "f.pt"), "--input-shape", "2,3,8,8",
                 "--example-weight", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "change from the unfolded eval output made by example weighing (alpha=0.5, intended)" in text
    assert "difference to the unfolded eval output" not in text


def test_export_prints_report_and_inspect_lists_ops(tmp_path, model_spec, capsys):
    onnx_path = tmp_path / "net.onnx"
    assert main(["export", model_spec, "--out", str(onnx_path), "--input-shape", "1,3,8,8"]) == 0
    text = capsys.readouterr().out
    assert "normalisation left: none" in text and "max rel error" in text and "folded first: 1 into-producer" in text
    assert main(["inspect", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    assert "Conv" in text and "normalisation left: none" in text
    assert main(["inspect", str(onnx_path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["node_counts"]["Conv"] == 1 and data["normalisation_nodes"] == {}


def test_export_with_example_weight_json(tmp_path, model_spec, capsys):
    assert main(["export", model_spec, "--out", str(tmp_path / "ew.onnx"), "--input-shape", "2,3,8,8",
                 "--example-weight", "0.3", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_rel_error"] <= 1e-4 and data["node_counts"]["ReduceMean"] >= 2
    assert data["fold"]["counts"] == {"example-weighted": 1}


def test_export_errors_are_clean(tmp_path, model_spec, capsys):
    assert main(["export", model_spec, "--out", str(tmp_path / "x.onnx"), "--input-shape", "none"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["fold", model_spec, "--out", str(tmp_path / "x.pt"), "--example-weight", "2"]) == 2
    assert "example_weight" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err


def test_fold_creates_the_folder_of_out(tmp_path, model_spec, capsys):
    out = tmp_path / "new" / "dir" / "folded.pt"
    assert main(["fold", model_spec, "--out", str(out), "--input-shape", "2,3,8,8"]) == 0
    assert out.exists() and f"saved {out}" in capsys.readouterr().out


def test_export_creates_the_folder_of_out(tmp_path, model_spec, capsys):
    out = tmp_path / "new" / "dir" / "model.onnx"
    assert main(["export", model_spec, "--out", str(out), "--input-shape", "2,3,8,8"]) == 0
    assert out.exists() and "onnxruntime" in capsys.readouterr().out


def _original_eval(model_spec):
    import importlib.util

    spec = importlib.util.spec_from_file_location("net", model_spec.rpartition(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.small().eval()


@pytest.mark.parametrize("recipe", ["vdn", "fs+vdn"])
def test_fold_and_export_a_vdn_recipe(tmp_path, model_spec, recipe, capsys):
    """vdn's data statistics only feed the training-time virtual rows: the CLI gives it unit ones,
    as inspect does, and the folded/exported model computes the stock eval output."""
    out = tmp_path / "v.pt"
    assert main(["fold", model_spec, "--recipe", recipe, "--out", str(out), "--input-shape", "2,3,8,8"]) == 0
    assert "max relative difference" in capsys.readouterr().out
    folded = torch.load(out, weights_only=False).eval()
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    # the training-only virtual-row modules are gone: a plain eval model, scriptable
    assert not any(getattr(m, "is_training_only", False) for m in folded.modules())
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = _original_eval(model_spec)(x)
        torch.testing.assert_close(folded(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.jit.script(folded)(x), want, rtol=1e-5, atol=1e-6)
    onnx_path = tmp_path / "v.onnx"
    assert main(["export", model_spec, "--recipe", recipe, "--out", str(onnx_path), "--input-shape", "2,3,8,8",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["max_rel_error"] <= 1e-4 and data["normalisation_nodes"] == {}
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
