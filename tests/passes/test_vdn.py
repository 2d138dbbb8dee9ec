"""``vdn``: virtual rows at the graph input, statistics from them, sliced off every output
(bn-sampling §4.2, Alg. 3, Eq. 4)."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torchvision
from torch import nn

import bnrewrite
from bnrewrite.errors import CaptureError, InputError
from bnrewrite.runtime.sampled import SampledBatchNorm
from tests import models
from tests.models import UntraceableRoot


class VirtualStatsBN(nn.Module):
    """Alg. 3 written out: statistics of the first ``nv`` rows normalise every row."""

    def __init__(self, bn, nv):
        super().__init__()
        self.bn, self.nv = bn, nv

    def forward(self, x):
        dims = [0] + list(range(2, x.dim()))
        v = x[:self.nv]
        mean = v.mean(dims, keepdim=True)
        var = ((v - mean) ** 2).mean(dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.bn.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return y * self.bn.weight.view(shape) + self.bn.bias.view(shape)


def _swap_bns(model, nv):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, VirtualStatsBN(m, nv))
    return model


def _strip(value, nv):
    if isinstance(value, torch.Tensor):
        return value[nv:]
    return type(value)(*(_strip(v, nv) for v in value))


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _flat(value):
    return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in _flat(v)]


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 64, 2),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 64, 2),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None), 64, 2),
    # the aux head's 5x5 conv needs the 17x17 grid of a 299 input; one real example keeps it fast
    # (VDN's statistics come from the virtual row, so a batch of one trains)
    "inception_v3": (lambda: torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False),
                     299, 1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vdn_on_torchvision_models(name):
    factory, size, batch = MODELS[name]
    torch.manual_seed(0)
    model = _no_dropout(factory()).double()  # one virtual row's statistics amplify fp32 rounding
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    stats = bnrewrite.dataset_stats(torch.randn(4, 3, 8, 8) * 2 + 1)
    nv = 1
    if name == "inception_v3":
        # the aux head has a BN over a 1x1 map: one virtual row is one value per channel there
        with pytest.raises(InputError, match="AuxLogits.*vdn:n=2"), torch.no_grad():
            bnrewrite.transform(model, "vdn:n=1", data_stats=stats)(x)
        nv = 2
    vdn = bnrewrite.transform(model, f"vdn:n={nv}", data_stats=stats)
    assert all(isinstance(m, SampledBatchNorm) for m in vdn.modules() if hasattr(m, "running_var"))
    assert vdn.state_dict().keys() - model.state_dict().keys() == {
        n + ".sample_schedule" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    reference = _swap_bns(copy.deepcopy(model), nv)

    virtual, rows = [], []

    def record(mod, inp, out):
        virtual.append(out[:nv].clone())
        rows.append(out.shape[0])

    vdn.bnrewrite_vdn_input.register_forward_hook(record)
    with torch.no_grad():
        got = vdn(x)
        # the original forward code, every BN written out as Alg. 3, on [V, x]
        expected = _strip(reference(torch.cat([virtual[0], x])), nv)
    assert type(got) is type(expected)
    assert [t.shape for t in _flat(got)] == [t.shape for t in _flat(expected)]
    assert all(t.shape[0] == batch for t in _flat(got))
    for g, e in zip(_flat(got), _flat(expected)):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-7)
    # eval: nothing changes (running statistics are shared, so compare after the same updates)
    model.load_state_dict(vdn.state_dict(), strict=False)
    model.eval()
    vdn.eval()
    with torch.no_grad():
        assert torch.equal(vdn(x), model(x))
    # nv virtual rows in training, none in eval (inception's eval graph has no aux head and
    # is a separate twin graph without the injector at all)
    assert rows[0] == batch + nv and all(r == batch for r in rows[1:])


class DictAndTupleOut(nn.Module):
    Pair = collections.namedtuple("Pair", "main aux")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = self.bn2(y)
        return {"logits": y.mean((2, 3)), "pair": self.Pair(z, [y.sum(), z[:, 0]]), "n": 3}


def test_outputs_of_any_structure_lose_the_virtual_rows_and_excluded_bn_stays_stock():
    torch.manual_seed(1)
    model = DictAndTupleOut()
    stock = copy.deepcopy(model)
    x = torch.randn(5, 3, 6, 6)
    out = bnrewrite.transform(model, "vdn:n=2", exclude="bn", data_stats=bnrewrite.dataset_stats(x))
    assert out.bn.strategy == "full" and out.bn2.strategy == "vdn"
    got = out(x)
    exp = stock(x)
    assert got.keys() == exp.keys() and got["n"] == 3
    assert isinstance(got["pair"], DictAndTupleOut.Pair) and isinstance(got["pair"].aux, list)
    assert got["logits"].shape == (5, 4) and got["pair"].main.shape == (5, 4, 6, 6)
    assert got["pair"].aux[1].shape == (5, 6, 6)
    # the excluded BN normalises the real rows with their own statistics, as stock BN does
    torch.testing.assert_close(got["logits"], exp["logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.bn.running_mean, stock.bn.running_mean)
    assert not torch.allclose(got["pair"].main, exp["pair"].main, atol=1e-3)  # bn2 uses the virtual rows


def test_sampler_plus_vdn_at_beta_zero_and_full_sample_is_stock():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3),
                          nn.BatchNorm2d(2)).double()
    stock = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out = bnrewrite.transform(model, "fs:ratio=1+vdn:beta=0", data_stats=bnrewrite.dataset_stats(x))
    y0, y1 = stock(x), out(x)
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for p0, p1 in zip(stock.parameters(), out.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-9, atol=1e-10)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(out.state_dict()[key], value, rtol=1e-10, atol=1e-12)


def test_fs_plus_vdn_mixes_statistics_by_eq4():
    torch.manual_seed(3)
    model = nn.Sequential(nn.BatchNorm2d(3))
    x = torch.randn(4, 3, 16, 16)
    out = bnrewrite.transform(model, "fs:ratio=1/4+vdn:n=1,beta=0.5", data_stats=bnrewrite.dataset_stats(x))
    virtual = []
    out.bnrewrite_vdn_input.register_forward_hook(lambda mod, inp, o: virtual.append(o[:1].clone()))
    y = out(x)
    bn = out.get_submodule("0")
    (h0, h1), (w0, w1) = bn.sample_spec((5, 3, 16, 16)).patch
    sample = x[:, :, h0:h1, w0:w1]
    v = virtual[0]
    mean = 0.5 * v.mean((0, 2, 3)) + 0.5 * sample.mean((0, 2, 3))
    var = 0.5 * v.var((0, 2, 3), unbiased=False) + 0.5 * sample.var((0, 2, 3), unbiased=False)
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_virtual_rows_follow_the_data_statistics():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    out = bnrewrite.transform(model, "vdn:n=64", data_stats=(torch.tensor([3.0, -1.0]), torch.tensor([0.5, 2.0])))
    rows = []
    out.bnrewrite_vdn_input.register_forward_hook(lambda mod, inp, o: rows.append(o[:64]))
    torch.manual_seed(0)
    out(torch.zeros(2, 2, 16, 16))
    v = rows[0]
    torch.testing.assert_close(v.mean((0, 2, 3)), torch.tensor([3.0, -1.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(v.std((0, 2, 3)), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0.02)


def test_missing_data_stats_says_how_to_make_it():
    with pytest.raises(InputError, match="dataset_stats"):
        bnrewrite.transform(nn.Sequential(nn.BatchNorm2d(3)), "vdn")


def test_channel_mismatch_is_an_input_error():
    out = bnrewrite.transform(nn.Sequential(nn.BatchNorm2d(3)), "vdn", data_stats=(torch.zeros(2), torch.ones(2)))
    with pytest.raises(InputError, match="data_stats has 2 channels"):
        out(torch.randn(2, 3, 4, 4))


def test_untraceable_top_level_is_a_capture_error_with_the_reason():
    with pytest.raises(CaptureError, match="vdn.*did not trace"):
        bnrewrite.transform(UntraceableRoot(), "vdn", data_stats=(torch.zeros(3), torch.ones(3)))


def test_one_virtual_row_on_a_bn1d_over_features_is_a_clear_error_not_an_explosion():
    """Found by the hypothesis hardening test: vdn:n=1 on BatchNorm1d over (N, C) took its
    statistics from one value per channel (variance 0), so training diverged to inf."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    one = bnrewrite.transform(model, "vdn:n=1", data_stats=([0.0] * 5, [1.0] * 5))
    with pytest.raises(InputError, match="virtual row.*vdn:n=2"):
        one(torch.randn(4, 5))
    two = bnrewrite.transform(model, "vdn:n=2", data_stats=([0.0] * 5, [1.0] * 5))
    out = two(torch.randn(4, 5))
    assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_one_virtual_row_is_refused_at_transform_time_when_shapes_are_known():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(InputError, match="site '1'.*vdn:n=2"):
        bnrewrite.transform(model, "vdn:n=1", data_stats=([0.0] * 5, [1.0] * 5), example_inputs=(torch.randn(4, 5),))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn(self.a(x) + self.b(y))


@pytest.mark.parametrize("recipe", ["vdn:n=2", "fs+vdn"])
def test_second_model_input_is_refused_at_transform_time(recipe):
    # Alg. 3 defines virtual rows for one input batch; adding them to x alone would misalign the batch
    with pytest.raises(InputError, match=r"other inputs besides 'x' \(y\)"):
        bnrewrite.transform(TwoInputs(), recipe, data_stats=([0.0] * 3, [1.0] * 3))


def test_data_statistics_survive_meta_device_init_and_to_empty():
    """Build on meta, transform, to_empty(), load a checkpoint: the data statistics are in no
    checkpoint, so they must come back from the module itself, not from uninitialised memory."""
    torch.manual_seed(0)
    checkpoint = models.ConvBNReLU().state_dict()
    stats = bnrewrite.dataset_stats(torch.randn(64, 3, 8, 8) * 3 + 5)
    with torch.device("meta"):
        model = models.ConvBNReLU()
    model = bnrewrite.transform(model, "vdn:n=2", data_stats=stats)
    model.to_empty(device="cpu")
    model.load_state_dict(checkpoint, strict=True)
    injector = model.bnrewrite_vdn_input
    torch.testing.assert_close(injector.mean, stats.mean.float())
    torch.testing.assert_close(injector.std, stats.std.float())
    model.double()
    torch.testing.assert_close(injector.mean, stats.mean.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recipe, site", [("vdn", "1"), ("fs:ratio=1/2+vdn", "1"), ("vdn", "4")])
def test_a_layer_training_while_the_virtual_rows_are_in_eval_is_refused(recipe, site):
    """model.eval() and then one BatchNorm put back in training: the virtual-row input is in eval
    mode and adds no rows, and the layer took its first real example for the virtual one (0.43 off
    stock BN here, silently). It is refused, naming both modules; with the input module in training
    too, the layer takes its statistics from the virtual rows again. Site "4" is left out of the
    recipe in the third case: a layer kept stock in a vdn model also skips the virtual rows."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 8, 8)
    exclude = "4" if site == "4" else None
    model = bnrewrite.transform(net, recipe, data_stats=bnrewrite.dataset_stats(x * 3 + 5), exclude=exclude)
    model.eval()
    model.get_submodule(site).train()
    with pytest.raises(InputError, match=rf"'{site}' is in training mode but the model's virtual-row input "
                                         r"\('bnrewrite_vdn_input'\) is in eval mode"):
        model(x)
    model.bnrewrite_vdn_input.train()
    seen = {}
    model.get_submodule(site).register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    assert model(x).shape == (4, 4, 8, 8)
    assert seen["x"].shape[0] == 5  # one virtual row in front of the real batch


def test_a_frozen_layer_in_a_training_vdn_model_normalises_with_its_running_statistics():
    """The converse: model.train() and one layer frozen with .eval() (fine-tuning). The batch holds
    the virtual rows, which the frozen layer normalises like every other row, with its running
    statistics; they do not move, and the real rows' output is stock eval BatchNorm's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8)
    model = bnrewrite.transform(copy.deepcopy(net).train(), "vdn", data_stats=bnrewrite.dataset_stats(x))
    model.get_submodule("1").eval()
    before = model.get_submodule("1").running_mean.clone()
    net.eval()
    torch.testing.assert_close(model(x), net(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(model.get_submodule("1").running_mean, before)


def test_an_eval_model_transformed_with_vdn_adds_no_rows_in_eval():
    """The virtual-row modules are made after capture; they took nn.Module's default (training) in
    a model transformed in eval mode, so every eval forward drew virtual rows (consuming the global
    RNG) and prepended them: a BatchNorm without running statistics, which normalises with the
    batch's, was 0.49 off stock. They now take the model's mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    x = torch.randn(4, 3, 6, 6)
    model = bnrewrite.transform(copy.deepcopy(net), "vdn:n=2", data_stats=bnrewrite.dataset_stats(x * 3 + 5))
    assert not model.training and not model.bnrewrite_vdn_input.training and not model.bnrewrite_vdn_output.training
    state = torch.get_rng_state()
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)  # no virtual rows drawn
    model.train()
    assert model.bnrewrite_vdn_input.training
