"""passes/lower.py and the fused runtime modules, on CPU: the lowered model must train exactly
like the reference rewrite (``lower="reference"``) and like stock BatchNorm for ``bn``. Without a
GPU the fused op runs its plain-torch implementation, or -- with ``BNREWRITE_TRITON_CPU=1`` -- the
Triton kernels in triton's interpreter; the kernels themselves are compared with PyTorch in
tests/runtime/kernels/."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnrewrite
from bnrewrite.passes.lower import LowerOptions
from bnrewrite.runtime.kernels import FusedBatchNorm, FusedSampledMixin, ops


class ConvNet(nn.Module):
    """BN followed by ReLU (module), SiLU (function), LeakyReLU (module), an add (no activation)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3, self.a3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2)
        self.b4 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = F.silu(self.b2(self.c2(x)))
        x = self.a3(self.b3(self.c3(x)))
        x = self.b4(x + 1.0)
        return self.head(x.mean((2, 3)))


def _pair(recipe, compile_path="inductor", **options):
    torch.manual_seed(0)
    base = ConvNet()
    ref = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="reference", **options)
    low = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="fused", compile_path=compile_path,
                              **options)
    return base, ref, low


def _train(model, steps=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outs = []
    model.train()
    for _ in range(steps):
        x = torch.randn(6, 3, 12, 10, generator=gen)
        y = torch.randint(0, 5, (6,), generator=gen)
        torch.manual_seed(seed)  # vdn draws virtual rows from the global generator
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(loss.detach())
    return torch.stack(outs)


def _assert_same_buffers_and_eval(low, ref, buffer_atol, rtol, atol):
    """Buffers (running statistics, histories) equal, then eval outputs equal; returns the eval input."""
    for (name, b), c in zip(low.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=buffer_atol, msg=name)
    low.eval()
    ref.eval()
    x = torch.randn(2, 3, 12, 10)
    torch.testing.assert_close(low(x), ref(x), rtol=rtol, atol=atol)
    return x


RECIPES = ["bn", "fs", "bs:n=4", "ns:n=3", "fs:ratio=1/4,every=2", "vdn:n=2", "fs+vdn:n=2"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_lowered_model_trains_like_reference(recipe):
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    _, ref, low = _pair(recipe, **options)
    records = low.bnrewrite_lowering
    assert [r.lowered for r in records] == [True] * 4, records
    assert [r.activation for r in records] == ["relu", "silu", "leaky_relu", None]
    torch.testing.assert_close(_train(low), _train(ref), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(low.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    _assert_same_buffers_and_eval(low, ref, buffer_atol=1e-6, rtol=1e-5, atol=1e-6)


def test_lowered_bn_equals_stock_batchnorm_and_keeps_its_state_dict():
    base, _, low = _pair("bn")
    stock = copy.deepcopy(base)
    assert set(low.state_dict()) == set(stock.state_dict())
    assert isinstance(low.get_submodule("b1"), FusedBatchNorm)
    torch.testing.assert_close(_train(low), _train(stock), rtol=1e-5, atol=1e-6)
    for (name, b), c in zip(low.named_buffers(), stock.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    # a stock checkpoint loads strictly into the lowered model and back
    low.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(low.state_dict(), strict=True)


def test_activation_is_fused_out_of_both_mode_graphs_and_folds():
    _, _, low = _pair("fs")
    names = [n.target for n in low.graph.nodes if n.op == "call_module"]
    assert "a1" not in names and "a3" not in names
    assert not any(n.target is F.silu for n in low.graph.nodes)
    _train(low)
    low.eval()
    x = torch.randn(2, 3, 12, 10)
    folded = bnrewrite.fold_for_inference(low)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "is_bnrewrite_norm", False)
                   for m in folded.modules())
    torch.testing.assert_close(folded(x), low(x), rtol=1e-5, atol=1e-5)


def test_modes_reference_and_auto_on_cpu_do_not_lower():
    _, ref, _ = _pair("fs")
    assert not any(isinstance(m, FusedSampledMixin) for m in ref.modules())
    torch.manual_seed(0)
    auto = bnrewrite.transform(ConvNet(), "fs", lower="auto")
    assert not any(isinstance(m, FusedSampledMixin) for m in auto.modules())


@pytest.mark.parametrize("hip, capability, lowered", [(None, (9, 0), True), (None, (7, 0), True),
                                                     (None, (6, 1), False), ("6.2", (9, 4), False)],
                         ids=["sm_90", "sm_70", "sm_61", "rocm"])
def test_auto_lowers_on_the_gpus_the_kernels_compile_for(hip, capability, lowered, monkeypatch):
    """``lower="auto"`` on a CUDA model: NVIDIA GPUs of compute capability 7.0 and newer (every
    kernel compiles for sm_70: benchmarks/kernel_resources.py --quick --arch 70); an older one, or
    an AMD GPU under a ROCm build (which torch also calls ``cuda``), keeps the reference path with
    the reason in the lowering records. The device is given to the decision as torch reports it."""
    from bnrewrite.passes import lower

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P40")
    why = lower.unsupported_gpu(torch.device("cuda", 0))
    assert (why is None) == lowered, why
    if hip is not None:
        assert "AMD" in why and "lower='fused'" in why
    elif not lowered:
        assert why == "Tesla P40 is sm_61: the fused kernels need compute capability 7.0 or newer"
    meta = ConvNet().to("meta")
    assert lower.should_lower(meta, "auto") == (False, "the model is not on a CUDA device (move it with .cuda() "
                                                       "before transform, or lower='fused')")
    assert lower.should_lower(meta, "fused") == (True, "")


def test_variants_without_kernels_stay_on_the_reference_path():
    torch.manual_seed(0)
    model = bnrewrite.transform(ConvNet(), "frs:ratio=1/4", lower="fused")
    assert not any(r.lowered for r in model.bnrewrite_lowering)
    assert "frs" in model.bnrewrite_lowering[0].reason
    torch.manual_seed(0)
    ghost = bnrewrite.transform(ConvNet(), "ghost:size=3", lower="fused")
    assert all(not r.lowered and "no fused kernel" in r.reason for r in ghost.bnrewrite_lowering)


def test_bad_lower_mode_is_a_clear_error():
    with pytest.raises(bnrewrite.errors.InputError, match="lower="):
        LowerOptions(mode="fast")
    with pytest.raises(bnrewrite.BnRewriteError, match="lower"):
        bnrewrite.transform(ConvNet(), "fs", lower="fast")


def _bnrewrite_ops(graphs) -> set[str]:
    return {str(n.target) for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("bnrewrite.")}


@pytest.mark.parametrize("recipe", ["fs:ratio=1/4", "bn"])
@pytest.mark.parametrize("compile_path", ["inductor", "ops"])
def test_torch_compile_fullgraph_matches_eager_across_epochs(compile_path, recipe):
    """fullgraph: the first step runs eagerly (it draws the sample); new_epoch draws eagerly too.
    ``compile_path="inductor"`` hands dynamo the plain-torch computation (no bnrewrite op in the
    graph, so inductor fuses it like stock BN); ``"ops"`` traces the custom ops."""
    _, ref, low = _pair(recipe, compile_path=compile_path)
    torch.testing.assert_close(_train(low, steps=1), _train(ref, steps=1), rtol=1e-5, atol=1e-6)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(low, backend=recording_backend, fullgraph=True)
    for epoch in range(3):
        bnrewrite.new_epoch(low)
        bnrewrite.new_epoch(ref)
        torch.testing.assert_close(_train(compiled, steps=2, seed=epoch), _train(ref, steps=2, seed=epoch),
                                   rtol=1e-5, atol=1e-6)
    used = _bnrewrite_ops(graphs)
    if compile_path == "ops":
        assert used == {"bnrewrite.batch_norm_act.default", "bnrewrite.update_running_stats_.default"}, used
    else:
        assert graphs and used == set(), used
    assert all(r.lowered for r in low.bnrewrite_lowering)


def test_compile_path_is_validated_and_shown():
    with pytest.raises(bnrewrite.errors.InputError, match="compile_path= must be 'inductor' or 'ops'"):
        LowerOptions(compile_path="triton")
    with pytest.raises(bnrewrite.errors.InputError, match="compile_path= .* needs lower='auto' or lower='fused'"):
        bnrewrite.transform(ConvNet(), "fs", compile_path="ops")
    _, _, low = _pair("fs", compile_path="ops")
    assert "compile_path=ops" in repr(low.b1) and low.b1.describe()["compile_path"] == "ops"
    _, _, default = _pair("fs")
    assert "compile_path" not in repr(default.b1) and default.b1.describe()["compile_path"] == "inductor"


@pytest.mark.parametrize("act", ["none", "relu", "leaky_relu"])
def test_eager_path_equals_the_custom_op(act):
    """Eager mode bypasses the custom-op dispatcher (host overhead); both must compute the same."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, 7, generator=gen, dtype=torch.float64)
    w = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, 5, 6, 7, generator=gen, dtype=torch.float64)
    region = [1, 1, 3, 0, 1, 2, 5, 1, 6]  # one virtual row, rows 1..3, a 3x5 patch
    results = []
    for fn in (ops.call_batch_norm_act, ops.batch_norm_act):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        y, stats = fn(xs, ws, bs, region, 0.25, 1e-5, act, 0.1)
        grads = torch.autograd.grad(y, (xs, ws, bs), dy)
        results.append((y, stats, *grads))
    for a, c in zip(*results):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration, as torch.compile uses them."""
    x = torch.randn(4, 5, 6, 7, requires_grad=True)
    w = torch.rand(5, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    torch.library.opcheck(torch.ops.bnrewrite.batch_norm_act.default,
                          (x, w, b, [0, 0, 4, 0, 1, 1, 5, 2, 6], 0.0, 1e-5, "relu", 0.0))
    stats = torch.rand(4, 5)
    torch.library.opcheck(torch.ops.bnrewrite.update_running_stats_.default,
                          (torch.zeros(5), torch.ones(5), stats, 0.1, 1.1))


def _interpreted_kernels(monkeypatch):
    """The Triton module, with CPU tensors routed through triton's interpreter for this test."""
    pytest.importorskip("triton")
    from bnrewrite.runtime.kernels import _triton

    if torch.cuda.is_available():
        pytest.skip("with a GPU triton compiles the kernels for CUDA tensors: see the gpu tests")
    if not _triton.is_interpreted():
        pytest.fail("TRITON_INTERPRET must be set before triton is imported (tests/conftest.py)")
    monkeypatch.setenv("BNREWRITE_TRITON_CPU", "1")
    return _triton


@pytest.mark.parametrize("recipe", ["bn", "fs+vdn:n=2"])
def test_lowered_model_with_interpreted_triton_kernels_trains_like_reference(recipe, monkeypatch):
    _interpreted_kernels(monkeypatch)
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    _, ref, low = _pair(recipe, **options)
    torch.testing.assert_close(_train(low, steps=2), _train(ref, steps=2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", ["cbn:k=3", "naive-cbn:k=3"])
def test_cbn_window_norm_on_interpreted_triton_kernels_trains_like_reference(recipe, monkeypatch):
    """Lowered CBN: Eqs. 9-12 (+ the fused activation) and their backward on the kernels (window
    finalize + the sampled BN backward with one group of count k·M), the history in plain torch;
    equal to the reference."""
    from bnrewrite.runtime.cross_iteration import CrossIterationBatchNorm

    _triton = _interpreted_kernels(monkeypatch)
    calls = []
    window_forward = _triton.window_forward
    monkeypatch.setattr(_triton, "window_forward", lambda *a, **k: calls.append(1) or window_forward(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cbn: b4 (after an add) has no producer and runs naive-cbn
        _, ref, low = _pair(recipe)
    records = low.bnrewrite_lowering
    assert [(r.lowered, r.activation) for r in records] == [(True, "relu"), (True, "silu"), (True, "leaky_relu"),
                                                             (True, None)]
    norms = [m for m in low.modules() if isinstance(m, CrossIterationBatchNorm)]
    assert len(norms) == 4 and all(m.lowered == "triton" for m in norms)
    assert "lowered=triton" in repr(norms[0])
    torch.testing.assert_close(_train(low, steps=4), _train(ref, steps=4), rtol=1e-4, atol=1e-5)
    assert len(calls) == 4 * 3  # every site from the second step on (the first fills the window)
    x = _assert_same_buffers_and_eval(low, ref, buffer_atol=1e-5, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bnrewrite.fold_for_inference(low)(x), low(x), rtol=1e-4, atol=1e-5)


def _break_single_pass_launch(_triton, monkeypatch, which: str) -> None:
    """Make the single-pass ``which`` launch (forward, backward or window) one Triton cannot run:
    a tile of 3 positions (``tl.arange`` takes powers of 2)."""
    plan_of = _triton._single_pass_plan

    def broken(*key):
        plan = plan_of(*key)
        launch = getattr(plan, which)
        return plan._replace(**{which: launch._replace(meta=dict(launch.meta, BLOCK_P=3))})

    monkeypatch.setattr(_triton, "SINGLE_PASS_MAX", 2 ** 62)
    monkeypatch.setattr(_triton, "_single_pass_plan", broken)


def _lowered_on_the_kernels(recipe: str, monkeypatch) -> tuple[nn.Module, torch.device]:
    """ConvNet rewritten with ``recipe`` and lowered, on CUDA where there is a GPU, else on CPU
    with the interpreted kernels."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        _interpreted_kernels(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cbn: b4 (after an add) has no producer and runs naive-cbn
        return bnrewrite.transform(ConvNet().to(device), recipe, lower="fused"), torch.device(device)


def _kernels_device_name() -> str:
    """How a KernelError names the device the kernels run on."""
    if not torch.cuda.is_available():
        return "Triton's CPU interpreter"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (cuda:{torch.cuda.current_device()}, sm_{major}{minor})"


# the site that launches first: the backward runs the last site first
@pytest.mark.cuda_too
@pytest.mark.parametrize("recipe, which, site", [("bn", "forward", "b1"), ("fs:ratio=1/4", "backward", "b4"),
                                                 ("cbn:k=2", "window", "b1")])
def test_a_kernel_triton_cannot_run_is_a_kernel_error_naming_site_kernel_and_input(recipe, which, site, monkeypatch):
    """A Triton error in a lowered site's forward or backward launch (a tile Triton rejects: on a GPU
    its compiler, on CPU its interpreter) reaches the training loop as a KernelError that names the
    site, the kernel, the device and the input, gives the innermost cause and says what to do."""
    from bnrewrite.runtime.kernels import _triton
    from triton.errors import TritonError

    model, device = _lowered_on_the_kernels(recipe, monkeypatch)
    _break_single_pass_launch(_triton, monkeypatch, which)
    x = torch.randn(4, 3, 6, 6, device=device)
    with pytest.raises(bnrewrite.KernelError) as info:
        for _ in range(2):  # cbn runs its window op from the second step (the first fills the window)
            model(x).sum().backward()
    message = str(info.value)
    assert message.startswith(f"{type(model.get_submodule(site)).__name__} '{site}': Triton kernel "
                              f"_{which}_single_pass_kernel failed on {_kernels_device_name()} for an input of shape "
                              "(4, 8, 6, 6), torch.float32: "), message
    assert "power of 2" in message and message.endswith("lower='reference' to train it without the fused kernels")
    assert isinstance(info.value.__cause__, TritonError)


@pytest.mark.cuda_too
@pytest.mark.parametrize("recipe, name, label", [("bn", "weight", "weight"), ("fs:ratio=1/4", "running_var", "running_var"),
                                                ("cbn:k=2", "bias", "bias")])
def test_a_lowered_site_refuses_tensors_on_another_device_than_its_input(recipe, name, label, monkeypatch):
    """A kernel handed another device's pointer reads memory that is not there (a meta tensor's is
    null): before it launches, the site refuses with an InputError naming it and the tensor, as
    torch's ops refuse mixed devices. On a GPU: a CPU tensor at a CUDA site; on CPU (interpreted
    kernels): a meta tensor at a CPU site."""
    model, device = _lowered_on_the_kernels(recipe, monkeypatch)
    other = "cpu" if device.type == "cuda" else "meta"
    x = torch.randn(4, 3, 6, 6, device=device)
    model(x).sum().backward()  # cbn: the first step fills the window; the window op runs from the second
    site = model.b1
    moved = getattr(site, name)
    elsewhere = torch.empty_like(moved, device=other)
    setattr(site, name, nn.Parameter(elsewhere) if isinstance(moved, nn.Parameter) else elsewhere)
    with pytest.raises(bnrewrite.InputError) as info:
        model(x)
    assert str(info.value) == (f"{type(site).__name__} 'b1': the input is on {x.device} but {label} is on {other}; "
                               f"move the model and its inputs to one device (model.to('{x.device}'))")


def _lowered_pair_on_kernels(recipe, kernels, monkeypatch):
    """(device, (stock, reference rewrite, lowered rewrite)) of the test ConvNet, its 4 sites all
    lowered; ``kernels``: "triton" runs the kernels (interpreted on a CPU), "reference-impl" the
    lowered op's plain-torch implementation (CPU only: on CUDA the op runs the kernels)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kernels == "triton" and device.type == "cpu":
        _interpreted_kernels(monkeypatch)
    elif kernels == "reference-impl" and device.type == "cuda":
        pytest.skip("on CUDA the lowered op runs the kernels")
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cbn: b4 (after an add) has no producer and runs naive-cbn
        models = _pair(recipe, **options)
    assert sum(r.lowered for r in models[2].bnrewrite_lowering) == 4, models[2].bnrewrite_lowering
    return device, models


def _gradient_penalty_step(model, device, steps: int = 2) -> list[torch.Tensor]:
    """Training steps with an input-gradient penalty (taken with create_graph=True, as R1/WGAN-GP
    and MAML take theirs): per step the penalty's gradients of every parameter."""
    gen = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(steps):  # cbn: the window op from the second step
        x = torch.randn(6, 3, 8, 8, generator=gen).to(device).requires_grad_(True)
        torch.manual_seed(5)  # vdn draws virtual rows from the global generator
        out = model(x)
        (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        params = [p for p in model.parameters() if p.requires_grad]
        grads += [g if g is not None else torch.zeros_like(p)
                  for g, p in zip(torch.autograd.grad(dx.square().sum(), params, allow_unused=True), params)]
    return grads


@pytest.mark.cuda_too
@pytest.mark.parametrize("kernels", ["reference-impl", "triton"])
@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/4", "fs+vdn:n=2", "cbn:k=2"])
def test_second_derivatives_through_lowered_sites_equal_the_reference_rewrites(recipe, kernels, monkeypatch):
    """A gradient taken with create_graph=True through a lowered site differentiates again like the
    reference rewrite's (plain autograd), and for ``bn`` like stock BatchNorm: the penalty's
    parameter gradients agree. (The kernels' closed-form backward alone gives first derivatives;
    under create_graph the op differentiates its plain-torch forward instead.)"""
    device, (base, ref, low) = _lowered_pair_on_kernels(recipe, kernels, monkeypatch)
    models = {"ref": ref, "low": low} if recipe != "bn" else {"ref": ref, "low": low, "stock": base}
    grads = {name: _gradient_penalty_step(m.to(device).train(), device) for name, m in models.items()}
    # fp32: second derivatives carry the rounding of both passes, and the convs before a BN get zero
    # bias gradients up to that rounding: a norm-wise check, at the scale of the largest gradient
    scale = max(g.norm() for g in grads["ref"])
    for name in models:
        for i, (a, b) in enumerate(zip(grads[name], grads["ref"])):
            assert (a - b).norm() <= 1e-4 * b.norm() + 1e-5 * scale, f"{name}, parameter gradient {i}: {a} vs {b}"
    assert max(g.abs().max().item() for g in grads["low"][:4]) > 1e-3  # not vacuous: the penalty moves the convs


def _func_grad_steps(model, device, use_func: bool, steps: int = 2) -> list[torch.Tensor]:
    """Per training step the parameter gradients, from torch.func.grad (buffers passed in) or
    from loss.backward()."""
    gen = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(steps):  # cbn: the window op from the second step
        x = torch.randn(6, 3, 8, 8, generator=gen).to(device)
        torch.manual_seed(5)  # vdn draws virtual rows from the global generator
        if use_func:
            params = {name: p.detach() for name, p in model.named_parameters()}
            found = torch.func.grad(lambda p, b: torch.func.functional_call(model, (p, b), (x,)).square().mean())(
                params, dict(model.named_buffers()))
            grads += [found[name] for name in params]
        else:
            model.zero_grad()
            model(x).square().mean().backward()
            grads += [p.grad.clone() for p in model.parameters()]
    return grads


@pytest.mark.cuda_too
@pytest.mark.parametrize("kernels", ["reference-impl", "triton"])
@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/4", "fs+vdn:n=2", "cbn:k=2"])
def test_torch_func_grad_through_lowered_sites_equals_the_kernels_gradients(recipe, kernels, monkeypatch):
    """Under a torch.func transform a lowered site runs its plain-torch computation (the transforms
    refuse the op's old-style autograd Function): the gradients and running statistics equal the
    fused op's under loss.backward(), step by step."""
    device, (_, _, low) = _lowered_pair_on_kernels(recipe, kernels, monkeypatch)
    low = low.to(device).train()
    func_model = copy.deepcopy(low)
    expected = _func_grad_steps(low, device, use_func=False)
    found = _func_grad_steps(func_model, device, use_func=True)
    scale = max(g.abs().max() for g in expected)
    for i, (a, b) in enumerate(zip(found, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=f"parameter gradient {i}")
    for (name, a), b in zip(func_model.named_buffers(), low.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert scale > 1e-3


def test_cbn_with_renorm_backward_is_not_lowered():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = bnrewrite.transform(ConvNet(), "cbn:backward=renorm", lower="fused")
    assert all(not r.lowered and "renorm" in r.reason for r in model.bnrewrite_lowering)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bn", "fs", "fs+vdn:n=2", "cbn:k=3"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lowered_model_on_cuda_trains_like_reference(recipe, channels_last):
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    torch.manual_seed(0)
    base = ConvNet().cuda()
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
    ref = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="reference", **options)
    low = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="auto", **options)
    assert all(r.lowered for r in low.bnrewrite_lowering)

    def train(model):
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            x = torch.randn(6, 3, 12, 10, generator=gen).cuda()
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = torch.randint(0, 5, (6,), generator=gen).cuda()
            torch.manual_seed(1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    torch.testing.assert_close(train(low), train(ref), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(low.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["bn", "fs"])
def test_lowered_training_step_replays_from_a_cuda_graph(recipe):
    """Small lowered layers are host-bound; a CUDA graph (``torch.cuda.graph``, as
    ``torch.compile(mode="reduce-overhead")`` uses) replays their launches without the host. The
    direct launches go to the capturing stream, so replays compute what eager steps compute:
    outputs, gradients and running statistics (the sample is the epoch's, fixed in the graph)."""
    torch.manual_seed(0)
    base = ConvNet().cuda()
    eager = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="auto")
    graphed = bnrewrite.transform(copy.deepcopy(base), recipe, seed=3, lower="auto")
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(6, 3, 12, 10, generator=gen).cuda() for _ in range(6)]

    def step(model, x):
        out = model(x)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        return out, grads

    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles and caches the launches), as PyTorch's docs do
        for x in inputs[:3]:
            static_x.copy_(x)
            step(graphed, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grads = step(graphed, static_x)
    # the eager twin takes the same steps: 3 warm-up steps and the capture (which ran nothing)
    for x in inputs[:3]:
        step(eager, x)
    for x in inputs[3:]:
        static_x.copy_(x)
        graph.replay()
        out, grads = step(eager, x)
        torch.testing.assert_close(static_out, out, rtol=1e-5, atol=1e-5)
        for got, want in zip(static_grads, grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for (name, b), c in zip(graphed.named_buffers(), eager.buffers()):  # num_batches_tracked too
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- what lowering must keep
def _conv_bn_act(act=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act if act is not None else nn.ReLU())


@pytest.mark.parametrize("kernels", ["reference-impl", "triton"])
@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/4"])
def test_a_float64_model_keeps_float64_precision(recipe, kernels, monkeypatch):
    """The kernels (and the op's plain-torch implementation) compute in fp32: a float64 model
    lowered with lower="fused" was 4e-7 off stock float64 and failed gradcheck."""
    if kernels == "triton":
        _interpreted_kernels(monkeypatch)
    model = _conv_bn_act().double()
    ref = bnrewrite.transform(copy.deepcopy(model), recipe, seed=1)
    low = bnrewrite.transform(copy.deepcopy(model), recipe, seed=1, lower="fused")
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(low(x), ref(x), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda t: low(t), (x[:3, :, :5, :5].detach().requires_grad_(),))


def test_a_forward_hook_on_the_batchnorm_keeps_the_norms_output():
    """A fused activation would move into the norm: its forward hooks saw (and edited) the output
    after the ReLU (min 0 where stock's hook saw -2.4)."""
    seen = {}
    model = _conv_bn_act()
    model[1].register_forward_hook(lambda module, args, out: seen.__setitem__(module, out) or out - 1)
    stock = copy.deepcopy(model)
    low = bnrewrite.transform(model, "bn", lower="fused", inplace=True)
    assert low.bnrewrite_lowering[0].lowered and low.bnrewrite_lowering[0].activation is None
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(low(x), stock(x))
    assert min(out.min().item() for out in seen.values()) < 0


def test_an_activation_with_hooks_or_its_own_forward_is_not_fused():
    """Fusing replaced the activation by a fresh stock one: its hooks stopped firing, and a ReLU
    subclass with its own forward (here a clamp at 1) was fused as a plain ReLU (max 3.2, not 1)."""
    class ClampedReLU(nn.ReLU):
        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent: torch.fx keeps the module a call of its own
                return super().forward(x).clamp(max=1.0)
            return x

    fired = []
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda module, args, out: fired.append(1))
    for act in (ClampedReLU(), hooked):
        model = _conv_bn_act(act)
        stock = copy.deepcopy(model)
        low = bnrewrite.transform(model, "bn", lower="fused")
        assert low.bnrewrite_lowering[0].activation is None
        x = torch.randn(8, 3, 6, 6) * 5
        torch.testing.assert_close(low(x), stock(x))
    assert len(fired) == 2  # the stock copy's call and the transformed model's


def test_vdn_one_virtual_row_on_a_linear_layer_is_refused_when_lowered_too():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    low = bnrewrite.transform(model, "vdn:n=1", lower="fused", data_stats=([0.0] * 3, [1.0] * 3))
    with pytest.raises(bnrewrite.InputError, match=r"1 virtual row\(s\) holds one value per channel"):
        low(torch.randn(8, 3))


@pytest.mark.parametrize("kernels", ["reference-impl", "triton"])
def test_an_eval_call_then_a_training_call_before_one_backward(kernels, monkeypatch):
    """The op's plain-torch implementation updated the running statistics in place, which bumped
    their version: the eval call's saved buffer then failed the backward (stock BN is fine)."""
    if kernels == "triton":
        _interpreted_kernels(monkeypatch)
    low = bnrewrite.transform(_conv_bn_act(), "bn", lower="fused")
    x = torch.randn(4, 3, 6, 6)
    loss = low.eval()(x).sum() + low.train()(x).sum()
    loss.backward()
    assert low.get_submodule("0").weight.grad is not None


@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/4"])
def test_a_norm_act_whose_activation_no_kernel_applies_is_not_reported_lowered(recipe):
    """timm's BatchNormAct2d with GELU: the site was reported lowered (inspect: "fused") while
    every training step fell back to the reference path."""
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4, act_layer=nn.GELU))
    reference = bnrewrite.transform(copy.deepcopy(model), recipe, seed=1)
    low = bnrewrite.transform(model, recipe, seed=1, lower="fused")
    record = low.bnrewrite_lowering[0]
    assert not record.lowered and record.reason.startswith("act=GELU after the norm: no fused kernel")
    assert type(low.get_submodule("1")) is type(reference.get_submodule("1"))
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(low(x), reference(x))


def test_a_hook_on_a_norm_acts_own_activation_keeps_the_site_on_the_reference_path():
    """timm's BatchNormAct2d applies its act child: lowered, the kernel applied the ReLU and the
    hook on act never ran."""
    timm_layers = pytest.importorskip("timm.layers")
    fired = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.BatchNormAct2d(4))
    model[1].act.register_forward_hook(lambda module, args, out: fired.append(1))
    low = bnrewrite.transform(model, "bn", lower="fused")
    record = low.bnrewrite_lowering[0]
    assert not record.lowered and "act=ReLU after the norm has hooks" in record.reason
    low(torch.randn(4, 3, 6, 6))
    assert fired == [1]
