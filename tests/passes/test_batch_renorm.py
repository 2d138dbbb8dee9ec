"""``brn:micro=m`` (extreme-normalization.txt §5 "improving batch renormalization", "single
examples"; §3.1) and ``bnrewrite.warm_up_statistics`` (§5)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError
from bnrewrite.runtime.extreme import ExtremeNorm
from tests.extreme_reference import EPS, randomise_extreme_layers, reference_brn
from tests.models import NestedUntraceable


class Mixed(nn.Module):
    """Conv→BN→ReLU, a BN after a pooling (no producer), Linear→BN1d→ReLU: every site kind."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.bn_pool = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 16)
        self.bn_fc = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.bn_pool(self.pool(x))
        x = F.relu(self.bn_fc(self.fc(x.mean((2, 3)))))
        return self.out(x)


def cross_example_jacobian(model, x):
    """J[i, j] = max |d out[i] / d x[j]| over output and input entries."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    n = x.shape[0]
    jac = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for k in range(out.shape[1]):
            (g,) = torch.autograd.grad(out[i, k], x, retain_graph=True)
            jac[i] = torch.maximum(jac[i], g.abs().flatten(1).max(1).values.double())
    return jac


@pytest.mark.parametrize("rot", ["", "+rot"])
def test_micro_1_has_no_interaction_between_examples(rot):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    # r_m=0,r_v=0.8: the paper's per-example setting; with r_m=1 the (N, C) BatchNorm1d would pass
    # no gradient at all (an example's mean of one value is the value; see the next test)
    tm = bnrewrite.transform(Mixed(), "brn:micro=1,r_m=0,r_v=0.8" + rot, example_inputs=(x,)).train()
    jac = cross_example_jacobian(tm, x)
    off = jac - torch.diag(torch.diagonal(jac))
    assert torch.count_nonzero(off) == 0  # exactly zero: per-example training
    assert (torch.diagonal(jac) > 0).all()


def test_micro_1_warns_about_2d_inputs_with_mean_gradient():
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match="'bn_fc' normalises \\(N, C\\) inputs"):
        tm = bnrewrite.transform(Mixed(), "brn:micro=1", example_inputs=(x,))
    tm.train()
    h = torch.randn(4, 6, requires_grad=True)
    tm.bn_fc(tm.fc(h), h).sum().backward()
    assert torch.count_nonzero(h.grad) == 0


@pytest.mark.parametrize("rot", ["", "+rot"])
def test_micro_2_interacts_only_within_a_micro_batch(rot):
    torch.manual_seed(1)
    x = torch.randn(5, 3, 8, 8)  # micro-batches {0,1}, {2,3}, {4}
    # r_m=0.5: the last micro-batch has one example (see test_micro_1_warns_...)
    tm = bnrewrite.transform(Mixed(), "brn:micro=2,r_m=0.5" + rot, example_inputs=(x,)).train()
    jac = cross_example_jacobian(tm, x)
    group = torch.tensor([0, 0, 1, 1, 2])
    same = group[:, None] == group[None, :]
    assert torch.count_nonzero(jac[~same]) == 0
    assert (jac[same] > 0).all()
    # stock BatchNorm, for contrast, couples every pair
    assert (cross_example_jacobian(Mixed().train(), x) > 0).all()


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def brn_layer(x, W, gamma, beta, mu_bar, nu_bar, group, r_m, r_v, f_max, u_max):
    """Alg. 1 with one tower and μ‡, ν‡ of micro-batches (§5): x → ReLU(γ q + β)."""
    return torch.relu(reference_brn(x, W, None, gamma, beta, mu_bar, nu_bar, group, r_m, r_v, f_max, u_max)[0])


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_gradients_match_alg1_one_tower_reference(micro):
    opts = {"r_m": 0.5, "r_v": 0.8, "f_max": 1.5, "u_max": 1.4}
    torch.manual_seed(2)
    tm = bnrewrite.transform(TwoLayer().double(), "brn:micro=%d,%s" % (
        micro, ",".join(f"{k}={v}" for k, v in opts.items()))).train()
    randomise_extreme_layers(tm)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * torch.tensor([0.5, 1, 2, 4.0], dtype=torch.float64)[:, None, None, None]
    y = torch.tensor([0, 1, 4, 2])
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in tm.named_parameters()}
    h = x
    for i in (1, 2):
        bn = tm.get_submodule(f"bn{i}")
        h = brn_layer(h, leaves[f"conv{i}.weight"], leaves[f"bn{i}.weight"], leaves[f"bn{i}.bias"],
                      bn.input_mean.clone(), bn.running_var.clone() + EPS, micro, **opts)
    ref = F.cross_entropy(F.linear(h.mean((2, 3)), leaves["head.weight"], leaves["head.bias"]), y)
    loss = F.cross_entropy(tm(x), y)
    assert torch.allclose(loss, ref, rtol=1e-12)
    loss.backward()
    ref.backward()
    for name, p in tm.named_parameters():
        assert torch.allclose(p.grad, leaves[name].grad, rtol=1e-9, atol=1e-12), name


def test_sites_and_descriptions():
    x = torch.randn(2, 3, 8, 8)
    tm = bnrewrite.transform(Mixed(), "brn", example_inputs=(x,))
    assert all(isinstance(tm.get_submodule(n), ExtremeNorm) for n in ("bn1", "bn2", "bn_pool", "bn_fc"))
    assert tm.bn1.mean_before_conv and tm.bn2.mean_before_conv and tm.bn_fc.mean_before_conv
    assert not tm.bn_pool.mean_before_conv
    assert "no conv/linear producer" in tm.bn_pool.describe()["mean"]
    assert "micro-batches of 2" in tm.bn1.describe()["mode"]


def trained(recipe, x, **kwargs):
    tm = bnrewrite.transform(Mixed(), recipe, example_inputs=(x,), **kwargs)
    bnrewrite.warm_up_statistics(tm, [x, x * 2], steps=4)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(tm.train()(x), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    return tm.eval()


def check_onnx(tm, x, path):
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        ref = tm(x)
    report = bnrewrite.export_onnx(tm, (x,), path)
    assert report.normalisation_nodes == {}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("recipe", ["brn", "brn:micro=1,r_m=0,r_v=0.8+rot",
                                    "brn:micro=2,r_m=0.5,r_v=0.5+rot:kind=random"])
def test_fold_and_onnx_match_eval(recipe, tmp_path):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    # bn_pool has no producer: with rot it becomes a ChannelMix (next test)
    tm = trained(recipe, x, exclude=None if "rot" not in recipe else ["bn_pool"])
    with torch.no_grad():
        ref = tm(x)
    inf = bnrewrite.fold_for_inference(tm, example_inputs=(x,))
    counts = inf.bnrewrite_fold_report.counts()
    assert counts.get("into-producer") == 3  # bn1, bn2, bn_fc into their conv/linear
    with torch.no_grad():
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    check_onnx(tm, x, tmp_path / "m.onnx")


def test_rotated_site_without_producer_folds_to_a_channel_mix():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    tm = trained("brn:micro=2+rot", x)
    with torch.no_grad():
        ref = tm(x)
    inf = bnrewrite.fold_for_inference(tm, example_inputs=(x,))
    assert inf.bnrewrite_fold_report.counts() == {"into-producer": 3, "channel-mix": 1}
    with torch.no_grad():
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_rotated_site_without_producer_exports_to_onnx(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(4, 3, 8, 8)
    check_onnx(trained("brn:micro=2+rot", x), x, tmp_path / "m.onnx")


def test_state_dict_keys_and_strict_loading():
    model = Mixed()
    tm = bnrewrite.transform(model, "brn+rot", example_inputs=(torch.randn(2, 3, 8, 8),))
    rotations = {"bn1.rotation", "bn2.rotation", "bn_pool.rotation", "bn_fc.rotation"}
    assert set(tm.state_dict()) - set(model.state_dict()) == rotations  # μ̄ unknown: no input_mean yet
    tm.train()(torch.randn(2, 3, 8, 8))
    extra = set(tm.state_dict()) - set(model.state_dict())
    assert extra == {"bn1.input_mean", "bn2.input_mean", "bn_fc.input_mean"} | rotations
    assert set(model.state_dict()) <= set(tm.state_dict())
    tm.load_state_dict(Mixed().state_dict(), strict=True)  # a stock checkpoint
    tm2 = bnrewrite.transform(Mixed(), "brn+rot", example_inputs=(torch.randn(2, 3, 8, 8),))
    tm2.load_state_dict(tm.state_dict(), strict=True)


def test_leaf_regions_and_eager_sites():
    tm = bnrewrite.transform(NestedUntraceable(), "brn:micro=1", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert tm.stem.bn.mean_before_conv and tm.body.block.bn.mean_before_conv
    assert not tm.body.gate.bn.mean_before_conv  # called from eager code: no producer known
    tm.train()
    tm(torch.randn(2, 3, 8, 8)).sum().backward()
    tm.eval()
    tm(torch.randn(2, 3, 8, 8))


def test_functional_and_untracked_sites_stay_stock():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(self.bn(self.conv(x)), self.rm, self.rv, training=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tm = bnrewrite.transform(Odd(), "brn")
    messages = " ".join(str(w.message) for w in caught)
    assert "functional F.batch_norm" in messages and "track_running_stats=False" in messages
    assert isinstance(tm.bn, nn.BatchNorm2d)


# ------------------------------------------------------------------------------------ warm-up (§5)
def test_warm_up_statistics_fills_averages_without_touching_weights():
    torch.manual_seed(4)
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    tm = bnrewrite.transform(Mixed(), "brn", example_inputs=(x,))
    tm.eval()
    weights = {n: p.detach().clone() for n, p in tm.named_parameters()}
    batches = [(x, torch.zeros(4)), (x, torch.zeros(4))]  # (inputs, targets) pairs, cycled
    assert bnrewrite.warm_up_statistics(tm, batches, steps=30) == 30
    assert not tm.training and not tm.bn1.training  # modes restored
    assert all(torch.equal(p, weights[n]) for n, p in tm.named_parameters())
    assert all(p.grad is None for p in tm.parameters())
    assert int(tm.bn1.num_batches_tracked) == 30
    # 30 steps at rate 0.2 from the first estimate: μ̄ is the batch mean of the conv input
    assert torch.allclose(tm.bn1.input_mean, x.mean((0, 2, 3)), atol=1e-5)
    # ν̄ − ε after n EMA steps from 1 towards E p², p = conv(x) − ΣW·μ̄: E p² + 0.8^n (1 − E p²)
    p = tm.conv1(x) - (tm.conv1.weight.sum((2, 3)) @ tm.bn1.input_mean)[None, :, None, None]
    target = (p ** 2).mean((0, 2, 3)).detach()
    assert torch.allclose(tm.bn1.running_var, target + 0.8 ** 30 * (1 - target), rtol=1e-5)


def test_warm_up_statistics_stops_on_a_one_shot_iterator():
    tm = bnrewrite.transform(Mixed(), "brn", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert bnrewrite.warm_up_statistics(tm, iter([torch.randn(2, 3, 8, 8)] * 3), steps=10) == 3
    with pytest.raises(bnrewrite.InputError):
        bnrewrite.warm_up_statistics(tm, [], steps=5)


@pytest.mark.parametrize("recipe", ["brn", "two-tower"])
def test_a_layer_training_alone_in_an_eval_model_says_why_it_cannot(recipe):
    """model.eval() and one Extreme-Norm layer put back in training: the eval graph does not pass
    the producer's input the training step needs. The refusal said to call the model rather than
    the layer on its own, which the user had done; it now names the mode mix."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 6, 6)
    model = bnrewrite.transform(net, recipe)
    model.eval()
    model.get_submodule("4").train()
    with pytest.raises(InputError, match=r"'4' is in training mode.*cannot be put back in training alone in an "
                                         r"eval model.*or keep this layer in eval mode"):
        model(x)
