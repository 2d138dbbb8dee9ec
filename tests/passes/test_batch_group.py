"""The ``bgn`` recipe component: rewriting, options, combinations, folding."""
import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import RecipeError
from bnrewrite.recipe import parse_recipe
from bnrewrite.runtime.base import is_batchnorm
from bnrewrite.runtime.batch_group import BatchGroupNorm


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def _norms(model):
    return [m for m in model.modules() if isinstance(m, BatchGroupNorm)]


def test_rewrites_with_groups_per_layer_and_keeps_state_dict():
    model = small_cnn()
    bgn = bnrewrite.transform(model, "bgn:groups=8,examples=2")
    norms = _norms(bgn)
    assert [m.groups for m in norms] == [6, 8]  # 12 channels: largest divisor <= 8 is 6
    assert "using 6" in norms[0].describe()["note"]
    assert all(m.examples == 2 for m in norms)
    bgn.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(bgn.state_dict(), strict=True)


def test_groups_equal_channels_and_examples_equal_batch_trains_like_stock():
    model = small_cnn()
    bgn = bnrewrite.transform(model, "bgn:groups=64,examples=64")
    x = torch.randn(4, 3, 8, 8)
    y_ref, y = model(x), bgn(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), bgn.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("batch", [1, 2])
def test_trains_at_batch_one_and_two_and_folds(batch):
    bgn = bnrewrite.transform(small_cnn(), "bgn:groups=4")
    opt = torch.optim.SGD(bgn.parameters(), lr=0.05)
    for seed in range(4):
        torch.manual_seed(seed)
        loss = bgn(torch.randn(batch, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    bgn.eval()
    x = torch.randn(3, 3, 8, 8)
    folded = bnrewrite.fold_for_inference(bgn)
    assert not any(is_batchnorm(m) for m in folded.modules())
    torch.testing.assert_close(folded(x), bgn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe,match", [
    ("bgn:groups=0", "groups must be >= 1"),
    ("bgn:examples=0", "examples must be >= 1"),
    ("bgn:momentum=0", "momentum"),
    ("bgn+ghost", "pick one normalisation"),
])
def test_bad_recipes(recipe, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(recipe)


def test_combines_with_no_other_component():
    from bnrewrite.registry import VARIANTS
    for other, variant in VARIANTS.items():
        if other == "bgn" or "bgn" in variant.combines_with:
            continue
        with pytest.raises(RecipeError):
            parse_recipe(f"bgn+{other}")


def test_torchvision_resnet18_batch_one():
    torchvision = pytest.importorskip("torchvision")
    bgn = bnrewrite.transform(torchvision.models.resnet18(weights=None, num_classes=10), "bgn")
    assert len(_norms(bgn)) == 20 and all(m.groups == 32 for m in _norms(bgn))
    out = bgn(torch.randn(1, 3, 32, 32))
    out.sum().backward()
    assert torch.isfinite(out).all()
