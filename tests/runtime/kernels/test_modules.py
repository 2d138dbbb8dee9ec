"""runtime/kernels/modules.py: the lowered modules' training step against stock PyTorch.

Their forward keeps per-module state between steps so a step costs less host time (the fused
activation, the sample region); these tests change what that state depends on between steps
and check that the next step follows the change, and that the running-statistics rule (kept
inside the op's launch) is PyTorch's for every momentum setting. On CPU the fused op runs its
plain-torch implementation; with ``BNREWRITE_TRITON_CPU=1`` the interpreted Triton kernels."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrewrite.runtime.kernels import FusedBatchNorm, lowered_class
from bnrewrite.runtime.sampled import SampledBatchNorm


def _fused_with(act: nn.Module | None, **bn_options) -> tuple[FusedBatchNorm, nn.BatchNorm2d]:
    torch.manual_seed(0)
    stock = nn.BatchNorm2d(6, **bn_options)
    if stock.affine:
        with torch.no_grad():
            stock.weight.uniform_(0.5, 1.5)
            stock.bias.uniform_(-0.5, 0.5)
    fused = FusedBatchNorm.from_batchnorm(copy.deepcopy(stock))  # (from_batchnorm shares its tensors)
    if act is not None:
        fused.add_module("act", act)
        fused._post_children = ("act",)
    return fused.train(), stock.train()


def _step(module, x, dy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x, *params], dy)
    return y.detach(), grads


def test_a_changed_activation_slope_or_child_takes_effect_at_the_next_step():
    fused, stock = _fused_with(nn.LeakyReLU(0.2))
    x, dy = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(fused(x), F.leaky_relu(stock(x), 0.2))
    fused.act.negative_slope = 0.05
    torch.testing.assert_close(fused(x), F.leaky_relu(stock(x), 0.05))
    assert fused.fused_activation() == ("leaky_relu", 0.05)
    fused.act = nn.SiLU()
    y, (dx, dw, db) = _step(fused, x, dy)
    x_ref = x.clone().requires_grad_(True)
    y_ref = F.silu(stock(x_ref))
    ref = torch.autograd.grad(y_ref, [x_ref, stock.weight, stock.bias], dy)
    torch.testing.assert_close(y, y_ref.detach())
    for got, want in zip((dx, dw, db), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # a child the kernels cannot apply (dropout after the activation): the stock path, still right
    fused.add_module("drop", nn.Dropout(0.0))
    fused._post_children = ("act", "drop")
    assert fused.fused_activation() is None
    torch.testing.assert_close(fused(x), F.silu(stock(x)))


KERNELS = ["reference", "interpreted-split", "interpreted-single-pass"]


def _use_kernels(kernels: str, monkeypatch) -> None:
    """Run the lowered modules on the plain-torch implementation, or on the Triton kernels in
    Triton's interpreter on one launch sequence (split: statistics, finalize, normalise; single-pass)."""
    if kernels == "reference":
        return
    from bnrewrite.runtime.kernels import _triton

    if torch.cuda.is_available() or not _triton.is_interpreted():
        pytest.skip("the interpreted kernels run on CPU tensors without a GPU (tests/conftest.py)")
    monkeypatch.setenv("BNREWRITE_TRITON_CPU", "1")
    monkeypatch.setattr(_triton, "SINGLE_PASS_MAX", 0 if kernels == "interpreted-split" else 2 ** 62)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
def test_running_statistics_follow_stock_batchnorm_for_every_momentum(momentum, kernels, monkeypatch):
    """The EMA and ``num_batches_tracked`` (both inside the forward launch with a momentum; the
    count on the host first for the cumulative mean) match stock BatchNorm step by step."""
    _use_kernels(kernels, monkeypatch)
    fused, stock = _fused_with(nn.ReLU(), momentum=momentum)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 5):
        x = torch.randn(5, 6, 4, 3, generator=gen) * 2 + 0.7
        torch.testing.assert_close(fused(x), F.relu(stock(x)))
        assert int(fused.num_batches_tracked) == int(stock.num_batches_tracked) == step
        torch.testing.assert_close(fused.running_mean, stock.running_mean)
        torch.testing.assert_close(fused.running_var, stock.running_var)
    assert fused.num_batches_tracked.dtype == torch.int64


def test_without_running_statistics_or_affine_it_is_stock_batchnorm():
    fused, stock = _fused_with(nn.ReLU(), affine=False, track_running_stats=False)
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(fused(x), F.relu(stock(x)))
    assert fused.running_mean is None and fused.num_batches_tracked is None


def test_lowered_sampled_module_records_the_sampled_statistics_without_autograd_history():
    torch.manual_seed(0)
    sampled = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(6), strategy="fs", ratio=1 / 4)
    sampled.__class__ = lowered_class(SampledBatchNorm)
    sampled.train()
    x = (torch.randn(4, 6, 8, 8) * 3 + 1).requires_grad_(True)
    sampled(x)
    mean, var, count = sampled.last_statistics
    spec = sampled.sample_spec(tuple(x.shape))
    (r0, r1), ((h0, h1), (w0, w1)) = spec.rows, spec.patch
    # Eq. 3 of bn-sampling.txt on the FS patch: the biased moments of the sampled values
    patch = x.detach()[r0:r1, :, h0:h1, w0:w1].transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(mean, patch.mean(1))
    torch.testing.assert_close(var, patch.var(1, unbiased=False))
    assert count == patch.shape[1] == 4 * 4 * 4
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("compile_path", ["inductor", "ops"])
def test_compiles_fullgraph_without_an_eager_step_first(compile_path):
    """The per-module state kept for eager steps is not written while torch.compile traces."""
    fused, stock = _fused_with(nn.ReLU())
    fused.compile_path = compile_path
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 6, 5, 5)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), F.relu(stock(x)))
    torch.testing.assert_close(fused.running_mean, stock.running_mean)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_model_in_16_bit_keeps_its_dtypes_and_rounds_once(dtype, kernels, monkeypatch):
    """``model.to(torch.bfloat16)`` before lowering: parameters, buffers and gradients stay in
    that dtype, and since the kernels compute in float32 and round once, every result is within
    one 16-bit rounding step of stock ``nn.BatchNorm2d`` run in float32 on the same values."""
    _use_kernels(kernels, monkeypatch)
    fused, stock = (module.to(dtype) for module in _fused_with(nn.ReLU()))
    with torch.no_grad():  # running statistics away from 0 and 1, the same in both
        stock.running_mean.uniform_(-0.5, 0.5)
        stock.running_var.uniform_(0.5, 2.0)
        fused.running_mean.copy_(stock.running_mean)
        fused.running_var.copy_(stock.running_var)
    stock32 = copy.deepcopy(stock).float()  # the same (16-bit representable) values, in float32
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, 5, 5, generator=gen) * 2 + 0.5).to(dtype)
    dy = torch.randn(4, 6, 5, 5, generator=gen).to(dtype)
    y, grads = _step(fused, x, dy)
    x32 = x.float().requires_grad_(True)
    y32 = F.relu(stock32(x32))
    ref = torch.autograd.grad(y32, [x32, stock32.weight, stock32.bias], dy.float())
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert fused.running_mean.dtype == fused.running_var.dtype == dtype
    ulp = 2 ** -7 if dtype is torch.bfloat16 else 2 ** -10  # relative spacing of the 16-bit values
    for got, want in [(y, y32.detach()), *zip(grads, ref), (fused.running_mean, stock32.running_mean),
                      (fused.running_var, stock32.running_var)]:
        torch.testing.assert_close(got.float(), want, rtol=ulp, atol=1e-5)
