"""Issue 2 acceptance on timm: the five models whose top level or blocks do not trace with
plain ``symbolic_trace``, and a sample of others. Every BN is a site; outputs are bitwise equal."""
import pytest
import torch

timm = pytest.importorskip("timm")

import bnrewrite  # noqa: E402
from bnrewrite.runtime.base import is_batchnorm  # noqa: E402
from tests.conftest import assert_same_structure_equal  # noqa: E402

UNTRACEABLE = ["tf_efficientnetv2_b1", "mobilevitv2_050", "efficientvit_b2", "tiny_vit_21m_512",
               "efficientnet_b2_pruned"]
SAMPLE = ["resnet18", "resnet26d", "mobilenetv3_small_100", "efficientnet_b0", "mixnet_s", "regnetx_002",
          "regnety_002", "dla34", "dpn68", "ghostnet_100", "hrnet_w18_small", "rexnet_100", "selecsls42b",
          "res2net50_14w_8s", "skresnet18", "resnest14d", "ese_vovnet19b_dw", "lcnet_050", "mobileone_s0",
          "repvgg_a0", "fbnetc_100", "mnasnet_small", "tinynet_e", "hardcorenas_a", "levit_128s",
          "gernet_s", "fastvit_t8", "repghostnet_050", "efficientformer_l1", "mobilevit_xxs", "tf_mixnet_s"]
# models whose forward only works at their configured resolution
FIXED_SIZE = {"levit_128s", "tiny_vit_21m_512", "efficientformer_l1", "efficientvit_b2", "mobilevitv2_050",
              "mobilevit_xxs", "fastvit_t8"}


def _input_for(model, name):
    size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
    if name not in FIXED_SIZE:
        size = min(size, 96)
    return torch.randn(2, 3, size, size)


def test_plain_symbolic_trace_fails_on_the_untraceable_five():
    """The premise of leaf capture: these really do not trace as a whole."""
    failures = 0
    for name in UNTRACEABLE:
        model = timm.create_model(name, pretrained=False)
        try:
            torch.fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - any trace failure counts
            failures += 1
    assert failures == len(UNTRACEABLE)


@pytest.mark.parametrize("name", UNTRACEABLE + SAMPLE)
def test_every_bn_found_and_outputs_equal(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    x = _input_for(model, name)
    transformed = bnrewrite.transform(model, "bn")
    info = transformed.bnrewrite_info
    bn_names = {n for n, m in model.named_modules() if is_batchnorm(m)}
    assert {s["name"] for s in info.sites} == bn_names
    if name in UNTRACEABLE:
        assert info.regions, "expected leaf regions for a model that does not trace whole"
        assert all(r.reason for r in info.regions)
    assert transformed.state_dict().keys() == model.state_dict().keys()
    for training in (True, False):
        model.train(training)
        transformed.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert_same_structure_equal(expected, transformed(x))
