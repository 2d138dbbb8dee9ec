"""param_groups (four-things-bn §3.3) with real SGD and AdamW steps."""
import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.gn(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc(self.ln(h))


def _model(recipe=None):
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.rand_like(p) + 0.5)  # no zeros: decay must show on every entry
    return bnrewrite.transform(model, recipe) if recipe else model


NORM = {"bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias"}


def _decay_after_zero_grad_step(model, optimizer_cls, groups, lr, **kw):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer_cls(groups, lr=lr, **kw)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # with a zero gradient, SGD's coupled L2 and AdamW's decoupled decay both give p·(1 − lr·λ)
    return {n: 1 - (p.detach() / before[n]).mean().item() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recipe", [None, "ghost:size=2", "bgn:groups=2"])
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("norm_decay", [0.0, 0.3, None])
def test_norm_parameters_get_exactly_the_decay_asked_for(recipe, optimizer, norm_decay):
    model = _model(recipe)
    lr, wd = 0.1, 0.05
    groups = bnrewrite.param_groups(model, wd, norm_weight_decay=norm_decay)
    shrink = _decay_after_zero_grad_step(model, optimizer, groups, lr)
    expect_norm = wd if norm_decay is None else norm_decay
    for name, s in shrink.items():
        expected = lr * (expect_norm if name in NORM else wd)
        assert s == pytest.approx(expected, abs=1e-6), name


def test_adam_coupled_decay_moves_norm_parameters_only_when_asked():
    model = _model()
    groups = bnrewrite.param_groups(model, 0.1, norm_weight_decay=0.0)
    shrink = _decay_after_zero_grad_step(model, torch.optim.Adam, groups, lr=0.01)
    for name, s in shrink.items():
        if name in NORM:
            assert s == 0.0, name
        else:
            assert s > 0, name  # Adam: grad = λp, a normalised step of about lr


def test_every_parameter_exactly_once_and_group_names():
    model = _model("ghost")
    groups = bnrewrite.param_groups(model, 1e-4, norm_weight_decay=0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"weights", "norm"}
    norm_ids = {id(p) for p in by_name["norm"]["params"]}
    assert norm_ids == {id(p) for n, p in model.named_parameters() if n in NORM}


def test_bias_weight_decay_separates_other_biases():
    model = _model()
    groups = bnrewrite.param_groups(model, 0.01, norm_weight_decay=0.0, bias_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["biases"]["params"]} == {id(model.conv.bias), id(model.fc.bias)}
    assert by_name["biases"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["weights"]["params"]} == {id(model.conv.weight), id(model.fc.weight)}


def test_shared_parameter_counted_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[0].bias = model[1].bias  # tied: it is a norm parameter
    groups = bnrewrite.param_groups(model, 0.1, norm_weight_decay=0.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 3
    torch.optim.SGD(groups, lr=0.1)  # torch rejects a parameter in two groups


@pytest.mark.parametrize("kwargs", [{"weight_decay": -1}, {"weight_decay": 0.1, "norm_weight_decay": float("nan")},
                                    {"weight_decay": "x"}])
def test_bad_decay(kwargs):
    with pytest.raises(InputError, match="param_groups"):
        bnrewrite.param_groups(_model(), **kwargs)


@pytest.mark.parametrize("value", [True, "5e-4", None])
def test_a_decay_that_is_not_a_number_is_refused(value):
    """float() took True as a decay of 1.0 and the string '5e-4' as a number."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match=f"param_groups: weight_decay must be a number, got {value!r}"):
        bnrewrite.param_groups(model, value)
    assert bnrewrite.param_groups(model, torch.tensor(1e-4))[0]["weight_decay"] == pytest.approx(1e-4)
