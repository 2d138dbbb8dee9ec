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
