"""``two-tower`` (extreme-normalization.txt §3.2, §3.4, Alg. 1, §5).

The gradient reference is Alg. 1 written out below in float64 for a 2-layer conv net: both
towers per layer, ScaleGrad as the paper's formula, loss from the second tower.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bnrewrite
from bnrewrite.errors import CaptureError, RecipeError, UnsupportedPatternError
from bnrewrite.runtime.extreme import ExtremeNorm, RotatedExtremeNorm
from tests.extreme_reference import EPS, paper_scale_grad, randomise_extreme_layers, sg
from tests.models import NestedUntraceable, UntraceableRoot


class TwoLayer(nn.Module):
    def __init__(self, c1=4, c2=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def conv_layer_train(x, x2, W, gamma, beta, mu_bar, nu_bar, R, r_m, r_v, f_max, u_max, clip_from_second=False):
    """Alg. 1, ConvLayer_Train(x, x'), line by line (NCHW instead of BHWC)."""
    mu = x.mean((2, 3))                                                   # B x Ci
    mu_d = paper_scale_grad(mu_bar, mu, r_m)
    W_sum = W.sum((2, 3))                                                 # Co x Ci
    p = F.conv2d(x, W, padding=1) - (mu_d @ W_sum.t())[:, :, None, None]
    nu = (p ** 2).mean((2, 3)) + EPS
    nu_d = paper_scale_grad(nu_bar, nu, r_v * torch.clamp(nu_bar / sg(nu), max=f_max))
    clip = sg(torch.clamp(u_max * torch.sqrt(nu_bar / nu), max=1.0))
    q = p / torch.sqrt(nu_d)[:, :, None, None] * clip[:, :, None, None]
    mu_dd = paper_scale_grad(mu_bar, mu.mean(0), r_m)
    nu_dd = paper_scale_grad(nu_bar, nu.mean(0), r_v * torch.clamp(nu_bar / sg(nu.mean(0)), max=f_max))
    p2 = F.conv2d(x2, W, padding=1) - (mu_dd @ W_sum.t())[:, None, None, None].transpose(0, 1).reshape(1, -1, 1, 1)
    if clip_from_second:  # stats_batch < B: per-example ν of the second tower's own examples
        nu2 = sg((p2 ** 2).mean((2, 3)) + EPS)
        clip = sg(torch.clamp(u_max * torch.sqrt(nu_bar / nu2), max=1.0))
    q2 = p2 / torch.sqrt(nu_dd)[None, :, None, None] * clip[:, :, None, None]

    def finish(t):
        t = t * gamma[None, :, None, None]
        if R is not None:
            t = torch.einsum("ji,bihw->bjhw", R, t)
        return torch.relu(t + beta[None, :, None, None])

    return finish(q), finish(q2), mu, nu


def reference_loss(model, x, y, opts, stats_batch=0):
    """Loss of the second tower of a 2-layer net built from Alg. 1, with copies of the model's
    parameters and moving averages (returned so the test can read their gradients)."""
    params = {}

    def leaf(name, t):
        params[name] = t.detach().clone().requires_grad_(True)
        return params[name]

    x_in = leaf("x", x)
    h1, h2 = (x_in[:stats_batch] if stats_batch else x_in), x_in
    moments = {}
    for i, (conv, bn) in enumerate(((model.conv1, model.bn1), (model.conv2, model.bn2)), 1):
        R = bn.rotation if isinstance(bn, RotatedExtremeNorm) else None
        h1, h2, mu, nu = conv_layer_train(h1, h2, leaf(f"conv{i}.weight", conv.weight), leaf(f"bn{i}.weight", bn.weight),
                                          leaf(f"bn{i}.bias", bn.bias), bn.input_mean.clone(),
                                          bn.running_var.clone() + EPS, R, clip_from_second=bool(stats_batch), **opts)
        moments[f"bn{i}"] = (mu, nu)
    logits = F.linear(h2.mean((2, 3)), leaf("head.weight", model.head.weight), leaf("head.bias", model.head.bias))
    return F.cross_entropy(logits, y), params, moments


def prepared(recipe, c2=8, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TwoLayer(c2=c2).to(dtype)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    tm = bnrewrite.transform(model, recipe, example_inputs=(x,))
    torch.manual_seed(seed + 1)
    randomise_extreme_layers(tm)
    return tm.train()


OPTS = {"r_m": 0.7, "r_v": 0.6, "f_max": 1.5, "u_max": 1.4}


@pytest.mark.parametrize("rot", ["", "+rot"])
@pytest.mark.parametrize("c2", [8, 6])
def test_gradients_match_alg1_reference(rot, c2):
    recipe = "two-tower:" + ",".join(f"{k}={v}" for k, v in OPTS.items()) + rot
    tm = prepared(recipe, c2=c2)
    assert isinstance(tm.bn2, RotatedExtremeNorm if rot else ExtremeNorm)
    torch.manual_seed(5)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * torch.tensor([0.5, 1.0, 2.0, 4.0],
                                                                    dtype=torch.float64)[:, None, None, None]
    y = torch.tensor([0, 3, 1, 4])
    ref_loss, params, moments = reference_loss(tm, x, y, OPTS)
    ema_before = {n: (tm.get_submodule(n).input_mean.clone(), tm.get_submodule(n).running_var.clone())
                  for n in ("bn1", "bn2")}
    x_ours = x.clone().requires_grad_(True)
    loss = F.cross_entropy(tm(x_ours), y)  # used like the original model
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    loss.backward()
    ref_loss.backward()
    ours = {name: p.grad for name, p in tm.named_parameters()}
    ours["x"] = x_ours.grad
    for name, ref in params.items():
        assert torch.allclose(ours[name], ref.grad, rtol=1e-9, atol=1e-12), name
        assert ref.grad.abs().max() > 0, name
    for name, (mu, nu) in moments.items():  # EMA at rate 0.2 of tower A's batch means, once
        layer = tm.get_submodule(name)
        mean0, var0 = ema_before[name]
        assert torch.allclose(layer.input_mean, 0.8 * mean0 + 0.2 * mu.mean(0).detach(), atol=1e-12)
        assert torch.allclose(layer.running_var, 0.8 * var0 + 0.2 * (nu.mean(0).detach() - EPS), atol=1e-12)
        assert int(layer.num_batches_tracked) == 1


def test_stats_batch_runs_tower_a_on_the_first_examples():
    opts = {"r_m": 1.0, "r_v": 1.0, "f_max": 2.0, "u_max": 1.4}
    tm = prepared("two-tower:stats_batch=2,u_max=1.4")
    seen = []
    tm.bn1.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0].shape[0], bool(kwargs.get("first_tower")))),
                                 with_kwargs=True)
    torch.manual_seed(6)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3])
    ref_loss, params, _ = reference_loss(tm, x, y, opts, stats_batch=2)
    x_ours = x.clone().requires_grad_(True)
    loss = F.cross_entropy(tm(x_ours), y)
    assert seen == [(2, True), (4, False)]
    loss.backward()
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    ours = dict(tm.named_parameters())
    for name, ref in params.items():
        grad = x_ours.grad if name == "x" else ours[name].grad
        assert torch.allclose(grad, ref.grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("recipe", ["two-tower:u_max=1e6", "two-tower:u_max=1e6+rot"])
def test_towers_have_equal_forward_values_equal_to_inference(recipe):
    tm = prepared(recipe, dtype=torch.float32, c2=6)
    calls = {}
    for name in ("bn1", "bn2"):
        calls[name] = []
        tm.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: calls[name].append(out[0] if isinstance(out, tuple) else out))
    x = torch.randn(4, 3, 6, 6)
    tm.eval()
    with torch.no_grad():
        eval_out = tm(x)
    assert [len(v) for v in calls.values()] == [1, 1]  # eval: one tower
    tm.train()
    train_out = tm(x)
    for name, outs in calls.items():
        inference, tower_a, tower_b = outs
        assert torch.equal(tower_a, tower_b), name  # the towers: the same forward values, bit for bit
        assert torch.allclose(tower_b, inference, rtol=1e-5, atol=1e-6), name
    assert torch.allclose(train_out, eval_out, rtol=1e-5, atol=1e-6)


def test_eval_mode_runs_the_original_graph_and_folds():
    tm = prepared("two-tower+rot", dtype=torch.float32)
    x = torch.randn(3, 3, 6, 6)
    tm(x).sum().backward()  # one step so that the EMAs moved
    tm.eval()
    inf = bnrewrite.fold_for_inference(tm)
    assert inf.bnrewrite_fold_report.counts() == {"into-producer": 2}
    with torch.no_grad():
        ref = tm(x)
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def vgg11_bn_features_net():
    """vgg11_bn's BatchNorm part (torchvision's own ``make_layers(cfgs['A'], batch_norm=True)``,
    exactly ``vgg11_bn().features``) with a small head instead of the 120M-parameter classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    return nn.Sequential(make_layers(cfgs["A"], batch_norm=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, 10))


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_real_models_train_and_fold(name):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10) if name == "resnet18" else vgg11_bn_features_net()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    tm = bnrewrite.transform(model, "two-tower+rot", example_inputs=(x,))
    assert tm.state_dict().keys() >= model.state_dict().keys()
    extra = set(tm.state_dict()) - set(model.state_dict())
    assert extra and all(k.endswith(("input_mean", "rotation")) for k in extra)
    layers = [m for m in tm.modules() if isinstance(m, ExtremeNorm)]
    assert len(layers) == (20 if name == "resnet18" else 8) and all(m.mean_before_conv for m in layers)
    bnrewrite.warm_up_statistics(tm, [x], steps=3)
    opt = torch.optim.SGD(tm.parameters(), lr=0.01)
    tm.train()
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(tm(x), y)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in tm.parameters() if p.grad is not None)
        opt.step()
    tm.eval()
    inf = bnrewrite.fold_for_inference(tm)
    assert not any(isinstance(m, (ExtremeNorm, nn.BatchNorm2d)) for m in inf.modules())
    with torch.no_grad():
        ref = tm(x)
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_stock_checkpoint_loads_strictly():
    model = TwoLayer()
    tm = bnrewrite.transform(model, "two-tower")
    tm.load_state_dict(TwoLayer().state_dict(), strict=True)


def test_untraceable_top_level_is_a_clear_error():
    with pytest.raises(CaptureError, match="two-tower"):
        bnrewrite.transform(UntraceableRoot(), "two-tower")


def test_site_in_leaf_region_is_a_clear_error():
    with pytest.raises(UnsupportedPatternError, match="body.gate.bn"):
        bnrewrite.transform(NestedUntraceable(), "two-tower")
    tm = bnrewrite.transform(NestedUntraceable(), "two-tower", exclude=["body.gate.bn"])
    tm.train()
    tm(torch.randn(2, 3, 8, 8)).sum().backward()


@pytest.mark.parametrize("recipe", ["two-tower+brn", "rot", "two-tower:stats_batch=-1", "two-tower:rate=2"])
def test_bad_recipes(recipe):
    with pytest.raises(RecipeError):
        bnrewrite.transform(TwoLayer(), recipe)


def test_describe_for_inspect():
    tm = bnrewrite.transform(TwoLayer(), "two-tower")
    info = tm.bn1.describe((2, 4, 6, 6))
    assert "two towers" in info["mode"] and "before Conv2d 'conv1'" in info["mean"]
    copied = copy.deepcopy(tm)
    assert copied.bn1.producer is copied.conv1  # the producer link follows deep copies


def test_torch_save_round_trip_keeps_towers_and_producer_links(tmp_path):
    import io

    tm = prepared("two-tower:stats_batch=2+rot", dtype=torch.float32)
    x = torch.randn(4, 3, 6, 6)
    buffer = io.BytesIO()
    torch.save(tm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.bn1.producer is loaded.conv1 and loaded.bn2.producer is loaded.conv2
    tm.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(tm(x), loaded(x))
    tm.train()
    loaded.train()
    assert torch.equal(tm(x), loaded(x))  # two towers (the EMA updates are the same too)
