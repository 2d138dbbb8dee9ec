"""`bnrewrite demo` end to end on a short schedule: table, plot, folded ONNX verified by onnxruntime."""
import json

import onnx
import pytest

from bnrewrite.cli import main


def test_demo_short_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    code = main(["demo", "--runs", "bn,fs/8+vdn,bgn@2", "--epochs", "2", "--small-batch-epochs", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "test acc" in text and "fs:ratio=1/8+vdn" in text and "ONNX export report" in text
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["bn", "fs/8+vdn", "bgn@2"]
    for run in results["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["step_ms"] > 0
        assert run["sites_rewritten"] == (0 if run["recipe"] == "bn" else run["sites"])
    # two epochs of stock BN on the digits are far above chance (10%)
    assert results["runs"][0]["accuracy"] > 0.5
    assert results["fold_max_abs_diff"] < 1e-4
    model = onnx.load(str(out / "model.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if (out / "training_curves.png").exists():
        assert (out / "training_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("recipe, want", [("cbn", "cbn:burnin=360"), ("cbn:k=2", "cbn:k=2,burnin=360"),
                                          ("naive-cbn", "naive-cbn:burnin=360"), ("cbn:burnin=5", "cbn:burnin=5"),
                                          ("bn", "bn"), ("fs+vdn", "fs+vdn")])
def test_cbn_runs_get_the_papers_burnin(recipe, want):
    import bnrewrite
    from bnrewrite.demo import with_cbn_burnin
    got = with_cbn_burnin(recipe, 360)
    assert got == want
    bnrewrite.parse_recipe(got)


@pytest.mark.parametrize("argv, message", [
    (["--runs", "bn@x"], "'bn@x' is not RECIPE@BATCH"),
    (["--runs", "bn@0"], "'bn@0' is not RECIPE@BATCH"),
    (["--epochs", "0"], "--epochs must be 1 or more"),
    (["--small-batch-epochs", "-1"], "--small-batch-epochs must be 1 or more"),
    (["--device", "nosuch"], "'nosuch' is not a device"),
    (["--out", "FILE/sub"], "cannot create the folder"),
])
def test_bad_demo_options_are_one_error_line_before_any_training(argv, message, tmp_path, capsys):
    """Each was a traceback from inside the training (int(), a ZeroDivisionError, OneCycleLR's
    total_steps, torch.device, os.makedirs), exit 1."""
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["demo", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnrewrite: error: demo ") and message in err and "Traceback" not in err


def test_demo_runs_take_recipes_with_several_options():
    """A recipe's own options are comma-separated like the runs: 'cbn:k=4,burnin=5@4' was split into
    'cbn:k=4' and 'burnin=5@4' (unknown component)."""
    from bnrewrite.cli_demo import _parse_runs

    assert _parse_runs("bn,cbn:k=4,burnin=5@4,fs:ratio=1/8+vdn:n=2,beta=0.3@16") == [
        ("bn", "bn", 32), ("cbn:k=4,burnin=5@4", "cbn:k=4,burnin=5", 4),
        ("fs:ratio=1/8+vdn:n=2,beta=0.3@16", "fs:ratio=1/8+vdn:n=2,beta=0.3", 16)]


def test_a_bad_recipe_in_runs_is_refused_before_the_runs_before_it_train(capsys, monkeypatch):
    """The recipe was parsed when its turn came: 'bn,fs:foo=1@4' trained bn first."""
    import bnrewrite.demo

    monkeypatch.setattr(bnrewrite.demo, "run_demo", lambda **kw: pytest.fail("training started"))
    assert main(["demo", "--no-progress", "--runs", "bn,fs:foo=1@4"]) == 2
    assert "bnrewrite: error: fs: unknown option 'foo'" in capsys.readouterr().err
