"""bnrewrite/schedule.py: warm_up_statistics (extreme-normalization.txt §5) against stock BatchNorm."""
import copy

import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.errors import InputError


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def _stock_running_mean(model, batches):
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        for x in batches:
            ref(x)
    return ref[1].running_mean


@pytest.mark.parametrize("form", ["tensor", "list", "pairs"])
def test_warm_up_runs_steps_forward_passes_like_stock_train_mode(form):
    x = torch.randn(2, 3, 8, 8) + 1
    model = _net()
    batches = {"tensor": x, "list": [x], "pairs": [(x, torch.zeros(2))]}[form]
    assert bnrewrite.warm_up_statistics(model, batches, steps=3) == 3
    torch.testing.assert_close(model[1].running_mean, _stock_running_mean(_net(), [x, x, x]))
    assert int(model[1].num_batches_tracked) == 3
    assert not model.training and not model[1].training  # modes restored


def test_no_batches_is_an_input_error():
    with pytest.raises(InputError, match="got no batches"):
        bnrewrite.warm_up_statistics(_net(), [], steps=2)


@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1", "ns:n=64", "ghost:size=64", "cbn:k=1", "bgn:groups=64,examples=64"])
def test_update_bn_recomputes_running_statistics_like_swa_utils_on_stock(recipe):
    """Where a variant's training statistics equal stock BN's, update_bn must give exactly
    torch.optim.swa_utils.update_bn's statistics of the stock model (which skips runtime modules)."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    model = bnrewrite.transform(copy.deepcopy(stock), recipe)
    batches = [(torch.randn(4, 3, 6, 6) * 2 + 1, torch.zeros(4)) for _ in range(5)]
    for x, _ in batches[:2]:  # unequal running statistics before the update
        model(x * 3)
    before = [m.running_mean.clone() for m in model.modules() if hasattr(m, "running_mean")]
    assert bnrewrite.update_bn(batches, model) == 5
    torch.optim.swa_utils.update_bn(batches, stock)
    ours = [m for m in model.modules() if getattr(m, "is_bnrewrite_norm", False) or isinstance(m, nn.BatchNorm2d)]
    ref = [m for m in stock.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    assert [m.momentum for m in ours] == [0.3, 0.1]
    assert not torch.equal(before[0], ours[0].running_mean)
    assert model.training


def _two_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _batches(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=gen) * 2 + 1, torch.zeros(4)) for _ in range(n)]


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "input_mean" in k}


@pytest.mark.parametrize("recipe", ["brn", "brn:micro=1", "two-tower"])
def test_update_bn_refuses_extreme_norm_and_leaves_statistics_alone(recipe):
    """ExtremeNorm normalises with its own moving averages (rate EMA, μ̄ before the conv): a
    reset plus a one-pass cumulative average is not what its eval uses, so update_bn refuses it
    (naming the site and pointing to warm_up_statistics) before resetting anything."""
    model = bnrewrite.transform(_two_layer(), recipe)
    bnrewrite.warm_up_statistics(model, [x for x, _ in _batches()], steps=3)
    before = _buffers(model)
    with pytest.raises(InputError, match=r"update_bn.*'1'.*warm_up_statistics"):
        bnrewrite.update_bn(_batches(), model)
    after = _buffers(model)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def _window_reference(model, batches, k):
    """CBN's Eqs. 9-11 with the weights fixed during the pass (the Taylor compensation is then 0):
    the statistics of each step are those of the last k batches' BN inputs together, and
    momentum=None averages them over the steps (unbiased variance over k·M values, as in
    training)."""
    conv = copy.deepcopy(model.get_submodule("0"))
    with torch.no_grad():
        outs = [conv(x) for x, _ in batches]
    means, variances = [], []
    for t in range(len(outs)):
        window = torch.cat(outs[max(0, t - k + 1):t + 1])
        means.append(window.mean((0, 2, 3)))
        variances.append(window.var((0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("recipe", ["cbn:k=3", "naive-cbn:k=3"])
def test_update_bn_on_cbn_forgets_the_history_of_other_weights(recipe):
    torch.manual_seed(0)
    model = bnrewrite.transform(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), recipe)
    for x, _ in _batches(3, seed=5):  # a history from other data and other weights
        model(x * 3 - 2)
    with torch.no_grad():
        model.get_submodule("0").weight.mul_(0.5)
    batches = _batches(5)
    assert bnrewrite.update_bn(batches, model) == 5
    mean, var = _window_reference(model, batches, 3)
    norm = model.get_submodule("1")
    torch.testing.assert_close(norm.running_mean, mean)
    torch.testing.assert_close(norm.running_var, var)


def test_update_bn_empty_loader_is_an_input_error_and_resets_nothing():
    model = _two_layer()
    bnrewrite.warm_up_statistics(model, [x for x, _ in _batches()], steps=2)
    before = _buffers(model)
    with pytest.raises(InputError, match="update_bn got no batches"):
        bnrewrite.update_bn([], model)
    with pytest.raises(InputError, match="update_bn got no batches"):
        bnrewrite.update_bn(iter([]), model)
    for key, value in _buffers(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert int(model[1].num_batches_tracked) == 2


def test_update_bn_accepts_a_one_shot_iterator_like_swa_utils():
    model, stock = _two_layer(), _two_layer()
    batches = _batches()
    assert bnrewrite.update_bn((b for b in batches), model) == 4
    torch.optim.swa_utils.update_bn(batches, stock)
    for a, b in zip(model.state_dict().values(), stock.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_update_bn_device_moves_each_input_like_swa_utils():
    model, stock = _two_layer().double(), _two_layer().double()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[0].device)))
    # float64 model, float32 inputs: device=torch.float64 makes the .to() move observable on a CPU-only machine
    batches = _batches()
    assert bnrewrite.update_bn(batches, model, device=torch.float64) == 4
    torch.optim.swa_utils.update_bn(batches, stock, device=torch.float64)
    assert seen == [(torch.float64, torch.device("cpu"))] * 4
    for a, b in zip(model.state_dict().values(), stock.state_dict().values()):
        torch.testing.assert_close(a, b)
    doubles = [(x.double(), y) for x, y in batches]
    assert bnrewrite.update_bn(doubles, model, device="cpu") == 4  # a device, as swa_utils takes it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_bn_device_cuda_like_swa_utils():
    model, stock = bnrewrite.transform(_two_layer(), "ghost:size=64").cuda(), _two_layer().cuda()
    batches = _batches()  # on the CPU
    assert bnrewrite.update_bn(batches, model, device="cuda") == 4
    torch.optim.swa_utils.update_bn(batches, stock, device="cuda")
    for a, b in zip(model.state_dict().values(), stock.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_update_bn_swapped_arguments_is_an_input_error():
    model = _two_layer()
    with pytest.raises(InputError, match=r"update_bn\(batches, model\).*got the model first"):
        bnrewrite.update_bn(model, _batches())
    with pytest.raises(InputError, match=r"update_bn expects an nn.Module as model, got list"):
        bnrewrite.update_bn(_batches(), [1])


def test_update_bn_without_batchnorm_warns_and_runs_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(UserWarning, match="update_bn: Sequential has no BatchNorm"):
        assert bnrewrite.update_bn(_batches(), model) == 0
    assert calls == []


@pytest.mark.parametrize("fn", ["new_epoch", "reset_history", "warm_up_statistics"])
def test_schedule_functions_refuse_a_non_module(fn):
    args = ([torch.zeros(2, 3, 8, 8)],) if fn == "warm_up_statistics" else ()
    with pytest.raises(InputError, match=rf"{fn} expects an nn.Module, got list"):
        getattr(bnrewrite, fn)([1, 2], *args)


@pytest.mark.parametrize("steps", ["10", 2.0, True, None])
def test_warm_up_steps_must_be_an_int(steps):
    with pytest.raises(InputError, match="warm_up_statistics: steps must be an int"):
        bnrewrite.warm_up_statistics(_net(), [torch.zeros(2, 3, 8, 8)], steps=steps)


def _training_outputs(model, batches):
    """Outputs and input gradients of training steps (a fixed SGD update each, so the CBN
    producer's weights move and the Taylor compensation is not 0)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    results = []
    for x, _ in batches:
        x = x.clone().requires_grad_()
        y = model(x)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        results.append((y.detach(), x.grad))
    return results


@pytest.mark.parametrize("recipe", ["cbn:k=2,burnin=3", "cbn:k=3,burnin=2,store=inputs", "naive-cbn:k=3",
                                    "bs:n=2,every=2"])
def test_update_bn_leaves_the_training_schedule_as_it_was(recipe):
    """update_bn's pass is train-mode forwards; they must not use up CBN's burn-in, fill its ring
    or advance a sampler's every=N draws: the training steps after it are those of a copy that
    was never updated (bitwise), only the running statistics differ."""
    model = bnrewrite.transform(_two_layer(), recipe)
    _training_outputs(model, _batches(1, seed=3))  # inside the burn-in: one step taken
    untouched = copy.deepcopy(model)
    assert bnrewrite.update_bn(_batches(5, seed=4), model) == 5
    assert not torch.equal(model.get_submodule("1").running_mean, untouched.get_submodule("1").running_mean)
    later = _batches(5, seed=6)
    for (y, g), (y_ref, g_ref) in zip(_training_outputs(model, later), _training_outputs(untouched, later)):
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["bn", "cbn:k=3", "fs:ratio=1/2"])
def test_update_bn_failing_batch_restores_the_statistics(recipe):
    """A batch that fails halfway through the pass (here the 2nd, with 4 channels instead of 3):
    swa_utils.update_bn leaves the statistics reset and one batch averaged; update_bn re-raises the
    forward's error with every running statistic (and CBN's history) as before the call."""
    model = bnrewrite.transform(_two_layer(), recipe)
    _training_outputs(model, _batches(3, seed=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [_batches(1)[0], (torch.randn(4, 4, 6, 6), torch.zeros(4)), _batches(1)[0]]
    with pytest.raises((RuntimeError, InputError), match="channels"):
        bnrewrite.update_bn(bad, model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert [m.momentum for m in model.modules() if hasattr(m, "running_mean")] == [0.1, 0.1]


@pytest.mark.parametrize("recipe, lower", [("fs:ratio=1", "reference"), ("bn", "fused")])
def test_drop_running_stats_acts_on_stock_and_rewritten_sites_like_torch_func_on_stock(recipe, lower):
    """drop_running_stats_ does to every site what torch.func.replace_all_batch_norm_modules_ does
    to stock BatchNorm: afterwards, in train and eval mode, the outputs are stock's without
    running statistics (a sampled site sampling everything; a lowered stock site, on a CPU the
    lowered op's plain-torch implementation)."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = bnrewrite.transform(copy.deepcopy(stock), recipe, lower=lower, include=["1"])  # '4' stays stock
    assert getattr(model.get_submodule("1"), "is_bnrewrite_norm", False)
    assert type(model.get_submodule("4")) is nn.BatchNorm2d
    torch.func.replace_all_batch_norm_modules_(stock)
    assert bnrewrite.drop_running_stats_(model) == 2
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert not [name for name, _ in model.named_buffers() if name.endswith(statistics)]
    assert not any(m.track_running_stats for m in model.modules() if hasattr(m, "track_running_stats"))
    assert bnrewrite.drop_running_stats_(model) == 0  # nothing left to drop
    x = torch.randn(2, 3, 8, 8) * 3 + 1
    for mode in ("train", "eval"):
        torch.testing.assert_close(getattr(model, mode)()(x), getattr(stock, mode)()(x))


def test_drop_running_stats_refuses_what_is_not_a_module():
    with pytest.raises(InputError, match="drop_running_stats_"):
        bnrewrite.drop_running_stats_("model")


@pytest.mark.parametrize("call", ["warm_up_statistics", "update_bn"])
@pytest.mark.parametrize("batches", [None, 3])
def test_batches_that_are_not_iterable_are_an_input_error(call, batches):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    function = getattr(bnrewrite, call)
    with pytest.raises(InputError, match=f"{call} expects the batches as an input tensor or an iterable of batches, "
                                         f"got {type(batches).__name__}".replace("batches,", r"batches \(a list, a "
                                                                                 r"DataLoader\),")):
        function(model, batches) if call == "warm_up_statistics" else function(batches, model)


def test_a_container_iterable_through_getitem_is_taken():
    class Batches:  # the old sequence protocol, as torch.optim.swa_utils.update_bn takes it
        def __getitem__(self, i):
            if i >= 3:
                raise IndexError
            return torch.randn(4, 3, 6, 6)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert bnrewrite.update_bn(Batches(), model) == 3
    assert bnrewrite.warm_up_statistics(model, Batches(), steps=3) == 3
    assert bnrewrite.dataset_stats(Batches()).mean.shape == (3,)
