"""Site discovery: every BN call, with producer, consumer, sharing and shapes."""
import warnings

import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.capture import capture
from bnrewrite.sites import find_sites
from tests import models


def _sites(model, x=None):
    return find_sites(capture(model), None if x is None else (x,))


def test_patterns():
    x = torch.randn(2, 3, 8, 8)
    sites = _sites(models.Patterns(), x)
    by = {(s.name, s.call_index): s for s in sites}
    bn1 = by[("bn1", 0)]
    assert (bn1.producer.kind, bn1.producer.name, bn1.consumer.kind) == ("Conv2d", "conv1", "relu")
    assert bn1.input_shape == (2, 8, 8, 8) and bn1.dims == 2 and not bn1.shared
    bn2 = by[("bn2", 0)]
    assert bn2.producer is None, "conv2's output also feeds the add: not a private producer"
    assert bn2.consumer.kind == "relu" and bn2.consumer.inplace
    assert by[("bn_shared", 0)].shared and by[("bn_shared", 1)].shared
    assert by[("bn_shared", 0)].consumer is None
    assert by[("bn_shared", 1)].producer is None
    bn1d = by[("bn1d", 0)]
    assert (bn1d.producer.kind, bn1d.consumer.kind, bn1d.dims, bn1d.input_shape) == ("Linear", "SiLU", 1, (2, 6))
    functional = [s for s in sites if s.functional]
    assert len(functional) == 1 and functional[0].kind == "F.batch_norm"
    assert len(sites) == 6


def test_eager_bn_of_an_untraceable_module_is_still_a_site():
    sites = _sites(models.NestedUntraceable(), torch.randn(2, 3, 8, 8))
    gate = [s for s in sites if s.name == "body.gate.bn"]
    assert len(gate) == 1 and gate[0].graph is None and gate[0].input_shape == (2, 8, 8, 8)
    assert {s.name for s in sites} == {"stem.bn", "body.block.bn", "body.gate.bn"}


@pytest.mark.parametrize("bn, shape", [
    (nn.BatchNorm1d(4), (3, 4, 5)),
    (nn.BatchNorm3d(4, affine=False), (2, 4, 3, 3, 3)),
    (nn.SyncBatchNorm(4), (2, 4, 3, 3)),
    (nn.BatchNorm2d(4, track_running_stats=False), (2, 4, 3, 3)),
])
def test_kinds_and_flags(bn, shape):
    model = nn.Sequential(bn, nn.ReLU6())
    (site,) = _sites(model, torch.randn(*shape))
    assert site.kind == type(bn).__name__
    assert site.affine == bn.affine and site.track_running_stats == bn.track_running_stats
    assert site.consumer.kind == "ReLU6" and site.input_shape == shape


def test_lazy_batchnorm_after_materialisation():
    import bnrewrite

    model = nn.Sequential(nn.LazyConv2d(5, 3), nn.LazyBatchNorm2d(), nn.GELU())
    out = bnrewrite.transform(model, "bn", example_inputs=(torch.randn(2, 3, 6, 6),))
    (site,) = out.bnrewrite_info.sites
    assert site["num_features"] == 5 and site["producer"] == "Conv2d" and site["consumer"] == "GELU"


def test_timm_batchnormact_has_internal_consumer():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.SiLU))
    (site,) = _sites(model, torch.randn(2, 3, 6, 6))
    assert site.kind == "BatchNormAct2d" and site.producer.kind == "Conv2d"
    assert site.consumer.kind == "SiLU" and site.consumer.internal


@pytest.mark.parametrize("recipe", ["fs", "bs", "ghost", "bgn", "brn"])
def test_module_passes_rewrite_a_shared_module_once_and_warn_about_functional_sites(recipe):
    """``Patterns`` has a BN module called twice and a functional F.batch_norm: the module is
    replaced once (both calls then use the variant) and the functional call stays stock, with a
    warning that names it and points at the caller of transform."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = bnrewrite.transform(models.Patterns(), recipe, example_inputs=(torch.randn(4, 3, 6, 6),))
    functional = [w for w in caught if "functional F.batch_norm" in str(w.message)]
    assert len(functional) == 1, [str(w.message) for w in caught]
    assert functional[0].filename == __file__
    assert getattr(model.bn_shared, "is_bnrewrite_norm", False) and model.bn_shared.site_name == "bn_shared"
    model.train()
    model(torch.randn(4, 3, 6, 6))


class _SubclassKeepingForward(nn.BatchNorm2d):
    """A subclass that only adds an attribute: stock BatchNorm's forward."""

    tag = "mine"


class _SubclassWithOwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x).clamp(min=0)


def _parametrized_batchnorm():
    bn = nn.BatchNorm2d(4)
    torch.nn.utils.parametrize.register_parametrization(bn, "bias", nn.Identity())
    return bn


@pytest.mark.parametrize("make, unfaithful", [
    (lambda: nn.BatchNorm2d(4), None), (lambda: nn.BatchNorm1d(4), None), (lambda: nn.LazyBatchNorm2d(), None),
    (lambda: nn.SyncBatchNorm(4), None), (lambda: _SubclassKeepingForward(4), None),
    (lambda: _SubclassWithOwnForward(4), "_SubclassWithOwnForward overrides BatchNorm's forward"),
    (_parametrized_batchnorm, "its bias is parametrized"),
])
def test_unfaithful_reason_tells_the_batchnorms_a_variant_cannot_stand_in_for(make, unfaithful):
    from bnrewrite.sites import unfaithful_reason

    reason = unfaithful_reason(make())
    assert (reason is None) if unfaithful is None else unfaithful in reason


def test_timm_norm_act_and_split_batchnorm():
    """timm's BatchNormAct2d computes stock BN then its drop/act children (which the runtime modules
    apply too); its SplitBatchNorm2d (AugMix's auxiliary BN) normalises each split of the batch with
    its own module: a forward of its own."""
    timm_layers = pytest.importorskip("timm.layers")
    from bnrewrite.sites import unfaithful_reason

    assert unfaithful_reason(timm_layers.BatchNormAct2d(4)) is None
    assert unfaithful_reason(timm_layers.SyncBatchNormAct(4)) is None
    assert "SplitBatchNorm2d overrides BatchNorm's forward" in unfaithful_reason(timm_layers.SplitBatchNorm2d(4))
