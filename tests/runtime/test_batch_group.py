"""BatchGroupNorm against nn.GroupNorm, nn.BatchNorm and §3.4's definition written out."""
import copy

import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError
from bnrewrite.runtime.batch_group import BatchGroupNorm, GroupExampleWeightedNorm, channel_groups_for


def _input(n, c, spatial=(3, 4), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, *spatial, generator=g, dtype=dtype) * 2 + 0.7


def _bgn(c, groups, examples, seed=1, **kw):
    torch.manual_seed(seed)
    m = BatchGroupNorm(c, groups=groups, examples=examples, **kw)
    with torch.no_grad():
        if m.affine:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    return m


def _reference(x, groups, examples, weight, bias, eps):
    """§3.4 written out: example groups of consecutive examples × channel groups of
    consecutive channels; mean and biased variance over everything in the cell."""
    n, c = x.shape[:2]
    per = c // groups
    y = torch.empty_like(x)
    for start in range(0, n, examples):
        ex = slice(start, min(start + examples, n))
        for g in range(groups):
            ch = slice(g * per, (g + 1) * per)
            cell = x[ex, ch]
            mu = cell.mean()
            var = ((cell - mu) ** 2).mean()
            y[ex, ch] = (cell - mu) / torch.sqrt(var + eps)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("n,groups,examples", [(6, 2, 2), (5, 4, 2), (7, 1, 3), (4, 8, 4), (3, 2, 1)])
def test_matches_definition(n, groups, examples):
    m = _bgn(8, groups, examples)
    x = _input(n, 8)
    y = m(x)
    torch.testing.assert_close(y, _reference(x, groups, examples, m.weight.detach(), m.bias.detach(), m.eps),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("spatial", [(3, 4), (5,), (2, 2, 2)])
def test_batch_of_one_is_group_norm(groups, spatial):
    m = _bgn(8, groups, examples=2)
    gn = nn.GroupNorm(groups, 8, eps=m.eps)
    with torch.no_grad():
        gn.weight.copy_(m.weight)
        gn.bias.copy_(m.bias)
    x = _input(1, 8, spatial)
    up = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = m(xa)
    y_ref = gn(xb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y * up).sum().backward()
    (y_ref * up).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.weight.grad, gn.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,examples", [(4, 4), (4, 32), (2, 2)])
@pytest.mark.parametrize("spatial", [(3, 4), ()])
def test_channel_groups_equal_channels_and_all_examples_is_batch_norm(n, examples, spatial):
    bn = nn.BatchNorm2d(6) if spatial else nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    m = BatchGroupNorm.from_batchnorm(copy.deepcopy(bn), groups=6, examples=examples)
    x = _input(n, 6, spatial)
    up = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = m(xa), bn(xb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y * up).sum().backward()
    (y_ref * up).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    m.eval()
    bn.eval()
    torch.testing.assert_close(m(x), bn(x), rtol=1e-5, atol=1e-6)


def test_running_statistics_are_per_channel_like_batch_norm():
    bn = nn.BatchNorm2d(8)
    m = BatchGroupNorm.from_batchnorm(copy.deepcopy(bn), groups=2, examples=2)
    for seed in range(3):
        x = _input(4, 8, seed=seed)
        bn(x)
        m(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("spatial", [(), (1, 1), (3, 3)])
@pytest.mark.parametrize("groups", [1, 4])
def test_no_nan_at_batch_one_and_two(n, spatial, groups):
    m = _bgn(4, groups, examples=2)
    x = _input(n, 4, spatial).requires_grad_(True)
    if n == 1 and groups == 4 and spatial in ((), (1, 1)):  # one value per cell: see below
        with pytest.raises(InputError, match="more than 1 value per channel"):
            m(x)
        return
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    m.eval()
    assert torch.isfinite(m(x)).all()


def test_single_value_cell_outputs_bias():
    m = _bgn(4, 4, examples=2)
    y = m(_input(3, 4, ()))  # the last example group holds one example: cells of one value
    torch.testing.assert_close(y[2:], m.bias.detach().reshape(1, -1))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("groups", [4, 2])
def test_batch_of_one_value_per_cell_is_groupnorms_error(groups):
    """A batch whose every cell is one value (batch 1, groups = C, one position) normalises every
    value to 0 whatever the input: nn.GroupNorm (bgn at batch 1) and nn.BatchNorm raise; so does bgn,
    naming the site, with the running statistics untouched. With C/groups >= 2 values per cell it is
    nn.GroupNorm."""
    m = _bgn(4, groups, examples=1)
    m.site_name = "layer1.bn"
    x = _input(1, 4, ())
    running = m.running_var.clone()
    if groups == 4:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nn.GroupNorm(4, 4)(x)
        with pytest.raises(InputError, match="'layer1.bn'.*more than 1 value per channel"):
            m(x)
    else:
        gn = nn.GroupNorm(groups, 4)
        gn.load_state_dict({"weight": m.weight, "bias": m.bias})
        torch.testing.assert_close(m(x), gn(x))
    assert torch.equal(m.running_var, running)  # one value per channel: no update


def test_eval_pools_running_moments_over_channel_groups():
    m = _bgn(6, 2, examples=2).eval()
    x = _input(3, 6)
    rm, rv = m.running_mean, m.running_var
    y = m(x)
    for g in range(2):
        ch = slice(3 * g, 3 * g + 3)
        mu = rm[ch].mean()
        var = (rv[ch] + rm[ch] ** 2).mean() - mu ** 2
        expect = (x[:, ch] - mu) / torch.sqrt(var + m.eps) * m.weight[ch].reshape(1, -1, 1, 1) \
            + m.bias[ch].reshape(1, -1, 1, 1)
        torch.testing.assert_close(y[:, ch], expect.detach(), rtol=1e-5, atol=1e-5)
    scale, shift = m.inference_affine()
    torch.testing.assert_close(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), y.detach())


def test_example_weighted_inference_is_eq3_over_groups():
    m = _bgn(4, 2, examples=2).eval()
    x = _input(2, 4)
    alpha = 0.3
    y = m.example_weighted_inference(alpha)(x)
    rm, rv = m.running_mean, m.running_var
    for n in range(2):
        for g in range(2):
            ch = slice(2 * g, 2 * g + 2)
            mu = alpha * x[n, ch].mean() + (1 - alpha) * rm[ch].mean()
            sq = alpha * (x[n, ch] ** 2).mean() + (1 - alpha) * (rv[ch] + rm[ch] ** 2).mean()
            expect = (x[n, ch] - mu) / torch.sqrt(sq - mu ** 2 + m.eps) * m.weight[ch].reshape(-1, 1, 1) \
                + m.bias[ch].reshape(-1, 1, 1)
            torch.testing.assert_close(y[n, ch], expect.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.example_weighted_inference(0.0)(x), m(x).detach(), rtol=1e-5, atol=1e-5)
    assert isinstance(m.example_weighted_inference(0.1), GroupExampleWeightedNorm)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 0.5])
def test_example_weighted_inference_keeps_float32_precision_when_the_mean_is_large(alpha):
    """Running means near 2000 with std 1: s_G − m_G² of the float32 module cancels (0.05–0.3 off
    before); written as a sum of non-negative terms it matches Eq. 3 over groups in float64."""
    m = _bgn(4, 2, examples=2).eval()
    with torch.no_grad():
        m.running_mean.uniform_(1990.0, 2010.0)
        m.running_var.uniform_(0.5, 2.0)
    x = m.running_mean.reshape(1, -1, 1, 1) + torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        got = m.example_weighted_inference(alpha)(x).double()
    xd, rm, rv = x.double(), m.running_mean.double(), m.running_var.double()
    weight, bias = m.weight.detach().double(), m.bias.detach().double()
    want = torch.empty_like(xd)
    for n in range(2):
        for g in range(2):
            ch = slice(2 * g, 2 * g + 2)
            mu = alpha * xd[n, ch].mean() + (1 - alpha) * rm[ch].mean()
            sq = alpha * (xd[n, ch] ** 2).mean() + (1 - alpha) * (rv[ch] + rm[ch] ** 2).mean()
            want[n, ch] = (xd[n, ch] - mu) / torch.sqrt(sq - mu ** 2 + m.eps) * weight[ch].reshape(-1, 1, 1) \
                + bias[ch].reshape(-1, 1, 1)
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("channels,groups,expect", [(48, 32, 24), (64, 32, 32), (3, 32, 3), (7, 4, 1), (12, 5, 4)])
def test_groups_that_do_not_divide_use_largest_divisor(channels, groups, expect):
    assert channel_groups_for(channels, groups) == expect
    m = BatchGroupNorm(channels, groups=groups)
    assert m.groups == expect
    info = m.describe((2, channels, 4, 4))
    assert info["channel_groups"] == expect
    assert ("note" in info) == (expect != groups)
    assert torch.isfinite(m(_input(2, channels))).all()


@pytest.mark.parametrize("n,examples", [(4, 2), (5, 2), (1, 2)])
def test_gradcheck_float64(n, examples):
    m = BatchGroupNorm(4, groups=2, examples=examples, dtype=torch.float64)
    x = _input(n, 4, (2, 3), dtype=torch.float64).requires_grad_(True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda i, ww, bb: torch.func.functional_call(m, {"weight": ww, "bias": bb}, (i,)), (x, w, b))


def test_state_dict_loads_both_ways():
    bn = nn.BatchNorm2d(8)
    bn.running_mean.fill_(0.3)
    m = BatchGroupNorm(8, groups=2)
    m.load_state_dict(bn.state_dict(), strict=True)
    nn.BatchNorm2d(8).load_state_dict(m.state_dict(), strict=True)
    assert torch.equal(m.running_mean, bn.running_mean)


def test_bad_options():
    with pytest.raises(InputError):
        BatchGroupNorm(4, groups=0)
    with pytest.raises(InputError):
        BatchGroupNorm(4, examples=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_normalised_in_float32_like_stock(dtype):
    """A bfloat16/float16 input (autocast) with float32 parameters: stock BatchNorm computes in
    float32 and returns the input's dtype; so must Batch-Group Norm, in training and in eval.
    Cell statistics rounded to bfloat16 put the output ~10 rounding steps off (mean near 100)."""
    step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # one rounding step at |y| < 4
    x = (_input(4, 6, seed=3) + 100).to(dtype)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    as_bn = BatchGroupNorm.from_batchnorm(copy.deepcopy(bn), groups=6, examples=4)
    y = as_bn(x)
    assert y.dtype == dtype
    assert (y.float() - bn(x).float()).abs().max() <= 2 * step * 4
    torch.testing.assert_close(as_bn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(as_bn.running_var, bn.running_var, rtol=1e-4, atol=1e-5)
    m = _bgn(6, 2, 2)
    y = m(x)
    ref = _reference(x.float(), 2, 2, m.weight.detach(), m.bias.detach(), m.eps)
    assert y.dtype == dtype and (y.float() - ref).abs().max() <= 2 * step * 4
    m.eval()
    assert m(x).dtype == dtype


@pytest.mark.parametrize("dtype, level, tol", [(torch.float32, 3000.0, 2e-3), (torch.float32, 1e4, 5e-3),
                                              (torch.float16, 300.0, 0.3)])
def test_eval_group_variance_does_not_cancel_at_large_channel_means(dtype, level, tol):
    """E[var + mean²] − μ_G² cancelled: a float32 group variance of 2.0 or 0 where it is 1.25
    (eval output 684 off at means near 1e4), and NaN in float16 at means near 300."""
    stock = nn.Sequential(nn.BatchNorm2d(4))
    means = torch.tensor([level, level + 1, -5.0, -4.0])
    stock[0].running_mean.copy_(means)
    model = bnrewrite.transform(stock, "bgn:groups=2").to(dtype).eval()
    _, group_var = model.get_submodule("0").group_running_moments()
    torch.testing.assert_close(group_var.double(), torch.full((4,), 1.25, dtype=torch.float64), rtol=1e-3, atol=0)
    x = (torch.randn(2, 4, 4, 4) + means.reshape(1, 4, 1, 1)).to(dtype)
    group_mean = torch.tensor([level + 0.5, level + 0.5, -4.5, -4.5], dtype=torch.float64).reshape(1, 4, 1, 1)
    want = (x.double() - group_mean) / (1.25 + 1e-5) ** 0.5  # Batch-Group Norm eval, pooled running statistics
    with torch.no_grad():
        got = model(x).double()
    assert (got - want).abs().max().item() <= tol
