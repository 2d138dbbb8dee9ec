"""Runtime of Extreme Normalization (extreme-normalization.txt §2.2, §3.1, §3.3, Alg. 1).

References are the paper's formulas written out here in float64 -- ScaleGrad literally as
``StopGradient(r)·Q + StopGradient(S − r·Q)`` -- never the layer's own output. ``gradcheck`` does
not apply to the layer: ScaleGrad defines a gradient that is on purpose *not* the derivative of
the forward value (which is the moving average).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrewrite.errors import InputError, UnsupportedPatternError
from bnrewrite.runtime.extreme import (ExtremeNorm, RotatedExtremeNorm, hadamard_matrix, random_rotation,
                                       rotation_matrix, scale_grad)
from tests import models
from tests.extreme_reference import EPS, paper_scale_grad, reference_brn, sg


# ------------------------------------------------------------------------------------ ScaleGrad
def test_scale_grad_forward_and_backward_by_hand():
    S = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    Q = torch.tensor([[10.0, 20.0, 30.0], [4.0, 5.0, 6.0]], requires_grad=True)
    r = torch.tensor([0.5, 2.0, 0.0], requires_grad=True)
    y = scale_grad(S, Q, r)
    assert torch.equal(y, torch.tensor([[1.0, -2.0, 3.0], [1.0, -2.0, 3.0]]))  # S exactly, broadcast
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y.backward(upstream)
    # d/dQ = r * upstream, by hand
    assert torch.equal(Q.grad, torch.tensor([[0.5, 4.0, 0.0], [2.0, 10.0, 0.0]]))
    assert S.grad is None or torch.count_nonzero(S.grad) == 0
    assert r.grad is None or torch.count_nonzero(r.grad) == 0


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0, 2.5])
def test_scale_grad_matches_paper_formula(rate):
    torch.manual_seed(0)
    S = torch.randn(5, dtype=torch.float64)
    Q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    Q2 = Q.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, dtype=torch.float64)
    ours = scale_grad(S, Q, rate)
    ref = paper_scale_grad(S, Q2, rate)
    assert torch.equal(ours, S.expand(3, 5))
    assert torch.allclose(ours, ref, atol=1e-12)
    ours.backward(g)
    ref.backward(g)
    assert torch.equal(Q.grad, Q2.grad)


def test_scale_grad_second_order_chain():
    """The gradient keeps flowing through Q into what produced it, scaled by r."""
    x = torch.tensor([2.0, 3.0], requires_grad=True)
    y = scale_grad(torch.tensor([7.0, 7.0]), x ** 2, 0.25)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.5]))  # 0.25 * 2x


# ------------------------------------------------------------------------------------ rotations
@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_orthogonal_with_smallest_entries(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h.t() @ h, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 48])
def test_random_rotation_is_orthogonal_and_seeded(n):
    r = random_rotation(n, seed=3)
    assert torch.allclose(r.t() @ r, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(r, random_rotation(n, seed=3))
    assert not torch.equal(r, random_rotation(n, seed=4))


def test_rotation_matrix_falls_back_to_random():
    assert rotation_matrix("hadamard", 16, 0)[1] == "hadamard"
    assert rotation_matrix("hadamard", 12, 0)[1] == "random"
    assert rotation_matrix("random", 16, 0)[1] == "random"
    a, _ = rotation_matrix("random", 16, 0, "layer1")
    b, _ = rotation_matrix("random", 16, 0, "layer2")
    assert not torch.equal(a, b)
    with pytest.raises(InputError):
        hadamard_matrix(12)


# ------------------------------------------------------------------------------------ the layer
def make_layer(cin=3, cout=4, bias=False, groups=1, mode="brn", micro=2, producer=True, **opts):
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias, groups=groups).double()
    bn = nn.BatchNorm2d(cout).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    layer = ExtremeNorm.from_batchnorm(bn, mode=mode, micro=micro, **opts)
    layer.site_name = "bn"
    if producer:
        layer.attach_producer(conv, "conv")
        with torch.no_grad():
            layer.input_mean.uniform_(-0.3, 0.3)
        layer.input_mean_known = True
    return conv, layer


@pytest.mark.parametrize("micro,batch", [(1, 4), (2, 4), (2, 5), (4, 4), (8, 3)])
@pytest.mark.parametrize("opts", [{}, {"r_m": 0.5, "r_v": 0.3, "f_max": 1.2, "u_max": 1.3}])
def test_brn_layer_matches_alg1(micro, batch, opts):
    conv, layer = make_layer(micro=micro, **opts)
    layer.train()
    torch.manual_seed(2)
    spread = torch.linspace(0.5, 3.0, batch, dtype=torch.float64)[:, None, None, None]  # some clipped
    x_in = (torch.randn(batch, 3, 5, 5, dtype=torch.float64) * spread + 0.4).requires_grad_(True)
    mu_bar = layer.input_mean.clone()
    nu_bar = layer.running_var.clone() + EPS
    gamma = layer.weight.detach().clone().requires_grad_(True)
    beta = layer.bias.detach().clone().requires_grad_(True)
    W = conv.weight.detach().clone().requires_grad_(True)
    x_ref = x_in.detach().clone().requires_grad_(True)

    y = layer(conv(x_in), x_in)
    ref, mu, nu = reference_brn(x_ref, W, None, gamma, beta, mu_bar, nu_bar, micro, **opts)
    if opts:
        clip = torch.clamp(opts["u_max"] * torch.sqrt(nu_bar / nu), max=1.0)
        assert (clip < 1).any() and (clip == 1).any()  # the clip is active for some, not all
        assert (nu_bar / nu > opts["f_max"]).any()  # ... and so is the f_max cap
    assert torch.allclose(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for ours, theirs in ((x_in.grad, x_ref.grad), (conv.weight.grad, W.grad),
                         (layer.weight.grad, gamma.grad), (layer.bias.grad, beta.grad)):
        assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-11)
    # EMA update at `rate` of the batch means (§5), running_mean = ΣW·μ̄ (no conv bias)
    rate = layer.rate
    assert torch.allclose(layer.input_mean, (1 - rate) * mu_bar + rate * mu.mean(0).detach(), atol=1e-12)
    assert torch.allclose(layer.running_var + EPS, (1 - rate) * nu_bar + rate * nu.mean(0).detach(), atol=1e-12)
    assert torch.allclose(layer.running_mean, conv.weight.detach().sum((2, 3)) @ layer.input_mean, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1


def test_first_tower_returns_aggregates_and_second_tower_uses_them():
    conv, layer = make_layer(mode="two-tower", r_m=0.7, r_v=0.6)
    layer.train()
    torch.manual_seed(3)
    x_in = torch.randn(3, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    mu_bar, nu_bar = layer.input_mean.clone(), layer.running_var.clone() + EPS
    y_a, mu_dd, nu_dd = layer(conv(x_in), x_in, first_tower=True)
    assert torch.equal(mu_dd, mu_bar) and torch.equal(nu_dd, nu_bar)  # forward values: the EMAs used
    y_b = layer(conv(x_in), x_in, (mu_dd, nu_dd))
    assert torch.equal(y_a, y_b)  # the two towers: equal forward values, bit for bit
    assert int(layer.num_batches_tracked) == 1  # only tower A updates the EMAs
    # gradient of ν‡ reaches x with r_v·min(ν̄/E ν, f_max)/B per example (by hand from §3.2)
    x_ref = x_in.detach().clone().requires_grad_(True)
    W = conv.weight.detach()
    p = F.conv2d(x_ref, W, padding=1) - (paper_scale_grad(mu_bar, x_ref.mean((2, 3)), 0.7) @ W.sum((2, 3)).t())[:, :, None, None]
    nu = (p ** 2).mean((2, 3)) + EPS
    ref = paper_scale_grad(nu_bar, nu.mean(0), 0.6 * torch.clamp(nu_bar / sg(nu.mean(0)), max=2.0))
    c = torch.randn(4, dtype=torch.float64)
    (nu_dd * c).sum().backward()
    (ref * c).sum().backward()
    assert torch.allclose(x_in.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_clip_bounds_normalised_second_moment():
    conv, layer = make_layer(u_max=1.5, micro=1)
    layer.train()
    x_in = torch.randn(4, 3, 6, 6, dtype=torch.float64) * 10  # ν ≫ ν̄: the clip is active
    q = (layer(conv(x_in), x_in) - layer.bias.detach()[None, :, None, None]) / layer.weight.detach()[None, :, None, None]
    assert ((q ** 2).mean((2, 3)) <= 1.5 ** 2 + 1e-9).all()
    assert ((q ** 2).mean((2, 3)) > 1.5 ** 2 - 1e-3).any()


def test_conv_bias_gets_no_gradient_and_is_part_of_the_mean():
    conv, layer = make_layer(bias=True)
    layer.train()
    x_in = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    layer(conv(x_in), x_in).pow(2).sum().backward()
    assert torch.count_nonzero(conv.bias.grad) == 0
    layer.eval()
    expected = conv.weight.detach().sum((2, 3)) @ layer.input_mean + conv.bias.detach()
    assert torch.allclose(layer.output_mean(), expected, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_mean_map_is_the_conv_of_a_constant_image(groups):
    """μ·ΣW (§3.3) is exactly what the conv gives on a constant input with circular padding."""
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 9, 3, padding=1, padding_mode="circular", groups=groups, bias=True).double()
    bn = nn.BatchNorm2d(9).double()
    layer = ExtremeNorm.from_batchnorm(bn, mode="brn")
    layer.attach_producer(conv, "conv")
    mu = torch.randn(6, dtype=torch.float64)
    with torch.no_grad():
        layer.input_mean.copy_(mu)
    layer.input_mean_known = True
    image = mu[None, :, None, None].expand(1, 6, 5, 5)
    assert torch.allclose(layer.output_mean(), conv(image)[0, :, 2, 2], atol=1e-12)
    assert torch.allclose(layer.output_mean(), conv(image)[0, :, 0, 0], atol=1e-12)


def test_linear_producer_per_example_moments():
    torch.manual_seed(5)
    lin = nn.Linear(5, 3).double()
    bn = nn.BatchNorm1d(3).double()
    layer = ExtremeNorm.from_batchnorm(bn, mode="brn", micro=4)
    layer.attach_producer(lin, "lin")
    layer.input_mean_known = True
    layer.train()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = layer(lin(x), x)
    p = x @ lin.weight.detach().t()          # μ̄ = 0: p = Wx (the bias is part of the mean)
    nu_bar = 1 + EPS
    clip = torch.clamp(5 * torch.sqrt(nu_bar / (p ** 2 + EPS)), max=1.0)
    assert torch.allclose(y, p / nu_bar ** 0.5 * clip, atol=1e-12)


def test_no_producer_uses_the_mean_after():
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(4).double()
    layer = ExtremeNorm.from_batchnorm(bn, mode="brn", micro=2, u_max=float("inf"))
    layer.train()
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    mu_bar = layer.running_mean.clone()
    y = layer(x)
    assert torch.allclose(y, (x - mu_bar[None, :, None, None]) / (1 + EPS) ** 0.5, atol=1e-12)
    assert torch.allclose(layer.running_mean, 0.8 * mu_bar + 0.2 * x.mean((0, 2, 3)), atol=1e-12)
    assert "no conv/linear producer" in layer.describe()["mean"]


# ------------------------------------------------------------------------------------ eval / fold interface
def test_eval_is_inference_affine_and_stock_batchnorm_on_the_state():
    conv, layer = make_layer(bias=True)
    layer.eval()
    x_in = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    p0 = conv(x_in)
    scale, shift = layer.inference_affine()
    nu_bar = layer.running_var + EPS
    expected_scale = layer.weight / torch.sqrt(nu_bar)
    mean = conv.weight.sum((2, 3)) @ layer.input_mean + conv.bias
    assert torch.allclose(scale, expected_scale, atol=1e-12)
    assert torch.allclose(shift, layer.bias - mean * expected_scale, atol=1e-12)
    y = layer(p0)
    # a stock BatchNorm loading this layer's BatchNorm keys computes the same eval output
    stock = nn.BatchNorm2d(4).double().eval()
    state = layer.state_dict()
    result = stock.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["input_mean"] and result.missing_keys == []
    assert torch.allclose(stock(p0), y, atol=1e-12)


@pytest.mark.parametrize("mode", ["brn", "two-tower"])
def test_low_precision_input_keeps_its_dtype_like_stock_batchnorm(mode):
    """Under autocast a bfloat16 producer output meets the float32 state: stock BatchNorm returns
    bfloat16; this layer returned float32 in training and eval (the rest of the net then ran in float32)."""
    conv, layer = make_layer(mode=mode)
    conv.float()
    layer.float().train()
    x_in = torch.randn(4, 3, 5, 5)
    out = layer(conv(x_in).bfloat16(), x_in, first_tower=(mode == "two-tower"))
    assert (out[0] if mode == "two-tower" else out).dtype == torch.bfloat16
    layer.eval()
    h = conv(x_in).detach().bfloat16()
    stock = nn.BatchNorm2d(4).eval()
    stock.load_state_dict(layer.state_dict(), strict=False)
    y, want = layer(h), stock(h)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("mode", ["brn", "two-tower"])
def test_mean_times_kernel_sum_stays_float32_under_autocast(mode):
    """μ·ΣW is subtracted from producer outputs close to it (Alg. 1): under CPU bf16 autocast its
    matmul ran in bfloat16 and the output was off by 15% of its range here (outputs near 75, a
    ±1.8 result); now only the output's own bfloat16 rounding is left, as for stock BatchNorm."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():
        conv.weight.uniform_(0.3, 0.7)
    layer = ExtremeNorm.from_batchnorm(nn.BatchNorm2d(4), mode=mode, micro=2)
    layer.site_name = "bn"
    layer.attach_producer(conv, "conv")
    x_in = torch.randn(8, 3, 6, 6) * 0.5 + 50.0
    with torch.no_grad():
        layer.input_mean.copy_(x_in.mean((0, 2, 3)))
    layer.input_mean_known = True
    layer.train()
    reference = copy.deepcopy(layer)
    h = conv(x_in).detach().bfloat16()
    first = mode == "two-tower"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h, x_in, first_tower=first)
    want = reference(h.float(), x_in, first_tower=first)
    y, want = (out[0], want[0]) if first else (out, want)
    assert y.dtype == torch.bfloat16
    assert (y.float() - want).abs().max() <= want.abs().max() * 2 ** -8


def test_rotated_inference_matrix_matches_alg1():
    conv, layer = make_layer(cout=4)
    rot = RotatedExtremeNorm.from_extreme(layer, "hadamard")
    assert rot.weight is layer.weight and rot.input_mean is layer.input_mean and rot.producer is conv
    rot.eval()
    M, shift = rot.inference_matrix()
    R = hadamard_matrix(4)
    s = rot.weight / torch.sqrt(rot.running_var + EPS)
    assert torch.allclose(M, R * s[None, :], atol=1e-12)
    # K = (W ⊙ γ/√ν̄)·R, bias −μ̄·ΣK + β (ConvLayer_Inference)
    K = torch.einsum("ji,icxy->jcxy", R, conv.weight * s[:, None, None, None])
    x_in = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = F.conv2d(x_in, K, -(K.sum((2, 3)) @ rot.input_mean) + rot.bias, padding=1)
    assert torch.allclose(rot(conv(x_in)), expected, atol=1e-12)
    with pytest.raises(UnsupportedPatternError):
        rot.inference_affine()


# ------------------------------------------------------------------------------------ state
def test_unknown_input_mean_keeps_running_mean_until_first_training_batch():
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
    stock_eval = copy.deepcopy(bn).eval()
    layer = ExtremeNorm.from_batchnorm(bn, mode="brn")
    layer.attach_producer(conv, "conv")
    layer.eval()
    x_in = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert torch.allclose(layer(conv(x_in)), stock_eval(conv(x_in)), atol=1e-12)
    layer.train()
    layer.rate = 0.0
    layer(conv(x_in), x_in)
    assert torch.allclose(layer.input_mean, x_in.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(layer.running_mean, conv.weight.sum((2, 3)).detach() @ layer.input_mean, atol=1e-12)


def test_stock_checkpoint_loads_strictly_and_own_checkpoint_round_trips():
    conv, layer = make_layer()
    stock_state = nn.BatchNorm2d(4).double().state_dict()
    layer.load_state_dict(stock_state, strict=True)
    assert not layer.input_mean_known
    _, other = make_layer()
    with torch.no_grad():
        other.input_mean.fill_(0.25)
    layer.load_state_dict(other.state_dict(), strict=True)
    assert layer.input_mean_known and torch.all(layer.input_mean == 0.25)


@pytest.mark.parametrize("recipe", ["brn", "two-tower", "brn+rot"])
def test_checkpoint_saved_before_training_round_trips(recipe):
    """Saved while μ̄ is unknown (stock weights loaded, no training step yet): no input_mean key, so
    the reload is unknown too -- same eval output -- and its first training step restarts μ̄ at that
    batch's mean exactly as the model it was saved from does."""
    import bnrewrite

    torch.manual_seed(0)
    stock = models.ConvBNReLU(bias=True)
    with torch.no_grad():
        stock.bn.running_mean.uniform_(-1, 1)
        stock.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 3, 8, 8)
    a = bnrewrite.transform(models.ConvBNReLU(bias=True), recipe)
    a.load_state_dict(stock.state_dict(), strict=True)
    ckpt = a.state_dict()
    assert "bn.input_mean" not in ckpt
    b = bnrewrite.transform(models.ConvBNReLU(bias=True), recipe)
    b.load_state_dict(ckpt, strict=True)
    assert not b.bn.input_mean_known
    a.eval(), b.eval()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    if recipe != "brn+rot":
        torch.testing.assert_close(b(x), stock.eval()(x))  # still the stock running statistics
    a.train(), b.train()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    assert b.bn.input_mean_known
    torch.testing.assert_close(b.bn.input_mean, x.mean((0, 2, 3)))  # restarted at the batch mean (then EMA)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert "bn.input_mean" in state_b and state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)


def test_training_call_without_producer_input_is_a_clear_error():
    conv, layer = make_layer()
    layer.train()
    with pytest.raises(InputError, match="without the input of its producer 'conv'"):
        layer(conv(torch.randn(2, 3, 5, 5, dtype=torch.float64)))


@pytest.mark.parametrize("bad", [{"micro": 0}, {"rate": 1.5}, {"r_m": -1}, {"f_max": 0}, {"u_max": 0}])
def test_bad_options(bad):
    with pytest.raises(InputError):
        ExtremeNorm(4, **bad)


def test_track_running_stats_false_is_refused():
    with pytest.raises(UnsupportedPatternError):
        ExtremeNorm.from_batchnorm(nn.BatchNorm2d(4, track_running_stats=False))


def test_describe_and_repr():
    conv, layer = make_layer(micro=1)
    info = layer.describe((2, 4, 5, 5))
    assert "per example" in info["mode"] and "before Conv2d 'conv'" in info["mean"]
    assert "mean_before='conv'" in repr(layer)
    rot = RotatedExtremeNorm.from_extreme(make_layer(cout=6)[1], "hadamard")
    assert "random 6x6" in rot.describe()["rotation"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", ["brn+rot", "two-tower+rot"])
def test_a_rotated_16_bit_model_trains_like_its_fp32_twin(recipe, dtype):
    """The layer computes in fp32 and its rotation buffer follows the model to 16 bits: the einsum
    of the two (which does not promote) was a raw 'expected scalar type Float' error."""
    import bnrewrite

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    wide = bnrewrite.transform(net, recipe)
    narrow = copy.deepcopy(wide).to(dtype)
    x = torch.randn(4, 3, 8, 8)
    want, got = wide(x), narrow(x.to(dtype))
    got.float().sum().backward()
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 3e-2
    assert narrow.get_submodule("0").weight.grad.dtype == dtype
