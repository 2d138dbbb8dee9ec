"""Issue 2 acceptance: every torchvision classification model with BatchNorm is captured,
every BN call is a site, and ``transform(m, "bn")`` is bitwise the original (train and eval)."""
import pytest
import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import bnrewrite
from tests.conftest import assert_same_structure_equal

# Heavy models stay in the suite (they run in CI) but are marked so they can be deselected locally.
HEAVY = {"efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "regnet_y_128gf",
         "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "densenet161", "densenet201", "resnet152",
         "wide_resnet101_2", "resnext101_64x4d", "resnext101_32x8d", "convnext_large"}


def _bn_models():
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        # cheap check: build on the meta device to count BatchNorm layers
        try:
            with torch.device("meta"):
                model = builder(weights=None)
        except NotImplementedError:  # some initialisers cannot run on meta tensors
            model = builder(weights=None)
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            names.append(name)
    return names


BN_MODELS = _bn_models()


def test_all_58_bn_models_are_covered():
    assert len(BN_MODELS) == 58, BN_MODELS


def _input_for(name):
    # inception's aux head needs 299; maxvit's window partition is fixed for 224
    size = {"inception_v3": 299, "maxvit_t": 224}.get(name, 64)
    return torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in BN_MODELS])
def test_transform_bn_is_bitwise_identical(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    x = _input_for(name)
    transformed = bnrewrite.transform(model, "bn")
    assert transformed.state_dict().keys() == model.state_dict().keys()
    bn_calls = []  # eager BN calls of the train-mode forward; a module called twice counts twice
    hooks = [m.register_forward_pre_hook(lambda mod, inp: bn_calls.append(mod))
             for m in model.modules() if isinstance(m, _BatchNorm)]
    # train mode first: both update running stats identically, then eval compares them too
    for training in (True, False):
        model.train(training)
        transformed.train(training)
        torch.manual_seed(1)
        expected = model(x)
        for h in hooks:
            h.remove()
        hooks = []
        torch.manual_seed(1)
        got = transformed(x)
        assert_same_structure_equal(expected, got)
    for key, value in model.state_dict().items():
        assert torch.equal(value, transformed.state_dict()[key]), key
    sites = transformed.bnrewrite_info.sites
    assert len(sites) == len(bn_calls)
    assert {s["name"] for s in sites} == {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
