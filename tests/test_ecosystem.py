"""Issue 9: every recipe works with the rest of PyTorch — torch.compile, autocast, channels_last,
checkpoints that resume identically, deepcopy / torch.save of the whole module, ``.to()``."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import bnrewrite
from bnrewrite.demo import SmallResNet

RECIPES = ["bn", "ns:n=2", "bs:n=2", "fs:ratio=1/4", "frs:ratio=1/4", "vdn", "fs+vdn", "ghost:size=2",
           "bgn:groups=4", "cbn:k=2", "cbn:k=2,store=inputs", "naive-cbn:k=2", "two-tower", "brn:micro=2",
           "brn:micro=1+rot",
           "two-tower+rot"]


def make(recipe, seed=0):
    torch.manual_seed(seed)
    model = SmallResNet(width=8)
    options = {}
    if "vdn" in recipe:
        options["data_stats"] = ([0.3], [0.4])
    return bnrewrite.transform(model, recipe, seed=seed, **options)


def batches(n, batch=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, 16, 16, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(n)]


def train_steps(model, optimizer, data, seed):
    torch.manual_seed(seed)  # VDN draws its virtual rows from the global generator
    losses = []
    model.train()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("recipe", RECIPES)
def test_checkpoint_resumes_identically(recipe):
    data = batches(6)
    model = make(recipe)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model, opt, data[:3], seed=5)
    bnrewrite.new_epoch(model)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = train_steps(model, opt, data[3:], seed=6)

    resumed = make(recipe, seed=123)  # different init: everything must come from the checkpoint
    # optional state (schedules, CBN history) appears after the first training step
    train_steps(resumed, torch.optim.SGD(resumed.parameters(), lr=0.0), data[:1], seed=0)
    buffer.seek(0)
    state = torch.load(buffer)
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(state["opt"])
    got = train_steps(resumed, opt2, data[3:], seed=6)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", RECIPES)
def test_deepcopy_torch_save_and_to(recipe):
    model = make(recipe)
    x, y = batches(1)[0]
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.01), [(x, y)], seed=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clones = [copy.deepcopy(model), loaded, copy.deepcopy(model).to(torch.float64).to(torch.float32)]
    model.eval()
    expected = model(x)
    for clone in clones:
        clone.eval()
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        torch.manual_seed(0)
        clone.train()
        out = clone(x)
        assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_channels_last_and_autocast(recipe):
    model = make(recipe)
    x, y = batches(1)[0]
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    expected = reference(x)
    cl = model.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    got = cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = make(recipe)(x)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    for module in model.modules():  # statistics stay fp32 under autocast
        if getattr(module, "is_bnrewrite_norm", False) and module.running_var is not None:
            assert module.running_var.dtype == torch.float32


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_compile(recipe):
    model = make(recipe)
    reference = copy.deepcopy(model)
    data = batches(6)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    for step, (x, y) in enumerate(data):
        torch.manual_seed(step)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        torch.manual_seed(step)
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        if step == 2:  # histories and windows have filled: training steps must not recompile
            settled = len(graphs)
    assert len(graphs) == settled, f"{recipe}: recompiled during training ({settled} -> {len(graphs)} graphs)"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    x = data[0][0]
    compiled.eval()
    reference.eval()
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", RECIPES)
def test_moves_to_cuda_and_back(recipe):
    model = make(recipe)
    x, y = batches(1)[0]
    model.eval()
    expected = model(x)
    back = model.to("cuda").to("cpu")
    torch.testing.assert_close(back(x), expected)
    cuda = copy.deepcopy(model).to("cuda").train()
    loss = F.cross_entropy(cuda(x.cuda()), y.cuda())
    loss.backward()
    assert torch.isfinite(loss)


def test_compiled_ghost_with_a_one_example_ghost_batch_matches_eager():
    """A last ghost batch of one example is normalised with the running statistics, which the
    same forward then updates in place: compiled backward must see the values from before."""
    torch.manual_seed(0)
    model = bnrewrite.transform(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)), "ghost:size=2")
    reference = copy.deepcopy(model)
    x, y = torch.rand(5, 3, 16, 16), torch.randint(0, 10, (5,))  # 5 = 2·2 + 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.warns(UserWarning, match="ghost batch of one example"):
        F.cross_entropy(compiled(x), y).backward()
    with pytest.warns(UserWarning, match="ghost batch of one example"):
        F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("recipe", RECIPES)
def test_channels_last_input_gives_channels_last_output_like_stock(recipe, dims):
    """Stock BatchNorm keeps a channels_last input's layout, in train and eval; so must every
    variant (channel-group reshapes and the rotation's einsum come out contiguous otherwise)."""
    conv, bn = (torch.nn.Conv2d, torch.nn.BatchNorm2d) if dims == 2 else (torch.nn.Conv3d, torch.nn.BatchNorm3d)
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    torch.manual_seed(0)
    stock = torch.nn.Sequential(conv(1, 8, 3, padding=1), bn(8)).to(memory_format=layout)
    options = {"data_stats": ([0.3], [0.4])} if "vdn" in recipe else {}
    model = bnrewrite.transform(stock, recipe, **options)
    x = torch.rand((4, 1) + (6,) * dims).to(memory_format=layout)
    for training in (True, False):
        stock.train(training), model.train(training)
        want = stock(x).is_contiguous(memory_format=layout)
        assert want
        assert model(x).is_contiguous(memory_format=layout) == want, f"{recipe}, training={training}"


def _func_loss(model, data_y):
    """The loss as a function of (parameters, buffers), as torch.func's users write it: the
    buffers passed in, so that training steps' in-place updates of them are allowed."""
    x, y = data_y

    def loss(params, buffers):
        return F.cross_entropy(torch.func.functional_call(model, (params, buffers), (x,)), y)

    return loss


def _warmed_up_pair(recipe):
    """Two identical models after three training steps (histories and schedules have moved)."""
    model = make(recipe)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), batches(3), seed=5)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_func_grad_equals_autograd(recipe):
    """torch.func.grad of training steps (functional code, as MAML libraries write it) from a fresh
    model, so that lazily allocated state (CBN's history) is made under the transform: autograd's
    parameter gradients and the same buffer updates at every step, and the model can be copied
    and saved afterwards (no dead transform wrapper left in it). The transforms refuse our
    old-style autograd Functions, so under them every op runs its plain-torch formulation."""
    func_model = make(recipe).train()
    model = copy.deepcopy(func_model)
    for step, data in enumerate(batches(3, seed=7)):
        params = {name: p.detach() for name, p in func_model.named_parameters()}
        torch.manual_seed(step)  # VDN draws its virtual rows from the global generator
        grads = torch.func.grad(_func_loss(func_model, data))(params, dict(func_model.named_buffers()))
        torch.manual_seed(step)
        model.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        scale = max(p.grad.abs().max() for p in model.parameters())
        assert scale > 1e-3  # not vacuous
        for name, p in model.named_parameters():
            # fp32: the closed-form backward and autograd's round differently; zero gradients (the
            # head of a BN-normalised conv) agree up to that rounding at the largest gradient's scale
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6 * scale,
                                       msg=f"{recipe}, step {step}: {name}")
    state = func_model.state_dict()
    assert state.keys() == model.state_dict().keys()
    for (name, a), b in zip(state.items(), model.state_dict().values()):  # (forward values round differently too)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{recipe}: {name}")
    copied = copy.deepcopy(func_model)
    torch.save(func_model, io.BytesIO())
    x = batches(1, seed=9)[0][0]
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(copied(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_func_forward_mode_equals_reverse_mode(recipe):
    """torch.func.jacfwd (forward mode, as hessian uses it) of a training step's loss gives the
    gradients autograd's reverse mode gives: for the stem conv's weight, which every
    normalisation site lies downstream of, and for the first site's affine weight."""
    func_model, model = _warmed_up_pair(recipe)
    data = batches(1, seed=7)[0]
    params = {name: p.detach() for name, p in func_model.named_parameters()}
    chosen = {name: params.pop(name) for name in ("stem.0.weight", "stem.1.weight")}
    loss = _func_loss(func_model, data)
    torch.manual_seed(11)
    # buffers as an argument, not captured (a transform refuses in-place updates of captured
    # tensors, stock BatchNorm's too); randomness="same" for vdn's virtual rows, drawn by torch ops at
    # every step, once for every tangent (a sample's draw is host randomness, outside the transform)
    grads = torch.func.jacfwd(lambda chosen, rest, buffers: loss({**chosen, **rest}, buffers), argnums=0,
                              randomness="same" if "vdn" in recipe else "error")(
        chosen, params, dict(func_model.named_buffers()))
    torch.manual_seed(11)
    model.zero_grad()
    F.cross_entropy(model(data[0]), data[1]).backward()
    for name in chosen:
        expected = model.get_parameter(name).grad
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max(),
                                   msg=f"{recipe}: {name}")
        assert expected.abs().max() > 1e-4  # not vacuous


STATEFUL = ("cbn", "naive-cbn", "two-tower", "brn")


def _first_component(recipe: str) -> str:
    """The variant a recipe string starts with: "cbn" for "cbn:k=2", "fs" for "fs+vdn"."""
    return recipe.split(":")[0].split("+")[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_func_vmap_of_a_training_step(recipe):
    """vmap over a stack of batches (model ensembles, per-example gradients) in training mode: with
    running statistics, and for a variant with per-step state always, a clear InputError naming the
    site (stock BatchNorm refuses the former too); without running statistics, a stateless variant's
    outputs equal one call per batch; in eval mode every variant's do."""
    model = make(recipe)
    stack = torch.rand(3, 4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    params = {name: p.detach() for name, p in model.named_parameters()}

    def vmapped(model):
        buffers = dict(model.named_buffers())
        torch.manual_seed(11)
        # a sample's draw is host randomness, outside the transform: only vdn's virtual rows, drawn
        # at every step by torch ops, need a randomness mode
        return torch.func.vmap(lambda x: torch.func.functional_call(model, (params, buffers), (x,)),
                               randomness="same" if "vdn" in recipe else "error")(stack)

    def one_call_per_batch(model):
        outs = []
        for x in stack:
            copy_ = copy.deepcopy(model)  # each batch from the same state, with the same draw
            torch.manual_seed(11)
            outs.append(copy_(x))
        return torch.stack(outs)

    model.train()
    if recipe == "bn":  # stock BatchNorm stays: torch's own refusal
        with pytest.raises(RuntimeError, match="Batch norm got a batched tensor"):
            vmapped(model)
    else:
        with pytest.raises(bnrewrite.InputError, match=r"'stem\.1'.*cannot train under torch\.func\.vmap"):
            vmapped(model)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    if _first_component(recipe) in ("two-tower", "brn"):  # it normalises with them
        with pytest.raises(bnrewrite.InputError, match=r"'stem\.1' normalises with its moving averages"):
            bnrewrite.drop_running_stats_(model)
        assert len([name for name, _ in model.named_buffers() if name.endswith(statistics)]) == 27  # unchanged
    else:  # every site (the stem, 2 per block, 2 shortcuts), stock ones (bn) too
        assert bnrewrite.drop_running_stats_(model) == 9
        assert not [name for name, _ in model.named_buffers() if name.endswith(statistics)]
    if _first_component(recipe) in STATEFUL:
        with pytest.raises(bnrewrite.InputError, match=r"cannot train under torch\.func\.vmap: a step updates its"):
            vmapped(model)
    else:
        torch.testing.assert_close(vmapped(model), one_call_per_batch(model), rtol=1e-5, atol=1e-6)
    model = make(recipe).eval()
    torch.testing.assert_close(vmapped(model), one_call_per_batch(model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_export_in_eval_mode(recipe):
    """torch.export of a trained, transformed model in eval mode (the PT2 deployment path, besides
    folding + ONNX): the exported program computes what the model does, on another batch size too."""
    model = make(recipe)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), batches(3), seed=5)
    model.eval()
    x = batches(1, batch=4, seed=9)[0][0]
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    for batch in (x, batches(1, batch=7, seed=10)[0][0]):
        torch.testing.assert_close(program.module()(batch), model(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_func_hessian_equals_double_backward(recipe):
    """The Hessian by torch.func (forward over reverse mode) of a training step's loss in the first site's
    affine weight equals autograd's double backward of the same step (fp64)."""
    model = make(recipe).double()
    for x, _ in batches(2):  # histories and moving averages have moved
        model(x.double())
    func_model = copy.deepcopy(model)
    x, y = batches(1, seed=7)[0]
    x = x.double()
    params = {name: p.detach() for name, p in func_model.named_parameters()}
    weight = params.pop("stem.1.weight")

    def loss(weight, rest, buffers):
        return F.cross_entropy(torch.func.functional_call(func_model, ({**rest, "stem.1.weight": weight}, buffers),
                                                          (x,)), y)

    torch.manual_seed(0)
    # torch.func.hessian's own composition, with randomness="same" for vdn (hessian takes no such
    # flag): vdn draws its virtual rows at random, once for every tangent
    hessian = torch.func.jacfwd(torch.func.jacrev(loss, argnums=0), argnums=0,
                                randomness="same" if "vdn" in recipe else "error")(
        weight, params, dict(func_model.named_buffers()))
    torch.manual_seed(0)
    weight = model.get_parameter("stem.1.weight")
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), weight, create_graph=True)
    expected = torch.stack([torch.autograd.grad(g, weight, retain_graph=True)[0] for g in grad])
    torch.testing.assert_close(hessian, expected, rtol=1e-7, atol=1e-9 * expected.abs().max())
    assert expected.abs().max() > 1e-6  # not vacuous


@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_export_of_training_steps(recipe):
    """torch.export of a training step (a QAT flow, say). Its first step a stateful variant refuses
    with an InputError naming the site: the program would make CBN's history or Extreme Norm's first
    mean estimate again at every step. After one eager step, the exported program's steps equal the
    model's, state updates included; a random sample's positions are constants in the program, and
    a warning names the site (the model re-draws at new_epoch)."""
    model = make(recipe).train()
    data = [x for x, _ in batches(4, seed=9)]
    stateful = _first_component(recipe) in STATEFUL
    if stateful:
        with pytest.raises(bnrewrite.InputError, match=r"'stem\.1'.*torch\.export of its first training step"):
            torch.export.export(model, (data[0],))
    else:  # a sample drawn during the export (host randomness, outside the trace's fake tensors)
        first = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(first, (data[0],)).module()
        torch.manual_seed(0)
        got = program(data[0])
        torch.manual_seed(0)
        torch.testing.assert_close(got, copy.deepcopy(model)(data[0]), rtol=1e-5, atol=1e-6)
    model(data[0])  # the first step, eagerly
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (data[0],)).module()
    messages = [str(w.message) for w in caught if "exported in training mode" in str(w.message)]
    if _first_component(recipe) in ("fs", "bs", "frs"):
        assert messages and "'stem.1'" in messages[0] and "new_epoch" in messages[0], messages
    else:
        assert not messages
    for step, x in enumerate(data[1:]):
        torch.manual_seed(step)  # vdn draws its virtual rows from the global generator
        got = program(x)
        torch.manual_seed(step)
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-6, msg=f"{recipe}, step {step}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_default_device_other_than_the_models(recipe):
    """A default device other than the model's (torch.set_default_device("cuda") with a CPU model;
    here the meta device stands in for it): transforming and training under it gives the model
    without it, and nothing lands on the default device (sample draws and rotations are host work
    on the CPU generator's device, a variant's own state sits on the BatchNorm's)."""
    torch.manual_seed(0)
    base = SmallResNet(width=8)
    options = {"data_stats": ([0.3], [0.4])} if "vdn" in recipe else {}
    reference = bnrewrite.transform(copy.deepcopy(base), recipe, seed=0, **options)
    with torch.device("meta"):
        model = bnrewrite.transform(base, recipe, seed=0, **options)
    elsewhere = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "cpu"]
    assert not elsewhere
    data = batches(3)
    with torch.device("meta"):
        losses = train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), data, seed=5)
        model.eval()
        out = model(data[0][0])
    expected = train_steps(reference, torch.optim.SGD(reference.parameters(), lr=0.05), data, seed=5)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(out, reference.eval()(data[0][0]))


@pytest.mark.parametrize("recipe", RECIPES)
def test_swa_utils_averaged_model(recipe):
    """torch.optim.swa_utils.AveragedModel (an EMA of the weights and buffers): its parameters are
    the EMA of the model's, step by step, and it runs in eval mode. Made before training for every
    recipe but CBN, whose history (buffers) appears at its first training step: made after that."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make(recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(4)
    if recipe.startswith(("cbn", "naive-cbn")):
        train_steps(model, optimizer, data[:1], seed=5)
        data = data[1:]
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    expected = [p.detach().clone() for p in model.parameters()]
    for step, batch in enumerate(data):
        train_steps(model, optimizer, [batch], seed=step)
        ema.update_parameters(model)
        for e, p in zip(expected, model.parameters()):
            e.lerp_(p.detach(), 1.0 if step == 0 else 0.1)  # the first update copies
    for e, p in zip(expected, ema.module.parameters()):
        torch.testing.assert_close(p, e)
    out = ema.eval()(batches(1, seed=9)[0][0])
    assert out.shape == (4, 10) and torch.isfinite(out).all()
