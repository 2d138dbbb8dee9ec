"""Issue 4 acceptance on every torchvision classification model with BatchNorm.

Every model (random weights, randomised running statistics and affine parameters so that
folding matters): the folded eval output equals the unfolded eval output within 1e-5
relative (fp32), and no normalisation module is left. A subset covering every family is
also exported to ONNX and run in onnxruntime (no BatchNormalization node, within 1e-4).
"""
import os
import tempfile

import pytest
import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

import bnrewrite
from bnrewrite.testing import randomize_batchnorm


def _bn_models():
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        try:
            with torch.device("meta"):
                model = builder(weights=None)
        except NotImplementedError:
            # regnet computes its widths with .tolist(), which meta tensors cannot do; the test
            # itself asserts that such a model really has BatchNorm
            names.append(name)
            continue
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            names.append(name)
    return names


BN_MODELS = _bn_models()

# Heavy to build and fold (hundreds of MB of weights or >150 sites): still run in CI.
HEAVY = {"efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "regnet_y_128gf",
         "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "regnet_x_16gf", "densenet161", "densenet201",
         "resnet152", "wide_resnet101_2", "resnext101_64x4d", "resnext101_32x8d", "vgg19_bn", "vgg16_bn"}

# One or two per family for the ONNX round trip (export takes seconds per model).
EXPORTED = {"resnet18", "resnext50_32x4d", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
            "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
            "regnet_y_400mf", "shufflenet_v2_x0_5", "vgg11_bn", "wide_resnet50_2"}


def test_all_58_bn_models_are_covered():
    assert len(BN_MODELS) == 58, BN_MODELS
    assert EXPORTED <= set(BN_MODELS)


def _input_for(name):
    size = 75 if name.startswith("inception") else 224 if name.startswith("maxvit") else 32
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _randomise(model):
    return randomize_batchnorm(model, seed=0)


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


@pytest.mark.parametrize("name", _params(BN_MODELS))
def test_fold_matches_eval_and_exports(name):
    torch.manual_seed(0)
    model = _randomise(torchvision.models.get_model(name, weights=None))
    assert any(isinstance(m, _BatchNorm) for m in model.modules())
    x = _input_for(name)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    assert not any(isinstance(m, _BatchNorm) or getattr(m, "is_bnrewrite_norm", False) for m in folded.modules())
    with torch.no_grad():
        got = folded(x)
    rel = ((want - got).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"{name}: folded differs by {rel:.3g} relative"
    report = folded.bnrewrite_fold_report
    assert all(r.action in ("into-producer", "into-consumer", "channel-affine") for r in report.records), report
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # the input model is untouched
    if name not in EXPORTED:
        return
    del model
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        result = bnrewrite.export_onnx(folded, (x[:1],), path)
    assert "BatchNormalization" not in result.node_counts, result.node_counts
    assert not {"BatchNormalization", "InstanceNormalization", "GroupNormalization"} & set(result.node_counts)
    assert result.max_rel_error <= 1e-4, result
    assert result.batch_sizes == [1, 2]
