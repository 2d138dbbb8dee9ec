"""CrossIterationBatchNorm against autograd Jacobians and the paper's formulas written out here
(cross-iteration-bn.txt Eqs. 7–12, Alg. 1, App. B)."""
import copy
import warnings
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bnrewrite.runtime import cross_iteration
from bnrewrite.errors import InputError
from bnrewrite.runtime.cross_iteration import (CrossIterationBatchNorm, auto_window, choose_store,
                                               compensate_from_inputs, compensate_statistics,
                                               expand_mean_gradient, mean_gradient, sq_mean_gradient,
                                               taylor_offsets, window_statistics)

STORES = ["gradients", "inputs"]

D = torch.float64

PRODUCERS = {
    "conv1x1": (lambda b: nn.Conv2d(4, 6, 1, bias=b), (3, 4, 5, 5)),
    "conv3x3_stride_pad": (lambda b: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=b), (3, 4, 7, 6)),
    # 4 output positions, patch 144: takes the im2col + matmul branch of the weight gradient
    "conv_small_map_long_patch": (lambda b: nn.Conv2d(16, 6, 3, stride=2, padding=1, bias=b), (1, 16, 3, 4)),
    "conv3x3_dilation": (lambda b: nn.Conv2d(4, 6, 3, dilation=2, padding=2, bias=b), (2, 4, 7, 7)),
    "conv3x3_groups": (lambda b: nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=b), (2, 4, 5, 5)),
    "conv_depthwise": (lambda b: nn.Conv2d(4, 4, 3, groups=4, bias=b), (2, 4, 5, 5)),
    "conv_reflect": (lambda b: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=b), (2, 4, 5, 5)),
    "conv_same_even": (lambda b: nn.Conv2d(4, 6, 4, padding="same", bias=b), (2, 4, 6, 6)),
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, stride=2, padding=1, bias=b), (3, 4, 9)),
    "conv3d": (lambda b: nn.Conv3d(2, 4, 3, padding=1, groups=2, bias=b), (2, 2, 3, 4, 4)),
    "linear": (lambda b: nn.Linear(5, 6, bias=b), (7, 5)),
}


def _producer(name, bias, seed=0):
    torch.manual_seed(seed)
    build, shape = PRODUCERS[name]
    producer = build(bias).to(D)
    u = torch.randn(shape, dtype=D) + 0.3
    return producer, u


def _stats(producer, u, weight, bias):
    params = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    x = functional_call(producer, params, (u,))
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.square().mean(dims)


def _jacobians(producer, u):
    """∂μ/∂θ and ∂ν/∂θ by autograd: full (C_out, C_out, C_in/g, *K) Jacobians (and bias)."""
    w = producer.weight.detach()
    b = None if producer.bias is None else producer.bias.detach()
    jw = torch.autograd.functional.jacobian(lambda w_: _stats(producer, u, w_, b), w)
    jb = None if b is None else torch.autograd.functional.jacobian(lambda b_: _stats(producer, u, w, b_), b)
    return jw, jb


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_closed_forms_equal_autograd_jacobians(name, bias):
    producer, u = _producer(name, bias)
    x = producer(u).detach()
    (jac_mean, jac_sq_mean), _ = _jacobians(producer, u)
    c_out = x.shape[1]
    g_mean = mean_gradient(producer, u, x)
    g_sq_mean = sq_mean_gradient(producer, u, x)
    groups = getattr(producer, "groups", 1)
    assert g_mean.shape[0] == groups and g_mean.numel() * c_out // groups == producer.weight.numel()
    assert g_sq_mean.shape == producer.weight.shape
    eye = torch.eye(c_out, dtype=torch.bool)
    # App. B Eq. 15: only the j = q blocks are non-zero
    assert jac_mean[~eye].abs().max() == 0 and jac_sq_mean[~eye].abs().max() == 0
    torch.testing.assert_close(expand_mean_gradient(g_mean, c_out), jac_mean[eye], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_sq_mean, jac_sq_mean[eye], rtol=1e-10, atol=1e-12)


def _every(x, stride):
    """Every ``stride``-th output position per spatial dim (every stride-th row for (N, C))."""
    if x.dim() == 2:
        return x[::stride]
    return x[(slice(None), slice(None)) + (slice(None, None, stride),) * (x.dim() - 2)]


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("name", ["conv1x1", "conv3x3_stride_pad", "conv_small_map_long_patch", "conv3x3_groups",
                                  "conv_same_even", "conv_reflect", "conv1d", "conv3d", "linear"])
def test_grad_stride_is_the_jacobian_of_nu_over_the_strided_positions(name, stride):
    """grad_stride=s (an approximation beyond App. B): ∂ν/∂θ of ν measured on every s-th output
    position only, i.e. autograd's Jacobian of mean(x[..., ::s, ::s]²)."""
    producer, u = _producer(name, True)
    x = producer(u).detach()
    b = producer.bias.detach()

    def strided_sq_mean(w_):
        sub = _every(functional_call(producer, {"weight": w_, "bias": b}, (u,)), stride)
        return sub.square().mean([d for d in range(sub.dim()) if d != 1])

    jac = torch.autograd.functional.jacobian(strided_sq_mean, producer.weight.detach())
    eye = torch.eye(x.shape[1], dtype=torch.bool)
    got = sq_mean_gradient(producer, u, x, stride)
    torch.testing.assert_close(got, jac[eye], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, sq_mean_gradient(producer, u, x), rtol=1e-3)  # it is an estimate


def test_grad_stride_keeps_the_stored_statistics_exact_and_compensates_close_to_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).to(D)
    models = {}
    for stride in (1, 2):
        bn = CrossIterationBatchNorm(8, window=3, grad_stride=stride, store="gradients").to(D)
        bn.attach_producer(conv, "conv")
        models[stride] = bn
    for _ in range(2):
        u = torch.randn(2, 3, 12, 12, dtype=D)
        for bn in models.values():
            bn(conv(u), u)
    exact, strided = models[1], models[2]
    torch.testing.assert_close(strided.cbn_mean, exact.cbn_mean)
    torch.testing.assert_close(strided.cbn_sq_mean, exact.cbn_sq_mean)
    # at the recorded weights the compensation term vanishes: both give the stored ν exactly
    torch.testing.assert_close(strided.past_statistics()[1], exact.past_statistics()[1])
    with torch.no_grad():
        conv.weight.add_(0.01 * torch.randn_like(conv.weight))
    moved_exact, moved_strided = exact.past_statistics()[1], strided.past_statistics()[1]
    term_exact = moved_exact - exact.cbn_sq_mean[:2]
    term_strided = moved_strided - strided.cbn_sq_mean[:2]
    # a noisy estimate of the Taylor term, but closer to exact cbn's ν than naive's (no term)
    assert 0 < (term_strided - term_exact).norm() < 0.75 * term_exact.norm()
    assert "grad_stride=2" in repr(strided) and strided.describe()["grad_stride"] == 2


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("name", ["conv3x3_stride_pad", "conv1d", "linear"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_recorded_taylor_offsets_equal_taylor_offsets_of_the_stored_gradients(name, bias, stride):
    """The ring's offsets come from the moments over the positions ∂ν/∂θ averages (an identity,
    no pass over ∂ν/∂θ); they equal taylor_offsets computed from the stored gradients."""
    producer, u = _producer(name, bias)
    x = producer(u).detach()
    bn = CrossIterationBatchNorm(x.shape[1], window=2, grad_stride=stride, store="gradients").to(D)
    bn.attach_producer(producer, "producer")
    bn(x, u)
    weight = producer.weight.detach()
    b = None if producer.bias is None else producer.bias.detach()
    groups = getattr(producer, "groups", 1)
    want = taylor_offsets(weight, b, bn.cbn_mean[:1], bn.cbn_sq_mean[:1], bn.cbn_grad_mean[:1],
                          bn.cbn_grad_sq_mean[:1], groups)
    torch.testing.assert_close(bn.cbn_mean_offset[:1], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bn.cbn_sq_mean_offset[:1], want[1], rtol=1e-10, atol=1e-10)


def test_grad_stride_must_be_a_positive_int():
    with pytest.raises(InputError, match="grad_stride"):
        CrossIterationBatchNorm(4, grad_stride=0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", ["conv3x3_groups", "conv3x3_dilation", "conv_reflect", "conv_same_even", "conv1d",
                                  "conv3d", "linear"])
def test_compensation_is_eqs_7_8_with_autograd_jacobians(name, bias):
    """Both stores give Eqs. 7-8 with autograd's Jacobians: the stored gradients (App. B) and the
    stored producer input/output (directional derivatives through one producer call)."""
    producer, u = _producer(name, bias)
    x = producer(u).detach()
    (jac_mean, jac_sq_mean), jac_b = _jacobians(producer, u)
    old_w = producer.weight.detach()
    old_b = None if producer.bias is None else producer.bias.detach()
    mean, sq_mean = _stats(producer, u, old_w, old_b)
    torch.manual_seed(3)
    new_w = old_w + 0.01 * torch.randn_like(old_w)
    new_b = None if old_b is None else old_b + 0.01 * torch.randn_like(old_b)
    # Eqs. 7-8: μ + Jacobian · Δθ
    delta_w = new_w - old_w
    want_mean = mean + (jac_mean * delta_w).flatten(1).sum(1)
    want_sq_mean = sq_mean + (jac_sq_mean * delta_w).flatten(1).sum(1)
    if bias:
        want_mean = want_mean + jac_b[0] @ (new_b - old_b)
        want_sq_mean = want_sq_mean + jac_b[1] @ (new_b - old_b)
    groups = getattr(producer, "groups", 1)
    grads = (mean_gradient(producer, u, x)[None], sq_mean_gradient(producer, u, x)[None])
    offsets = taylor_offsets(old_w, old_b, mean[None], sq_mean[None], *grads, groups)
    got_mean, got_sq_mean = compensate_statistics(new_w, new_b, mean[None], *grads, *offsets, groups)
    torch.testing.assert_close(got_mean[0], want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_sq_mean[0], want_sq_mean, rtol=1e-10, atol=1e-12)
    rows = torch.tensor([u.shape[0]])
    from_inputs = compensate_from_inputs(producer, new_w, new_b, mean[None], sq_mean[None], u[None], x[None], rows)
    torch.testing.assert_close(from_inputs[0][0], want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(from_inputs[1][0], want_sq_mean, rtol=1e-10, atol=1e-12)
    # the first-order term only: an exact recomputation under new_w would differ (by E[Δx²] > 0)
    exact_sq_mean = _stats(producer, u, new_w, new_b)[1]
    assert (exact_sq_mean - from_inputs[1][0]).min() > 0
    # unchanged weights: the Taylor term vanishes and the stored statistics come back
    same = compensate_statistics(old_w, old_b, mean[None], *grads, *offsets, groups)
    torch.testing.assert_close(same[0][0], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(same[1][0], sq_mean, rtol=1e-12, atol=1e-12)


def _paper_window(x, past_mean, past_sq_mean):
    """Eqs. 9-11 literally: ν̄ = mean of max(ν, μ²), σ̄² = ν̄ − μ̄²."""
    dims = [d for d in range(x.dim()) if d != 1]
    means = torch.cat([x.mean(dims)[None], past_mean])
    sq_means = torch.cat([x.square().mean(dims)[None], past_sq_mean])
    mean = means.mean(0)
    sq_mean = torch.maximum(sq_means, means.square()).mean(0)
    return mean, sq_mean - mean.square()


def test_window_statistics_equal_eqs_9_11_including_the_max():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=D) * 2 + 1
    past_mean = torch.randn(3, 4, dtype=D)
    past_sq_mean = past_mean.square() + torch.rand(3, 4, dtype=D)
    past_sq_mean[0, :2] = past_mean[0, :2].square() - 0.5  # invalid after compensation: Eq. 10 clamps
    mean, var = window_statistics(x, past_mean, past_sq_mean)
    want_mean, want_var = _paper_window(x, past_mean, past_sq_mean)
    torch.testing.assert_close(mean, want_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want_var, rtol=1e-12, atol=1e-12)


def test_window_statistics_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    past_mean = torch.randn(2, 3, dtype=D)
    past_sq_mean = past_mean.square() + torch.rand(2, 3, dtype=D)
    assert torch.autograd.gradcheck(lambda x_: window_statistics(x_, past_mean, past_sq_mean), (x,))


def _run_history(compensate=True, k=4, steps=5, bias=True, lr=0.05, name="conv3x3_stride_pad", store="gradients"):
    """Train-mode steps with the producer's weights moved between them; returns what Alg. 1 needs."""
    producer, _ = _producer(name, bias)
    shape = PRODUCERS[name][1]
    cbn = CrossIterationBatchNorm(producer.weight.shape[0], momentum=0.1, window=k, compensate=compensate,
                                  store=store).to(D)
    if compensate:
        cbn.attach_producer(producer, "conv")
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    record = []
    torch.manual_seed(1)
    for _ in range(steps):
        u = torch.randn(shape, dtype=D) + 0.3
        x = producer(u)
        record.append((u, producer.weight.detach().clone(),
                       None if producer.bias is None else producer.bias.detach().clone()))
        cbn(x, u).square().sum().backward()
        with torch.no_grad():
            for p in producer.parameters():
                p -= lr * p.grad
                p.grad = None
    return producer, cbn, record, shape


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("compensate", [True, False], ids=["cbn", "naive"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_module_equals_algorithm_1_with_autograd_jacobians(compensate, bias, store):
    k = 4
    producer, cbn, record, shape = _run_history(compensate, k=k, bias=bias, store=store)
    assert cbn.resolved_store == (store if compensate else None)
    torch.manual_seed(7)
    u = torch.randn(shape, dtype=D) + 0.3
    x = producer(u).detach().requires_grad_(True)
    w_now = producer.weight.detach()
    b_now = None if producer.bias is None else producer.bias.detach()
    past_mean, past_sq_mean = [], []
    for u_old, w_old, b_old in record[-(k - 1):]:  # the last k-1 iterations (Alg. 1 input)
        mean, sq_mean = _stats(producer, u_old, w_old, b_old)
        if compensate:  # Eqs. 7-8 with autograd Jacobians at θ_{t-τ}
            old = copy.deepcopy(producer)
            with torch.no_grad():
                old.weight.copy_(w_old)
                if bias:
                    old.bias.copy_(b_old)
            (jw_mean, jw_sq), jb = _jacobians(old, u_old)
            mean = mean + (jw_mean * (w_now - w_old)).flatten(1).sum(1)
            sq_mean = sq_mean + (jw_sq * (w_now - w_old)).flatten(1).sum(1)
            if bias:
                mean = mean + jb[0] @ (b_now - b_old)
                sq_mean = sq_mean + jb[1] @ (b_now - b_old)
        past_mean.append(mean)
        past_sq_mean.append(sq_mean)
    want_mean, want_var = _paper_window(x, torch.stack(past_mean), torch.stack(past_sq_mean))
    shape_c = [1, -1] + [1] * (x.dim() - 2)
    want = ((x - want_mean.reshape(shape_c)) / torch.sqrt(want_var.reshape(shape_c) + cbn.eps)
            * cbn.weight.detach().reshape(shape_c) + cbn.bias.detach().reshape(shape_c))   # Eq. 12
    running_mean, running_var = cbn.running_mean.clone(), cbn.running_var.clone()
    got = cbn(x, u)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    (gx_got,) = torch.autograd.grad(got, x, g)
    (gx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx_got, gx_want, rtol=1e-9, atol=1e-10)
    # running statistics: EMA of the window statistics, Bessel-corrected over k*M values
    count = k * (x.numel() // x.shape[1])
    torch.testing.assert_close(cbn.running_mean, 0.9 * running_mean + 0.1 * want_mean.detach())
    torch.testing.assert_close(cbn.running_var, 0.9 * running_var + 0.1 * want_var.detach() * count / (count - 1))


@pytest.mark.parametrize("store", STORES)
def test_module_gradcheck_with_history(store):
    producer, cbn, _, shape = _run_history(True, k=3, steps=4, store=store)
    torch.manual_seed(9)
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach().requires_grad_(True)
    gamma = cbn.weight.detach().clone().requires_grad_(True)
    beta = cbn.bias.detach().clone().requires_grad_(True)

    def fresh(x_, gamma_, beta_):
        m = copy.deepcopy(cbn)  # each evaluation starts from the same history
        return functional_call(m, {"weight": gamma_, "bias": beta_}, (x_, u))

    assert cbn._filled == 2
    assert torch.autograd.gradcheck(fresh, (x, gamma, beta))


@pytest.mark.parametrize("compensate", [True, False], ids=["cbn", "naive-cbn"])
def test_module_gradients_can_be_differentiated_again(compensate):
    """Second derivatives through a module step (create_graph=True: a gradient penalty, MAML):
    gradgradcheck in fp64. The step writes its own statistics into the history ring after the
    forward, over a slot the forward read (naive-cbn reads the ring itself), so a backward that
    re-read the past rows would differentiate another function."""
    producer, cbn, _, shape = _run_history(compensate, k=2, steps=3)
    torch.manual_seed(9)
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach().requires_grad_(True)
    gamma = cbn.weight.detach().clone().requires_grad_(True)

    def fresh(x_, gamma_):
        m = copy.deepcopy(cbn)  # each evaluation starts from the same history
        return functional_call(m, {"weight": gamma_, "bias": cbn.bias}, (x_, u))

    assert cbn._filled == 1 and cbn.resolved_window == 2
    assert torch.autograd.gradgradcheck(fresh, (x, gamma))


def test_history_is_detached_and_holds_the_last_iterations():
    producer, cbn, record, _ = _run_history(True, k=3, steps=3)
    for key in ("cbn_mean", "cbn_sq_mean", "cbn_grad_mean", "cbn_grad_sq_mean", "cbn_mean_offset"):
        assert not getattr(cbn, key).requires_grad
    # the ring holds μ of the last two iterations, under the weights they ran with
    stored = sorted(cbn.cbn_mean[:, 0].tolist())
    want = sorted(_stats(producer, u, w, b)[0][0].item() for u, w, b in record[-2:])
    assert stored == pytest.approx(want, rel=1e-12)


def test_state_dict_restores_burnin_progress():
    producer, _ = _producer("conv3x3_stride_pad", True)
    shape = PRODUCERS["conv3x3_stride_pad"][1]
    cbn = CrossIterationBatchNorm(producer.weight.shape[0], window=2, burnin=4).to(D)
    cbn.attach_producer(producer, "conv")
    for _ in range(3):
        u = torch.randn(shape, dtype=D)
        cbn(producer(u).detach(), u)
    fresh = CrossIterationBatchNorm(cbn.num_features, window=2, burnin=4).to(D)
    fresh.attach_producer(producer, "conv")
    fresh.load_state_dict(cbn.state_dict(), strict=True)
    assert fresh._steps == 3
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach()
    # step 4 is the last burn-in step (stock BN), step 5 the first with the window, in both
    for _ in range(2):
        torch.testing.assert_close(fresh(x, u), cbn(x, u), rtol=0, atol=0)
    assert fresh.last_statistics is not None and fresh._steps == cbn._steps == 4


def test_eval_is_stock_batchnorm_on_running_statistics():
    producer, cbn, _, shape = _run_history(True, k=3, steps=4)
    stock = nn.BatchNorm2d(cbn.num_features).to(D)
    stock.load_state_dict({k: v for k, v in cbn.state_dict().items() if not k.startswith("cbn_")})
    cbn.eval()
    stock.eval()
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach()
    torch.testing.assert_close(cbn(x, u), stock(x), rtol=0, atol=0)
    scale, shift = cbn.inference_affine()
    torch.testing.assert_close(cbn(x), x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("store", STORES)
def test_state_dict_roundtrip_restores_history_exactly(store):
    producer, cbn, _, shape = _run_history(True, k=4, steps=5, store=store)
    other = {"gradients": "inputs", "inputs": "gradients"}[store]
    saved = set(cbn.state_dict())
    assert {"cbn_mean", "cbn_sq_mean", "cbn_steps"} <= saved
    assert ("cbn_input" in saved) == (store == "inputs") and ("cbn_grad_sq_mean" in saved) == (store == "gradients")
    # a module whose own history is the other store takes the checkpoint's store
    fresh = CrossIterationBatchNorm(cbn.num_features, window="auto", store=other).to(D)
    fresh.attach_producer(producer, "conv")
    u0 = torch.randn(shape, dtype=D)
    fresh(producer(u0).detach(), u0)
    assert fresh.resolved_store == other
    fresh.load_state_dict(cbn.state_dict(), strict=True)
    assert fresh.resolved_store == store and set(fresh.state_dict()) == set(cbn.state_dict())
    # burnin=0: the step count stops at the burn-in (no Python int changing every step)
    assert fresh.resolved_window == 4 and fresh._filled == 3 and fresh._steps == 0
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach()
    torch.testing.assert_close(fresh(x, u), cbn(x, u), rtol=0, atol=0)
    torch.testing.assert_close(fresh.running_var, cbn.running_var, rtol=0, atol=0)


def test_stock_checkpoint_loads_strict_and_forgets_the_history():
    """The stored iterations belong to the weights a stock checkpoint replaces: the history is
    dropped, so the next step is stock BatchNorm's with the checkpoint's state (it kept compensating
    from the old weights' iterations: up to 3.1 off)."""
    stock = nn.BatchNorm2d(6).double()
    stock.running_mean.fill_(0.5)
    producer, cbn, _, shape = _run_history(True, k=3, steps=3)
    assert cbn.history_filled == 2
    cbn.load_state_dict(stock.state_dict(), strict=True)  # history keys are optional
    torch.testing.assert_close(cbn.running_mean, stock.running_mean)
    assert cbn.history_filled == 0 and int(cbn.cbn_filled) == 0
    u = torch.randn(shape, dtype=D)
    x = producer(u).detach()
    torch.testing.assert_close(cbn(x, u), stock(x), rtol=0, atol=0)
    torch.testing.assert_close(cbn.running_var, stock.running_var, rtol=0, atol=0)


def test_to_moves_history_and_reset_history_returns_to_stock():
    producer, cbn, _, shape = _run_history(True, k=3, steps=3)
    cbn.float()
    producer.float()
    assert cbn.cbn_grad_sq_mean.dtype == torch.float32 and cbn.cbn_mean.dtype == torch.float32
    cbn.reset_history()
    assert cbn._filled == 0 and int(cbn.cbn_filled) == 0
    stock = nn.BatchNorm2d(6)
    stock.load_state_dict({k: v for k, v in cbn.state_dict().items() if not k.startswith("cbn_")})
    u = torch.randn(shape)
    x = producer(u).detach()
    torch.testing.assert_close(cbn(x, u), stock(x), rtol=0, atol=0)


def test_deepcopy_and_torch_save_keep_the_producer_reference():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cbn = CrossIterationBatchNorm.from_batchnorm(model[1], window=3)
    cbn.attach_producer(model[0], "0")
    model[1] = cbn
    assert [k for k in model.state_dict()] == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                               "1.running_var", "1.num_batches_tracked"]
    copied = copy.deepcopy(model)
    assert copied[1].producer is copied[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[1].producer is loaded[0]


def test_compensated_call_without_producer_input_is_a_clear_error():
    producer, _ = _producer("conv1x1", True)
    cbn = CrossIterationBatchNorm(6, window=2).to(D)
    cbn.attach_producer(producer, "conv")
    with pytest.raises(InputError, match="producer_input"):
        cbn(torch.randn(2, 6, 3, 3, dtype=D))


@pytest.mark.parametrize("batch, k", [(1, 8), (2, 8), (3, 6), (4, 4), (5, 4), (8, 2), (16, 1), (64, 1)])
def test_auto_window_is_section_4_3(batch, k):
    assert auto_window(batch) == k
    cbn = CrossIterationBatchNorm(3, window="auto", compensate=False)
    cbn(torch.randn(batch, 3, 2, 2) if batch > 1 else torch.randn(1, 3, 2, 2))
    assert cbn.resolved_window == k and cbn.cbn_mean.shape == (k - 1, 3)


def test_describe_reports_history_memory():
    producer, cbn, _, _ = _run_history(True, k=4, steps=2)
    info = cbn.describe((3, 6, 4, 3))
    w = producer.weight
    per_iter = 2 * 6 + w.numel() + w[0].numel() + 2 * 6  # μ, ν, ∂ν/∂θ, ∂μ/∂θ, two offsets
    assert info["variant"] == "cbn" and info["history_bytes"] == 3 * per_iter * 8
    naive = CrossIterationBatchNorm(6, window=4, compensate=False)
    assert naive.describe((3, 6, 4, 3))["history_bytes"] == 3 * 2 * 6 * 4


def _train_both_stores(conv, window, batches, stores=STORES):
    """SGD steps of conv -> CBN with each store on the same batches; every step's output must be
    the same (the stores hold different things for the same Eqs. 7-8). Returns store -> module."""
    pair = {}
    for store in stores:
        producer = copy.deepcopy(conv)
        bn = CrossIterationBatchNorm(conv.out_channels, window=window, store=store).to(D)
        bn.attach_producer(producer, "conv")
        pair[store] = (producer, bn)
    for u in batches:
        outputs = {}
        for store, (producer, bn) in pair.items():
            y = bn(producer(u), u)
            y.square().sum().backward()
            outputs[store] = y.detach()
            with torch.no_grad():
                for p in producer.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        torch.testing.assert_close(outputs["inputs"], outputs["gradients"], rtol=1e-10, atol=1e-10)
    return {store: bn for store, (_, bn) in pair.items()}


def test_inputs_store_holds_a_smaller_last_batch_and_matches_the_gradient_store():
    """A batch with fewer rows (the last one of an epoch) is zero-padded in the ``inputs`` ring and
    only its real rows count; every step equals the ``gradients`` store."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).to(D)
    torch.manual_seed(1)
    batches = [torch.randn(2 if step in (2, 5) else 3, 4, 7, 6, dtype=D) + 0.3 for step in range(7)]
    bns = _train_both_stores(conv, 4, batches)
    assert bns["inputs"].cbn_rows.tolist() == [3, 3, 2]  # the ring's slots hold steps 6, 4 and 5
    torch.testing.assert_close(bns["inputs"].running_var, bns["gradients"].running_var, rtol=1e-10, atol=0)


def test_inputs_store_grows_for_a_batch_larger_than_the_first_and_matches_the_gradient_store():
    """The ring is sized at the first training step; a later, larger batch (a short first batch,
    or a bigger one after evaluation) grows it, keeping the window (it restarted on stock BN before)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(D)
    torch.manual_seed(1)
    batches = [torch.randn(rows, 4, 5, 5, dtype=D) + 0.3 for rows in (2, 2, 3, 4, 2, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "switching to store='gradients'"
        bn = _train_both_stores(conv, 3, batches, ("inputs", "gradients"))["inputs"]
    assert bn.resolved_store == "inputs" and bn._filled == 2 and bn.cbn_input.shape[1] == 4
    assert sorted(bn.cbn_rows.tolist()) == [2, 4]


def test_inputs_store_switches_to_gradients_when_the_input_shape_changes():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(D)
    bn = CrossIterationBatchNorm(4, window=3, store="inputs").to(D)
    bn.attach_producer(conv, "conv")
    bn.site_name = "layer.bn"
    for _ in range(2):
        u = torch.randn(2, 3, 6, 6, dtype=D)
        bn(conv(u), u)
    u = torch.randn(2, 3, 8, 8, dtype=D)  # a new resolution
    with pytest.warns(UserWarning, match="layer.bn.*store='gradients'"):
        y = bn(conv(u), u)
    assert bn.resolved_store == "gradients" and bn.cbn_input is None and bn._filled == 1
    x = conv(u).detach()
    dims = [0, 2, 3]
    want = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + bn.eps)
    torch.testing.assert_close(y.detach(), want * bn.weight.detach().reshape(1, -1, 1, 1)
                               + bn.bias.detach().reshape(1, -1, 1, 1))  # the window restarted: stock BN
    u = torch.randn(2, 3, 8, 8, dtype=D)
    bn(conv(u), u)
    assert bn._filled == 2


def test_inputs_store_under_autocast_keeps_the_taylor_term_free_of_bf16_rounding():
    """With a bf16 producer output the ring keeps an fp32 recomputation of x, so at unchanged
    weights the compensated statistics are the stored ones (no bf16 rounding in Δx)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    bn = CrossIterationBatchNorm(16, window=3, store="inputs")
    bn.attach_producer(conv, "conv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            u = torch.randn(2, 8, 6, 6)
            x = conv(u)
            assert x.dtype == torch.bfloat16
            bn(x, u)
    assert bn.cbn_output.dtype == torch.float32
    mean, sq_mean = bn.past_statistics()
    torch.testing.assert_close(mean, bn.cbn_mean[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sq_mean, bn.cbn_sq_mean[:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, weight, u, x, positions, want", [
    # ResNet-18 at 32x32, batch 4: layer4's 3x3 conv sees 1x1 maps (weights dominate)
    ("layer4 1x1 map", 512 * 512 * 9, 4 * 512, 4 * 512, 4, "inputs"),
    # the stem at 224x224: 3 input channels, 112x112 outputs (activations dominate)
    ("stem 112x112", 64 * 3 * 49, 4 * 3 * 224 * 224, 4 * 64 * 112 * 112, 4 * 112 * 112, "gradients"),
    ("layer1 56x56", 64 * 64 * 9, 4 * 64 * 56 * 56, 4 * 64 * 56 * 56, 4 * 56 * 56, "gradients"),
])
def test_choose_store_prefers_the_smaller_history_at_the_extremes(name, weight, u, x, positions, want):
    assert choose_store(weight, u, x, positions, 3, "cpu") == want
    assert choose_store(weight, u, x, positions, 3, "cuda") == want


def test_auto_store_is_decided_per_site_and_reported():
    torch.manual_seed(0)
    small_map = nn.Conv2d(64, 64, 3, padding=1).to(D)
    big_map = nn.Conv2d(3, 4, 3, padding=1).to(D)
    sites = {}
    for name, conv, shape in [("deep", small_map, (2, 64, 1, 1)), ("stem", big_map, (2, 3, 32, 32))]:
        bn = CrossIterationBatchNorm(conv.out_channels, window=3).to(D)
        bn.attach_producer(conv, name)
        before = bn.describe((shape[0], conv.out_channels, *shape[2:]))
        u = torch.randn(shape, dtype=D)
        bn(conv(u), u)
        info = bn.describe()
        assert info["store"] == bn.resolved_store == before["store"]
        sites[name] = (bn, info, before)
    assert sites["deep"][0].resolved_store == "inputs" and sites["stem"][0].resolved_store == "gradients"
    for bn, info, before in sites.values():  # bytes: counted from the buffers, estimated before
        assert info["history_bytes"] == before["history_bytes"] == sum(
            b.numel() * b.element_size() for n, b in bn.named_buffers() if n.startswith("cbn_")
            and n not in ("cbn_steps", "cbn_filled", "cbn_next"))
    assert "store=inputs" in repr(sites["deep"][0])
    with pytest.raises(InputError, match="store"):
        CrossIterationBatchNorm(4, store="weights")


@pytest.fixture(params=["aten", "composite"])
def window_kernels(request, monkeypatch):
    """Both ways the fused op computes its moments, normalisation and backward reductions:
    ATen's BatchNorm kernels (fp32/fp64) and the broadcasting ops (fp16/bf16 input)."""
    if request.param == "composite":
        monkeypatch.setattr(cross_iteration, "_native_kernels_apply", lambda x, weight: False)
    return request.param


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (6, 4), (2, 4, 3, 2, 2)], ids=["2d", "1d", "3d"])
def test_fused_window_norm_equals_eqs_9_12_through_autograd(shape, affine, window_kernels):
    """The fused op (closed-form backward) against Eqs. 9-12 written out and differentiated by autograd."""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, dtype=D) * 2 + 1).requires_grad_(True)
    gamma = (torch.rand(c, dtype=D) + 0.5).requires_grad_(True) if affine else None
    beta = torch.randn(c, dtype=D).requires_grad_(True) if affine else None
    past_mean = torch.randn(3, c, dtype=D)
    past_sq_mean = past_mean.square() + torch.rand(3, c, dtype=D)
    past_sq_mean[1, 0] = past_mean[1, 0].square() - 0.3  # Eq. 10's max at work
    y, mean, var, mean_now, var_now = window_batch_norm(x, gamma, beta, past_mean, past_sq_mean, 1e-5)
    want_mean, want_var = _paper_window(x, past_mean, past_sq_mean)
    view = [1, -1] + [1] * (x.dim() - 2)
    want = (x - want_mean.reshape(view)) / torch.sqrt(want_var.reshape(view) + 1e-5)
    if affine:
        want = want * gamma.reshape(view) + beta.reshape(view)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, want_mean.detach())
    torch.testing.assert_close(var, want_var.detach())
    dims = [d for d in range(x.dim()) if d != 1]
    torch.testing.assert_close(mean_now, x.detach().mean(dims))
    torch.testing.assert_close(var_now, x.detach().var(dims, unbiased=False))
    inputs = [x] + ([gamma, beta] if affine else [])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    want_grads = torch.autograd.grad(want, inputs, g)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: window_batch_norm(t[0], *(t[1:] if affine else (None, None)), past_mean, past_sq_mean, 1e-5)[0],
        tuple(inputs))


def test_fused_window_norm_bf16_input_keeps_fp32_statistics():
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    past_mean = torch.randn(2, 3)
    past_sq_mean = past_mean.square() + 1
    y16, mean16, var16, _, _ = window_batch_norm(x.bfloat16().requires_grad_(), None, None, past_mean, past_sq_mean, 1e-5)
    y32, mean32, var32, _, _ = window_batch_norm(x.bfloat16().float(), None, None, past_mean, past_sq_mean, 1e-5)
    assert y16.dtype == torch.bfloat16 and mean16.dtype == var16.dtype == torch.float32
    torch.testing.assert_close(mean16, mean32)
    torch.testing.assert_close(var16, var32)
    torch.testing.assert_close(y16.float(), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_renorm_backward_is_batch_renormalization_through_autograd(affine, window_kernels):
    """backward='renorm': Batch Renormalization's x̂ = (x − μ_t)/σ_t · SG(σ_t/σ̄) + SG((μ_t − μ̄)/σ̄)
    (extreme-normalization.txt §2), written out here and differentiated by autograd."""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, 2, dtype=D) * 2 + 1).requires_grad_(True)
    gamma = (torch.rand(4, dtype=D) + 0.5).requires_grad_(True) if affine else None
    beta = torch.randn(4, dtype=D).requires_grad_(True) if affine else None
    past_mean = torch.randn(3, 4, dtype=D)
    past_sq_mean = past_mean.square() + torch.rand(3, 4, dtype=D)
    eps = 1e-3
    y = window_batch_norm(x, gamma, beta, past_mean, past_sq_mean, eps, renorm=True)[0]
    window_mean, window_var = (t.detach() for t in _paper_window(x, past_mean, past_sq_mean))
    view = [1, -1, 1, 1]
    dims = [0, 2, 3]
    mu, sigma = x.mean(dims), torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma_bar = torch.sqrt(window_var + eps)
    r, d = (sigma / sigma_bar).detach(), ((mu - window_mean) / sigma_bar).detach()
    want = (x - mu.reshape(view)) / sigma.reshape(view) * r.reshape(view) + d.reshape(view)
    if affine:
        want = want * gamma.reshape(view) + beta.reshape(view)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    inputs = [x] + ([gamma, beta] if affine else [])
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, g)
    for a, b in zip(got, torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # it is not CBN's backward
    (cbn_gx,) = torch.autograd.grad(window_batch_norm(x, gamma, beta, past_mean, past_sq_mean, eps)[0], x, g)
    assert not torch.allclose(cbn_gx, got[0], rtol=1e-3)


@pytest.mark.parametrize("valid", [None, (True, False, True)], ids=["whole-window", "ring-with-a-gap"])
@pytest.mark.parametrize("renorm", [False, True], ids=["window", "renorm"])
def test_fused_window_norm_gradients_can_be_differentiated_again(renorm, valid, window_kernels):
    """Gradients taken with ``create_graph=True`` (a gradient penalty, MAML's meta-gradient) are the
    closed-form ones and differentiate again correctly: gradgradcheck in fp64 compares their
    derivatives with finite differences of the backward. (Computed from the statistics the forward
    saved, which carry no history, they missed those terms.)"""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 3, 2, dtype=D) * 2 + 1).requires_grad_(True)
    gamma = (torch.rand(4, dtype=D) + 0.5).requires_grad_(True)
    beta = torch.randn(4, dtype=D).requires_grad_(True)
    past_mean = torch.randn(3, 4, dtype=D)
    past_sq_mean = past_mean.square() + torch.rand(3, 4, dtype=D)
    valid = None if valid is None else torch.tensor(valid)

    def op(x, gamma, beta):
        return window_batch_norm(x, gamma, beta, past_mean, past_sq_mean, 1e-3, renorm, valid)[0]

    g = torch.randn_like(x)
    plain = torch.autograd.grad(op(x, gamma, beta), (x, gamma, beta), g)
    graphed = torch.autograd.grad(op(x, gamma, beta), (x, gamma, beta), g, create_graph=True)
    assert graphed[0].requires_grad and graphed[1].requires_grad  # dβ = Σg depends on g alone
    for a, b in zip(graphed, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(op, (x, gamma, beta))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_fused_window_norm_fp32_matches_an_fp64_reference(affine, memory_format, window_kernels):
    """fp32 storage (ATen's kernels unless forced off): values and gradients within fp32 rounding
    of the fp64 op, in NCHW and channels_last, with a mean far from zero (cancellation check)."""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    x64 = torch.randn(4, 6, 7, 5, dtype=D) * 0.5 + 3
    gamma64 = torch.rand(6, dtype=D) + 0.5 if affine else None
    beta64 = torch.randn(6, dtype=D) if affine else None
    past_mean = x64.mean([0, 2, 3]) + 0.1 * torch.randn(3, 6, dtype=D)
    past_sq_mean = past_mean.square() + 0.25 + 0.05 * torch.rand(3, 6, dtype=D)
    g64 = torch.randn_like(x64)

    def run(dtype):
        x = x64.to(dtype).contiguous(memory_format=memory_format).requires_grad_(True)
        params = [t.to(dtype).requires_grad_(True) for t in (gamma64, beta64)] if affine else [None, None]
        out = window_batch_norm(x, *params, past_mean.to(dtype), past_sq_mean.to(dtype), 1e-5)
        grads = torch.autograd.grad(out[0], [x] + (params if affine else []), g64.to(dtype))
        return [t.double() for t in out + grads]

    for got, want in zip(run(torch.float32), run(D)):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("renorm", [False, True], ids=["window", "renorm"])
def test_fused_window_norm_without_history_is_stock_batchnorm(renorm, window_kernels):
    """k = 1 (no past iterations): both backwards are stock BatchNorm's (forward and gradients)."""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=D, requires_grad=True)
    bn = nn.BatchNorm2d(3).to(D)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    empty = torch.zeros(0, 3, dtype=D)
    y = window_batch_norm(x, bn.weight, bn.bias, empty, empty, bn.eps, renorm)[0]
    want = bn(x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, bn.weight, bn.bias], g),
                    torch.autograd.grad(want, [x, bn.weight, bn.bias], g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_backward_option_reaches_the_module_and_is_validated():
    import bnrewrite
    from bnrewrite.errors import RecipeError
    model = bnrewrite.transform(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), "cbn:backward=renorm")
    bn = model.get_submodule("1")
    assert bn.backward_mode == "renorm" and "backward=renorm" in repr(bn)
    model = bnrewrite.transform(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), "naive-cbn:backward=renorm")
    bn = model.get_submodule("1")
    assert bn.backward_mode == "renorm" and bn.describe()["backward"] == "renorm"
    with pytest.raises(RecipeError, match="renorm"):
        bnrewrite.parse_recipe("cbn:backward=full")
    with pytest.raises(InputError, match="backward"):
        CrossIterationBatchNorm(4, backward="full")


def test_inputs_store_history_runs_on_the_meta_device():
    """Shape checks on ``meta`` (no autocast there): the producer re-run must not ask for autocast."""
    conv = nn.Conv2d(3, 4, 3)
    bn = CrossIterationBatchNorm(4, window=3, store="inputs")
    bn.attach_producer(conv, "conv")
    u = torch.randn(2, 3, 6, 6)
    bn(conv(u), u)
    conv.to("meta"), bn.to("meta")
    u = u.to("meta")
    y = bn(conv(u), u)
    assert y.device.type == "meta" and y.shape == (2, 4, 4, 4)


def test_linear_producer_on_a_3d_input_runs_naive_cbn_with_a_warning():
    """Linear(16 -> 6) on (N, 6, 16): its outputs are the last dim, the BN normalises dim 1 (also 6):
    App. B does not apply. naive-cbn, not a raw size-mismatch error from the closed forms."""
    torch.manual_seed(0)
    fc = nn.Linear(16, 6).to(D)
    bn = CrossIterationBatchNorm(6, window=2).to(D)
    bn.attach_producer(fc, "fc")
    bn.site_name = "bn"
    naive = CrossIterationBatchNorm(6, window=2, compensate=False).to(D)
    u = torch.randn(4, 6, 16, dtype=D)
    with pytest.warns(UserWarning, match="bn: producer Linear fc got a 3-D input.*runs naive-cbn"):
        bn(fc(u), u)
    naive(fc(u))
    for _ in range(2):
        u = torch.randn(4, 6, 16, dtype=D)
        torch.testing.assert_close(bn(fc(u), u), naive(fc(u)))
    assert bn.describe()["variant"] == "naive-cbn" and "3-D input" in bn.describe()["note"]


@pytest.mark.parametrize("recipe", ["cbn:k=2", "cbn:k=2,store=inputs", "naive-cbn:k=2", "cbn:k=1"])
def test_train_mode_forward_under_inference_mode_is_like_no_grad(recipe):
    """A statistics pass in train mode under torch.inference_mode must leave a model that trains
    on (as stock BN does), exactly as the same pass under torch.no_grad would."""
    import bnrewrite
    import torch.nn.functional as F

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    models = [bnrewrite.transform(copy.deepcopy(base), recipe) for _ in range(2)]
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for model, mode in zip(models, (torch.inference_mode, torch.no_grad)):
        with mode():
            model(x)
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("layers, shape", [(lambda: (nn.Linear(3, 4), nn.BatchNorm1d(4)), (3,)),
                                           (lambda: (nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), (3, 1, 1))],
                         ids=["BatchNorm1d", "BatchNorm2d"])
def test_compiled_step_refuses_one_value_per_channel_without_history_like_eager(layers, shape):
    """A batch of one value per channel has no variance: stock BatchNorm raises "Expected more than
    1 value per channel", and so does the eager CBN step while it has no history (the first step,
    the burn-in). The compiled step must refuse the same batches, and accept it, with eager's
    output, once the window holds past iterations."""
    import bnrewrite

    torch.manual_seed(0)
    stock = nn.Sequential(*layers())
    eager = bnrewrite.transform(copy.deepcopy(stock), "cbn:k=2,burnin=2")
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    single, good = torch.randn(1, *shape), torch.randn(4, *shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        stock(single)
    for step in ["first", "burn-in"]:
        for net in (eager, compiled):
            with pytest.raises(InputError, match="more than 1 value per channel"):
                net(single)
        torch.testing.assert_close(compiled(good), eager(good), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(single), eager(single), rtol=1e-6, atol=1e-6)  # k = 2 from here
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_last_statistics_follow_double():
    """The window statistics of the last step (a plain attribute) follow .double() as the buffers do."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = CrossIterationBatchNorm(4, window=2)
    bn.attach_producer(conv, "conv")
    for _ in range(2):
        u = torch.randn(2, 3, 6, 6)
        bn(conv(u), u)
    k = bn.last_statistics[2]
    bn.double()
    mean, var, count = bn.last_statistics
    assert mean.dtype == var.dtype == bn.cbn_mean.dtype == torch.float64 and count == k == 2


@pytest.mark.parametrize("store", ["gradients", "inputs"])
def test_a_model_with_history_converts_to_channels_last_and_other_dtypes(store):
    """``.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D tensor of a model and
    refuses 5-D ones: the history's records ((k−1, N, C, H, W) inputs, (k−1, g, C/g, kh, kw)
    gradients) made that a raw error once the first step had allocated them. They keep their
    layout, the next step equals an unconverted copy's, and dtype/device changes still reach them."""
    import bnrewrite

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = bnrewrite.transform(net, f"cbn:k=3,store={store}")
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    reference = copy.deepcopy(model)
    history = {k: v for k, v in model.named_buffers() if ".cbn_" in k}
    assert any(v.dim() == 5 for v in history.values())
    model.to(memory_format=torch.channels_last)
    assert model.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
    assert all(v is history[k] for k, v in model.named_buffers() if k in history)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), reference(x))
    model.double()
    for k, v in model.named_buffers():
        if k in history:
            assert v.shape == history[k].shape and v.is_contiguous()
            assert v.dtype == (torch.float64 if history[k].is_floating_point() else history[k].dtype)


def test_a_partial_load_that_leaves_the_layer_out_keeps_its_history():
    """torch calls every module's _load_from_state_dict: a checkpoint of other layers only (a new
    head, strict=False) reset the history of every CBN layer."""
    _, cbn, _, _ = _run_history(True, k=3, steps=3)
    holder = nn.Module()
    holder.norm, holder.head = cbn, nn.Linear(2, 2)
    holder.load_state_dict({f"head.{k}": v for k, v in nn.Linear(2, 2).state_dict().items()}, strict=False)
    assert cbn.history_filled == 2
