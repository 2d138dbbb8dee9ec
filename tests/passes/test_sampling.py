"""``ns``/``bs``/``fs``/``frs`` through ``bnrewrite.transform`` (bn-sampling §4.1, Alg. 1–2)."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import bnrewrite
from bnrewrite.errors import RecipeError
from bnrewrite.runtime.sampled import SampledBatchNorm


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.b3 = nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.b3(self.fc(x.mean((2, 3))))


def _specs(model, shape):
    return {n: (s.rows, s.patch) for n, m in model.named_modules() if isinstance(m, SampledBatchNorm)
            for s in [m.sample_spec(shape)]}


@pytest.mark.parametrize("recipe,strategy", [("ns", "ns"), ("bs:n=2", "bs"), ("fs:ratio=1/16", "fs"),
                                             ("frs:ratio=1/8", "frs"), ("bs:ratio=1/4", "bs")])
def test_every_bn_becomes_sampled_and_trains(recipe, strategy):
    torch.manual_seed(0)
    model = SmallNet()
    out = bnrewrite.transform(model, recipe)
    mods = {n: m for n, m in out.named_modules() if isinstance(m, SampledBatchNorm)}
    assert set(mods) == {"b1", "b2", "b3"}
    assert all(m.strategy == strategy for m in mods.values())
    assert out.state_dict().keys() - model.state_dict().keys() == {f"{n}.sample_schedule" for n in mods}
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16)
    target = torch.randint(0, 6, (8,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(out(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    out.eval()
    assert out(x).shape == (8, 6)


def test_full_sampling_model_equals_stock_model():
    torch.manual_seed(0)
    model = SmallNet()
    x = torch.randn(8, 3, 16, 16)
    for recipe in ("ns:n=8", "bs:n=64", "fs:ratio=1", "frs:ratio=1"):
        stock = copy.deepcopy(model)
        out = bnrewrite.transform(model, recipe)
        y0 = stock(x)
        y1 = out(x)
        assert torch.equal(y0, y1)
        y0.sum().backward()
        y1.sum().backward()
        for (n, p0), p1 in zip(stock.named_parameters(), out.parameters()):
            assert torch.equal(p0.grad, p1.grad), (recipe, n)
        for k, v in stock.state_dict().items():
            assert torch.equal(v, out.state_dict()[k]), (recipe, k)


def test_options_reach_the_modules():
    model = SmallNet()
    out = bnrewrite.transform(model, "fs:ratio=1/64,every=5,momentum=0.3")
    assert out.b1.ratio == pytest.approx(1 / 64) and out.b1.every == 5 and out.b1.momentum == 0.3
    kept = bnrewrite.transform(model, "bs:n=3")
    assert kept.b1.momentum == model.b1.momentum == 0.1 and kept.b1.n == 3
    assert "fs falls back to bs" in out.b3.describe((32, 6))["note"]


@pytest.mark.parametrize("word, expected", [("keep", 0.25), ("none", 0.25), ("cumulative", None), ("0.3", 0.3)])
@pytest.mark.parametrize("component", ["ns:n=2", "bs:n=2", "fs", "frs"])
def test_momentum_takes_the_same_words_as_every_component(component, word, expected):
    """keep / cumulative as for ghost, bgn, cbn; 'none' stays the alias of keep it was here."""
    model = SmallNet()
    model.b1.momentum = 0.25
    out = bnrewrite.transform(model, f"{component},momentum={word}" if ":" in component else
                              f"{component}:momentum={word}")
    assert out.b1.momentum == expected


def test_include_exclude_and_functional_kept():
    model = SmallNet()
    out = bnrewrite.transform(model, "fs", exclude="b3")
    assert isinstance(out.b1, SampledBatchNorm) and isinstance(out.b3, nn.BatchNorm1d)


def test_seed_reproducible_layers_independent_new_epoch_redraws():
    model = torchvision.models.resnet18(weights=None)
    shape = (8, 64, 32, 32)
    a = _specs(bnrewrite.transform(model, "fs:ratio=1/32", seed=0), shape)
    b = _specs(bnrewrite.transform(model, "fs:ratio=1/32", seed=0), shape)
    c = _specs(bnrewrite.transform(model, "fs:ratio=1/32", seed=1), shape)
    assert a == b and a != c
    assert len(set(a.values())) >= len(a) // 2  # layers draw independently
    m = bnrewrite.transform(model, "fs:ratio=1/32", seed=0)
    assert bnrewrite.new_epoch(m) == 20
    assert _specs(m, shape) != a


def test_checkpoint_resumes_the_schedule_and_stock_checkpoints_load():
    model = SmallNet()
    m = bnrewrite.transform(model, "bs:n=2,every=2", seed=3)
    x = torch.randn(16, 3, 8, 8)
    bnrewrite.new_epoch(m)
    for _ in range(3):
        m(x)
    state = copy.deepcopy(m.state_dict())
    resumed = bnrewrite.transform(SmallNet(), "bs:n=2,every=2", seed=99)
    resumed.load_state_dict(state, strict=True)
    for _ in range(4):
        assert _specs(resumed, x.shape) == _specs(m, x.shape)
        torch.testing.assert_close(resumed(x), m(x))
    resumed.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("bad,match", [("fs:ratio=2", "ratio"), ("bs:n=0", "n must"), ("bs:n=2,ratio=1/4", "not both"),
                                       ("ns:every=-1", "every"), ("fs:momentum=1.5", "momentum"),
                                       ("fs+bs", "pick one"), ("fs+ghost", "cannot be combined|pick one")])
def test_bad_recipes_are_recipe_errors(bad, match):
    with pytest.raises(RecipeError, match=match):
        bnrewrite.transform(SmallNet(), bad)


def _small_map_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _train_steps(model, batch, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(batch, 3, 16, 16)).sum().backward()
        opt.step()


@pytest.mark.parametrize("recipe,batch,warned", [("fs", 4, True), ("frs", 4, True), ("fs", 32, False),
                                                 ("fs:ratio=1/2", 4, False), ("bs:n=2", 4, False)])
def test_few_sample_values_warn_once_at_the_second_training_step(recipe, batch, warned):
    """Sites whose first training step's sample held < 16 values per channel are named in one
    warning when the second step begins -- the training batch decides, not example_inputs (here
    of batch 1). At batch 4 the second BN ('4', a 4x4 map) gets 4 values from fs at 1/32 (a
    1-pixel patch per example) and 2 from frs; at batch 32 fs gets 32."""
    import warnings

    model = bnrewrite.transform(_small_map_net(), recipe, example_inputs=(torch.randn(1, 3, 16, 16),))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train_steps(model, batch)
    found = [w for w in caught if "values per channel" in str(w.message)]
    if not warned:
        assert found == []
        return
    assert len(found) == 1, [str(w.message) for w in found]
    message = str(found[0].message)
    assert found[0].filename == __file__  # attributed to the training loop, not to bnrewrite
    assert "1 site(s)" in message and "'1'" not in message
    shape = (batch, 16, 4, 4)
    count = model.get_submodule("4").sample_spec(shape).sample_count(shape)
    assert count < 16 and f"'4' ({count} from {shape})" in message
