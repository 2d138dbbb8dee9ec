"""fold_for_inference: every pattern against stock eval-mode PyTorch, and example weighing
(four-things-bn §3.1, Eq. 3) against the formula written out here."""
import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import bnrewrite
from bnrewrite.errors import InputError, UnsupportedPatternError
from bnrewrite.passes.fold import ChannelAffine, ChannelMix, ExampleWeightedNorm
from bnrewrite.runtime.base import BatchNormState, is_batchnorm
from tests import models


def randomise(model, seed=0):
    """Running statistics and affine parameters far from the identity, so folding matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (_BatchNorm, BatchNormState)):
            n = m.num_features
            with torch.no_grad():
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=g))
                    m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def no_norm_left(model):
    return not any(isinstance(m, _BatchNorm) or getattr(m, "is_bnrewrite_norm", False) for m in model.modules())


def actions(folded):
    return [r.action for r in folded.bnrewrite_fold_report.records]


def fold_with_shapes_from(shapes, model, x):
    """Fold ``model`` knowing the input shapes from ``shapes`` (None: nowhere, "example_inputs",
    or "transform": recorded by a stock-equivalent rewrite); the fold must match eval."""
    with torch.no_grad():
        want = model(x)
    if shapes == "transform":
        model = bnrewrite.transform(model, "bn", example_inputs=(x,)).eval()
    folded = bnrewrite.fold_for_inference(model, example_inputs=(x,) if shapes == "example_inputs" else None)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    return folded


def check(model, *inputs, expected_actions=None, tol=1e-5, shapes=False):
    randomise(model)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        want = model(*inputs)
    folded = bnrewrite.fold_for_inference(model, example_inputs=inputs if shapes else None)
    with torch.no_grad():
        got = folded(*inputs)
    assert rel_err(want, got) <= tol, rel_err(want, got)
    assert no_norm_left(folded)
    assert not folded.training
    # the input model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(is_batchnorm(m) for m in model.modules())
    if expected_actions is not None:
        assert actions(folded) == expected_actions, folded.bnrewrite_fold_report
    return folded


# ---------------------------------------------------------------------------- into the producer
CONV = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def spatial(d, size=6):
    return (size,) * d


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4)], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv_bn_folds_into_conv(dims, groups, cin, cout, bias, dilation):
    conv, bn = CONV[dims]
    model = nn.Sequential(conv(cin, cout, 3, padding=1, groups=groups, bias=bias, dilation=dilation), bn(cout))
    folded = check(model, torch.randn(2, cin, *spatial(dims)), expected_actions=["into-producer"])
    assert folded.get_submodule("0").bias is not None


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4)], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_bn_folds_on_weight_dim_1(dims, groups, cin, cout, bias):
    bn = CONV[dims][1]
    model = nn.Sequential(CONV_T[dims](cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups,
                                       bias=bias), bn(cout))
    check(model, torch.randn(2, cin, *spatial(dims, 4)), expected_actions=["into-producer"])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_folds_into_linear(bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7), nn.ReLU())
    check(model, torch.randn(4, 5), expected_actions=["into-producer"], shapes=True)


@pytest.mark.parametrize("shapes", [None, "example_inputs", "transform"])
@pytest.mark.parametrize("channels,length", [(3, 5), (5, 5)], ids=["L!=C", "L==C"])
@pytest.mark.parametrize("linear_side", ["producer", "consumer"])
def test_bn1d_over_channels_next_to_a_linear_over_the_length_is_not_folded_into_it(linear_side, channels,
                                                                                 length, shapes):
    """On (N, C, L) a Linear maps L while BatchNorm1d(C) normalises dim 1: the Linear does not act
    on the channels. Without shapes the rank is unknown, so it is not folded either. Both sides
    were folded as (N, C), silently wrong for L == C even with the shapes transform recorded
    (consumer side: a raw size-mismatch error for L != C)."""
    if linear_side == "producer":
        model = randomise(nn.Sequential(nn.Linear(length, length), nn.BatchNorm1d(channels)))
    else:
        model = randomise(nn.Sequential(nn.BatchNorm1d(channels), nn.Linear(length, 4)))
    x = torch.randn(2, channels, length)
    folded = fold_with_shapes_from(shapes, model, x)
    assert actions(folded) == ["channel-affine"]
    assert "Linear acts on the last dim" in folded.bnrewrite_fold_report.records[0].reason
    assert no_norm_left(folded)


class FlattenHead(nn.Module):
    """flatten(x, start_dim) -> Linear -> BatchNorm1d(4), or (consumer) flatten -> BatchNorm1d(4) -> Linear."""

    def __init__(self, flatten, start_dim=1, consumer=False):
        super().__init__()
        self.flatten, self.start_dim, self.consumer = flatten, start_dim, consumer
        self.mod = nn.Flatten(start_dim)
        self.fc = nn.Linear(16 if start_dim == 1 else 4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        if self.flatten == "module":
            h = self.mod(x)
        elif self.flatten == "function":
            h = torch.flatten(x, self.start_dim)
        else:
            h = x.flatten(start_dim=self.start_dim)
        return self.out(self.bn(h)) if self.consumer else self.bn(self.fc(h))


@pytest.mark.parametrize("flatten", ["module", "function", "method"])
def test_linear_bn1d_after_a_flatten_folds_without_shapes(flatten):
    """A flatten to (N, features) shows the head is 2-D with no example shapes: the common
    classifier head folds into its Linear (producer) or the next Linear (consumer)."""
    folded = check(FlattenHead(flatten), torch.randn(3, 4, 2, 2), expected_actions=["into-producer"])
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())
    check(FlattenHead(flatten, consumer=True), torch.randn(3, 4, 1, 1), expected_actions=["into-consumer"])


def test_linear_bn1d_after_a_partial_flatten_is_not_folded():
    """flatten(2) keeps (N, C, L): the Linear maps L = 4 and BatchNorm1d(4) normalises C = 4."""
    check(FlattenHead("module", start_dim=2), torch.randn(3, 4, 2, 2), expected_actions=["channel-affine"])


@pytest.mark.parametrize("shapes", ["example_inputs", "transform"])
@pytest.mark.parametrize("linear_side,action", [("producer", "into-producer"), ("consumer", "into-consumer")])
def test_bn1d_on_2d_input_folds_into_its_linear_when_the_rank_is_known(linear_side, action, shapes):
    if linear_side == "producer":
        model = randomise(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    else:
        model = randomise(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4)))
    x = torch.randn(6, 5)
    folded = fold_with_shapes_from(shapes, model, x)
    assert actions(folded) == [action]
    assert no_norm_left(folded) and not any(isinstance(m, ChannelAffine) for m in folded.modules())


def test_non_affine_bn_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    check(model, torch.randn(2, 3, 8, 8), expected_actions=["into-producer"])


def test_bn_with_momentum_none_and_custom_eps_folds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=None))
    check(model, torch.randn(2, 3, 8, 8), expected_actions=["into-producer"])


# ---------------------------------------------------------------------------- pre-activation
class PreAct(nn.Module):
    def __init__(self, layer, features):
        super().__init__()
        self.stem = nn.Conv2d(3, features, 3, padding=1) if not isinstance(layer, nn.Linear) else nn.Linear(3, features)
        self.bn = nn.BatchNorm2d(features) if not isinstance(layer, nn.Linear) else nn.BatchNorm1d(features)
        self.layer = layer

    def forward(self, x):
        h = self.stem(x)
        return self.layer(self.bn(h + 1.0))  # the add keeps the BN away from its producer


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_preactivation_bn_folds_into_unpadded_conv(groups):
    model = PreAct(nn.Conv2d(4, 8, 3, padding=0, groups=groups, bias=groups != 2), 4)
    folded = check(model, torch.randn(2, 3, 7, 7), expected_actions=["into-consumer"])
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())


def test_preactivation_bn_folds_into_linear():
    model = PreAct(nn.Linear(4, 6), 4)
    check(model, torch.randn(5, 3), expected_actions=["into-consumer"], shapes=True)


def test_preactivation_bn_before_padded_conv_stays_affine_and_says_why():
    model = PreAct(nn.Conv2d(4, 8, 3, padding=1), 4)
    folded = check(model, torch.randn(2, 3, 7, 7), expected_actions=["channel-affine"])
    record = folded.bnrewrite_fold_report.records[0]
    assert "pad" in record.reason
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == 1


class AfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.a(x) + self.b(x)))


def test_bn_after_add_becomes_channel_affine():
    folded = check(AfterAdd(), torch.randn(2, 3, 6, 6), expected_actions=["channel-affine"])
    assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == 1


def test_channel_affine_exports_mul_add_not_batchnorm(tmp_path):
    model = randomise(AfterAdd())
    report = bnrewrite.export_onnx(model, (torch.randn(2, 3, 6, 6),), tmp_path / "m.onnx")
    assert "BatchNormalization" not in report.node_counts
    assert report.node_counts.get("Mul", 0) >= 1 and report.node_counts.get("Add", 0) >= 2


# ---------------------------------------------------------------------------- sharing
class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x)) * self.bn(self.c2(x)) + self.bn(x.repeat(1, 2, 1, 1)[:, :4] * 2)


def test_shared_bn_folds_per_call():
    folded = check(SharedBN(), torch.randn(2, 3, 6, 6),
                   expected_actions=["into-producer", "into-producer", "channel-affine"])
    assert [r.site for r in folded.bnrewrite_fold_report.records] == ["bn@0", "bn@1", "bn@2"]


class ProducerTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


def test_producer_with_two_users_keeps_other_user_exact():
    model = randomise(ProducerTwoUsers())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want_bn, want_raw = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        got_bn, got_raw = folded(x)
    assert torch.equal(want_raw, got_raw)  # the other user sees the untouched conv
    assert rel_err(want_bn, got_bn) <= 1e-5
    assert actions(folded) == ["channel-affine"]
    assert "also feeds" in folded.bnrewrite_fold_report.records[0].reason


class SharedProducer(nn.Module):
    """One conv called twice: once before a BN, once raw -- folding must clone it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)), self.conv(x * 2)


def test_shared_producer_is_cloned_before_folding():
    model = randomise(SharedProducer())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        got = folded(x)
    assert rel_err(want[0], got[0]) <= 1e-5
    assert torch.equal(want[1], got[1])
    assert actions(folded) == ["into-producer"]
    assert folded.bnrewrite_fold_report.records[0].target != "conv"


class TiedProducers(nn.Module):
    """Two convs holding one weight Parameter (tied weights), each followed by a BN or not."""

    def __init__(self, both_normalised):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.c2.weight = self.c1.weight
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4) if both_normalised else nn.Identity()

    def forward(self, x):
        return self.bn1(self.c1(x)) + self.bn2(self.c2(x))


class ReadsWeights(nn.Module):
    """A forward that reads the producer's weight, or the BN's own tensors, besides calling them."""

    def __init__(self, reads):
        super().__init__()
        self.conv, self.bn, self.reads = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), reads

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.reads == "producer":
            return y + self.conv.weight.sum()
        return y * self.bn.weight.view(1, -1, 1, 1) + self.bn.running_mean.view(1, -1, 1, 1)


@pytest.mark.parametrize("model", [TiedProducers(False), TiedProducers(True), ReadsWeights("producer"),
                                   ReadsWeights("norm")], ids=["tied", "tied-both", "reads-producer", "reads-norm"])
def test_tensors_read_elsewhere_are_not_changed_by_folding(model, tmp_path):
    """Folding scales a producer's weight: when another conv holds the same Parameter or the forward
    reads it, the producer is cloned first; a norm tensor the forward reads stays on the graph."""
    x = torch.randn(2, 3, 6, 6)
    check(model, x, expected_actions=["into-producer"] * (2 if isinstance(model, TiedProducers)
                                                           and isinstance(model.bn2, nn.BatchNorm2d) else 1))
    folded = bnrewrite.fold_for_inference(model)
    report = bnrewrite.export_onnx(folded, (x,), str(tmp_path / "m.onnx"))
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5 and report.max_abs_error <= 1e-4


class OwnForwardBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2 + 1


def test_a_batchnorm_subclass_with_its_own_forward_is_kept_with_a_warning():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), OwnForwardBatchNorm(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="'1': OwnForwardBatchNorm overrides BatchNorm's forward: not folded"):
        folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5
    assert actions(folded) == ["kept", "into-producer"]
    assert isinstance(folded.get_submodule("1"), OwnForwardBatchNorm)


# ---------------------------------------------------------------------------- parametrized layers
class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _parametrize(layer, how):
    if how == "weight_norm":
        return torch.nn.utils.parametrizations.weight_norm(layer)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Doubled())
    if how == "weight+bias":
        torch.nn.utils.parametrize.register_parametrization(layer, "bias", Doubled())
    return layer


@pytest.mark.parametrize("how", ["weight_norm", "custom", "weight+bias"])
@pytest.mark.parametrize("recipe", [None, "bn", "fs", "cbn:k=2"])
def test_parametrized_producer_is_folded_into_a_plain_weight(recipe, how):
    """A parametrized weight is recomputed on every access: the fold makes it a plain Parameter
    before writing (the write was lost while the bias was updated: 0.56 off, every recipe). The
    source model keeps its parametrization."""
    torch.manual_seed(0)
    model = models.ConvBNReLU(bias=True)
    _parametrize(model.conv, how)
    x = torch.randn(4, 3, 8, 8)
    if recipe:
        model = bnrewrite.transform(model, recipe, example_inputs=(x,))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    randomise(model)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)  # the source model still works as before
    assert actions(folded) == ["into-producer"]
    assert torch.nn.utils.parametrize.is_parametrized(model.get_submodule("conv"))
    assert not torch.nn.utils.parametrize.is_parametrized(folded.get_submodule("conv"))
    # a deployable plain model saves whole: weight_norm's load_state_dict hook (a local function,
    # which pickle refuses) went with the parametrization
    loaded = torch.load(io.BytesIO(_saved(folded)), weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["weight_norm", "weight+bias"])
def test_parametrized_consumer_is_folded_into_a_plain_weight(how):
    model = PreAct(_parametrize(nn.Conv2d(4, 8, 3, padding=0), how), 4)
    check(model, torch.randn(2, 3, 7, 7), expected_actions=["into-consumer"])
    assert torch.nn.utils.parametrize.is_parametrized(model.layer)


@pytest.mark.parametrize("function", ["fold_for_inference", "transform"])
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_hook_based_weight_norm_is_an_input_error(kind, function):
    """Their computed weight is a non-leaf tensor deepcopy refuses: transform (which copies unless
    inplace=True) raised torch's raw "Only Tensors created explicitly by the user" error."""
    model = models.ConvBNReLU(bias=True)
    with pytest.warns(FutureWarning) if kind == "weight_norm" else contextlib.nullcontext():
        getattr(torch.nn.utils, kind)(model.conv)
    model.eval()(torch.randn(1, 3, 8, 8))
    call = bnrewrite.fold_for_inference if function == "fold_for_inference" else \
        (lambda m: bnrewrite.transform(m.train(), "fs"))
    with pytest.raises(InputError, match=f"{function}: 'conv'.*parametrizations.{kind}"):
        call(model)


# ---------------------------------------------------------------------------- functional / eager
class Functional(nn.Module):
    def __init__(self, training_flag=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)
        self.w = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(4))
        self.training_flag = training_flag

    def forward(self, x):
        y = F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, self.training_flag, 0.0, 1e-3)
        z = F.batch_norm(torch.relu(y), self.rm, self.rv, None, None, False, 0.0, 1e-5)
        return z


def test_functional_batch_norm_with_constant_stats_folds():
    model = Functional().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    assert actions(folded) == ["into-producer", "channel-affine"]
    assert not any(n.target is F.batch_norm for n in folded.graph.nodes if n.op == "call_function")


def test_functional_batch_norm_in_training_mode_is_left_with_a_note():
    model = Functional(training_flag=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    with pytest.warns(UserWarning, match="left as is"):
        folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    assert actions(folded) == ["kept", "channel-affine"]
    assert "training=True" in folded.bnrewrite_fold_report.records[0].reason


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Untraceable(nn.Module):
    """Top-level forward with data-dependent control flow: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block()

    def forward(self, x):
        h = self.bn(self.stem(x))
        if h.sum() > 0:
            h = h * 2
        return self.block(h)


def test_untraceable_top_folds_captured_regions_and_swaps_eager_sites():
    folded = check(Untraceable(), torch.randn(2, 3, 6, 6))
    by_site = {r.site: r for r in folded.bnrewrite_fold_report.records}
    assert by_site["block.bn"].action == "into-producer"
    assert by_site["block.bn"].target == "block.conv"  # named in the model, not inside the region's graph
    assert by_site["bn"].action == "channel-affine"
    assert isinstance(folded.get_submodule("bn"), ChannelAffine)


def test_timm_batchnorm_act_keeps_its_activation():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU))
    check(model, torch.randn(2, 3, 6, 6), expected_actions=["into-producer"])


@pytest.mark.parametrize("recipe", ["cbn:k=2", "brn"])
def test_producer_wired_variant_on_batchnorm_act_folds(recipe):
    """cbn and brn call their norm as ``norm(x, producer_input)``; on timm's BatchNormAct2d the
    fold keeps the activation as a post-norm module, which must get ``x`` alone (this used to be
    a raw TypeError from the activation's forward)."""
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU),
                          nn.Conv2d(4, 4, 3, padding=1), timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU))
    x = torch.randn(4, 3, 8, 8)
    transformed = bnrewrite.transform(model, recipe, example_inputs=(x,))
    transformed.train()
    for _ in range(3):
        transformed(x).sum().backward()
    transformed.eval()
    with torch.no_grad():
        want = transformed(x)
    folded = bnrewrite.fold_for_inference(transformed)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    assert no_norm_left(folded)
    assert actions(folded) == ["into-producer", "into-producer"]


def test_transformed_model_folds():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                    nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    transformed = bnrewrite.transform(model, "bn")
    transformed.eval()
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(transformed)
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    assert no_norm_left(folded)
    assert actions(folded) == ["into-producer", "into-producer"]


# ---------------------------------------------------------------------------- runtime module interface
class TwiceNorm(BatchNormState):
    """A stand-in variant whose eval output is twice stock BN (its own folding rule)."""

    def forward_train(self, x):
        return self.stock_forward(x)

    def forward(self, x):
        return self.post_norm(2 * self.stock_forward(x))

    def inference_affine(self):
        scale, shift = super().inference_affine()
        return 2 * scale, 2 * shift


class RotatedNorm(BatchNormState):
    """A stand-in for a rotation variant: eval output is R @ (stock BN) over channels."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        q, _ = torch.linalg.qr(torch.randn(self.num_features, self.num_features, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("rotation", q)

    def forward(self, x):
        y = self.stock_forward(x)
        return torch.einsum("ji,ni...->nj...", self.rotation, y)

    def inference_matrix(self):
        scale, shift = BatchNormState.inference_affine(self)
        return self.rotation * scale[None, :], self.rotation @ shift


class PerExampleNorm(BatchNormState):
    foldable = False

    def forward(self, x):
        return F.instance_norm(x)


def _swap(model, name, cls):
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, cls.from_batchnorm(getattr(owner, child)))


@pytest.mark.parametrize("cls,action", [(TwiceNorm, "into-producer"), (RotatedNorm, "into-producer")])
def test_runtime_modules_fold_through_their_interface(cls, action):
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    _swap(model, "1", cls)
    folded = check(model, torch.randn(2, 3, 6, 6), expected_actions=[action])
    assert not any(isinstance(m, cls) for m in folded.modules())


def test_rotation_after_add_becomes_channel_mix():
    model = randomise(AfterAdd())
    _swap(model, "bn", RotatedNorm)
    folded = check(model, torch.randn(2, 3, 6, 6), expected_actions=["channel-mix"])
    assert sum(isinstance(m, ChannelMix) for m in folded.modules()) == 1


def test_rotation_cannot_fold_into_grouped_conv():
    model = randomise(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)))
    _swap(model, "1", RotatedNorm)
    folded = check(model, torch.randn(2, 4, 6, 6), expected_actions=["channel-mix"])
    assert "grouped" in folded.bnrewrite_fold_report.records[0].reason


def test_unfoldable_runtime_module_is_kept_and_reported():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    _swap(model, "1", PerExampleNorm)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert torch.allclose(want, folded(x), atol=1e-6)
    assert actions(folded) == ["kept"]
    assert "foldable=False" in folded.bnrewrite_fold_report.records[0].reason


# ---------------------------------------------------------------------------- batch statistics / shapes
def test_bn_without_running_stats_normalises_with_batch_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    folded = check(model, torch.randn(3, 3, 6, 6), expected_actions=["batch-statistics"])
    assert no_norm_left(folded)


NO_RUNNING_STATS_RECIPES = ["bn", "fs", "bs:n=2", "ns:n=2", "vdn:n=2", "fs+vdn:n=2", "ghost:size=2", "cbn",
                            "brn", "two-tower", "bgn:groups=2,examples=2"]


@pytest.mark.parametrize("lower", ["reference", "fused"])
@pytest.mark.parametrize("recipe", NO_RUNNING_STATS_RECIPES)
def test_variants_without_running_stats_fold_to_their_eval_output(recipe, lower):
    """track_running_stats=False: eval is stock BatchNorm on the whole batch's statistics (not a
    sample, not ghost batches), and the folded model computes what eval computes. Batch-Group Norm
    keeps its cell statistics in eval (as GroupNorm) and is kept by the fold."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                         nn.Conv2d(8, 4, 1))
    x = torch.randn(8, 3, 16, 16) * 2 + 1
    with torch.no_grad():
        stock = copy.deepcopy(base).eval()(x)
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    model = bnrewrite.transform(copy.deepcopy(base), recipe, example_inputs=(x,), lower=lower, **options)
    model.train()
    for _ in range(3):
        model(x).sum().backward()
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
        folded = bnrewrite.fold_for_inference(model)(x)
    torch.testing.assert_close(folded, evaluated, rtol=1e-5, atol=1e-5)
    if recipe.startswith("bgn"):
        assert not torch.allclose(evaluated, stock, atol=1e-3)  # group statistics, not per channel
        assert actions(bnrewrite.fold_for_inference(model)) == ["kept"]
    else:
        torch.testing.assert_close(evaluated, stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["brn:micro=2", "two-tower", "bn", "fs"])
@pytest.mark.parametrize("layout", ["linear", "conv1x1"])
def test_folding_a_site_forward_does_not_change_the_next_sites_map(recipe, layout):
    """BN (no producer) -> Linear/1x1 conv -> BN: the first folds forward into the layer that is the
    second's producer. Extreme Norm's map depends on its producer's weights (running mean
    ΣW·μ̄ + b), so every map must be read before any weight changes (was 10-26% off)."""
    torch.manual_seed(0)
    if layout == "linear":
        base = nn.Sequential(nn.BatchNorm1d(16), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        x = torch.randn(8, 16) * 3 + 1
    else:
        base = nn.Sequential(nn.BatchNorm2d(16), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 16, 3))
        x = torch.randn(8, 16, 4, 4) * 3 + 1
    model = bnrewrite.transform(base, recipe, example_inputs=(x,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
        folded = bnrewrite.fold_for_inference(model)
        got = folded(x)
    assert actions(folded)[:2] == ["into-consumer", "into-producer"]
    assert rel_err(want, got) <= 1e-5, rel_err(want, got)


@pytest.mark.parametrize("recipe", [None, "fs", "brn"])
@pytest.mark.parametrize("features, shape", [(8, (4, 8, 16, 8)), (6, (2, 8, 4, 6))])
def test_batchnorm2d_before_a_linear_over_the_last_dim_is_not_folded_into_it(recipe, features, shape):
    """Without example shapes a BatchNorm2d's rank is known from its type: a Linear after it acts on
    the width, not the channels (was folded as (N, C): 58% off, or a raw size-mismatch error)."""
    model = randomise(nn.Sequential(nn.BatchNorm2d(8), nn.Linear(features, 5)))
    if recipe:
        model = bnrewrite.transform(model, recipe)
    model.eval()
    x = torch.randn(*shape)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5
    assert actions(folded) == ["channel-affine"]
    assert "4-D input" in folded.bnrewrite_fold_report.records[0].reason


class LinearOn3D(nn.Module):
    """Linear over the last dim, BatchNorm1d over dim 1: the channels do not line up."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_on_3d_input_is_not_folded_when_shapes_are_known():
    model = randomise(LinearOn3D())
    x = torch.randn(2, 5, 5)
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model, example_inputs=(x,))
    with torch.no_grad():
        assert rel_err(want, folded(x)) <= 1e-5
    assert actions(folded) == ["channel-affine"]


# ---------------------------------------------------------------------------- example weighing (§3.1)
def paper_example_weighing(x, bn, alpha):
    """four-things-bn §3.1 Eq. 3, written out: per-example moments mixed with the moving averages."""
    dims = tuple(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    ex_mean = x.mean(dim=dims, keepdim=True) if dims else x
    ex_sq = (x ** 2).mean(dim=dims, keepdim=True) if dims else x ** 2
    mu_ema = bn.running_mean.reshape(shape)
    var_ema = bn.running_var.reshape(shape)
    mu = alpha * ex_mean + (1 - alpha) * mu_ema
    var = alpha * ex_sq + (1 - alpha) * (var_ema + mu_ema ** 2) - mu ** 2
    return (x - mu) / torch.sqrt(var + bn.eps) * bn.weight.reshape(shape) + bn.bias.reshape(shape)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("shape,bn_cls", [((3, 4, 5, 5), nn.BatchNorm2d), ((3, 4), nn.BatchNorm1d),
                                          ((3, 4, 7), nn.BatchNorm1d), ((2, 4, 3, 3, 3), nn.BatchNorm3d)])
def test_example_weighing_matches_paper_formula(alpha, shape, bn_cls):
    bn = randomise(bn_cls(4))
    bn.running_var.abs_()
    model = nn.Sequential(bn)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 0.5
    model.double()
    folded = bnrewrite.fold_for_inference(model, example_weight=alpha)
    assert actions(folded) == ["example-weighted"]
    assert no_norm_left(folded)
    with torch.no_grad():
        got = folded(x)
        want = paper_example_weighing(x, bn, alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 0.5])
@pytest.mark.parametrize("shape,bn_cls", [((2, 4, 8, 8), nn.BatchNorm2d), ((6, 4), nn.BatchNorm1d)])
def test_example_weighing_keeps_float32_precision_when_the_mean_is_large(alpha, shape, bn_cls):
    """Running mean 2000 with std 1 (an un-normalised input, 0–255 pixels say): Eq. 3's σ² written
    as a·E[x²] + (1−a)(σ²_ema + μ²_ema) − μ² cancels in float32 (0.09–0.22 off before). The float32
    fold matches Eq. 3 in float64 on the same inputs to what float32 inputs near 2000 allow."""
    bn = nn.BatchNorm2d(4) if bn_cls is nn.BatchNorm2d else nn.BatchNorm1d(4)
    bn = randomise(bn).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(1990.0, 2010.0)
        bn.running_var.uniform_(0.5, 2.0)
    x = bn.running_mean.reshape([1, -1] + [1] * (len(shape) - 2)) + torch.randn(*shape)
    folded = bnrewrite.fold_for_inference(nn.Sequential(bn), example_weight=alpha)
    with torch.no_grad():
        got = folded(x).double()
        want = paper_example_weighing(x.double(), copy.deepcopy(bn).double(), alpha)
    assert rel_err(want, got) < 1e-4


def test_example_weighing_alpha_one_is_instance_norm():
    bn = randomise(nn.BatchNorm2d(4))
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    folded = bnrewrite.fold_for_inference(nn.Sequential(bn).double(), example_weight=1.0)
    want = F.instance_norm(x, weight=bn.weight.double(), bias=bn.bias.double(), eps=bn.eps)
    torch.testing.assert_close(folded(x).detach(), want.detach(), rtol=1e-10, atol=1e-10)


def test_example_weighing_alpha_zero_is_stock_eval():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    folded = bnrewrite.fold_for_inference(model, example_weight=0.0)
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5
    assert not any(isinstance(m, ExampleWeightedNorm) for m in folded.modules())


def test_example_weighing_depends_on_the_example_itself():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    folded = bnrewrite.fold_for_inference(model, example_weight=0.5)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        alone = folded(x[:1])
        together = folded(x)
    torch.testing.assert_close(alone, together[:1])  # per example: the batch does not matter
    with torch.no_grad():
        assert rel_err(model(x), together) > 1e-3  # and it is not the stock eval output


def test_example_weighing_onnx_matches_formula(tmp_path):
    bn = randomise(nn.BatchNorm2d(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn).eval()
    x = torch.randn(2, 3, 8, 8)
    report = bnrewrite.export_onnx(model, (x,), tmp_path / "ew.onnx", example_weight=0.25)
    assert report.max_rel_error <= 1e-4
    assert "BatchNormalization" not in report.node_counts and report.node_counts["ReduceMean"] >= 2
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "ew.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = paper_example_weighing(model[0](x), bn, 0.25)
    assert rel_err(want, torch.from_numpy(got)) <= 1e-4


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_example_weight_out_of_range_is_an_input_error(alpha):
    with pytest.raises(InputError, match="example_weight"):
        bnrewrite.fold_for_inference(nn.Sequential(nn.BatchNorm2d(2)), example_weight=alpha)


def test_example_weighing_refuses_channel_mixing_norms():
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    _swap(model, "1", RotatedNorm)
    with pytest.raises(UnsupportedPatternError, match="inference_matrix"):
        bnrewrite.fold_for_inference(model, example_weight=0.5)


def test_not_a_module_is_an_input_error():
    with pytest.raises(InputError, match="nn.Module"):
        bnrewrite.fold_for_inference(lambda x: x)


def test_uninitialised_lazy_bn_is_an_input_error():
    with pytest.raises(InputError, match="lazy"):
        bnrewrite.fold_for_inference(nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d()))


def test_model_without_bn_is_returned_as_an_eval_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    folded = bnrewrite.fold_for_inference(model)
    assert folded is not model and not folded.training
    assert folded.bnrewrite_fold_report.records == []


def test_report_prints_every_site():
    folded = check(AfterAdd(), torch.randn(2, 3, 6, 6))
    text = str(folded.bnrewrite_fold_report)
    assert "bn" in text and "channel-affine" in text and "1 normalisation sites" in text
    assert isinstance(folded, fx.GraphModule)


# ---------------------------------------------------------------------------- every registered recipe
class SmallNet(nn.Module):
    """conv→BN (dense and grouped), BN after an add, Linear→BN1d: every fold route."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b2 = nn.BatchNorm2d(8)
        self.b3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.b4 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b3(h + self.b2(self.c2(h)))
        h = torch.relu(h).mean((2, 3))
        return self.out(torch.relu(self.b4(self.fc(h))))


def _registered_recipes():
    from bnrewrite.registry import VARIANTS

    recipes = []
    for name, variant in sorted(VARIANTS.items()):
        if variant.role == "norm":
            recipes.append(name)
        elif variant.role == "stats" and "fs" in VARIANTS:
            recipes.append(f"fs+{name}")
        elif variant.role == "post":
            partner = next((n for n in sorted(variant.combines_with) if VARIANTS.get(n) and VARIANTS[n].role == "norm"), None)
            if partner:
                recipes.append(f"{partner}+{name}")
    return recipes


@pytest.mark.parametrize("recipe", _registered_recipes())
def test_every_registered_recipe_folds_after_training(recipe):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    extra = {"data_stats": bnrewrite.dataset_stats(x)} if "vdn" in recipe else {}
    model = bnrewrite.transform(SmallNet(), recipe, example_inputs=(x,), **extra)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        want = model(x)
    folded = bnrewrite.fold_for_inference(model)
    with torch.no_grad():
        got = folded(x)
    kept = [r for r in folded.bnrewrite_fold_report.records if r.action == "kept"]
    assert rel_err(want, got) <= 1e-5, folded.bnrewrite_fold_report
    assert len(folded.bnrewrite_fold_report.records) == 4
    if not kept:
        assert no_norm_left(folded)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(h), h


class _TrainOnlyHead(_TwoHeads):
    """An output that differs between modes (as StochasticDepth's does): a mode twin, whose eval
    graph vdn does not rewrite, so the eval graph never calls the virtual-row modules."""

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(h) * (0.5 if self.training else 1.0)


@pytest.mark.parametrize("recipe", ["vdn", "fs:ratio=1/4+vdn"])
@pytest.mark.parametrize("net", ["sequential", "two-heads", "mode-twin"])
def test_vdn_virtual_rows_leave_the_folded_model(recipe, net):
    """The virtual-row injector and stripper act in training only: the inference model is a plain
    eval model without them, with the unfolded eval output, and (a flat model) scripts. With a mode
    twin (torchvision's efficientnet_b0) the eval graph never called them, and they stayed."""
    from bnrewrite.runtime.sampled import VirtualRowsInput, VirtualRowsOutput

    torch.manual_seed(0)
    if net == "sequential":
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    else:
        model = _TwoHeads() if net == "two-heads" else _TrainOnlyHead()
    m = bnrewrite.transform(model, recipe, data_stats=([0.3, 0.2, 0.1], [0.4, 0.5, 0.6]))
    x = torch.rand(4, 3, 32, 32)
    out = m(x)
    (out if isinstance(out, torch.Tensor) else out[0]).square().mean().backward()
    folded = bnrewrite.fold_for_inference(m)
    assert not any(isinstance(mod, (VirtualRowsInput, VirtualRowsOutput)) for mod in folded.modules())
    assert not any("vdn" in name for name, _ in folded.named_modules())
    assert all(n.op != "call_module" or "vdn" not in str(n.target) for n in folded.graph.nodes)
    assert no_norm_left(folded) and not folded.training
    m.eval()
    with torch.no_grad():
        want = m(x)
        got = folded(x)
        scripted = torch.jit.script(folded)(x)
    for w, g, sc in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (want, got, scripted))):
        assert rel_err(w, g) <= 1e-5 and rel_err(w, sc) <= 1e-5


def test_example_weighing_uses_a_variants_own_rule():
    """Batch-Group Norm pools its example weighing over channel groups (its
    ``example_weighted_inference``); the fold pass must use that, not the per-channel Eq. 3."""
    import copy

    import bnrewrite
    from bnrewrite.capture import set_submodule
    from bnrewrite.runtime.batch_group import BatchGroupNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    transformed = bnrewrite.transform(model, "bgn:groups=2,examples=2")
    opt = torch.optim.SGD(transformed.parameters(), lr=0.1)
    for _ in range(3):
        loss = transformed(torch.randn(4, 3, 9, 9)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    transformed.eval()
    manual = copy.deepcopy(transformed)
    for name, m in list(manual.named_modules()):
        if isinstance(m, BatchGroupNorm):
            set_submodule(manual, name, m.example_weighted_inference(0.3))
    x = torch.randn(3, 3, 9, 9)
    folded = bnrewrite.fold_for_inference(transformed, example_weight=0.3)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), manual(x), rtol=1e-5, atol=1e-6)
        plain = bnrewrite.fold_for_inference(transformed, example_weight=0.0)
        assert (plain(x) - folded(x)).abs().max() > 1e-3  # the weighing really changed something


def test_torchvision_frozen_batchnorm_folds_into_its_producer():
    """torchvision's FrozenBatchNorm2d (detection backbones) is an eval BatchNorm2d on its buffers;
    it stayed in the folded model as an elementwise affine."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 64, 64)
    folded = bnrewrite.fold_for_inference(model)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(model(x), folded(x)) <= 1e-5
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # the source model is as it was
