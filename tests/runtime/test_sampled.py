"""SampledBatchNorm and its reference functional (bn-sampling §3.2, §4.1–4.2, App. C–D).

Ground truth is stock ``nn.BatchNorm*d``, autograd ``gradcheck`` and the paper's formulas
(Eq. 3, 4, 6, 8) written out here — never the module's own output.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnrewrite.errors import InputError
from bnrewrite.runtime.sampled import (SampledBatchNorm, SampleSpec, dataset_stats, patch_shape,
                                       sampled_batch_norm_reference)

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {"1d-NC": (6, 3), "1d-NCL": (6, 3, 10), "2d": (4, 3, 6, 5), "3d": (3, 2, 4, 3, 5)}
DIMS = {"1d-NC": 1, "1d-NCL": 1, "2d": 2, "3d": 3}


def _stock(kind, affine, dtype=torch.float64):
    torch.manual_seed(1)
    bn = BN[DIMS[kind]](SHAPES[kind][1], affine=affine, momentum=0.1).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _run(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + ([module.weight.grad, module.bias.grad] if module.affine else [])
    return y.detach(), grads


FULL = {"ns": dict(n=10_000), "bs": dict(n=10_000), "fs": dict(ratio=1.0), "frs": dict(ratio=1.0)}


# ---------------------------------------------------------------- full sampling == stock BatchNorm
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("strategy", list(FULL))
def test_full_sample_equals_stock_batchnorm(kind, affine, strategy):
    stock = _stock(kind, affine)
    sampled = SampledBatchNorm.from_batchnorm(copy.deepcopy(stock), strategy=strategy, **FULL[strategy])
    torch.manual_seed(2)
    x = torch.randn(SHAPES[kind], dtype=torch.float64) * 3 + 1
    dy = torch.randn_like(x)
    for _ in range(2):  # twice: running statistics compound
        y0, g0 = _run(stock, x, dy)
        y1, g1 = _run(sampled, x, dy)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sampled.running_mean, stock.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(sampled.running_var, stock.running_var, rtol=0, atol=0)
    assert int(sampled.num_batches_tracked) == int(stock.num_batches_tracked) == 2
    stock.eval()
    sampled.eval()
    torch.testing.assert_close(sampled(x), stock(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_reference_with_full_spec_equals_stock(kind, affine):
    """The plain-torch reference (what kernels are tested against) at full sampling."""
    stock = _stock(kind, affine)
    x = torch.randn(SHAPES[kind], dtype=torch.float64)
    spec = SampleSpec(rows=(0, x.shape[0]))
    y, mean, var, count = sampled_batch_norm_reference(x, spec, stock.weight, stock.bias, stock.eps)
    torch.testing.assert_close(y, stock(x), rtol=1e-12, atol=1e-12)
    dims = [d for d in range(x.dim()) if d != 1]
    torch.testing.assert_close(mean, x.mean(dims))
    torch.testing.assert_close(var, x.var(dims, unbiased=False))
    assert count == x.numel() // x.shape[1]


@pytest.mark.parametrize("kind", ["1d-NCL", "2d", "3d"])
def test_vdn_mix_at_beta_zero_with_full_sample_equals_stock_on_real_rows(kind):
    stock = _stock(kind, True)
    sampled = SampledBatchNorm.from_batchnorm(copy.deepcopy(stock), strategy="fs", ratio=1.0,
                                              num_virtual=2, beta=0.0)
    x = torch.randn(SHAPES[kind], dtype=torch.float64)
    virtual = torch.randn((2,) + x.shape[1:], dtype=torch.float64) * 5
    dy = torch.randn_like(x)
    y0, g0 = _run(stock, x, dy)
    xv = torch.cat([virtual, x]).requires_grad_(True)
    y1 = sampled(xv)
    y1[2:].backward(dy)
    torch.testing.assert_close(y1[2:].detach(), y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xv.grad[2:], g0[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sampled.weight.grad, g0[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sampled.running_var, stock.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta,strategy", [(0.0, "full"), (1.0, "vdn")])
def test_vdn_low_precision_input_is_normalised_in_float32_like_stock(dtype, beta, strategy):
    """A bfloat16/float16 input (autocast) with float32 parameters: stock BatchNorm computes in
    float32 and returns the input's dtype. Rounding the statistics to the input's dtype first
    put the output ~10 bfloat16 steps off (mean near 100: off by up to 0.25)."""
    torch.manual_seed(0)
    stock = _stock("2d", True, torch.float32)
    vdn = SampledBatchNorm.from_batchnorm(copy.deepcopy(stock), strategy=strategy, num_virtual=2, beta=beta)
    xv = (torch.randn(6, 3, 6, 5) + 100).to(dtype)
    y = vdn(xv)
    assert y.dtype == dtype
    stats = xv[2:] if beta == 0.0 else xv[:2]  # Eq. 4 at β = 0 / Alg. 3 (virtual rows only)
    ref = (xv.float() - stats.float().mean((0, 2, 3), keepdim=True)) \
        / (stats.float().var((0, 2, 3), unbiased=False, keepdim=True) + stock.eps).sqrt()
    ref = ref * stock.weight.detach()[:, None, None] + stock.bias.detach()[:, None, None]
    if beta == 0.0:
        torch.testing.assert_close(y[2:], stock(xv[2:]).detach(), rtol=0, atol=0.02)
    step = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10  # one rounding step at |y| < 4
    assert (y.float() - ref).abs().max() <= 2 * step * 4


# ---------------------------------------------------------------- gradients: gradcheck and Eq. 6
SPECS = {
    "bs-rows": lambda x: SampleSpec(rows=(1, 3)),
    "fs-patch": lambda x: SampleSpec(rows=(0, x.shape[0]), patch=((1, 3), (2, 4))),
    "frs-points": lambda x: SampleSpec(rows=(0, x.shape[0]), points=torch.tensor([0, 5, 7, 20, 33, 41])),
    "fs+vdn": lambda x: SampleSpec(rows=(0, x.shape[0] - 1), patch=((0, 2), (1, 3)), num_virtual=1, beta=0.5),
    "vdn-only": lambda x: SampleSpec(rows=(0, x.shape[0] - 2), num_virtual=2, beta=1.0),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradcheck_reference(name, dtype):
    torch.manual_seed(3)
    x = torch.randn(4, 2, 4, 5, dtype=dtype, requires_grad=True)
    w = (torch.rand(2, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(2, dtype=dtype, requires_grad=True)
    spec = SPECS[name](x)

    def f(x, w, b):
        return sampled_batch_norm_reference(x, spec, w, b, 1e-5)[0]

    if dtype == torch.float64:
        assert torch.autograd.gradcheck(f, (x, w, b))
    else:  # float32: finite differences need a large step and tolerance
        assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-2, atol=5e-2, rtol=5e-2)


def _sample_mask(shape, spec: SampleSpec) -> torch.Tensor:
    """Boolean mask of the sampled real positions, built independently of spec.select."""
    mask = torch.zeros(shape, dtype=torch.bool)
    real = mask[spec.num_virtual:]
    idx = [slice(spec.rows[0], spec.rows[1]), slice(None)]
    idx += [slice(a, b) for a, b in spec.patch] if spec.patch else [slice(None)] * (len(shape) - 2)
    if spec.points is None:
        real[tuple(idx)] = True
    else:
        sel = real[tuple(idx)]  # (n, C, *S) view
        flat = torch.zeros(sel.shape[0] * sel[0, 0].numel(), dtype=torch.bool)
        flat[spec.points] = True
        per_channel = flat.reshape((sel.shape[0],) + tuple(sel.shape[2:]))
        sel.copy_(per_channel.unsqueeze(1).expand_as(sel))
    return mask


@pytest.mark.parametrize("name", list(SPECS))
def test_gradient_matches_eq6(name):
    """App. C Eq. 5–6 (and Eq. 4 for the virtual mix), written out per channel."""
    torch.manual_seed(4)
    eps = 1e-5
    x = torch.randn(4, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(2, dtype=torch.float64) + 0.5
    beta_shift = torch.randn(2, dtype=torch.float64)
    spec = SPECS[name](x)
    y, *_ = sampled_batch_norm_reference(x, spec, gamma, beta_shift, eps)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)

    in_sample = _sample_mask(x.shape, spec)
    in_virtual = torch.zeros_like(in_sample)
    in_virtual[:spec.num_virtual] = True
    wv = spec.beta if spec.num_virtual else 0.0
    xd = x.detach()
    for c in range(2):
        xc, dyc, sc, vc = xd[:, c], dy[:, c], in_sample[:, c], in_virtual[:, c]
        xs, xv = xc[sc], xc[vc]
        mean = (1 - wv) * (xs.mean() if wv < 1 else 0) + wv * (xv.mean() if wv > 0 else 0)
        var = ((1 - wv) * (((xs - xs.mean()) ** 2).mean() if wv < 1 else 0)
               + wv * (((xv - xv.mean()) ** 2).mean() if wv > 0 else 0))
        sigma = torch.sqrt(var + eps)
        dxhat = dyc * gamma[c]                                                    # Eq. 5
        dmean = (dxhat * -1 / sigma).sum()                                        # sum over all m points
        dvar = (dxhat * (xc - mean) * -0.5 * (var + eps) ** -1.5).sum()
        expected = dxhat / sigma                                                  # Eq. 6, "otherwise"
        if wv < 1:
            s = xs.numel()
            expected = expected + sc * (1 - wv) * (dmean / s + dvar * 2 * (xc - xs.mean()) / s)  # x_i in S
        if wv > 0:
            s_v = xv.numel()
            expected = expected + vc * wv * (dmean / s_v + dvar * 2 * (xc - xv.mean()) / s_v)
        torch.testing.assert_close(dx[:, c], expected, rtol=1e-10, atol=1e-12)
        outside = ~((sc if wv < 1 else torch.zeros_like(sc)) | (vc if wv > 0 else torch.zeros_like(vc)))
        assert outside.any()
        # points outside the sample get exactly dy·γ/σ
        torch.testing.assert_close(dx[:, c][outside], (dyc * gamma[c] / sigma)[outside], rtol=1e-13, atol=0)


def test_module_gradient_outside_sample_is_dy_gamma_over_sigma():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    m = SampledBatchNorm.from_batchnorm(bn, strategy="fs", ratio=1 / 4, seed=3, stream=1)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    spec = m.sample_spec(x.shape)
    (h0, h1), (w0, w1) = spec.patch
    assert (h1 - h0, w1 - w0) == (4, 4)
    patch = x.detach()[:, :, h0:h1, w0:w1]
    var, _ = torch.var_mean(patch, dim=(0, 2, 3), unbiased=False)
    scale = (bn.weight.detach() / torch.sqrt(var + bn.eps)).view(1, 3, 1, 1)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[h0:h1, w0:w1] = False
    torch.testing.assert_close(x.grad[:, :, outside], (dy * scale)[:, :, outside], rtol=1e-13, atol=0)


# ---------------------------------------------------------------- statistics and running stats (Eq. 3, 8)
def test_statistics_and_running_stats_follow_the_sample_with_momentum():
    torch.manual_seed(6)
    bn = nn.BatchNorm2d(3).double()
    m = SampledBatchNorm.from_batchnorm(bn, strategy="bs", n=3, seed=0, stream=7)
    m.momentum = 0.3  # App. D: decay 0.7
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 3
    y = m(x)
    a, b = m.sample_spec(x.shape).rows
    assert b - a == 3
    sample = x[a:b]
    mean = sample.mean((0, 2, 3))
    var = sample.var((0, 2, 3), unbiased=False)
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + bn.eps)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # Eq. 8 with α = momentum, starting from (0, 1); PyTorch stores the unbiased sample variance
    torch.testing.assert_close(m.running_mean, 0.3 * mean)
    torch.testing.assert_close(m.running_var, 0.7 + 0.3 * sample.var((0, 2, 3), unbiased=True))


def test_eval_is_stock_batchnorm_on_running_stats():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(bn).eval()
    m = SampledBatchNorm.from_batchnorm(bn, strategy="fs").eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(m(x), ref(x))
    scale, shift = m.inference_affine()
    torch.testing.assert_close(x * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1), ref(x))


@pytest.mark.parametrize("strategy, options", [("fs", {"ratio": 1 / 32}), ("bs", {"n": 2}), ("ns", {"n": 2})])
def test_eval_without_running_stats_is_stock_batchnorm_on_the_whole_batch(strategy, options):
    """Stock BatchNorm with track_running_stats=False uses the batch's statistics in eval too; a
    sampled module does the same over the whole batch, not its sample (eval must not depend on a draw)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16) * 3 + 1
    m = SampledBatchNorm(3, strategy=strategy, track_running_stats=False, **options).eval()
    stock = nn.BatchNorm2d(3, track_running_stats=False).eval()
    torch.testing.assert_close(m(x), stock(x), rtol=0, atol=0)


# ---------------------------------------------------------------- the sample shapes
def test_fs_patch_area_and_aspect():
    assert patch_shape((56, 56), 1 / 32) == (10, 10)  # paper's FS-1/32 on a 56x56 map ≈ 3.2%
    assert patch_shape((16, 8), 1 / 4) == (8, 4)       # keeps the 2:1 aspect
    assert patch_shape((7, 7), 1 / 64) == (1, 1)
    assert patch_shape((10,), 0.3) == (3,)
    assert patch_shape((4, 4, 4), 1 / 8) == (2, 2, 2)


def test_fs_on_flat_bn1d_falls_back_to_bs_and_says_so():
    m = SampledBatchNorm.from_batchnorm(nn.BatchNorm1d(5), strategy="fs", ratio=1 / 4)
    info = m.describe((32, 5))
    assert "falls back to bs" in info["note"]
    spec = m.sample_spec((32, 5))
    assert spec.patch is None and spec.rows[1] - spec.rows[0] == 8
    x = torch.randn(32, 5)
    m(x)  # trains
    info_l = m.describe((32, 5, 40))
    assert "note" not in info_l and info_l["sample"].endswith("patch of 40")
    assert m.sample_spec((32, 5, 40)).patch == ((m.sample_spec((32, 5, 40)).patch[0][0],
                                                 m.sample_spec((32, 5, 40)).patch[0][0] + 10),)


def test_describe_reports_strategy_sample_and_ratio():
    m = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(8), strategy="fs", ratio=1 / 16)
    info = m.describe((64, 8, 32, 32))
    assert info["strategy"] == "fs" and info["sample"] == "64 x 8x8 patch of 32x32"
    assert info["sampling_ratio"] == pytest.approx(1 / 16)
    bs = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(8), strategy="bs", n=4).describe((128, 8, 4, 4))
    assert bs["sampling_ratio"] == pytest.approx(4 / 128) and bs["n"] == 4
    frs = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(8), strategy="frs", ratio=1 / 32).describe((4, 8, 16, 16))
    assert frs["sample"] == "32 random points of 1024"


def test_one_value_per_channel_is_a_clear_error():
    m = SampledBatchNorm.from_batchnorm(nn.BatchNorm1d(4), strategy="bs", n=1)
    with pytest.raises(InputError, match="one value"):
        m(torch.randn(8, 4))


# ---------------------------------------------------------------- the schedule (§4.1, App. C.1)
def _patch(m, shape=(4, 3, 32, 32)):
    return m.sample_spec(shape).patch


def test_indices_static_within_epoch_and_redrawn_by_new_epoch():
    m = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(3), strategy="fs", ratio=1 / 16, seed=0, stream=11)
    x = torch.randn(4, 3, 32, 32)
    first = _patch(m)
    for _ in range(5):
        m(x)
        assert _patch(m) == first
    draws = {first}
    for _ in range(6):
        m.new_epoch()
        draws.add(_patch(m))
    assert len(draws) >= 5  # 25x25 possible offsets: repeats are rare


def test_every_redraws_after_n_steps():
    m = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(3), strategy="bs", n=2, every=3, seed=1, stream=2)
    x = torch.randn(64, 3, 2, 2)
    seen = []
    for _ in range(9):
        m(x)
        seen.append(m.sample_spec(x.shape).rows)
    assert m.draw == 2
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[6] == seen[7] == seen[8]
    assert len({seen[0], seen[3], seen[6]}) >= 2


def test_layers_independent_and_seed_reproducible():
    def patches(seed):
        return [_patch(SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(3), strategy="fs", ratio=1 / 16,
                                                       seed=seed, stream=s)) for s in range(8)]

    a, b, c = patches(0), patches(0), patches(1)
    assert a == b
    assert a != c
    assert len(set(a)) >= 6  # different layers sample different places


def test_schedule_restored_from_checkpoint_and_stock_checkpoint_loads_strictly():
    bn = nn.BatchNorm2d(3)
    m = SampledBatchNorm.from_batchnorm(bn, strategy="fs", ratio=1 / 16, every=4, seed=5, stream=9)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        m.new_epoch()
    for _ in range(6):
        m(x)
    state = copy.deepcopy(m.state_dict())
    fresh = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(3), strategy="fs", ratio=1 / 16, every=4, seed=0, stream=0)
    fresh.load_state_dict(state, strict=True)
    assert fresh.draw == m.draw and _patch(fresh) == _patch(m)
    for _ in range(5):  # the step counter resumes too: re-draws happen at the same steps
        m(x)
        fresh(x)
        assert _patch(fresh) == _patch(m)
    stock_state = nn.BatchNorm2d(3).state_dict()
    fresh.load_state_dict(stock_state, strict=True)


# ---------------------------------------------------------------- dataset_stats (Alg. 3 line 1)
def test_dataset_stats_tensor_and_streamed_batches_agree():
    torch.manual_seed(7)
    data = torch.randn(50, 3, 6, 6) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([0.0, 1.0, -2.0]).view(1, 3, 1, 1)
    expected_mean = data.double().mean((0, 2, 3))
    expected_std = data.double().var((0, 2, 3), unbiased=False).sqrt()
    whole = dataset_stats(data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(50)), batch_size=7)
    streamed = dataset_stats(loader)
    for stats in (whole, streamed):
        torch.testing.assert_close(stats.mean, expected_mean)
        torch.testing.assert_close(stats.std, expected_std)
        assert stats.count == 50 * 36


def test_dataset_stats_rejects_empty():
    with pytest.raises(InputError):
        dataset_stats([])


def test_last_statistics_follow_to_and_double():
    """``last_statistics`` is a plain attribute: nn.Module's .to()/.double() convert parameters and
    buffers only, so without care it stays float32 while the module is float64."""
    from bnrewrite.runtime.sampled import SampledBatchNorm

    bn = SampledBatchNorm(3, strategy="ns", n=2).train()  # the first 2 examples
    x = torch.randn(4, 3, 5, 5)
    bn(x)
    assert bn.last_statistics[0].dtype == torch.float32
    bn.double()
    mean, var, count = bn.last_statistics
    assert mean.dtype == var.dtype == bn.running_mean.dtype == torch.float64 and count == 2 * 25
    assert bn.to(torch.float32).last_statistics[1].dtype == torch.float32
    expected_var, expected_mean = torch.var_mean(x[:2].double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, expected_mean.to(mean.dtype))  # the values kept
    torch.testing.assert_close(var, expected_var.to(var.dtype))


def test_frs_trains_after_a_first_forward_under_inference_mode():
    """A shape-check forward under ``torch.inference_mode()`` before training drew frs's random
    points as inference tensors, which every later training step of that draw failed to save for
    backward (a raw RuntimeError until the next new_epoch)."""
    import bnrewrite

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    checked, plain = bnrewrite.transform(net, "frs:ratio=1/4"), bnrewrite.transform(net, "frs:ratio=1/4")
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        checked(x)
    grads = [torch.autograd.grad(m(x).sum(), m.get_submodule("0").weight)[0] for m in (checked, plain)]
    torch.testing.assert_close(grads[0], grads[1])


def test_data_stats_with_nan_or_a_negative_std_are_refused():
    """One NaN pixel in the data made every BatchNorm train on NaN through the virtual rows."""
    from bnrewrite.runtime.sampled import DatasetStats

    data = torch.randn(16, 3, 4, 4)
    data[3, 0, 1, 1] = float("nan")
    with pytest.raises(InputError, match=r"data_stats: the mean of input channel\(s\) \[0\] is nan.*NaN or inf"):
        dataset_stats(data)
    with pytest.raises(InputError, match=r"the std of input channel\(s\) \[1\] is -1.0 \(it must be finite and >= 0\)"):
        DatasetStats.coerce(([0.0, 0.0], [1.0, -1.0]))
    with pytest.raises(InputError, match="need one value per input channel each, got 2 and 3"):
        DatasetStats.coerce(([0.0, 0.0], [1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="dataset_stats expects a tensor or an iterable of batches"):
        dataset_stats(None)


@pytest.mark.parametrize("recipe", ["bs:n=4+vdn:n=1", "fs+vdn:n=1"])
def test_one_virtual_value_per_channel_in_a_mix_warns_once(recipe):
    """vdn:n=1 on a BatchNorm1d over (N, C): the one virtual value's variance 0 goes into Eq. 4's
    mix, so training normalises with (1 − β) of the sample's variance; that was silent."""
    import warnings

    import bnrewrite

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    rewritten = bnrewrite.transform(model, recipe, data_stats=([0.0] * 3, [1.0] * 3))
    with pytest.warns(UserWarning, match=r"1 virtual row\(s\) hold one value per channel.*0.5 of the sample's "
                                         "variance.*vdn:n=2 or more"):
        rewritten(torch.randn(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewritten(torch.randn(8, 3))  # once per site
        two = bnrewrite.transform(model, recipe.replace("n=1", "n=2"), data_stats=([0.0] * 3, [1.0] * 3))
        assert two(torch.randn(8, 3)).shape == (8, 3)
    assert not [w for w in caught if "virtual row" in str(w.message)]


def test_the_one_virtual_value_warning_stays_out_of_compiled_steps():
    """Dynamo does not guard on the warned-once flag: a compiled step warned at every call."""
    import warnings

    import bnrewrite

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    rewritten = bnrewrite.transform(model, "bs:n=4+vdn:n=1", data_stats=([0.0] * 3, [1.0] * 3))
    compiled = torch.compile(rewritten, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            compiled(torch.randn(8, 3))
    assert not [w for w in caught if "virtual row" in str(w.message)]
