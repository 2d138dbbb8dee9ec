"""bnrewrite CLI: fast help, inspect in three formats, clear errors."""
import json
import subprocess
import sys
import time

import pytest

from bnrewrite.cli import main

ENTRY = [sys.executable, "-m", "bnrewrite.cli"]


def test_help_is_fast_and_lists_options():
    start = time.perf_counter()
    out = subprocess.run(ENTRY + ["--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    assert "inspect" in out.stdout
    assert elapsed < 2.0, f"bnrewrite --help took {elapsed:.2f}s"
    sub = subprocess.run(ENTRY + ["inspect", "--help"], capture_output=True, text=True, check=True).stdout
    for option in ("--recipe", "--input-shape", "--format", "--out", "--seed"):
        assert option in sub


def test_help_does_not_import_torch():
    code = "import sys; from bnrewrite.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspect_table(capsys):
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.bn1" in out and "1x64x16x16" in out and "Conv2d" in out and "ReLU" in out
    assert out.strip().endswith("20 sites, 0 rewritten, 0 leaf regions (recipe: bn)")


def test_inspect_json_reports_leaf_regions(capsys):
    pytest.importorskip("timm")
    assert main(["inspect", "timm:mobilevitv2_050", "--format", "json", "--input-shape", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["sites"] == len(data["sites"]) > 0
    assert data["summary"]["leaf_regions"] == len(data["regions"]) > 0
    assert all(r["reason"] for r in data["regions"])


def test_inspect_dot(tmp_path, capsys):
    path = tmp_path / "g.dot"
    assert main(["inspect", "torchvision:resnet18", "--format", "dot", "--out", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("digraph G {") and '"layer1_0_bn1"' in text and "->" in text


def test_inspect_out_creates_its_folder(tmp_path, capsys):
    out = tmp_path / "new" / "report.json"
    assert main(["inspect", "torchvision:resnet18", "--input-shape", "none", "--format", "json", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["sites"] == 20


def test_inspect_user_file_factory(tmp_path, capsys):
    src = tmp_path / "net.py"
    src.write_text("import torch.nn as nn\n"
                   "def build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())\n")
    assert main(["inspect", f"{src}:build", "--input-shape", "2,3,8,8"]) == 0
    assert "2x4x6x6" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "torchvision:resnet9000"], "torchvision has no model 'resnet9000'"),
    (["inspect", "nothing"], "cannot load model 'nothing'"),
    (["inspect", "torchvision:resnet18", "--recipe", "fss"], "unknown component 'fss'"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,x"], "--input-shape must be comma-separated ints"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnrewrite: error:") and message in err and "Traceback" not in err


BAD_MODEL_FILE = """import torch.nn as nn
def small(): return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
def raises(): raise RuntimeError("factory exploded")
def needs_arg(n): return small()
def not_a_module(): return 3
def exits(): raise SystemExit(3)
notcallable = 3
"""


@pytest.mark.parametrize("argv, message", [
    (["fold", "{d}/sd.pt", "--out", "{d}/o.pt"], "{d}/sd.pt holds an object of type OrderedDict, not a whole module"),
    (["inspect", "{d}/corrupt.pt"], "{d}/corrupt.pt is not a file torch.load can read (UnpicklingError"),
    (["inspect", "{d}/m.py:raises"], "{d}/m.py:raises() raised RuntimeError: factory exploded"),
    # a sys.exit() in the factory or at import exited silently (status 3, or 1 with the message only)
    (["inspect", "{d}/m.py:exits"], "{d}/m.py:exits() called sys.exit(3) instead of returning the model"),
    (["inspect", "{d}/script.py:small"], "importing {d}/script.py called sys.exit('bye')"),
    (["inspect", "{d}/m.py:needs_arg"], "{d}/m.py:needs_arg must be callable with no arguments"),
    (["inspect", "{d}/m.py:notcallable"], "{d}/m.py:notcallable is of type int, not a function"),
    (["inspect", "{d}/m.py:not_a_module"], "{d}/m.py:not_a_module() returned an object of type int, not an nn.Module"),
    (["inspect", "{d}/broken.py:small"], "{d}/broken.py:1: syntax error"),
    (["inspect", "{d}/m.py"], "{d}/m.py: name the function that returns the model, as {d}/m.py:FACTORY"),
    (["inspect", "{d}/m.py:"], "{d}/m.py: name the function that returns the model, as {d}/m.py:FACTORY"),
    (["inspect", "{d}/m.py:small", "--input-shape", "99999999,3,999,999"],
     "--input-shape 99999999,3,999,999: cannot allocate an example input"),
    (["export", "{d}/m.py:small", "--input-shape", "2,3,8,8", "--opset", "99", "--out", "{d}/o.onnx"],
     "opset 99 is newer than any this onnx"),
    (["inspect", "{d}/m.onnx", "--format", "dot"], "{d}/m.onnx: --format dot applies to a torch model"),
    (["inspect", "{d}/m.onnx", "--recipe", "fs", "--seed", "1"], "{d}/m.onnx: --recipe, --seed applies to a torch model"),
    (["inspect", "{d}/m.py:small", "--out", "{d}"], "--out {d}: cannot write there (Is a directory)"),
    (["inspect", "{d}/m.py:small", "--out", "{d}/m.py/x.txt"], "--out {d}/m.py/x.txt: cannot write there"),
    (["export", "{d}/m.py:small", "--input-shape", "2,3,8,8", "--out", "{d}"],
     "--out '{d}' is a folder; give the path of the .onnx file to write"),
    (["export", "{d}/m.py:small", "--input-shape", "2,3,8,8", "--out", ""], "--out '' is empty; give the path of the .onnx"),
    (["fold", "{d}/m.py:small", "--out", "{d}"], "--out '{d}' is a folder; give the path of the .pt file to write"),
    (["fold", "{d}/m.py:small", "--out", " "], "--out ' ' is empty; give the path of the .pt file"),
])
def test_bad_model_inputs_are_one_clear_line(argv, message, tmp_path, capsys):
    import torch
    from torch import nn

    (tmp_path / "m.py").write_text(BAD_MODEL_FILE)
    (tmp_path / "broken.py").write_text("def small(:\n")
    (tmp_path / "script.py").write_text("raise SystemExit('bye')\n")
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), tmp_path / "sd.pt")
    (tmp_path / "corrupt.pt").write_text("x")
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnrewrite: error:") and message.format(d=tmp_path) in err and "Traceback" not in err


def test_inspect_shows_lowering(capsys):
    pytest.importorskip("triton")
    assert main(["inspect", "torchvision:resnet18", "--recipe", "fs", "--lower", "fused", "--input-shape", "none"]) == 0
    out = capsys.readouterr().out
    assert "lowered" in out.splitlines()[0]
    bn1 = next(line for line in out.splitlines() if line.startswith("bn1 "))
    assert "fused (+relu)" in bn1
    bn2 = next(line for line in out.splitlines() if line.startswith("layer1.0.bn2 "))
    assert "fused " in bn2 and "+relu" not in bn2  # its output goes to the residual add


def test_inspect_two_tower_lists_each_site_once(capsys):
    """two-tower calls every BatchNorm once per tower; inspect still shows one row per site of the
    model (with calls=2), not a second row per tower."""
    assert main(["inspect", "torchvision:resnet18", "--recipe", "two-tower", "--input-shape", "2,3,64,64",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in data["sites"]]
    assert len(names) == len(set(names)) == 20 and data["summary"] == {**data["summary"], "sites": 20,
                                                                         "rewritten": 20}
    first = data["sites"][0]
    assert first["name"] == "bn1" and first["input_shape"] == [2, 64, 32, 32] and first["consumer"] == "ReLU"
    assert all(r["details"]["calls"] == 2 and not r["shared"] for r in data["sites"])


def test_inspect_include_and_exclude_globs(capsys):
    assert main(["inspect", "torchvision:resnet18", "--recipe", "fs", "--input-shape", "2,3,32,32",
                 "--exclude", "layer4.*", "--exclude", "bn1", "--format", "json"]) == 0
    rows = {r["name"]: r["rewritten_to"] for r in json.loads(capsys.readouterr().out)["sites"]}
    assert rows["bn1"] == rows["layer4.1.bn2"] == "(excluded)" and rows["layer3.0.bn1"] == "SampledBatchNorm"
    assert main(["inspect", "torchvision:resnet18", "--recipe", "fs", "--include", "layer9.*"]) == 2
    assert "glob 'layer9.*' matches no BatchNorm site" in capsys.readouterr().err
