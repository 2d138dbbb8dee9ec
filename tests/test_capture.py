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
