"""The Triton kernels against independent references (bn-sampling.txt Eq. 1, 3, 4; App. C
Eq. 5–6): forward, backward and running statistics, over odd shapes, 1–3 spatial dims, all
sampling strategies and their mixtures, fp32/bf16/fp16 storage, NCHW and channels-last.

Without a GPU the kernels run in triton's interpreter (tests/conftest.py sets TRITON_INTERPRET) on small shapes; with one
the same checks run on CUDA on larger odd shapes (``gpu`` marker)."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from bnrewrite.runtime.sampled import SampleSpec

from .common import ACTS as REFERENCE_ACTS
from .common import make_input, reference_grads, rel_err, spec_cases

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = ["none", "relu", "relu6", "silu", "leaky_relu"]
# tolerance on ‖out − ref‖/‖ref‖: fp32 arithmetic, or rounding of 16-bit storage
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _kernels():
    from bnrewrite.runtime.kernels import _triton

    return _triton


@pytest.fixture(params=["split", "single-pass"])
def kernel_path(request, monkeypatch):
    """Every kernel check runs on both launch sequences: the split kernels (statistics partials,
    finalize, normalise; 3 launches each way) and the single-pass ones (1 launch each way)."""
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("no triton backend")
    monkeypatch.setattr(_kernels(), "SINGLE_PASS_MAX", 0 if request.param == "split" else 2 ** 62)
    return request.param


def _cases():
    # every spec case meets every dtype and both layouts once; activations rotate through
    out = []
    for i, ((name, shape, spec), dtype, cl) in enumerate(itertools.product(spec_cases(), DTYPES, (False, True))):
        if (i % 3) != 0 and dtype is not torch.float32:
            continue  # keeps CI short: each case still meets 16-bit storage in both layouts
        out.append(pytest.param(shape, spec, dtype, cl, ACTS[i % len(ACTS)],
                                id=f"{name}-{str(dtype)[6:]}-{'cl' if cl else 'nchw'}-{ACTS[i % len(ACTS)]}"))
    return out


def _region(spec, shape):
    from bnrewrite.runtime.kernels import region_of

    return region_of(spec, shape)


def _check(shape, spec_factory, dtype, channels_last, act, device):
    triton_mod = _kernels()
    spec = spec_factory()
    x = make_input(shape, dtype, channels_last, device, seed=hash(shape) % 1000)
    C = shape[1]
    gen = torch.Generator().manual_seed(1)
    weight = (torch.rand(C, generator=gen) + 0.5).to(device)
    bias = (torch.rand(C, generator=gen) - 0.5).to(device)
    dy = make_input(shape, dtype, channels_last, device, seed=7)
    eps, slope = 1e-5, 0.07
    region, wv, count = _region(spec, shape)
    y, stats = triton_mod.forward(x, weight, bias, region, wv, eps, act, slope)
    dx, dw, db = triton_mod.backward(dy, x, weight, bias, stats, region, wv, eps, act, slope)
    ry, rmean, rvar, rcount, rdx, rdw, rdb = reference_grads(x, spec, weight, bias, eps, act, slope, dy)
    tol = TOL[dtype]
    assert count == rcount
    assert y.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    assert rel_err(stats[0], rmean) < max(tol, 1e-5) * 0.1 + 1e-6
    assert rel_err(stats[1], rvar) < 1e-5
    assert rel_err(y, ry) < tol
    # 16-bit storage: dx carries the rounding of x, dy and of dx itself
    assert rel_err(dx, rdx) < (tol if dtype is torch.float32 else 3 * tol)
    assert rel_err(dw, rdw) < (1e-4 if dtype is torch.float32 else 2 * tol)
    assert rel_err(db, rdb) < (1e-4 if dtype is torch.float32 else 2 * tol)
    # running statistics: PyTorch's EMA with the unbiased variance of the `count` values
    rm, rv = torch.full((C,), 0.3, device=device), torch.full((C,), 2.0, device=device)
    triton_mod.update_running_stats(rm, rv, stats, 0.1, count / (count - 1))
    assert torch.allclose(rm.cpu().double(), 0.9 * 0.3 + 0.1 * rmean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rv.cpu().double(), 0.9 * 2.0 + 0.1 * rvar * count / (count - 1), rtol=1e-5, atol=1e-6)
    # the same EMA folded into the forward's finalize launch (eager mode's path)
    # (and num_batches_tracked's + 1, made by one program of that launch)
    rm, rv = torch.full((C,), 0.3, device=device), torch.full((C,), 2.0, device=device)
    tracked = torch.tensor(5, device=device)
    y2, stats2 = triton_mod.forward(x, weight, bias, region, wv, eps, act, slope,
                                    running=(rm, rv, 0.1, count / (count - 1)), tracked=tracked)
    assert torch.equal(y2, y) and torch.equal(stats2, stats)
    assert tracked.dtype == torch.int64 and int(tracked) == 6
    assert torch.allclose(rm.cpu().double(), 0.9 * 0.3 + 0.1 * rmean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(rv.cpu().double(), 0.9 * 2.0 + 0.1 * rvar * count / (count - 1), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not INTERPRETED, reason="triton interpreter not enabled: the cuda cases cover this")
@pytest.mark.parametrize("shape,spec_factory,dtype,channels_last,act", _cases())
def test_kernels_match_reference_interpreted(shape, spec_factory, dtype, channels_last, act, kernel_path):
    _check(shape, spec_factory, dtype, channels_last, act, "cpu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_statistics_of_values_far_from_zero_are_as_precise_as_torch(channels_last, kernel_path):
    """Values near 1000 with unit variance, over several tiles per program: each thread's
    running Welford moments and their combination keep the variance as precise as
    ``torch.var_mean`` in float32 (E[x²]−E[x]² in float32 would lose all of it)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(16, 3, 24, 24, generator=gen, dtype=torch.float64) + 1000.0
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    from bnrewrite.runtime.kernels import region_of

    region, wv, _ = region_of(None, x.shape)
    _, stats = _kernels().forward(x.to(device), None, None, region, wv, 1e-5, "none", 0.0)
    exact = x.double()  # the float32 values, exactly
    var64, mean64 = torch.var_mean(exact, dim=(0, 2, 3), unbiased=False)
    var32, mean32 = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    torch_err = ((var32.double() - var64).abs() / var64).max().item()
    ours_err = ((stats[1].cpu().double() - var64).abs() / var64).max().item()
    assert ours_err <= max(4 * torch_err, 2e-5), (ours_err, torch_err)
    assert (stats[0].cpu().double() - mean64).abs().max() <= 1e-4


@pytest.mark.skipif(not INTERPRETED, reason="triton interpreter not enabled: the cuda cases cover this")
def test_launch_plans_are_cached_per_shape_layout_and_region(kernel_path):
    """Launch arguments are computed once per (shape, layout, region, flags) and reused: the
    same shape in both layouts and with three samples, twice over, still matches the reference."""
    triton_mod = _kernels()
    specs = [lambda: None, lambda: SampleSpec(rows=(0, 3), patch=((1, 4), (2, 5))), lambda: SampleSpec(rows=(1, 2))]
    for plan in (triton_mod._forward_plan, triton_mod._backward_plan, triton_mod._single_pass_plan):
        plan.cache_clear()
    for _ in range(2):
        for spec in specs:
            for cl in (False, True):
                _check((3, 5, 7, 6), spec, torch.float32, cl, "relu", "cpu")
    # _check runs forward twice (with and without the running update) and backward once; every
    # call consults the single-pass plan first (None: too large, the split plans follow)
    split_calls = 24 if kernel_path == "split" else 0
    expected = ((triton_mod._forward_plan, split_calls), (triton_mod._backward_plan, split_calls // 2),
                (triton_mod._single_pass_plan, 36))
    for plan, calls in expected:
        info = plan.cache_info()
        assert (info.misses, info.hits) == (min(6, calls), calls - min(6, calls))


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="no triton backend")
def test_the_launch_sequence_follows_the_values_per_channel(monkeypatch):
    """Layers whose single-pass programs cover at most SINGLE_PASS_MAX elements take the
    single-pass kernels, larger ones the split kernels: each direction is 1 launch, or 3."""
    triton_mod = _kernels()
    # (N, 5, 7, 6) NCHW: one channel per program (5 channels, too few to share), N x 42 elements
    monkeypatch.setattr(triton_mod, "SINGLE_PASS_MAX", 3 * 7 * 6)
    launched = []
    for name in ("_stats_partial_kernel", "_stats_finalize_kernel", "_normalize_kernel", "_grad_partial_kernel",
                 "_grad_finalize_kernel", "_grad_input_kernel", "_forward_single_pass_kernel",
                 "_backward_single_pass_kernel", "_window_finalize_kernel", "_window_single_pass_kernel"):
        kernel = getattr(triton_mod, name)

        class Counted:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(triton_mod, name, Counted(kernel, name))
    for shape, expected in (((3, 5, 7, 6), ["_forward_single_pass_kernel", "_backward_single_pass_kernel"]),
                            ((4, 5, 7, 6), ["_stats_partial_kernel", "_stats_finalize_kernel", "_normalize_kernel",
                                            "_grad_partial_kernel", "_grad_finalize_kernel", "_grad_input_kernel"])):
        launched.clear()
        assert triton_mod.single_pass(torch.empty(shape)) == (len(expected) == 2)
        _check(shape, lambda: None, torch.float32, False, "relu", "cuda" if torch.cuda.is_available() else "cpu")
        # _check: forward, backward, the separate running update, forward with the update
        assert launched[:len(expected)] == expected
        assert launched.count(expected[0]) == 2
    # Cross-iteration BN's forward: the window statistics in the same single launch, or split
    for shape, expected in (((3, 5, 7, 6), ["_window_single_pass_kernel"]),
                            ((4, 5, 7, 6), ["_stats_partial_kernel", "_window_finalize_kernel", "_normalize_kernel"])):
        launched.clear()
        _check_window(shape, torch.float32, False, 2, "cuda" if torch.cuda.is_available() else "cpu", "relu")
        assert launched[:len(expected)] == expected


def _gpu_cases():
    big = [
        ("full", (8, 64, 28, 28), lambda: None),
        ("full-odd", (7, 37, 13, 11), lambda: None),
        ("fs", (16, 48, 29, 31), lambda: SampleSpec(rows=(0, 16), patch=((3, 9), (20, 26)))),
        ("bs", (32, 96, 7, 7), lambda: SampleSpec(rows=(5, 9))),
        ("vdn", (9, 130, 14, 14), lambda: SampleSpec(rows=(0, 8), num_virtual=1, beta=1.0)),
        ("fs+vdn", (17, 33, 15, 15), lambda: SampleSpec(rows=(0, 16), patch=((2, 5), (4, 7)), num_virtual=1,
                                                       beta=0.5)),
        ("full-1d", (300, 70), lambda: None),
        ("fs-3d", (4, 12, 5, 9, 11), lambda: SampleSpec(rows=(0, 4), patch=((1, 3), (2, 6), (0, 4)))),
        ("bs-large-C", (64, 2048, 7, 7), lambda: SampleSpec(rows=(10, 14))),
        ("full-large", (64, 64, 56, 56), lambda: None),
    ]
    out = []
    for i, ((name, shape, spec), dtype, cl) in enumerate(itertools.product(big, DTYPES, (False, True))):
        out.append(pytest.param(shape, spec, dtype, cl, ACTS[i % len(ACTS)],
                                id=f"{name}-{str(dtype)[6:]}-{'cl' if cl else 'nchw'}-{ACTS[i % len(ACTS)]}"))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,spec_factory,dtype,channels_last,act", _gpu_cases())
def test_kernels_match_reference_cuda(shape, spec_factory, dtype, channels_last, act, kernel_path):
    _check(shape, spec_factory, dtype, channels_last, act, "cuda")


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="no triton backend")
def test_gradient_in_other_memory_format_is_accepted(kernel_path):
    """A gradient arriving NCHW for a channels-last input (or vice versa) gives the same dx."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_mod = _kernels()
    shape = (3, 4, 5, 6)
    x = make_input(shape, torch.float32, True, device)
    w = torch.ones(4, device=device)
    region, wv, _ = _region(SampleSpec(rows=(0, 2), patch=((1, 3), (2, 5))), shape)
    y, stats = triton_mod.forward(x, w, w, region, wv, 1e-5, "relu", 0.0)
    dy = torch.randn(shape, device=device)
    dx_a, *_ = triton_mod.backward(dy, x, w, w, stats, region, wv, 1e-5, "relu", 0.0)
    dx_b, *_ = triton_mod.backward(dy.contiguous(memory_format=torch.channels_last), x, w, w, stats, region, wv,
                                   1e-5, "relu", 0.0)
    assert torch.equal(dx_a, dx_b)


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="no triton backend")
def test_every_output_element_is_written(kernel_path):
    """Poisoned outputs: the kernels write every element (NaN would survive otherwise)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton_mod = _kernels()
    for shape, cl in [((5, 3, 7, 9), False), ((5, 3, 7, 9), True), ((11, 6), False)]:
        x = make_input(shape, torch.float32, cl, device)
        region, wv, _ = _region(None, shape)
        y, stats = triton_mod.forward(x, None, None, region, wv, 1e-5, "none", 0.0)
        assert torch.isfinite(y).all()
        assert torch.isfinite(stats).all()
        dx, dw, db = triton_mod.backward(torch.ones_like(x), x, None, None, stats, region, wv, 1e-5, "none", 0.0)
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
        # normalised over the whole batch: mean 0, biased variance 1 per channel
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(y.double(), dim=dims, unbiased=False)
        assert mean.abs().max() < 1e-5 and (var - 1).abs().max() < 1e-3


def _window_case(shape, dtype, channels_last, h, device):
    """Inputs of a cross-iteration BN step: x, affine, dy and h compensated past (μ, ν)."""
    C = shape[1]
    x = make_input(shape, dtype, channels_last, device, seed=3)
    dy = make_input(shape, dtype, channels_last, device, seed=4)
    gen = torch.Generator().manual_seed(5)
    weight = (torch.rand(C, generator=gen) + 0.5).to(device)
    bias = (torch.rand(C, generator=gen) - 0.5).to(device)
    past_mean = torch.randn(h, C, generator=gen) * 0.5 + 0.4
    past_var = torch.rand(h, C, generator=gen) * 3 + 0.2
    past_sq_mean = past_var + past_mean.square()
    past_sq_mean[0, 0] = past_mean[0, 0] ** 2 - 0.1   # a ν < μ² (Eq. 10's max applies)
    return x, dy, weight, bias, past_mean.to(device), past_sq_mean.to(device)


def _check_window(shape, dtype, channels_last, h, device, act="none"):
    """The fused window op (forward + backward) against the plain-torch Eqs. 9–12 op of the CBN
    runtime (itself checked against autograd in tests/runtime/test_cross_iteration.py), in fp64."""
    from bnrewrite.runtime.cross_iteration import window_batch_norm
    from bnrewrite.runtime.kernels.functional import whole_batch_region

    triton_mod = _kernels()
    x, dy, weight, bias, past_mean, past_sq_mean = _window_case(shape, dtype, channels_last, h, device)
    eps = 1e-5
    slope = 0.07
    y, stats = triton_mod.window_forward(x, weight, bias, past_mean, past_sq_mean, eps, act, slope)
    count = (h + 1) * (x.numel() // x.shape[1])
    dx, dw, db = triton_mod.backward(dy, x, weight, bias, stats, whole_batch_region(x.shape), 0.0, eps,
                                     act, slope, group_count=count)
    x64 = x.detach().double().cpu().requires_grad_(True)
    w64 = weight.double().cpu().requires_grad_(True)
    b64 = bias.double().cpu().requires_grad_(True)
    rz, rmean, rvar, rmean_now, rvar_now = window_batch_norm(x64, w64, b64, past_mean.double().cpu(),
                                                             past_sq_mean.double().cpu(), eps)
    ry = REFERENCE_ACTS[act](rz, slope)
    rdx, rdw, rdb = torch.autograd.grad(ry, (x64, w64, b64), dy.double().cpu())
    tol = TOL[dtype]
    assert y.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
    for got, want in ((stats[0], rmean), (stats[1], rvar), (stats[4], rmean_now), (stats[5], rvar_now)):
        assert rel_err(got, want) < 1e-5
    assert torch.equal(stats[3], stats[0])
    assert rel_err(y, ry) < tol
    assert rel_err(dx, rdx) < (tol if dtype is torch.float32 else 3 * tol)
    assert rel_err(dw, rdw) < (1e-4 if dtype is torch.float32 else 2 * tol)
    assert rel_err(db, rdb) < (1e-4 if dtype is torch.float32 else 2 * tol)


_WINDOW_CASES = [((3, 5, 7, 6), torch.float32, False, 1, "none"), ((3, 5, 7, 6), torch.float32, True, 3, "relu"),
                 ((4, 6, 9), torch.float32, False, 2, "silu"), ((6, 7), torch.float32, False, 3, "none"),
                 ((2, 4, 3, 5, 4), torch.float32, True, 2, "leaky_relu"),
                 ((3, 5, 7, 6), torch.bfloat16, True, 3, "relu6"), ((5, 3, 4, 4), torch.float16, False, 1, "relu")]


@pytest.mark.skipif(not INTERPRETED, reason="triton interpreter not enabled: the cuda cases cover this")
@pytest.mark.parametrize("shape,dtype,channels_last,h,act", _WINDOW_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-{'cl' if c[2] else 'nchw'}-h{c[3]}-{c[4]}"
                              for c in _WINDOW_CASES])
def test_window_kernels_match_cbn_reference_interpreted(shape, dtype, channels_last, h, act, kernel_path):
    _check_window(shape, dtype, channels_last, h, "cpu", act)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,channels_last,h,act",
                         [((8, 64, 28, 28), torch.float32, False, 3, "relu"),
                          ((16, 48, 29, 31), torch.bfloat16, True, 7, "silu"),
                          ((300, 70), torch.float32, False, 2, "none"), ((7, 37, 13, 11), torch.float16, True, 1, "relu")])
def test_window_kernels_match_cbn_reference_cuda(shape, dtype, channels_last, h, act, kernel_path):
    _check_window(shape, dtype, channels_last, h, "cuda", act)


def test_entry_points_make_the_input_device_current(monkeypatch):
    """Triton launches on the current CUDA device: an input on cuda:1 while cuda:0 is current runs
    the entry point inside ``torch.cuda.device(cuda:1)``, an input on the current device (or on the
    CPU) without a device switch."""
    import contextlib
    import types

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    inside = []
    entry = _kernels().on_device_of(1)(lambda a, t: inside.append(list(entered)) or a)
    on = lambda index: types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", index))  # noqa: E731
    assert entry("dy", on(1)) == "dy" and inside[-1] == [torch.device("cuda", 1)]
    entered.clear()
    entry("dy", on(0))
    entry("dy", torch.zeros(1))
    assert entered == [] and inside[-2:] == [[], []]
    # every kernel entry point carries it, on the argument that holds the input
    mod = _kernels()
    for name in ("forward", "backward", "window_forward", "normalize", "update_running_stats"):
        assert getattr(mod, name).__wrapped__ is not None, name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_layer_on_the_second_gpu_runs_there_while_the_first_is_current(kernel_path):
    torch.cuda.set_device(0)
    _check((6, 5, 9, 7), lambda: SampleSpec(rows=(1, 4), patch=((2, 6), (1, 5))), torch.float32, False, "relu",
           "cuda:1")
    assert torch.cuda.current_device() == 0
