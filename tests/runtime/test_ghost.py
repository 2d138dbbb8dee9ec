"""GhostBatchNorm against stock nn.BatchNorm (four-things-bn §3.2, Eq. 4)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from bnrewrite.errors import InputError
from bnrewrite.runtime.ghost import GhostBatchNorm

BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _input(n, c, ndim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    spatial = {2: (), 3: (5,), 4: (3, 4), 5: (2, 2, 3)}[ndim]
    return (torch.randn(n, c, *spatial, generator=g, dtype=dtype) * 2 + 0.5)


def _stock(c, ndim, seed=1, **kw):
    torch.manual_seed(seed)
    bn = BN[ndim](c, **kw)
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return bn


def _run(module, x, upstream):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * upstream).sum().backward()
    grads = [x.grad] + ([module.weight.grad, module.bias.grad] if module.weight is not None else [])
    return y.detach(), grads


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("n,size", [(4, 4), (4, 16), (7, 8), (2, 2)])
def test_size_at_least_batch_is_stock_batchnorm_exactly(ndim, n, size):
    stock = _stock(6, ndim)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=size)
    x = _input(n, 6, ndim)
    up = torch.randn_like(x)
    y_ref, g_ref = _run(stock, x, up)
    y, g = _run(ghost, x, up)
    assert torch.equal(y, y_ref)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)
    assert torch.equal(ghost.running_mean, stock.running_mean)
    assert torch.equal(ghost.running_var, stock.running_var)
    assert ghost.num_batches_tracked.item() == stock.num_batches_tracked.item() == 1


@pytest.mark.parametrize("ndim", [2, 4])
@pytest.mark.parametrize("n,size", [(8, 2), (12, 4), (10, 4), (11, 3), (7, 5)])
def test_equals_stock_batchnorm_on_each_chunk(ndim, n, size):
    """Eq. 4: each ghost batch of consecutive examples is normalised on its own; the last holds
    the remainder (≥ 2 examples here)."""
    stock = _stock(5, ndim)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=size)
    x = _input(n, 5, ndim)
    up = torch.randn_like(x)
    y, g = _run(ghost, x, up)

    # reference: a fresh stock BN (same γ/β) on every chunk, gradients summed over chunks
    ref = copy.deepcopy(stock)
    xr = x.clone().requires_grad_(True)
    outs = [ref(chunk) for chunk in torch.split(xr, size)]
    y_ref = torch.cat(outs)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[0], xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1], ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[2], ref.bias.grad, rtol=1e-4, atol=1e-5)

    # running statistics: one stock update from the whole batch
    whole = copy.deepcopy(stock)
    whole(x)
    torch.testing.assert_close(ghost.running_mean, whole.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, whole.running_var, rtol=1e-5, atol=1e-6)
    assert ghost.num_batches_tracked.item() == 1


def test_statistics_follow_eq4_written_out():
    """Eq. 4 written directly: μ_i = mean over j with floor(j/B') = floor(i/B')."""
    n, c, size = 6, 3, 2
    x = _input(n, c, 4, seed=3)
    ghost = GhostBatchNorm(c, size=size, affine=False)
    y = ghost(x)
    for i in range(n):
        members = [j for j in range(n) if j // size == i // size]
        vals = x[members].transpose(0, 1).reshape(c, -1)
        mu = vals.mean(1)
        var = ((vals - mu[:, None]) ** 2).mean(1)
        expect = (x[i] - mu[:, None, None]) / torch.sqrt(var[:, None, None] + ghost.eps)
        torch.testing.assert_close(y[i], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ndim", [2, 4])
def test_single_example_ghost_batch_uses_running_statistics_and_warns_once(ndim):
    stock = _stock(4, ndim)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=4)
    rm, rv = stock.running_mean.clone(), stock.running_var.clone()
    x = _input(9, 4, ndim)  # 4 + 4 + 1
    with pytest.warns(UserWarning, match="one example"):
        y = ghost(x)
    assert torch.isfinite(y).all()
    shape = [1, -1] + [1] * (ndim - 2)
    expect_last = (x[8:] - rm.reshape(shape)) / torch.sqrt(rv.reshape(shape) + stock.eps) \
        * stock.weight.detach().reshape(shape) + stock.bias.detach().reshape(shape)
    torch.testing.assert_close(y[8:], expect_last, rtol=1e-5, atol=1e-5)
    ref = copy.deepcopy(stock)
    torch.testing.assert_close(y[:8], torch.cat([ref(x[:4]), ref(x[4:8])]).detach(), rtol=1e-5, atol=1e-5)
    whole = copy.deepcopy(stock)
    whole(x)
    torch.testing.assert_close(ghost.running_mean, whole.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, whole.running_var, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghost(x)  # second time: no warning


@pytest.mark.parametrize("ndim", [2, 4])
def test_batch_of_one_never_nan(ndim):
    ghost = GhostBatchNorm.from_batchnorm(_stock(3, ndim), size=4)
    x = _input(1, 3, ndim).requires_grad_(True)
    with pytest.warns(UserWarning):
        y = ghost(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(ghost.running_var).all()


def test_single_example_without_running_stats_uses_whole_batch():
    stock = _stock(4, 4, track_running_stats=False)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=2)
    x = _input(5, 4, 4)
    with pytest.warns(UserWarning, match="whole batch"):
        y = ghost(x)
    torch.testing.assert_close(y[4:], stock(x)[4:].detach(), rtol=1e-5, atol=1e-5)


def test_eval_is_stock_eval_and_inference_affine():
    stock = _stock(5, 4)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=2)
    stock.eval()
    ghost.eval()
    x = _input(3, 5, 4)
    assert torch.equal(ghost(x), stock(x))
    scale, shift = ghost.inference_affine()
    torch.testing.assert_close(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), stock(x).detach())


def test_cumulative_momentum_like_stock():
    stock = _stock(3, 4, momentum=None)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=2)
    for seed in range(3):
        x = _input(6, 3, 4, seed=seed)
        stock(x)
        ghost(x)
    torch.testing.assert_close(ghost.running_mean, stock.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, stock.running_var, rtol=1e-5, atol=1e-6)


def test_state_dict_loads_both_ways():
    stock = _stock(4, 4)
    ghost = GhostBatchNorm(4, size=2)
    ghost.load_state_dict(stock.state_dict(), strict=True)
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ghost.state_dict(), strict=True)
    assert torch.equal(back.running_var, stock.running_var)


@pytest.mark.parametrize("n,size", [(6, 4), (6, 2), (5, 2)])
def test_gradcheck_float64(n, size):
    # momentum 0: the running statistics (used by a one-example ghost batch) stay fixed while
    # gradcheck calls forward again and again
    ghost = GhostBatchNorm(3, size=size, momentum=0.0, dtype=torch.float64)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    x = _input(n, 3, 4, dtype=torch.float64).requires_grad_(True)
    w = ghost.weight.detach().clone().requires_grad_(True)
    b = ghost.bias.detach().clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda i, ww, bb: ghost_fn(ghost, i, ww, bb), (x, w, b))


def ghost_fn(module, x, w, b):
    """Functional call so gradcheck differentiates through weight and bias too."""
    return torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))


def test_bad_size():
    with pytest.raises(InputError, match="size"):
        GhostBatchNorm(3, size=1)


def test_describe_shows_ghost_batches():
    info = GhostBatchNorm(3, size=4).describe((9, 3, 8, 8))
    assert info["ghost_size"] == 4 and info["ghost_batches"] == "2 x 4 + 1 x 1" and "note" in info


@pytest.mark.parametrize("n,size", [(6, 2), (5, 2), (4, 8)])
def test_channels_last_in_channels_last_out_with_the_same_values(n, size):
    torch.manual_seed(0)
    x = torch.randn(n, 3, 5, 4)
    plain, cl = GhostBatchNorm(3, size=size), GhostBatchNorm(3, size=size)
    want = plain(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n=5, size=2: the single-example warning
        got = cl(x.to(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_eval_without_running_stats_is_stock_batchnorm_on_the_whole_batch():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    ghost = GhostBatchNorm(3, size=2, track_running_stats=False).eval()
    stock = nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(ghost(x), stock(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("track", [True, False])
def test_low_precision_input_like_stock_batchnorm(dtype, track):
    """A bfloat16/float16 input (autocast) with float32 parameters: stock BatchNorm accumulates in
    float32 and returns the input's dtype. A last ghost batch of one example came out float32
    (making the whole output float32), and the running mean was updated from a mean rounded to
    bfloat16 (off by 0.075 at values near 100)."""
    stock = _stock(4, 4, track_running_stats=track)
    ghost = GhostBatchNorm.from_batchnorm(copy.deepcopy(stock), size=4)
    x = (_input(9, 4, 4, seed=2) + 100).to(dtype)  # 4 + 4 + 1
    with pytest.warns(UserWarning, match="one example"):
        y = ghost(x)
    assert y.dtype == dtype
    step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # one rounding step at |y| < 4
    ref = copy.deepcopy(stock).float()
    if track:
        torch.testing.assert_close(y[:8], torch.cat([ref(x[:4]), ref(x[4:8])]).detach(), rtol=0, atol=0)
        whole = copy.deepcopy(stock)
        whole(x)
        torch.testing.assert_close(ghost.running_mean, whole.running_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ghost.running_var, whole.running_var, rtol=1e-4, atol=1e-5)
    else:
        expect_last = ref(x.float())[8:].detach()  # whole-batch statistics, in float32
        assert (y[8:].float() - expect_last).abs().max() <= 2 * step * 4
