"""The ``ghost`` recipe component: rewriting, options, combinations, folding."""

import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import RecipeError
from bnrewrite.recipe import parse_recipe
from bnrewrite.runtime.ghost import GhostBatchNorm


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4))


def _norms(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def test_rewrites_every_site_and_keeps_state_dict():
    model = small_cnn()
    ghost = bnrewrite.transform(model, "ghost:size=4")
    assert len(_norms(ghost, GhostBatchNorm)) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ghost.modules())
    assert all(m.size == 4 for m in _norms(ghost, GhostBatchNorm))
    assert ghost.state_dict().keys() == model.state_dict().keys()
    ghost.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(ghost.state_dict(), strict=True)


def test_size_at_least_batch_trains_like_stock_model():
    model = small_cnn()
    ghost = bnrewrite.transform(model, "ghost:size=8")
    x = torch.randn(6, 3, 8, 8)
    y_ref, y = model(x), ghost(x)
    assert torch.equal(y, y_ref)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ghost.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), ghost.buffers()):
        assert torch.equal(b, c), name


def test_small_ghost_batches_change_training_output():
    model = small_cnn()
    ghost = bnrewrite.transform(model, "ghost:size=2")
    x = torch.randn(8, 3, 8, 8)
    assert not torch.allclose(ghost(x), model(x), atol=1e-3)


@pytest.mark.parametrize("option,expect", [("keep", 0.1), ("0.5", 0.5), ("cumulative", None)])
def test_momentum_option(option, expect):
    ghost = bnrewrite.transform(small_cnn(), f"ghost:size=4,momentum={option}")
    assert all(m.momentum == expect for m in _norms(ghost, GhostBatchNorm))


@pytest.mark.parametrize("recipe,match", [
    ("ghost:size=1", "size must be >= 2"),
    ("ghost:size=0", "size must be >= 2"),
    ("ghost:momentum=2", "momentum"),
    ("ghost:momentum=fast", "momentum"),
    ("ghost+bgn", "pick one normalisation"),
    ("ghost+bn", "pick one normalisation"),
])
def test_bad_recipes(recipe, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe)


def test_combines_with_no_other_component():
    from bnrewrite.registry import VARIANTS
    for other, variant in VARIANTS.items():
        if other == "ghost" or "ghost" in variant.combines_with:
            continue
        with pytest.raises(RecipeError):
            parse_recipe(f"ghost+{other}")


def test_folds_after_training_and_with_example_weight():
    ghost = bnrewrite.transform(small_cnn(), "ghost:size=2")
    opt = torch.optim.SGD(ghost.parameters(), lr=0.1)
    for seed in range(3):
        torch.manual_seed(seed)
        loss = ghost(torch.randn(8, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ghost.eval()
    x = torch.randn(5, 3, 8, 8)
    folded = bnrewrite.fold_for_inference(ghost)
    assert not any(bnrewrite.runtime.base.is_batchnorm(m) for m in folded.modules())
    torch.testing.assert_close(folded(x), ghost(x), rtol=1e-5, atol=1e-5)
    weighted = bnrewrite.fold_for_inference(ghost, example_weight=0.2)
    assert torch.isfinite(weighted(x)).all()
    assert not torch.allclose(weighted(x), ghost(x), atol=1e-4)


def test_include_glob_selects_sites():
    ghost = bnrewrite.transform(small_cnn(), "ghost", include="1")
    kinds = [type(m).__name__ for m in ghost.modules() if bnrewrite.runtime.base.is_batchnorm(m)]
    assert kinds == ["GhostBatchNorm", "BatchNorm2d", "BatchNorm1d"]
    assert _norms(ghost, GhostBatchNorm)[0].size == 16


def test_functional_batch_norm_is_kept_with_a_warning():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rm", torch.zeros(3))
            self.register_buffer("rv", torch.ones(3))

        def forward(self, x):
            return nn.functional.batch_norm(x, self.rm, self.rv, training=self.training)

    model = nn.Sequential(Functional(), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match="functional"):
        out = bnrewrite.transform(model, "ghost:size=2")
    assert len(_norms(out, GhostBatchNorm)) == 1


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    ghost = bnrewrite.transform(model, "ghost:size=2")
    assert len(_norms(ghost, GhostBatchNorm)) == 20
    x = torch.randn(4, 3, 32, 32)
    out = ghost(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    ghost.eval()
    torch.testing.assert_close(bnrewrite.fold_for_inference(ghost)(x), ghost(x), rtol=1e-4, atol=1e-4)
