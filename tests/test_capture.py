"""Capture never gives up on the whole model: leaf regions, eager fallbacks, mode twins."""
import copy
import io

import pytest
import torch
from torch import fx, nn

import bnrewrite
from bnrewrite.capture import CapturedGraphModule, capture, require_graph
from bnrewrite.errors import CaptureError
from tests import models
from tests.conftest import assert_same_structure_equal


def test_plain_model_is_one_graph():
    cap = capture(models.ConvBNReLU())
    assert cap.top_traced and not cap.regions
    assert isinstance(cap.root, CapturedGraphModule)
    assert [n.target for n in cap.root.graph.nodes if n.op == "call_module"] == ["conv", "bn", "relu"]


def test_failing_submodule_becomes_a_region_and_its_insides_are_captured():
    model = models.NestedUntraceable()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    cap = capture(copy.deepcopy(model))
    assert cap.top_traced
    regions = {r.name: r for r in cap.regions}
    # the innermost failing module is the leaf; its own forward stays eager
    assert set(regions) == {"body.gate"}
    assert not regions["body.gate"].traced
    assert "TraceError" in regions["body.gate"].reason
    # body itself stays in the top graph: body.block's BN is a node of the root graph
    root_targets = {n.target for n in cap.root.graph.nodes if n.op == "call_module"}
    assert {"stem.bn", "body.block.bn", "body.gate"} <= root_targets
    assert "unused" in dict(cap.root.named_children())
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    cap.root.eval()
    assert torch.equal(model(x), cap.root(x))


def test_untraceable_root_keeps_children_captured():
    model = models.UntraceableRoot()
    cap = capture(copy.deepcopy(model))
    assert not cap.top_traced and "TraceError" in cap.top_error
    assert isinstance(cap.root.a, fx.GraphModule) and isinstance(cap.root.b, fx.GraphModule)
    with pytest.raises(CaptureError, match="top level of UntraceableRoot did not trace"):
        require_graph(cap.root, "vdn")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False):
        model.train(training)
        cap.root.train(training)
        assert torch.equal(model(x), cap.root(x))


def test_training_branches_get_a_twin_graph():
    model = models.TrainOnlyBranch()
    cap = capture(copy.deepcopy(model))
    root = cap.root
    assert "mode_twin" in root.__dict__
    x = torch.randn(2, 3, 8, 8)
    for training in (True, False, True):
        model.train(training)
        root.train(training)
        assert_same_structure_equal(model(x), root(x))


@pytest.mark.parametrize("make", [models.TrainOnlyBranch, models.NestedUntraceable])
def test_deepcopy_and_torch_save_keep_all_state_and_the_twin(make):
    model = make()
    transformed = bnrewrite.transform(model, "bn")
    buffer = io.BytesIO()
    torch.save(transformed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    for clone in (copy.deepcopy(transformed), loaded):
        reference = copy.deepcopy(model)  # each clone starts from the same running stats
        assert clone.state_dict().keys() == reference.state_dict().keys()
        assert type(clone.bnrewrite_info).__name__ == "TransformInfo"
        for training in (True, False):
            reference.train(training)
            clone.train(training)
            assert_same_structure_equal(reference(x), clone(x))
        # the clone owns its parameters
        p = next(clone.parameters())
        assert all(p is not q for q in transformed.parameters())


def test_shared_submodule_replacement_reaches_the_twin():
    from bnrewrite.capture import set_submodule

    cap = capture(models.TrainOnlyBranch())
    marker = nn.Identity()
    set_submodule(cap.root, "main", marker)
    assert cap.root.main is marker and cap.root.__dict__["mode_twin"].main is marker


class OptionalArguments(nn.Module):
    """The usual optional-argument idioms, which a Proxy trace gets wrong for one kind of call:
    ``arg is not None`` is always true of a Proxy, ``isinstance(arg, Tensor)`` never."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, shift=None, bias=None):
        y = self.bn(self.conv(x))
        if shift is not None:
            y = y + shift
        if isinstance(bias, torch.Tensor):
            y = y + bias
        return y


class DataDependentCaller(nn.Module):
    """An untraceable root (a branch on data) that calls a block with its optional argument."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        mask = torch.ones(1, 4, 1, 1) * 2
        return self.block(x, shift=mask) if x.sum() > -1e9 else self.block(x)


@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/2", "cbn:k=2"])
def test_optional_arguments_default_call_is_exact_and_other_calls_are_refused(recipe):
    torch.manual_seed(0)
    net = OptionalArguments()
    model = bnrewrite.transform(net, recipe)
    x = torch.randn(4, 3, 6, 6)
    net.eval(), model.eval()
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x, shift=None, bias=None), net(x), rtol=0, atol=0)
    # traced with shift=None: the `is not None` branch is not in the graph
    with pytest.raises(bnrewrite.InputError, match="'shift'.*example_inputs"):
        model(x, torch.ones(1))
    # bias is read only behind isinstance(), which no trace passes
    with pytest.raises(bnrewrite.InputError, match="'bias'"):
        model(x, bias=torch.full((1, 4, 1, 1), 100.0))
    folded = bnrewrite.fold_for_inference(model)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(bnrewrite.InputError, match="'shift'"):
        folded(x, shift=torch.ones(1))


def test_optional_argument_given_an_example_is_traced_as_an_input():
    torch.manual_seed(0)
    net = OptionalArguments().eval()
    x = torch.randn(2, 3, 6, 6)
    model = bnrewrite.transform(net, "bn", example_inputs=(x, torch.zeros(1, 4, 1, 1))).eval()
    shift = torch.randn(1, 4, 1, 1)
    torch.testing.assert_close(model(x, shift), net(x, shift), rtol=0, atol=0)
    with pytest.raises(bnrewrite.InputError, match="'shift'.*example input"):
        model(x)
    # an example for an argument read only behind isinstance() cannot be traced: say so
    with pytest.warns(UserWarning, match="does not read the example input given for 'bias'"):
        bnrewrite.transform(net, "bn", example_inputs=(x, None, torch.zeros(1, 4, 1, 1)))


class UnreadArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, context=None):
        return self.bn(x)


def test_optional_argument_the_graph_does_not_read_must_stay_none():
    model = bnrewrite.transform(UnreadArgument(), "bn")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model(x), UnreadArgument()(x))
    with pytest.raises(bnrewrite.InputError, match="'context'.*does not read it"):
        model(x, context=x)


def test_leaf_region_with_an_optional_argument_keeps_its_callers_call():
    torch.manual_seed(0)
    net = DataDependentCaller(OptionalArguments())
    model = bnrewrite.transform(net, "fs:ratio=1/2")
    cap_block = model.block
    assert isinstance(cap_block, CapturedGraphModule)
    x = torch.randn(4, 3, 6, 6)
    net.eval(), model.eval()
    torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)
    # the region was traced with a value for shift (as its caller passes one)
    with pytest.raises(bnrewrite.InputError, match="'shift'"):
        cap_block(x)


class OwnBuffer(nn.Module):
    """A model with a tensor of its own (an input scale), next to its submodules."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x * self.scale)))


@pytest.mark.parametrize("recipe", ["brn", "two-tower"])  # both keep the eval graph as a mode twin
@pytest.mark.parametrize("how", ["double+load", "load(assign=True)", "setattr"])
def test_mode_twin_sees_the_models_own_tensors_after_to_load_and_assignment(recipe, how):
    torch.manual_seed(0)
    checkpoint = OwnBuffer().state_dict()
    checkpoint["scale"] = torch.full((1, 3, 1, 1), 5.0)
    model = bnrewrite.transform(OwnBuffer(), recipe)
    assert model.__dict__.get("mode_twin") is not None
    x = torch.randn(4, 3, 8, 8)
    if how == "double+load":
        model.double()
        model.load_state_dict(checkpoint, strict=True)
        x = x.double()
    elif how == "load(assign=True)":
        model.load_state_dict(checkpoint, strict=True, assign=True)
    else:
        model.load_state_dict(OwnBuffer().state_dict(), strict=True)
        model.scale = checkpoint["scale"].clone()
    stock = OwnBuffer().to(x.dtype)
    stock.load_state_dict(bnrewrite.stock_state_dict(model))
    model.eval(), stock.eval()
    torch.testing.assert_close(model(x), stock(x))


class _CheckpointBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _CheckpointNet(nn.Module):
    def __init__(self, use_reentrant):
        super().__init__()
        self.b = _CheckpointBlock()
        self.use_reentrant = use_reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.b, x, use_reentrant=self.use_reentrant).mean()


class _CheckpointOuter(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _CheckpointNet(False)

    def forward(self, x):
        return self.inner(x) * 2


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_in_forward_is_dropped_with_a_warning(use_reentrant):
    import warnings

    import torch.utils.checkpoint as ckpt

    impl = ckpt._checkpoint_impl
    model = _CheckpointNet(use_reentrant)
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(UserWarning) as record:
        out = bnrewrite.transform(copy.deepcopy(model), "bn")
    texts = [str(w.message) for w in record if "checkpoint" in str(w.message)]
    assert len(texts) == 1, texts
    assert texts[0].startswith("_CheckpointNet: its forward calls torch.utils.checkpoint on 'b'")
    assert "without gradient checkpointing" in texts[0] and "more memory" in texts[0]
    assert record[0].filename == __file__
    assert ckpt._checkpoint_impl is impl  # restored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(out(x), model(x))


def test_checkpoint_in_a_submodule_names_the_submodule():
    with pytest.warns(UserWarning, match=r"^'inner' \(in _CheckpointOuter\): its forward calls torch.utils.checkpoint"):
        bnrewrite.transform(_CheckpointOuter(), "bn")


def test_no_checkpoint_warning_without_checkpoint():
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bnrewrite.transform(nn.Sequential(_CheckpointBlock()), "bn")
    assert not [w for w in record if "checkpoint" in str(w.message)]


class _FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = models.ConvBNReLU(3, 8)
        self.trained = models.ConvBNReLU(8, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.drop(self.trained(self.frozen(x)).mean((2, 3))))


def _modes(model):
    return {name: m.training for name, m in model.named_modules() if name}


# two-tower refuses BatchNorms called from eager code (the untraceable models')
@pytest.mark.parametrize("make, recipe", [
    (make, recipe) for make in (_FrozenStem, models.NestedUntraceable, models.UntraceableRoot)
    for recipe in ("bn", "fs:ratio=1/4", "ghost:size=2", "cbn:k=2", "two-tower")
    if recipe != "two-tower" or make is _FrozenStem])
def test_each_modules_own_mode_is_kept(make, recipe):
    """Fine-tuning with frozen BatchNorms: model.train(), then .eval() on some of them (and a
    Dropout), then transform. Each module keeps its own mode, as copy.deepcopy and fx.symbolic_trace
    do; before, every module took the model's, so a frozen BatchNorm trained again (normalised with
    batch statistics and moved its running statistics). A model in eval mode with one BatchNorm in
    training keeps that one in training."""
    torch.manual_seed(0)
    model = make().train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen, trained = bns[0], bns[-1]
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
    frozen.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    expected_modes = _modes(model)
    out = bnrewrite.transform(copy.deepcopy(model), recipe)
    got_modes = _modes(out)
    assert {k: got_modes[k] for k in expected_modes if k in got_modes} == expected_modes
    frozen_name = next(n for n, m in model.named_modules() if m is frozen)
    site = out.get_submodule(frozen_name)
    assert not site.training
    before = site.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    y = out(x)
    assert torch.equal(site.running_mean, before)
    if recipe == "bn":
        assert torch.equal(y, model(x))
    model.eval()
    trained.train()
    out = bnrewrite.transform(copy.deepcopy(model), recipe)
    trained_name = next(n for n, m in model.named_modules() if m is trained)
    assert not out.training and out.get_submodule(trained_name).training
    assert not out.get_submodule(frozen_name).training
