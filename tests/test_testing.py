"""bnrewrite.testing.randomize_batchnorm: makes a fold comparison able to fail."""
import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError
from bnrewrite.testing import randomize_batchnorm


def _net(affine=True, track=True):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=affine, track_running_stats=track), nn.ReLU())


def test_randomize_is_reproducible_and_non_trivial():
    a, b = randomize_batchnorm(_net(), seed=3), randomize_batchnorm(_net(), seed=3)
    assert not a.training
    for key, value in a.state_dict().items():
        if key.startswith("1."):
            torch.testing.assert_close(value, b.state_dict()[key])
    bn = a[1]
    assert bn.running_mean.abs().min() > 0 and not torch.allclose(bn.running_var, torch.ones(4))
    assert not torch.allclose(bn.weight, torch.ones(4)) and bn.bias.abs().min() > 0
    assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 2.0
    c = randomize_batchnorm(_net(), seed=4)[1]
    assert not torch.allclose(c.running_mean, bn.running_mean)


def test_randomize_handles_plain_and_untracked_batchnorm():
    plain = randomize_batchnorm(_net(affine=False))[1]
    assert plain.weight is None and not torch.allclose(plain.running_var, torch.ones(4))
    untracked = randomize_batchnorm(_net(track=False))[1]
    assert untracked.running_mean is None and not torch.allclose(untracked.weight, torch.ones(4))


def test_a_fold_that_drops_the_statistics_fails_on_randomized_batchnorm():
    """With fresh statistics eval BN is nearly the identity; after randomising, dropping the BN
    changes the output, while fold_for_inference does not."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    fresh = _net().eval()
    torch.testing.assert_close(fresh(x), nn.Sequential(fresh[0], fresh[2])(x), rtol=1e-4, atol=1e-4)
    model = randomize_batchnorm(_net())
    assert not torch.allclose(model(x), nn.Sequential(model[0], model[2])(x), atol=1e-2)
    torch.testing.assert_close(bnrewrite.fold_for_inference(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_randomize_reaches_the_runtime_modules_of_a_transformed_model():
    """A rewritten site is no _BatchNorm; it keeps BatchNorm's names, so it must be randomised too."""
    model = bnrewrite.transform(_net(), recipe="fs")
    norm = next(m for m in model.modules() if getattr(m, "is_bnrewrite_norm", False))
    randomize_batchnorm(model, seed=1)
    assert not torch.allclose(norm.running_var, torch.ones(4)) and norm.running_mean.abs().min() > 0
    assert not torch.allclose(norm.weight, torch.ones(4)) and norm.bias.abs().min() > 0
    # the stock twin randomised with the same seed holds the same values under the same names
    stock = randomize_batchnorm(_net(), seed=1)
    for key in ("running_mean", "running_var", "weight", "bias"):
        torch.testing.assert_close(getattr(norm, key), getattr(stock[1], key))


@pytest.mark.parametrize("bad", [{"shift": -0.1}, {"var_range": (0.0, 1.0)}, {"var_range": (2.0, 1.0)}])
def test_randomize_bad_arguments_are_input_errors(bad):
    with pytest.raises(InputError, match="randomize_batchnorm"):
        randomize_batchnorm(_net(), **bad)


@pytest.mark.parametrize("function", [randomize_batchnorm, bnrewrite.inspect_sites, bnrewrite.stock_state_dict])
def test_a_non_module_is_an_input_error_naming_the_function(function):
    with pytest.raises(InputError, match=f"{function.__name__} expects an nn.Module, got dict"):
        function({"weight": torch.ones(1)})
