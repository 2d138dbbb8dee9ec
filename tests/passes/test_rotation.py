"""``rot`` (extreme-normalization.txt §2.2, Alg. 1 ``ReLU(Rotate(q ⊙ γ) + β)``, §5)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import bnrewrite
from bnrewrite.errors import RecipeError
from bnrewrite.runtime.extreme import RotatedExtremeNorm


class Net(nn.Module):
    def __init__(self, channels=(8, 6, 16)):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.head = nn.Linear(c3, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def rotations(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RotatedExtremeNorm)}


@pytest.mark.parametrize("recipe", ["brn+rot", "two-tower+rot", "brn:micro=1+rot:kind=random"])
def test_rotations_are_orthogonal(recipe):
    tm = bnrewrite.transform(Net().double(), recipe)
    layers = rotations(tm)
    assert set(layers) == {"bn1", "bn2", "bn3"}
    for name, layer in layers.items():
        R = layer.rotation
        assert R.dtype == torch.float64
        assert torch.allclose(R.t() @ R, torch.eye(R.shape[0], dtype=torch.float64), atol=1e-12), name
        assert torch.allclose(R @ R.t(), torch.eye(R.shape[0], dtype=torch.float64), atol=1e-12), name


def test_hadamard_where_the_channel_count_allows():
    layers = rotations(bnrewrite.transform(Net(), "brn+rot:kind=hadamard"))
    for name, c in (("bn1", 8), ("bn3", 16)):
        assert layers[name].rotation_kind == "hadamard"
        assert torch.allclose(layers[name].rotation.abs(), torch.full((c, c), c ** -0.5))
    assert layers["bn2"].rotation_kind == "random"  # 6 channels
    assert "not a power of 2" in layers["bn2"].describe()["rotation"]
    random = rotations(bnrewrite.transform(Net(), "brn+rot:kind=random"))
    assert all(m.rotation_kind == "random" for m in random.values())
    assert not torch.allclose(random["bn1"].rotation.abs(), torch.full((8, 8), 8 ** -0.5))


def test_random_rotations_are_fixed_by_seed_and_layer():
    a = rotations(bnrewrite.transform(Net((8, 8, 8)), "brn+rot:kind=random,seed=1"))
    b = rotations(bnrewrite.transform(Net((8, 8, 8)), "brn+rot:kind=random,seed=1"))
    c = rotations(bnrewrite.transform(Net((8, 8, 8)), "brn+rot:kind=random,seed=2"))
    assert all(torch.equal(a[n].rotation, b[n].rotation) for n in a)
    assert not torch.equal(a["bn1"].rotation, a["bn2"].rotation)
    assert not torch.equal(a["bn1"].rotation, c["bn1"].rotation)


def test_rotation_sits_between_gamma_and_beta():
    """brn+rot computes R(γ ⊙ q) + β where brn computes γ ⊙ q + β, on the same state."""
    torch.manual_seed(0)
    plain = bnrewrite.transform(Net().double(), "brn:micro=2")
    rotated = copy.deepcopy(plain)
    for name in ("bn1", "bn2", "bn3"):
        layer = rotated.get_submodule(name)
        new = RotatedExtremeNorm.from_extreme(layer, "hadamard")
        rotated._modules[name] = new
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    for model in (plain, rotated):
        model.train()
    outs = {}
    for label, model in (("plain", plain), ("rotated", rotated)):
        bn = model.bn1
        h = model.conv1(x)
        outs[label] = bn(h, x)
    R, beta = rotated.bn1.rotation, rotated.bn1.bias.detach()
    expected = torch.einsum("ji,bihw->bjhw", R, outs["plain"] - beta[None, :, None, None]) + beta[None, :, None, None]
    assert torch.allclose(outs["rotated"], expected, atol=1e-12)


def test_rotation_is_not_trained():
    tm = bnrewrite.transform(Net(), "brn+rot")
    assert not any("rotation" in n for n, _ in tm.named_parameters())
    before = tm.bn1.rotation.clone()
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    tm.train()
    tm(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    assert torch.equal(tm.bn1.rotation, before)


@pytest.mark.parametrize("recipe", ["brn:micro=2+rot", "two-tower+rot"])
def test_folded_model_equals_trained_model_and_onnx(recipe, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    x = torch.randn(4, 3, 8, 8)
    tm = bnrewrite.transform(Net(), recipe, example_inputs=(x,))
    bnrewrite.warm_up_statistics(tm, [x], steps=5)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05)
    tm.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(tm(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    tm.eval()
    with torch.no_grad():
        ref = tm(x)
    inf = bnrewrite.fold_for_inference(tm)
    assert inf.bnrewrite_fold_report.counts() == {"into-producer": 3}
    with torch.no_grad():
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    report = bnrewrite.export_onnx(tm, (x,), tmp_path / "rot.onnx")
    assert report.normalisation_nodes == {}
    session = ort.InferenceSession(str(tmp_path / "rot.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_grouped_producer_keeps_the_rotation_as_a_channel_mix():
    class Depthwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    torch.manual_seed(2)
    x = torch.randn(4, 4, 6, 6)
    tm = bnrewrite.transform(Depthwise(), "brn+rot")
    tm.train()
    tm(x).sum().backward()
    tm.eval()
    inf = bnrewrite.fold_for_inference(tm)
    assert inf.bnrewrite_fold_report.counts() == {"channel-mix": 1}
    with torch.no_grad():
        assert torch.allclose(inf(x), tm(x), rtol=1e-5, atol=1e-6)


def test_resnet18_fold_with_rotation():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    tm = bnrewrite.transform(torchvision.models.resnet18(weights=None, num_classes=10), "brn:micro=2+rot",
                             example_inputs=(x,))
    assert len(rotations(tm)) == 20
    bnrewrite.warm_up_statistics(tm, [x], steps=3)
    tm.train()
    F.cross_entropy(tm(x), torch.tensor([1, 2])).backward()
    tm.eval()
    inf = bnrewrite.fold_for_inference(tm)
    assert inf.bnrewrite_fold_report.counts() == {"into-producer": 20}
    with torch.no_grad():
        ref = tm(x)
        assert torch.allclose(inf(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("recipe", ["rot", "bn+rot", "ghost+rot", "rot:kind=diagonal"])
def test_bad_combinations(recipe):
    with pytest.raises(RecipeError):
        bnrewrite.transform(Net(), recipe)


@pytest.mark.parametrize("recipe", ["brn+rot", "brn+rot:kind=random,seed=3", "two-tower+rot"])
def test_rotation_is_rebuilt_after_meta_init_to_empty_and_a_stock_checkpoint(recipe):
    """A stock checkpoint has no rotation key; after to_empty() the buffer holds uninitialised
    memory, so loading must rebuild R from (kind, seed, layer), exactly as transform drew it."""
    torch.manual_seed(0)
    checkpoint = Net().state_dict()
    reference = bnrewrite.transform(Net(), recipe)
    reference.load_state_dict(checkpoint, strict=True)
    with torch.device("meta"):
        model = Net()
    model = bnrewrite.transform(model, recipe)
    model.to_empty(device="cpu")
    model.load_state_dict(checkpoint, strict=True)
    rotated = [(a, b) for a, b in zip(model.modules(), reference.modules()) if isinstance(a, RotatedExtremeNorm)]
    assert len(rotated) == 3  # 8 (Hadamard), 6 (random: not a power of 2), 16 channels
    for ours, ref in rotated:
        torch.testing.assert_close(ours.rotation, ref.rotation, rtol=0, atol=0)
    x = torch.randn(4, 3, 8, 8)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("recipe", ["brn+rot", "two-tower+rot"])
def test_rotated_output_keeps_the_input_layout(recipe, train, layout):
    """The rotation's einsum picks its own output strides: a model's ``.view()`` after the layer
    raised "view size is not compatible" (stock BatchNorm's output has the input's layout)."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8 * 6 * 6, 2)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.fc(y.view(y.shape[0], -1)) if layout is torch.contiguous_format else y

    torch.manual_seed(0)
    model = bnrewrite.transform(Flat().to(memory_format=layout), recipe).train(train)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=layout)
    seen = []
    model.bn.register_forward_hook(lambda module, args, out: seen.append(out))
    model(x)
    assert seen[-1].is_contiguous(memory_format=layout)
