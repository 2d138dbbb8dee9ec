"""export_onnx / inspect_onnx against real onnxruntime."""
import json
import re
import stat
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnrewrite
from bnrewrite.errors import ExportError, InputError
from bnrewrite.export import ExportReport, inspect_onnx


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def small_net():
    return randomise(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)))


def ort_run(path, *arrays):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), arrays)})


def test_export_folds_verifies_and_reports(tmp_path):
    model = small_net()
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "net.onnx"
    report = bnrewrite.export_onnx(model, (x,), path)
    assert isinstance(report, ExportReport)
    assert report.folded and report.path == str(path)
    assert report.node_counts["Conv"] == 2 and "BatchNormalization" not in report.node_counts
    assert report.normalisation_nodes == {}
    assert report.max_rel_error <= 1e-4 and report.max_abs_error is not None
    assert report.batch_sizes == [2, 3]
    assert report.providers[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert report.fold_report is not None and len(report.fold_report.records) == 3
    assert model.training  # the caller's model keeps its mode and its BatchNorms
    assert any(isinstance(m, _BatchNorm) for m in model.modules())
    # independent check of the file: onnxruntime vs the unfolded model in eval mode
    model.eval()
    x5 = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        want = model(x5).numpy()
    got = ort_run(path, x5.numpy())[0]
    assert np.abs(want - got).max() / np.abs(want).max() <= 1e-4
    assert json.dumps(report.as_dict(), default=str)
    assert "normalisation left: none" in str(report)


def test_batch_one_example_still_exports_a_dynamic_batch(tmp_path):
    model = small_net()
    report = bnrewrite.export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "b1.onnx")
    assert report.batch_sizes == [1, 2]
    summary = inspect_onnx(tmp_path / "b1.onnx")
    assert isinstance(summary["inputs"][0]["shape"][0], str)  # symbolic batch dim


def test_static_batch_export(tmp_path):
    report = bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False)
    assert report.batch_sizes == [2]
    assert inspect_onnx(tmp_path / "s.onnx")["inputs"][0]["shape"] == [2, 3, 8, 8]


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))

    def forward(self, x, v):
        h = self.a(x)
        return h.mean(dim=(2, 3)) + self.b(v), h


def test_several_inputs_and_outputs(tmp_path):
    model = randomise(TwoInTwoOut())
    inputs = (torch.randn(2, 3, 6, 6), torch.randn(2, 5))
    report = bnrewrite.export_onnx(model, inputs, tmp_path / "io.onnx")
    assert report.max_rel_error <= 1e-4
    summary = inspect_onnx(tmp_path / "io.onnx")
    assert len(summary["inputs"]) == 2 and len(summary["outputs"]) == 2


def test_already_folded_model_is_exported_as_is(tmp_path):
    folded = bnrewrite.fold_for_inference(small_net())
    report = bnrewrite.export_onnx(folded, torch.randn(2, 3, 8, 8), tmp_path / "f.onnx")
    assert not report.folded and report.fold_report is None


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_net()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.net(x))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_both_exporters_export_eval_mode(tmp_path, exporter):
    # dropout in the graph: exporting in train mode would not match eval-mode torch
    report = bnrewrite.export_onnx(WithDropout(), torch.randn(2, 3, 8, 8), tmp_path / "e.onnx", exporter=exporter)
    assert report.exporter == exporter and report.max_rel_error <= 1e-4
    assert "BatchNormalization" not in report.node_counts


def test_mismatch_raises_export_error_with_the_error(tmp_path):
    # Drifts' output changes between the trace and the check, so the mismatch is certain (a
    # tiny tolerance on an exact net is not: onnxruntime can agree with torch bit for bit)
    with pytest.raises(ExportError, match="max abs"):
        bnrewrite.export_onnx(Drifts(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")


@pytest.mark.parametrize("bad", [{"tolerance": -1.0}, {"tolerance": 0}, {"opset": 5}, {"opset": "17"}])
def test_bad_tolerance_or_opset_is_an_input_error(tmp_path, bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "b.onnx", **bad)


def test_a_folder_or_a_missing_folder_as_the_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is a folder; pass the path of the .onnx file"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path)
    with pytest.raises(InputError, match="does not exist; create it first"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "no" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_link_is_written_through_and_a_pipe_or_device_is_refused(tmp_path):
    """The verified file moves into place by a rename, which replaced whatever was at the path: a
    link became a file (its target stayed as it was), and ``--out /dev/null`` would have replaced
    the device with an .onnx file. A link's target is written now; a pipe or device is refused."""
    import os

    target = tmp_path / "target.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    report = bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert onnx.load(str(target)).graph.node and report.max_rel_error < 1e-4
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(InputError, match="'.*pipe' exists and is not a regular file"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), pipe)
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_a_folder_that_cannot_be_written_is_an_input_error():
    """/proc takes no new files, even for root: an InputError naming the folder (it was a raw
    OSError from the staging folder, a traceback from the CLI)."""
    with pytest.raises(InputError, match="cannot write into '/proc'"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), "/proc/bnrewrite-test.onnx")


def test_opset_newer_than_onnx_knows_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=f"opset 99 is newer .* newest is {onnx.defs.onnx_opset_version()}"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "b.onnx", opset=99)


def test_file_of_another_opset_than_requested_is_an_export_error(tmp_path, monkeypatch):
    """The dynamo exporter keeps its own opset when it cannot convert to the requested one: an
    exporter that writes another opset than asked fails (auto falls back), naming both."""
    from bnrewrite import export as export_module

    real = export_module._export
    monkeypatch.setattr(export_module, "_export", lambda m, i, p, d, opset, kind: real(m, i, p, d, None, kind))
    with pytest.raises(ExportError, match=r"torchscript: wrote opset 17, not the requested opset 21 \| "
                                          r"dynamo: wrote opset \d+, not the requested opset 21"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "o.onnx", opset=21)
    report = bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "o.onnx", opset=17)
    assert report.opset == 17 and onnx.load(str(tmp_path / "o.onnx")).opset_import[0].version == 17


def test_example_weighing_of_several_sites_exports_a_model_onnxruntime_loads(tmp_path):
    """Several example-weighted sites, each of other statistics: the file matches the folded model."""
    model = small_net().eval()
    x = torch.randn(2, 3, 8, 8)
    report = bnrewrite.export_onnx(model, x, tmp_path / "w.onnx", example_weight=0.25)
    folded = bnrewrite.fold_for_inference(model, example_weight=0.25)
    with torch.no_grad():
        want = folded(x).numpy()
    np.testing.assert_allclose(ort_run(tmp_path / "w.onnx", x.numpy())[0], want, rtol=1e-4, atol=1e-5)
    assert report.max_rel_error <= 1e-4 and "BatchNormalization" not in report.node_counts


def fresh_two_bn_net():
    """Two BatchNorms with equal constants (fresh: γ=1, β=0, mean 0, var 1), as in any model
    built with ``weights=None``."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()


def example_weighted_output(model, x, alpha):
    """Stock torch, with every BatchNorm2d's output replaced by four-things-bn §3.1 Eq. 3 on its buffers."""
    def weigh(bn, inputs, _):
        h, c = inputs[0], [1, -1, 1, 1]
        mean = alpha * h.mean((2, 3), keepdim=True) + (1 - alpha) * bn.running_mean.reshape(c)
        ema_sq = (bn.running_var + bn.running_mean ** 2).reshape(c)
        sq = alpha * (h * h).mean((2, 3), keepdim=True) + (1 - alpha) * ema_sq
        return (h - mean) / torch.sqrt(sq - mean * mean + bn.eps) * bn.weight.reshape(c) + bn.bias.reshape(c)

    hooks = [m.register_forward_hook(weigh) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            return model.eval()(x).numpy()
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["fresh_two_bn_net", "resnet18"])
def test_example_weighing_of_equal_batchnorms_exports_with_torchscript(tmp_path, name):
    """Equal BatchNorm constants were merged by the TorchScript exporter into one initializer read
    through Identity nodes, and onnxruntime's default graph optimisations then broke the graph
    ("Node input 'onnx::Mul_…' is not a graph input"): the file now loads and matches Eq. 3."""
    if name == "resnet18":
        model = pytest.importorskip("torchvision").models.resnet18(weights=None).eval()
        source, alpha = bnrewrite.fold_for_inference(model, example_weight=0.25), 0.0  # folded by the user
    else:
        model = fresh_two_bn_net()
        source, alpha = model, 0.25
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "w.onnx"
    report = bnrewrite.export_onnx(source, (x,), path, example_weight=alpha, exporter="torchscript")
    assert report.exporter == "torchscript" and report.opset == 17 and report.max_rel_error <= 1e-4
    assert "Identity" not in report.node_counts
    want = example_weighted_output(model, x, 0.25)
    got = ort_run(path, x.numpy())[0]  # a session of its own, with onnxruntime's default optimisations
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 36, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).reshape(4, -1))


def test_model_with_a_fixed_batch_size_says_to_export_a_static_batch(tmp_path):
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(InputError, match=r"does not run at batch size 5 .*dynamic_batch=False \(CLI: --static-batch\)"):
        bnrewrite.export_onnx(FixedBatch().eval(), x, tmp_path / "f.onnx")
    assert bnrewrite.export_onnx(FixedBatch().eval(), x, tmp_path / "f.onnx", dynamic_batch=False).max_rel_error < 1e-4


def test_kept_batch_group_norm_says_to_export_a_static_batch(tmp_path):
    """bgn without running statistics stays in the folded model and groups the examples by the
    batch size: a dynamic batch is refused up front, naming the site; a static one exports."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    model = bnrewrite.transform(net, "bgn:groups=2,examples=2").eval()
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(InputError, match=r"BatchGroupNorm site\(s\) '1' \(track_running_stats=False\).*"
                                         r"dynamic_batch=False \(CLI: --static-batch\)"):
        bnrewrite.export_onnx(model, x, tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's constants: this example's batch size, as asked
        report = bnrewrite.export_onnx(model, x, tmp_path / "g.onnx", dynamic_batch=False)
    assert report.max_rel_error <= 1e-4


def test_tracer_constants_are_a_warning_naming_the_model_line(tmp_path):
    """Verification runs on the example's rows and cannot see a branch the trace froze: say so."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if x.mean() > 0 else -y

    with pytest.warns(UserWarning, match=r"may be right for this input only(.|\n)*test_export.py:\d+") as record:
        bnrewrite.export_onnx(Branchy().eval(), torch.rand(2, 3, 8, 8), tmp_path / "t.onnx", exporter="torchscript")
    assert any(w.filename == __file__ for w in record if "may be right" in str(w.message))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no such warning where nothing is data-dependent
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "s.onnx", exporter="torchscript")


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_unexportable_model_raises_export_error(tmp_path):
    with pytest.raises(ExportError, match="dynamo"):
        bnrewrite.export_onnx(DataDependent(), torch.randn(2, 3), tmp_path / "d.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [None, (), ("text",)])
def test_bad_example_inputs_are_input_errors(tmp_path, bad):
    with pytest.raises(InputError, match="example_inputs"):
        bnrewrite.export_onnx(small_net(), bad, tmp_path / "x.onnx")


def test_unknown_provider_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="providers"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "p.onnx", providers=["NoSuchProvider"])


def test_inspect_onnx_counts_ops_and_normalisation(tmp_path):
    # a graph that still holds a BatchNormalization, written with onnx.helper
    from onnx import TensorProto, helper

    c = 2
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [c], [1.0] * c) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])
    relu = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph([node, relu], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c, 4, 4])], inits)
    path = tmp_path / "bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    summary = inspect_onnx(path)
    assert summary["node_counts"] == {"BatchNormalization": 1, "Relu": 1}
    assert summary["normalisation_nodes"] == {"BatchNormalization": 1}
    assert summary["opset"] == 17 and summary["num_parameters"] == 8
    assert "BatchNormalization×1" in str(summary)
    assert json.loads(json.dumps(summary))["num_nodes"] == 2


def test_inspect_missing_or_broken_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such"):
        inspect_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(InputError, match="not a readable"):
        inspect_onnx(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_exports_and_verifies(tmp_path):
    model = small_net().cuda()
    report = bnrewrite.export_onnx(model, torch.randn(2, 3, 8, 8, device="cuda"), tmp_path / "g.onnx")
    assert report.max_rel_error <= 1e-4


class PoolsUp(nn.Module):
    """AdaptiveAvgPool2d to a larger map than its input: the TorchScript exporter gives up (and its
    C++ side prints the whole IR graph to stdout); the dynamo exporter handles it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d((7, 7))

    def forward(self, x):
        return self.pool(self.bn(self.conv(x)))


def test_exporter_fallback_prints_nothing_on_stdout(tmp_path, capfd):
    with pytest.warns(UserWarning, match="opset"):
        report = bnrewrite.export_onnx(PoolsUp().eval(), torch.randn(2, 3, 3, 3), tmp_path / "p.onnx")
    out = capfd.readouterr().out
    assert report.exporter == "dynamo" and report.max_rel_error <= 1e-4
    assert "Torch IR graph" not in out and out == ""


def test_fallback_to_dynamo_warns_of_the_opset_it_wrote(tmp_path):
    """The exporters' default opsets differ (TorchScript 17, dynamo 18+): a fallback says which
    one the file got, and it is the file's."""
    path = tmp_path / "p.onnx"
    with pytest.warns(UserWarning, match=r"TorchScript exporter failed \(torchscript: .*\), so the dynamo exporter "
                                         r"wrote .*p\.onnx at its default opset (\d+), not the TorchScript "
                                         r"exporter's 17; pass opset=N") as record:
        report = bnrewrite.export_onnx(PoolsUp().eval(), torch.randn(2, 3, 3, 3), path)
    written = next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "")
    assert report.opset == written > 17 and f"default opset {written}," in str(record[0].message)


def test_dynamo_fallback_writes_the_requested_opset_or_no_file(tmp_path, monkeypatch):
    """opset=17 asked, the TorchScript exporter fails, and the dynamo exporter (opset 18+) cannot
    convert ReduceMean's axes down to 17: an ExportError naming both opsets, and no opset-18 file."""
    from bnrewrite import export as export_module

    real = export_module._export

    def torchscript_fails(model, inputs, path, dynamic_batch, opset, kind):
        if kind == "torchscript":
            raise RuntimeError("no TorchScript here")
        return real(model, inputs, path, dynamic_batch, opset, kind)

    monkeypatch.setattr(export_module, "_export", torchscript_fails)
    path = tmp_path / "o.onnx"
    try:
        report = bnrewrite.export_onnx(fresh_two_bn_net(), torch.randn(2, 3, 8, 8), path, example_weight=0.25, opset=17)
    except ExportError as exc:
        assert re.search(r"dynamo: wrote opset \d+, not the requested opset 17", str(exc))
        assert not path.exists()
    else:  # a version converter that can: then the file is opset 17
        assert report.opset == 17 and onnx.load(str(path)).opset_import[0].version == 17


class Drifts(nn.Module):
    """Its output grows with every call, so no file verifies (the trace holds one call's count)."""

    def __init__(self):
        super().__init__()
        self.conv, self.calls = nn.Conv2d(3, 4, 3), 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) * self.calls


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "auto"])
def test_failed_export_leaves_path_as_it_was(tmp_path, exporter):
    """A file that fails verification (with auto: both exporters' files) is not left at path; a
    file that was there before is untouched, and nothing else is left in the folder."""
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="onnxruntime differs from torch"):
        bnrewrite.export_onnx(Drifts(), torch.randn(2, 3, 8, 8), path, exporter=exporter)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"the previous file")
    with pytest.raises(ExportError, match=f"{path}: onnxruntime differs(.|\n)*nothing was written: export with "
                                          "verify=False"):  # named by path, not by the file verified
        bnrewrite.export_onnx(Drifts(), torch.randn(2, 3, 8, 8), path, exporter=exporter)
    assert path.read_bytes() == b"the previous file" and list(tmp_path.iterdir()) == [path]


def test_file_of_another_opset_is_not_left_at_path(tmp_path, monkeypatch):
    from bnrewrite import export as export_module

    real = export_module._export
    monkeypatch.setattr(export_module, "_export", lambda m, i, p, d, opset, kind: real(m, i, p, d, None, kind))
    with pytest.raises(ExportError, match="not the requested opset 21"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), tmp_path / "o.onnx", opset=21)
    assert list(tmp_path.iterdir()) == []


def test_successful_export_replaces_the_file_with_a_plain_files_mode(tmp_path):
    path, plain = tmp_path / "m.onnx", tmp_path / "plain"
    path.write_bytes(b"the previous file")
    plain.write_bytes(b"")
    report = bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), path)
    assert sorted(tmp_path.iterdir()) == [path, plain] and report.path == str(path)
    assert ort_run(path, np.random.randn(3, 3, 8, 8).astype(np.float32))[0].shape == (3, 3)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_dynamo_exporter_that_cannot_reach_the_opset_keeps_stderr_clean(tmp_path, capfd):
    """torch's dynamo exporter and onnxscript log a warning and the version converter's traceback to
    stderr when the conversion to an older opset fails; the ExportError says why instead, and
    nothing reaches stderr (nor a file the path)."""
    path = tmp_path / "old.onnx"
    with pytest.raises(ExportError, match=r"dynamo: wrote opset 18, not the requested opset 12 \(exporter log: .*"
                                          r"RuntimeError: .*Assertion.*\); .*exporter='torchscript'"):
        bnrewrite.export_onnx(small_net(), torch.randn(2, 3, 8, 8), path, exporter="dynamo", opset=12)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert not path.exists()


@pytest.mark.parametrize("exporter", ["auto", "torchscript", "dynamo"])
def test_float64_conv_model_is_an_export_error_saying_float(tmp_path, exporter):
    """onnxruntime's CPU provider has no float64 Conv: a model.double() CNN exports, but no session
    can run it. The error says so and what to do, and leaves no file."""
    with pytest.raises(ExportError, match=r"no float64 implementation .*Conv.*model\.float\(\)"):
        bnrewrite.export_onnx(small_net().double(), torch.randn(2, 3, 8, 8).double(), tmp_path / "d.onnx",
                              exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_float64_model_of_ops_onnxruntime_runs_in_float64_exports(tmp_path):
    """Gemm, Mul and Add have float64 kernels: such a model exports in float64 and onnxruntime
    computes torch's unfolded float64 output."""
    model = randomise(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    bnrewrite.export_onnx(model, x, tmp_path / "d.onnx")
    got = ort_run(tmp_path / "d.onnx", x.numpy())[0]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-12, atol=1e-12)
