"""Issue 9 hardening: random small conv nets × random valid recipes — a training step, then
``fold_for_inference``; and bad inputs (NaN/Inf, batch of one, empty batch, wrong rank)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnrewrite
from bnrewrite.errors import BnRewriteError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (12,), 2: (6, 6), 3: (4, 4, 4)}


class Block(nn.Module):
    """conv with BN after it (post) or before it (pre-activation), optionally residual."""

    def __init__(self, dims, channels, placement, residual, act):
        super().__init__()
        self.placement, self.residual = placement, residual
        self.conv = CONV[dims](channels, channels, 3, padding=1, bias=placement == "none")
        self.bn = BN[dims](channels) if placement != "none" else nn.Identity()
        self.act = act()

    def forward(self, x):
        if self.placement == "pre":
            y = self.conv(self.act(self.bn(x)))
        else:
            y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y


class RandomNet(nn.Module):
    def __init__(self, dims, channels, blocks, bn_after_add, head_bn1d):
        super().__init__()
        self.stem = nn.Sequential(CONV[dims](2, channels, 3, padding=1, bias=False), BN[dims](channels), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(dims, channels, *b) for b in blocks])
        self.after_add = BN[dims](channels) if bn_after_add else None
        self.fc = nn.Linear(channels, 8)
        self.head_bn = nn.BatchNorm1d(8) if head_bn1d else None
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        if self.after_add is not None:
            x = self.after_add(x + x.flip(1))
        x = self.fc(x.flatten(2).mean(2))
        if self.head_bn is not None:
            x = self.head_bn(x)
        return self.out(F.relu(x))


RECIPES = st.one_of(
    st.just("bn"),
    st.builds("ns:n={}".format, st.integers(1, 4)),
    st.builds("bs:n={}".format, st.integers(1, 4)),
    st.builds("fs:ratio=1/{}".format, st.sampled_from([1, 2, 4, 8])),
    st.builds("frs:ratio=1/{}".format, st.sampled_from([2, 4])),
    st.builds("ghost:size={}".format, st.integers(2, 5)),
    st.builds("bgn:groups={},examples={}".format, st.sampled_from([1, 2, 4]), st.integers(1, 3)),
    st.builds("cbn:k={}".format, st.integers(1, 3)),
    st.builds("naive-cbn:k={}".format, st.integers(1, 3)),
    st.builds("vdn:n={}".format, st.integers(1, 2)),
    st.builds("fs:ratio=1/{}+vdn".format, st.sampled_from([1, 4])),
    st.just("two-tower"),
    st.builds("brn:micro={}".format, st.integers(1, 3)),
    st.builds("brn:micro={}+rot".format, st.integers(1, 2)),
)
BLOCKS = st.lists(st.tuples(st.sampled_from(["post", "pre", "none"]), st.booleans(),
                            st.sampled_from([nn.ReLU, nn.SiLU, nn.GELU, nn.Hardswish])), min_size=1, max_size=3)


def _randomise_stats(model):
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if getattr(m, "running_var", None) is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.sampled_from([1, 2, 3]), channels=st.sampled_from([4, 8]), blocks=BLOCKS,
       bn_after_add=st.booleans(), head_bn1d=st.booleans(), recipe=RECIPES, batch=st.integers(2, 6),
       seed=st.integers(0, 3))
def test_random_nets_random_recipes(dims, channels, blocks, bn_after_add, head_bn1d, recipe, batch, seed):
    torch.manual_seed(seed)
    model = RandomNet(dims, channels, blocks, bn_after_add, head_bn1d)
    x = torch.randn(batch, 2, *SPATIAL[dims])
    options = {"data_stats": ([0.0, 0.0], [1.0, 1.0])} if "vdn" in recipe else {}
    try:
        transformed = bnrewrite.transform(model, recipe, seed=seed, **options)
    except BnRewriteError:
        return  # a documented, clear refusal is allowed
    opt = torch.optim.SGD(transformed.parameters(), lr=0.01)
    for _ in range(2):
        try:
            out = transformed(x)
        except BnRewriteError:  # e.g. a sample of one value per channel: refused, clearly
            return
        assert out.shape == (batch, 3) and torch.isfinite(out).all(), recipe
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    transformed.eval()
    with torch.no_grad():
        _randomise_stats(transformed)
        expected = transformed(x)
        assert torch.isfinite(expected).all()
        try:
            folded = bnrewrite.fold_for_inference(transformed)
        except BnRewriteError:
            return
        got = folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any(getattr(m, "is_bnrewrite_norm", False) or isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for m in folded.modules())


ALL_RECIPES = ["bn", "ns", "bs", "fs", "frs", "vdn", "fs+vdn", "ghost", "bgn", "cbn", "naive-cbn",
               "two-tower", "brn", "brn+rot"]


def _small(recipe):
    torch.manual_seed(0)
    model = RandomNet(2, 4, [("post", True, nn.ReLU)], True, False)
    options = {"data_stats": ([0.0, 0.0], [1.0, 1.0])} if "vdn" in recipe else {}
    return bnrewrite.transform(model, recipe, **options)


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_batch_of_one_is_defined_or_a_clear_error(recipe):
    """Stock BN raises on a batch of one in training (one value per channel); a variant either
    raises a clear error or returns finite values — never NaN."""
    model = _small(recipe)
    x = torch.randn(1, 2, 6, 6)
    try:
        out = model(x)
    except BnRewriteError as exc:
        assert "batch" in str(exc).lower()
        return
    except ValueError as exc:  # stock BatchNorm's own message, kept for 'bn'
        assert recipe == "bn" and "more than 1 value per channel" in str(exc)
        return
    assert torch.isfinite(out).all(), f"{recipe}: NaN at batch 1"


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_wrong_rank_is_a_clear_error(recipe):
    model = _small(recipe)
    with pytest.raises((BnRewriteError, RuntimeError, ValueError)) as info:
        model(torch.randn(2, 2, 6))  # 3-d input to a 2-d net
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_nan_input_propagates_like_stock(recipe):
    """Documented behaviour: NaN/Inf in the input propagate as in stock BN — no exception, the
    output is not finite. (A NaN batch whose NaN reaches the statistics poisons the running
    statistics, exactly as it does in stock BatchNorm.)"""
    model = _small(recipe)
    for bad in (math.nan, math.inf):
        x = torch.randn(4, 2, 6, 6)
        x[0, 0, 0, 0] = bad
        assert not torch.isfinite(model(x)).all()


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_empty_batch_in_eval(recipe):
    model = _small(recipe).eval()
    out = model(torch.randn(0, 2, 6, 6))
    assert out.shape == (0, 3)


def _site_model(recipe, bn, channels=4):
    options = {"data_stats": ([0.0] * channels, [1.0] * channels)} if "vdn" in recipe else {}
    return bnrewrite.transform(nn.Sequential(bn), recipe, **options)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("recipe", [r for r in ALL_RECIPES if r != "bn"])
@pytest.mark.parametrize("dims, good, bad", [(1, [(4, 4), (4, 4, 6)], [(4, 4, 6, 6)]),
                                             (2, [(4, 4, 6, 6)], [(4, 4, 6), (4, 4, 6, 6, 6)]),
                                             (3, [(4, 4, 3, 3, 3)], [(4, 4, 3, 3)])])
def test_wrong_rank_is_an_input_error_as_in_stock(recipe, mode, dims, good, bad):
    """Stock BatchNorm{1,2,3}d raise on any other input rank (train and eval); the variant that
    replaced one says so, naming the site, the expected and the given shape."""
    stock = BN[dims](4).train(mode == "train")
    model = _site_model(recipe.replace("vdn", "vdn:n=2"), BN[dims](4)).train(mode == "train")  # n=2: (N, C) ok
    for shape in good:
        assert model(torch.randn(*shape)).shape == shape
    for shape in bad:
        with pytest.raises(ValueError):
            stock(torch.randn(*shape))
        with pytest.raises(bnrewrite.InputError, match=r"'0' \(replacing BatchNorm%dd\) expects \(N, 4" % dims) as info:
            model(torch.randn(*shape))
        assert "got shape (" in str(info.value) and str(shape[1:])[1:] in str(info.value)  # vdn adds rows


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_empty_batch_in_training_is_stock(recipe):
    """Stock BN in training returns an empty output for N = 0, counts num_batches_tracked and keeps
    its running statistics. Every variant does the same, and moves none of its own state: a run
    with an empty batch between two steps equals the run without it (CBN history, sampling
    schedule, Extreme-Norm EMAs and μ̄ restart, VDN's draws)."""
    a = _small(recipe + ":every=1" if recipe in ("ns", "bs", "fs", "frs") else recipe)  # re-draw every step
    b = copy.deepcopy(a)
    x1, x2 = torch.randn(4, 2, 6, 6), torch.randn(4, 2, 6, 6)
    empty = torch.randn(0, 2, 6, 6, requires_grad=True)
    out = a(empty)  # first (μ̄ unknown for Extreme Norm, no CBN window yet) and between steps
    assert out.shape == (0, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    for model in (a, b):
        torch.manual_seed(1)
        model(x1)
    a(empty)
    torch.manual_seed(2)
    y_a = a(x2)
    torch.manual_seed(2)
    y_b = b(x2)
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=0)
    state_a, state_b = _buffers(a), _buffers(b)
    assert state_a.keys() == state_b.keys()
    for key, value in state_b.items():
        expected = value + 2 if key.endswith("num_batches_tracked") else value  # two empty steps counted
        torch.testing.assert_close(state_a[key], expected, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("recipe", [r for r in ALL_RECIPES if "vdn" not in r])
def test_empty_batch_in_training_keeps_the_layout(recipe):
    stock = nn.BatchNorm2d(4).train()
    model = _site_model(recipe, nn.BatchNorm2d(4)).train()
    x = torch.randn(0, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    got, expected = model(x), stock(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype and got.stride() == expected.stride()


ONE_VALUE_ERRORS = {"ns", "bs", "fs", "frs", "cbn", "naive-cbn", "bgn", "fs+vdn"}


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_one_value_per_channel_in_training(recipe):
    """(1, C) into a BatchNorm1d in training: stock BN's ValueError. Variants that would take batch
    statistics from it raise it as an InputError naming the site, before any state moves (cbn's
    first step is stock BN; bgn's cells are single values, nn.GroupNorm's error). Defined: ghost
    (a ghost batch of one example uses the running statistics, documented), Extreme Normalization
    (forward with the moving averages; the paper's single-example training) -- both then equal
    eval -- and vdn (statistics of its virtual rows)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    options = {"data_stats": ([0.0] * 6, [1.0] * 6)} if "vdn" in recipe else {}
    model = bnrewrite.transform(net, recipe.replace("vdn", "vdn:n=2"), **options)
    x = torch.randn(1, 6)
    if recipe == "bn":
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            model(x)
        return
    if recipe in ONE_VALUE_ERRORS:
        before = _buffers(model)
        with pytest.raises(bnrewrite.InputError, match=r"'1'.*(one value|more than 1 value) per channel"):
            model(x)
        after = _buffers(model)
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        return
    for _ in range(3):
        model(torch.randn(8, 6))
    model.eval()
    expected = model(x)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ghost's one-example warning
        got = model(x)
    assert torch.isfinite(got).all()
    if "vdn" not in recipe:
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- gradient checkpointing
class _CkptBlock(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.conv = nn.Conv2d(cin, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class _CkptNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = _CkptBlock(3, 8)
        self.b2 = _CkptBlock(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def _checkpointed_training(recipe, checkpointed, use_reentrant, batch=4):
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(3)]
    torch.manual_seed(0)
    model = _CkptNet()
    if recipe != "stock":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = bnrewrite.transform(model, recipe, seed=0)
    outputs = []
    if checkpointed:
        bn, forward = model.b2.bn, model.b2.bn.forward

        def run(*args, **kwargs):
            out = forward(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            return out
        # early_stop=False: the non-reentrant recomputation runs to the end, so its output is seen
        bn.forward = lambda *a, **kw: checkpoint(run, *a, use_reentrant=use_reentrant, early_stop=False, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return grads, outputs


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("recipe", ["stock", "bn", "ghost:size=2", "bgn", "fs:ratio=1/4,every=1", "ns:every=1",
                                    "frs:ratio=1/4,every=1", "bs:every=2"])
def test_gradient_checkpointing_recomputes_exactly(recipe, use_reentrant):
    plain, _ = _checkpointed_training(recipe, False, use_reentrant)
    ckpt, outputs = _checkpointed_training(recipe, True, use_reentrant)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name
    # every forward ran twice (first call, recomputation) and gave the same bits
    assert len(outputs) == 6
    for first, again in zip(outputs[0::2], outputs[1::2]):
        assert torch.equal(first, again)


@pytest.mark.parametrize("recipe", ["cbn:k=2", "naive-cbn:k=2", "brn:micro=2", "two-tower"])
def test_gradient_checkpointing_of_a_stateful_variant_is_refused(recipe):
    from bnrewrite.errors import InputError

    for use_reentrant in ([False] if recipe == "two-tower" else [True, False]):  # two-tower passes kwargs
        with pytest.raises(InputError, match=r"'b2\.bn'.*gradient checkpointing.*recomputes the forward"):
            _checkpointed_training(recipe, True, use_reentrant)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_of_a_single_example_ghost_batch_is_refused(use_reentrant):
    """A batch of 5 in ghost batches of 2 leaves one example, normalised with the running
    statistics, which the first call has already updated when the checkpoint recomputes it: the
    gradients would differ (by 1e-2 here), so the recomputation is refused, naming the site. A
    batch that leaves 2 or more examples recomputes exactly."""
    from bnrewrite.errors import InputError

    with pytest.raises(InputError, match=r"'b2\.bn'\(size=2\) was called again during the backward pass"):
        _checkpointed_training("ghost:size=2", True, use_reentrant, batch=5)
    plain, _ = _checkpointed_training("ghost:size=3", False, use_reentrant, batch=5)
    ckpt, _ = _checkpointed_training("ghost:size=3", True, use_reentrant, batch=5)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


@pytest.mark.parametrize("recipe", ALL_RECIPES + ["ghost:size=3", "cbn:k=3,burnin=3"])
def test_two_calls_before_one_backward_equal_two_backwards(recipe):
    """A siamese or contrastive step: the model called on two batches, one loss, one backward. Stock
    BatchNorm allows it (its running-statistics update leaves autograd's version counter alone).
    Every variant gives the gradients and state of calling backward after each call. The first call
    takes stock BN's path where the second does not (cbn's first step or last burn-in step before a
    window step; a ghost batch of 2 examples, then one of 4): before, the second call's in-place
    update of the running statistics made the first call's backward raise a raw RuntimeError."""
    torch.set_default_dtype(torch.float64)
    try:
        joint = _small(recipe + ":every=1" if recipe in ("ns", "bs", "fs", "frs") else recipe)
        apart = copy.deepcopy(joint)
        gen = torch.Generator().manual_seed(3)
        steps = [(torch.randn(2 if "ghost" in recipe else 4, 2, 6, 6, generator=gen),
                  torch.randn(4, 2, 6, 6, generator=gen)) for _ in range(4)]
        for a, b in steps:
            for model in (joint, apart):
                model.zero_grad()
            torch.manual_seed(5)
            (joint(a).square().mean() + joint(b).square().mean()).backward()
            torch.manual_seed(5)
            apart(a).square().mean().backward()
            apart(b).square().mean().backward()
            for (name, p), q in zip(joint.named_parameters(), apart.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
        state_joint, state_apart = _buffers(joint), _buffers(apart)
        for key, value in state_apart.items():
            torch.testing.assert_close(state_joint[key], value, rtol=1e-12, atol=1e-14, msg=key)
    finally:
        torch.set_default_dtype(torch.float32)


def test_recomputing_is_false_outside_the_backward_pass():
    from bnrewrite.runtime.base import BatchNormState

    model = bnrewrite.transform(_CkptNet(), "cbn:k=2")
    x = torch.rand(4, 3, 8, 8)
    model(x).sum().backward()  # training forward: no refusal
    model.eval()
    with torch.no_grad():
        model(x)
    assert not BatchNormState.recomputing()
