"""tune_example_weight (four-things-bn §3.1) against Eq. 3 written out in the test."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.2, 3.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.3, 0.3)
    return model.eval()


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g) * 1.5 + 0.3
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def _eq3_forward(model, x, alpha):
    """Eq. 3: μ = α E[x] + (1−α) μ_ema; σ² = α E[x²] + (1−α)(σ²_ema + μ²_ema) − μ²."""
    conv, bn = model[0], model[1]
    h = conv(x)
    ex_mean = h.mean(dim=(2, 3), keepdim=True)
    ex_sq = (h * h).mean(dim=(2, 3), keepdim=True)
    rm = bn.running_mean.reshape(1, -1, 1, 1)
    rv = bn.running_var.reshape(1, -1, 1, 1)
    mu = alpha * ex_mean + (1 - alpha) * rm
    var = alpha * ex_sq + (1 - alpha) * (rv + rm * rm) - mu * mu
    h = (h - mu) / torch.sqrt(var + bn.eps) * bn.weight.reshape(1, -1, 1, 1) + bn.bias.reshape(1, -1, 1, 1)
    for layer in list(model)[2:]:
        h = layer(h)
    return h


GRID = (0.0, 0.1, 0.25, 0.5, 1.0)


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_curve_matches_eq3(metric):
    model = _model()
    x, y = _data()
    curve = bnrewrite.tune_example_weight(model, (x, y), metric=metric, grid=GRID, batch_size=16)
    assert curve.alphas == list(GRID)
    with torch.no_grad():
        for alpha, score in zip(GRID, curve.scores):
            out = _eq3_forward(model, x, alpha)
            ref = (out.argmax(1) == y).float().mean().item() if metric == "accuracy" else F.cross_entropy(out, y).item()
            assert score == pytest.approx(ref, abs=1e-5), alpha
    pick = max if metric == "accuracy" else min
    assert curve.best_score == pick(curve.scores)
    assert curve.best_alpha == GRID[curve.scores.index(curve.best_score)]
    assert curve.baseline_score == curve.scores[0]
    assert curve.examples == 40
    assert len(set(round(s, 6) for s in curve.scores)) > 1  # α really changes the model


class _TwoInputs(nn.Module):
    """A model whose forward takes two tensors: `_model()` on their sum."""

    def __init__(self):
        super().__init__()
        self.net = _model()

    def forward(self, a, b):
        return self.net(a + b)


@pytest.mark.parametrize("container", [tuple, list])
def test_a_pair_with_several_inputs_is_the_data_itself(container):
    """``((x1, x2), y)``: the inputs of a model taking two tensors, and the targets. Before, it was
    read as a list of two batches and refused with a message about the data format; a batch of a
    list of batches is a pair, never a tensor, so a pair whose second item is a tensor is the data."""
    model = _TwoInputs().eval()
    x, y = _data()
    x1, x2 = x * 0.5, x * 0.5 + 0.1
    curve = bnrewrite.tune_example_weight(model, (container([x1, x2]), y), metric="loss", grid=GRID, batch_size=16,
                                          example_inputs=(x1[:2], x2[:2]))
    assert curve.examples == 40
    with torch.no_grad():
        for alpha, score in zip(GRID, curve.scores):
            ref = F.cross_entropy(_eq3_forward(model.net, x1 + x2, alpha), y).item()
            assert score == pytest.approx(ref, abs=1e-5), alpha
    with pytest.raises(InputError, match="inputs hold 39 examples but targets 40"):
        bnrewrite.tune_example_weight(model, (container([x1[:39], x2]), y), grid=GRID)


def test_dataloader_callable_metric_and_plot(tmp_path):
    model = _model()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)

    def neg_mse(out, target):
        return -F.mse_loss(out.softmax(1), F.one_hot(target, 5).float()).item()

    path = tmp_path / "alpha.png"
    curve = bnrewrite.tune_example_weight(model, loader, metric=neg_mse, grid=(0.5, 0.0, 0.2), plot=str(path))
    assert curve.alphas == [0.0, 0.2, 0.5] and curve.metric == "neg_mse"
    assert curve.plot_path == str(path) and path.stat().st_size > 0
    with torch.no_grad():
        ref = [neg_mse(_eq3_forward(model, x, a), y) for a in curve.alphas]
    assert curve.scores == pytest.approx(ref, abs=1e-6)
    assert curve.best_score == max(ref)
    lower = bnrewrite.tune_example_weight(model, loader, metric=neg_mse, grid=(0.5, 0.0, 0.2),
                                          higher_is_better=False)
    assert lower.best_score == min(ref)


def test_ties_pick_smallest_alpha_and_model_unchanged():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    curve = bnrewrite.tune_example_weight(model, (x, y), metric=lambda o, t: 1.0, grid=(0.3, 0.1, 0.2))
    assert curve.best_alpha == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_works_on_a_rewritten_model():
    torch.manual_seed(0)
    model = bnrewrite.transform(_model().train(), "ghost:size=4")
    x, y = _data()
    for i in range(0, 40, 8):
        model(x[i:i + 8])
    model.eval()
    curve = bnrewrite.tune_example_weight(model, (x, y), metric="loss", grid=(0.0, 0.2))
    assert all(math.isfinite(s) for s in curve.scores)
    with torch.no_grad():
        assert curve.scores[0] == pytest.approx(F.cross_entropy(model(x), y).item(), abs=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"grid": ()}, "grid is empty"),
    ({"grid": (0.0, 1.5)}, r"\[0, 1\]"),
    ({"metric": "f1"}, "metric must be"),
    ({"grid": ("low", 0.5)}, "grid must be a sequence of numbers"),
    ({"grid": 0.5}, "grid must be a sequence of numbers"),
    ({"grid": (float("nan"),)}, r"\[0, 1\]"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": "8"}, "batch_size must be an int >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an int >= 1"),
    ({"metric": "accuracy", "higher_is_better": False}, "'accuracy' is higher is better"),
    ({"metric": "loss", "higher_is_better": True}, "'loss' is lower is better"),
    ({"plot": "/nonexistent-folder/curve.png"}, "does not exist"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        bnrewrite.tune_example_weight(_model(), _data(), **kwargs)


def test_bad_data():
    with pytest.raises(InputError, match="data must be"):
        bnrewrite.tune_example_weight(_model(), 3)
    x, y = _data()
    with pytest.raises(InputError, match="examples"):
        bnrewrite.tune_example_weight(_model(), (x, y[:3]))


def _untracked(recipe=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
    return (bnrewrite.transform(model, recipe) if recipe else model).eval()


@pytest.mark.parametrize("recipe,kind", [(None, "BatchNorm2d"), ("bgn:groups=2,examples=2", "BatchGroupNorm")])
def test_refuses_a_model_that_example_weighing_does_not_change(recipe, kind):
    """Without running statistics eval normalises with the batch's own (Batch-Group Norm is then kept
    by the fold as it is): α changes nothing, and the flat curve's best α of 0 would mean nothing."""
    model = _untracked(recipe)
    folded = bnrewrite.fold_for_inference(model, example_weight=0.5)
    x, _ = _data()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bnrewrite.fold_for_inference(model)(x))
    with pytest.raises(InputError, match=f"changes no normalisation site.*'1' \\({kind}"):
        bnrewrite.tune_example_weight(model, _data(), grid=(0.0, 0.5))
    with pytest.raises(InputError, match="has no BatchNorm"):
        bnrewrite.tune_example_weight(nn.Sequential(nn.Flatten(), nn.Linear(36, 5)), _data())


def test_warns_about_sites_example_weighing_does_not_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))
    model = bnrewrite.transform(model, "bgn:groups=2,examples=2").eval()
    with pytest.warns(UserWarning, match=r"α does not change 1 of 2 normalisation sites: '4' \(BatchGroupNorm"):
        curve = bnrewrite.tune_example_weight(model, _data(), metric="loss", grid=(0.0, 0.5))
    assert curve.scores[0] != curve.scores[1]  # the tracked site still weighs


def test_tunes_batch_group_norm_with_group_pooled_weighing():
    """A tracked bgn model is tuned on its own rule (moments pooled over channel groups), not the per-channel Eq. 3."""
    from bnrewrite.runtime.batch_group import BatchGroupNorm

    model = bnrewrite.transform(_model().train(), "bgn:groups=2,examples=2")
    x, y = _data()
    for i in range(0, 40, 8):
        model(x[i:i + 8])
    model.eval()
    curve = bnrewrite.tune_example_weight(model, (x, y), metric="loss", grid=(0.0, 0.3))
    layers = [model.get_submodule(str(i)) for i in range(6)]
    assert isinstance(layers[1], BatchGroupNorm)
    layers[1] = layers[1].example_weighted_inference(0.3)
    with torch.no_grad():
        h = nn.Sequential(*layers)(x)
    assert curve.scores[1] == pytest.approx(F.cross_entropy(h, y).item(), abs=1e-5)
