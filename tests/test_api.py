"""transform(): errors, globs, warnings, checkpoints both ways."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import bnrewrite
from bnrewrite.errors import BnRewriteError, InputError, RecipeError, UnsupportedPatternError
from tests import models


def test_model_without_batchnorm_is_returned_unchanged_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.warns(UserWarning, match="has no BatchNorm: returned unchanged"):
        out = bnrewrite.transform(model, "bn")
    assert out is model


class FunctionalBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.weight, self.bias = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))
        self.register_buffer("running_mean", torch.zeros(8))
        self.register_buffer("running_var", torch.ones(8))

    def forward(self, x):
        return nn.functional.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias,
                                        self.training)


def test_model_with_only_functional_batchnorm_says_so_and_is_returned_unchanged():
    model = FunctionalBatchNorm()
    with pytest.warns(UserWarning, match=r"only functional F.batch_norm call\(s\) \(batch_norm\), which stay stock"
                                         r".*make them nn.BatchNorm modules") as record:
        out = bnrewrite.transform(model, "fs+vdn")
    assert out is model
    assert not any("has no BatchNorm:" in str(w.message) for w in record)


@pytest.mark.parametrize("bad", [None, "resnet18", torch.randn(2), lambda x: x])
def test_non_module_input(bad):
    with pytest.raises(InputError, match="transform expects an nn.Module"):
        bnrewrite.transform(bad, "bn")


def test_unknown_recipe_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown component 'bnn' — did you mean 'bn'"):
        bnrewrite.transform(models.ConvBNReLU(), "bnn")


def test_errors_are_bnrewrite_errors():
    assert issubclass(RecipeError, BnRewriteError) and issubclass(InputError, BnRewriteError)


def test_glob_matching_nothing():
    with pytest.raises(InputError, match=r"glob 'layer9\.\*' matches no BatchNorm site; site names look like: bn1"):
        bnrewrite.transform(torchvision.models.resnet18(weights=None), "bn", include="layer9.*")


def test_include_exclude_select_sites():
    model = torchvision.models.resnet18(weights=None)
    out = bnrewrite.transform(model, "bn", include=["layer1.*", "bn1"], exclude="layer1.1.*")
    assert out.bnrewrite_info.selected == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]


@pytest.mark.parametrize("kwargs, message", [
    ({"include": 3}, "include= takes module-name globs like 'layer1.*' (a string or a list of strings), got 3"),
    ({"exclude": ["1", 2]}, "exclude= takes module-name globs like 'layer1.*' (a string or a list of strings), got ['1', 2]"),
    ({"seed": "x"}, "seed= must be an int, got 'x'"),
    ({"seed": 1.5}, "seed= must be an int, got 1.5"),
    ({"seed": None}, "seed= must be an int, got None"),
    ({"inplace": "yes"}, "inplace= must be True or False, got 'yes'"),
    ({"inplace": 1}, "inplace= must be True or False, got 1"),
])
def test_bad_globs_and_seed_are_input_errors(kwargs, message):
    with pytest.raises(InputError) as info:
        bnrewrite.transform(models.ConvBNReLU(), "fs", **kwargs)
    assert message in str(info.value)


def test_unused_transform_option_is_rejected():
    with pytest.raises(InputError, match="option\\(s\\) data_stats that no component"):
        bnrewrite.transform(models.ConvBNReLU(), "bn", data_stats=None)


def test_lazy_modules_need_example_inputs():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d())
    with pytest.raises(InputError, match="pass example_inputs"):
        bnrewrite.transform(model, "bn")


def test_inplace_and_copy():
    model = models.ConvBNReLU()
    out = bnrewrite.transform(model, "bn")
    assert all(p is not q for p in out.parameters() for q in model.parameters())
    out2 = bnrewrite.transform(model, "bn", inplace=True)
    assert {id(p) for p in out2.parameters()} == {id(p) for p in model.parameters()}


def test_inplace_original_refuses_to_run_half_rewritten():
    """inplace=True on resnet18: nested BNs are swapped inside the shared blocks, the top-level
    bn1 only in the returned GraphModule; the original must not silently run that mix."""
    model = torchvision.models.resnet18(weights=None)
    out = bnrewrite.transform(model, "fs", inplace=True)
    assert out is not model and type(model.layer1[0].bn1).__name__ == "SampledBatchNorm"
    with pytest.raises(InputError, match="rewritten by bnrewrite.transform.*inplace=True.*call the module transform "
                                         "returned"):
        model(torch.randn(2, 3, 32, 32))
    assert out(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    copy.deepcopy(model)  # the guard is a plain function: the original still copies and pickles


def test_state_dict_round_trip_strict_both_ways():
    torch.manual_seed(0)
    stock = torchvision.models.resnet18(weights=None)
    for m in stock.modules():  # make every BN state distinct from the defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    transformed = bnrewrite.transform(torchvision.models.resnet18(weights=None), "bn")
    transformed.load_state_dict(stock.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    stock.eval()
    transformed.eval()
    assert torch.equal(stock(x), transformed(x))
    fresh = torchvision.models.resnet18(weights=None)
    fresh.load_state_dict(copy.deepcopy(transformed.state_dict()), strict=True)
    fresh.eval()
    assert torch.equal(fresh(x), stock(x))


def test_stock_state_dict_loads_back_strictly_after_training():
    """Variants that add optional state (sampling schedule, CBN history, Extreme-Norm means) still
    give a checkpoint the stock model loads with strict=True through stock_state_dict."""
    for recipe in ("fs", "cbn:k=2", "brn+rot"):
        stock = torchvision.models.resnet18(weights=None)
        transformed = bnrewrite.transform(stock, recipe)
        transformed(torch.randn(4, 3, 32, 32)).sum().backward()
        assert set(transformed.state_dict()) > set(stock.state_dict()), recipe
        fresh = torchvision.models.resnet18(weights=None)
        fresh.load_state_dict(bnrewrite.stock_state_dict(transformed), strict=True)


@pytest.mark.parametrize("recipe", ["fs", "bs", "vdn", "fs+vdn", "ghost", "bgn", "cbn", "naive-cbn", "brn",
                                    "two-tower"])
def test_runtime_modules_know_their_site_and_errors_name_it(recipe):
    """Every pass tells its runtime module the site's qualified name; a bad input names it."""
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    model = bnrewrite.transform(models.ConvBNReLU(), recipe, example_inputs=(torch.randn(2, 3, 6, 6),), **options)
    norms = {name: m for name, m in model.named_modules() if getattr(m, "is_bnrewrite_norm", False)}
    assert norms, "the recipe replaced no BatchNorm"
    for name, norm in norms.items():
        assert norm.site_name == "bn", (name, norm.site_name)
        with pytest.raises(InputError, match="'bn'"):
            norm.check_input(torch.randn(2, norm.num_features + 1, 4, 4))


def test_example_inputs_the_model_rejects_are_an_input_error(capsys):
    """transform runs the model once on example_inputs; when the model itself fails on them the
    user gets an InputError that says so, and no dump of the traced graph's code on stderr."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model(torch.randn(2, 3, 8, 8))  # the shape it accepts
    with pytest.raises(bnrewrite.errors.InputError, match=r"example_inputs \(\(2, 3, 10, 10\)\) do not run through"):
        bnrewrite.transform(model, "fs", example_inputs=(torch.randn(2, 3, 10, 10),))
    assert "FX-traced" not in capsys.readouterr().err
    out = bnrewrite.transform(model, "fs", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert out.get_submodule("1").__class__.__name__ == "SampledBatchNorm"


@pytest.mark.parametrize("first, second", [("cbn", "cbn:k=4,burnin=5"), ("fs", "ghost"), ("ghost:size=2", "bgn")])
def test_transforming_a_transformed_model_again_is_an_input_error(first, second):
    x = torch.randn(2, 3, 32, 32)
    once = bnrewrite.transform(torchvision.models.resnet18(weights=None), first, example_inputs=(x,))
    with pytest.raises(InputError, match=r"bn1 \(\w+\).* already rewritten by an earlier bnrewrite.transform.*"
                                         r"combined recipe"):
        bnrewrite.transform(once, second, example_inputs=(x,))


def test_sites_left_out_the_first_time_can_be_rewritten_later():
    x = torch.randn(2, 3, 32, 32)
    part = bnrewrite.transform(torchvision.models.resnet18(weights=None), "fs", include=["layer1.*"])
    rest = bnrewrite.transform(part, "ghost:size=2", exclude=["layer1.*"], example_inputs=(x,))
    kinds = {name: type(m).__name__ for name, m in rest.named_modules() if name in ("bn1", "layer1.0.bn1")}
    assert kinds == {"bn1": "GhostBatchNorm", "layer1.0.bn1": "SampledBatchNorm"}
    assert rest(x).shape == (2, 1000)


PER_PROCESS_RECIPES = ["fs:ratio=1/4", "ns:n=2", "bs:n=2", "frs:ratio=1/4", "cbn:k=2", "naive-cbn:k=2", "brn",
                       "two-tower", "ghost:size=2", "bgn", "vdn"]


def _sync_bn_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))


@pytest.mark.parametrize("recipe", PER_PROCESS_RECIPES)
def test_sync_batchnorm_becoming_per_process_statistics_warns_once(recipe):
    import warnings

    extra = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = bnrewrite.transform(_sync_bn_net(), recipe, **extra)
    assert not getattr(t.get_submodule("1"), "synchronises_statistics", True)
    messages = [str(w.message) for w in caught if "SyncBatchNorm" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'1'" in messages[0] and "'4'" not in messages[0]  # the plain BatchNorm2d is not listed
    assert "each process" in messages[0]
    if recipe.split(":")[0] in ("fs", "ns", "bs", "frs"):
        assert f"{recipe.split(':')[0]}:sync=true" in messages[0]
    if "cbn" in recipe:
        assert "cbn §4.2" in messages[0]


@pytest.mark.parametrize("recipe", ["bn", "fs:ratio=1/4,sync=true", "ns:n=2,sync=true", "fs:sync=true+vdn"])
def test_sync_batchnorm_kept_synchronised_does_not_warn(recipe):
    import warnings

    extra = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bnrewrite.transform(_sync_bn_net(), recipe, **extra)
    assert not [str(w.message) for w in caught if "SyncBatchNorm" in str(w.message)]


# ---------------------------------------------------------------------------- sites a variant cannot stand in for
class OwnForwardBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2 + 1


class Softplus(nn.Module):
    def forward(self, w):
        return nn.functional.softplus(w)


def _with_unfaithful_site(kind):
    torch.manual_seed(0)
    bn = OwnForwardBatchNorm(4) if kind == "own-forward" else nn.BatchNorm2d(4)
    if kind == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(bn, "weight", Softplus())
    return nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize("kind, why", [("own-forward", "OwnForwardBatchNorm overrides BatchNorm's forward"),
                                       ("parametrized", "its weight is parametrized")])
@pytest.mark.parametrize("recipe", ["fs:ratio=1/4", "cbn:k=2", "ghost:size=2", "two-tower", "vdn"])
def test_a_site_a_variant_cannot_stand_in_for_is_refused_by_name(kind, why, recipe):
    """A variant takes BatchNorm's tensors and computes the normalisation itself: an overridden
    forward or a parametrized weight would be dropped without a word (the forward silently
    changed from 2·BN(x)+1 to BN(x); a raw TypeError for the parametrization)."""
    options = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    with pytest.raises(bnrewrite.UnsupportedPatternError, match=f"site '1' .*{why}.*exclude=\\['1'\\]"):
        bnrewrite.transform(_with_unfaithful_site(kind), recipe, **options)


@pytest.mark.parametrize("kind", ["own-forward", "parametrized"])
@pytest.mark.parametrize("recipe, options", [("fs:ratio=1", {"exclude": "1"}), ("cbn:k=1", {"exclude": "1"}),
                                             ("bn", {}), ("bn", {"lower": "fused"})])
def test_an_excluded_unfaithful_site_and_the_bn_recipe_keep_its_forward(kind, recipe, options):
    """Left out (or under ``bn``, which replaces nothing; lowering skips it), the site computes what
    it did: the whole model's training step equals the original's (``fs:ratio=1`` and ``cbn:k=1``
    are stock BN at the other site)."""
    model = _with_unfaithful_site(kind)
    rewritten = bnrewrite.transform(model, recipe, **options)
    assert type(rewritten.get_submodule("1")) is type(model[1])
    x = torch.randn(4, 3, 8, 8)
    want, got = model(x), rewritten(x)
    assert torch.allclose(want, got, atol=1e-6)
    weights = torch.randn_like(want)  # (a sum of squares of a BN output is nearly constant: no test)
    grads = [torch.autograd.grad((y * weights).sum(), m[0].weight if m is model else m.get_submodule("0").weight)[0]
             for y, m in ((want, model), (got, rewritten))]
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_vdn_refuses_an_unfaithful_site_even_when_excluded():
    with pytest.raises(bnrewrite.UnsupportedPatternError,
                       match="vdn's virtual rows reach every BatchNorm, excluded ones too"):
        bnrewrite.transform(_with_unfaithful_site("own-forward"), "vdn", exclude="1",
                            data_stats=([0.0] * 3, [1.0] * 3))


@pytest.mark.parametrize("recipe", ["fs:ratio=1/4", "ghost:size=2", "cbn:k=2", "bgn:groups=2", "brn", "bn"])
def test_hooks_on_a_batchnorm_run_on_the_module_that_replaces_it(recipe):
    """Feature-extraction hooks the model's code put on a BatchNorm keep firing on the module that
    stands in for it, with that site's output, and their handles still remove them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seen = []
    handles = [model[1].register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape))),
               model[1].register_forward_hook(lambda module, args, out: seen.append(out))]
    rewritten = bnrewrite.transform(model, recipe, inplace=True)  # inplace: the handles are this model's
    x = torch.randn(4, 3, 8, 8)
    y = rewritten(x)
    assert len(seen) == 2 and seen[0] == (4, 4, 6, 6) and seen[1] is y
    for handle in handles:
        handle.remove()
    seen.clear()
    rewritten(x)
    assert seen == []


_REWRITING_ENTRY_POINTS = {
    "transform": lambda m, x, out: bnrewrite.transform(m, "ghost:size=2"),
    "fold_for_inference": lambda m, x, out: bnrewrite.fold_for_inference(m),
    "export_onnx": lambda m, x, out: bnrewrite.export_onnx(m.eval(), (x,), out / "model.onnx"),
    "tune_example_weight": lambda m, x, out: bnrewrite.tune_example_weight(m.eval(),
                                                                          (x, torch.zeros(8, dtype=torch.long))),
}


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("function", sorted(_REWRITING_ENTRY_POINTS))
def test_a_torch_compile_wrapper_is_refused(function, nested, tmp_path):
    """torch.compile's OptimizedModule calls the module it was made from: a rewritten copy of the
    wrapper ran the original model silently (transform with ghost gave stock BN's output, 0.30 off
    the rewrite), and a folded one raised a raw AttributeError. Every function that rewrites or
    copies the model refuses one, the model itself or a submodule, naming it."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model = nn.Sequential(torch.compile(block, backend="eager"), head) if nested else \
        torch.compile(nn.Sequential(block, head), backend="eager")
    where = r"'0' is" if nested else "the model is"
    with pytest.raises(InputError, match=rf"{function}: {where} a torch.compile wrapper.*compile what {function} "
                                         "returns"):
        _REWRITING_ENTRY_POINTS[function](model, torch.randn(8, 3, 8, 8), tmp_path)


def test_the_plain_module_of_a_compile_wrapper_transforms_and_compiles():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    compiled = torch.compile(model, backend="eager")
    out = torch.compile(bnrewrite.transform(compiled._orig_mod, "ghost:size=2"), backend="eager")
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(out(x), bnrewrite.transform(copy.deepcopy(model), "ghost:size=2")(x))


class CalibratedBatchNorm(nn.BatchNorm2d):
    """Stock forward, with state of its own that the forward never reads (calibration data, an
    observer; an ``act`` child that stock BatchNorm's forward does not call)."""

    def __init__(self, channels):
        super().__init__(channels)
        self.register_buffer("calib", torch.full((channels,), 3.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.gain = nn.Parameter(torch.ones(channels))
        self.observer = nn.Linear(1, 1)
        self.act = nn.ReLU()


REPLACING_RECIPES = ["fs", "ns:n=2", "ghost:size=2", "bgn", "cbn:k=2", "naive-cbn:k=2", "brn", "brn+rot",
                     "two-tower", "fs+vdn"]


@pytest.mark.parametrize("recipe", REPLACING_RECIPES)
def test_a_batchnorm_subclass_keeps_its_own_state(recipe):
    """Its parameters, buffers and children move to the variant unchanged (they were dropped: stock
    checkpoints no longer loaded strictly either way, and an optimizer missed the parameter); an
    ``act`` child is not applied, since the stock forward the subclass keeps does not apply it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CalibratedBatchNorm(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    extra = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    rewritten = bnrewrite.transform(model, recipe, **extra)
    site = rewritten.get_submodule("1")
    assert type(site) is not CalibratedBatchNorm
    assert site._post_children == ()  # its act child is state, not applied (brn+rot applied it)
    assert site.calib is not None and site.gain is not None and site.observer is not None
    assert set(bnrewrite.stock_state_dict(rewritten)) == set(model.state_dict())
    assert "1.scratch" not in rewritten.state_dict()
    rewritten.load_state_dict(model.state_dict(), strict=True)
    copy.deepcopy(model).load_state_dict(bnrewrite.stock_state_dict(rewritten), strict=True)
    assert any(p is site.gain for p in rewritten.parameters())
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():  # eval: every variant normalises with the running statistics, as stock does
        if "rot" not in recipe:  # (rot then also rotates the channels)
            torch.testing.assert_close(rewritten.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    rewritten.train()(x).sum().backward()
    assert site.gain.grad is None  # in the model and the optimizer, but (as in stock) not read


@pytest.mark.parametrize("recipe, name", [("fs", "reduce_dims"), ("fs", "sample_schedule"), ("brn", "input_mean"),
                                          ("two-tower", "input_mean"), ("brn+rot", "rotation")])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_batchnorm_subclass_state_named_like_the_variants_is_refused(inplace, recipe, name):
    """brn registers input_mean once its producer is known, and rot's module is rebuilt from brn's:
    both clashes went through, the subclass's buffer silently replaced by the variant's."""
    class Clashing(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.register_buffer(name, torch.zeros(1))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Clashing(4))
    with pytest.raises(UnsupportedPatternError, match=f"Clashing has a buffer '{name}'.*exclude"):
        bnrewrite.transform(model, recipe, inplace=inplace)
    model(torch.randn(2, 3, 6, 6))  # nothing was rewritten, so even an inplace=True model still runs


_BATCHNORM_LAYER_CALLS = {
    "transform": lambda m, out: bnrewrite.transform(m, "ghost:size=2"),
    "fold_for_inference": lambda m, out: bnrewrite.fold_for_inference(m.eval()),
    "export_onnx": lambda m, out: bnrewrite.export_onnx(m.eval(), torch.randn(2, 4, 3, 3), out / "m.onnx"),
    "tune_example_weight": lambda m, out: bnrewrite.tune_example_weight(m.eval(), (torch.randn(4, 4, 3, 3),
                                                                                   torch.zeros(4, dtype=torch.long))),
}


@pytest.mark.parametrize("function", sorted(_BATCHNORM_LAYER_CALLS))
def test_a_model_that_is_a_batchnorm_layer_is_an_input_error(function, tmp_path):
    """A module cannot replace itself in the caller's variable: the variant was attached as a child
    named '' while the returned layer still ran stock BatchNorm (ghost: 0.52 off the variant)."""
    layer = nn.BatchNorm2d(4)
    with pytest.raises(InputError, match=rf"{function}: the model is itself a BatchNorm2d layer.*nn.Sequential"):
        _BATCHNORM_LAYER_CALLS[function](layer, tmp_path)
    assert dict(layer.named_children()) == {}


def _two_blocks():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


def _kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(".1")}


@pytest.mark.parametrize("options, message", [
    ({"sede": 1}, r"option\(s\) sede that no component of recipe 'fs' uses"),
    ({"ratio": 0.5}, r"ratio: write it into the recipe, 'fs:ratio=\.\.\.'"),
    ({"lower": "bogus"}, "lower= must be 'auto', 'fused' or 'reference'"),
    ({"compile_path": "ops"}, "compile_path= .* needs lower='auto' or lower='fused'"),
])
def test_a_bad_keyword_option_is_refused_before_an_inplace_model_is_touched(options, message):
    """These were checked after the passes had run: with inplace=True the caller's model was left
    half rewritten (nested sites swapped), still running, and refused a retry."""
    model = _two_blocks()
    with pytest.raises(InputError, match=message):
        bnrewrite.transform(model, "fs", inplace=True, **options)
    assert _kinds(model) == {"0.1": "BatchNorm2d", "1.1": "BatchNorm2d"}
    model(torch.randn(2, 3, 8, 8))
    assert type(bnrewrite.transform(model, "fs", inplace=True).get_submodule("1.1")).__name__ == "SampledBatchNorm"


def test_vdn_without_data_stats_is_refused_before_the_sampler_rewrites():
    model = _two_blocks()
    with pytest.raises(InputError, match="vdn needs the per-channel mean and std"):
        bnrewrite.transform(model, "fs+vdn", inplace=True)
    assert _kinds(model) == {"0.1": "BatchNorm2d", "1.1": "BatchNorm2d"}


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _two_blocks()

    def forward(self, x, y):
        return self.body(x) + y


def test_an_inplace_model_a_pass_fails_on_part_way_refuses_to_run():
    """fs swaps the nested BatchNorms, then vdn refuses the second input: the model must not run
    as a mix of stock and sampled BatchNorm."""
    model = TwoInputs()
    stats = bnrewrite.dataset_stats(torch.randn(8, 3, 8, 8))
    with pytest.raises(InputError, match="vdn: .* takes other inputs"):
        bnrewrite.transform(model, "fs+vdn", inplace=True, data_stats=stats)
    with pytest.raises(InputError, match=r"inplace=True\) failed part way through on this TwoInputs.*build the model "
                                         "again"):
        model(torch.randn(2, 3, 8, 8), torch.zeros(1))


@pytest.mark.parametrize("recipe", ["fs+vdn", "two-tower"])
@pytest.mark.parametrize("first", ["ghost:size=2", "cbn:k=2"])
def test_a_whole_graph_component_refuses_sites_an_earlier_transform_rewrote(first, recipe):
    """vdn's virtual rows entered an excluded ghost/cbn site's statistics, and two-tower called an
    excluded cbn site twice a step (its window filled with both towers' copies of a batch)."""
    part = bnrewrite.transform(_two_blocks(), first, include=["0.1"])
    extra = {"data_stats": bnrewrite.dataset_stats(torch.randn(8, 3, 8, 8))} if "vdn" in recipe else {}
    with pytest.raises(InputError, match=rf"0\.1 \(\w+\) were already rewritten.*{recipe.split('+')[-1]} rewrites the "
                                         "whole graph, excluded sites too"):
        bnrewrite.transform(part, recipe, exclude=["0.1"], **extra)
    # per-site recipes still rewrite the other sites in turn
    assert _kinds(bnrewrite.transform(part, "fs", exclude=["0.1"]))["1.1"] == "SampledBatchNorm"


@pytest.mark.parametrize("filters", [{"include": "0.*", "exclude": "0.*"}, {"exclude": "*"},
                                     {"include": "0.1", "exclude": ["0.*", "1.*"]}])
def test_filters_that_leave_no_site_are_an_error_not_a_stock_model(filters):
    with pytest.raises(InputError, match=r"transform 'fs': include/exclude leave no site to rewrite \(sites: 0\.1, 1\.1\)"):
        bnrewrite.transform(_two_blocks(), "fs", **filters)
    assert _kinds(bnrewrite.transform(_two_blocks(), "bn", exclude="*")) == {"0.1": "BatchNorm2d", "1.1": "BatchNorm2d"}


@pytest.mark.parametrize("recipe", ["fs", "ghost:size=2", "bgn", "cbn:k=2", "brn"])
def test_a_site_with_eps_zero_is_refused_by_a_replacing_recipe(recipe):
    """Stock BatchNorm's training forward refuses eps=0 (a raw ValueError); the variants, which
    normalise themselves, took it silently (a constant sample then gave NaN) or passed torch's error on."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0))
    with pytest.raises(InputError, match=rf"transform '{recipe}': site '1' \(BatchNorm2d\) has eps=0.0; training needs "
                                         "eps > 0"):
        bnrewrite.transform(model, recipe)
    assert bnrewrite.transform(model, "bn") is not None


@pytest.mark.parametrize("recipe, options", [("fs+vdn", {"exclude": ["1"]}), ("vdn", {"exclude": ["1"]}),
                                             ("bn", {"lower": "fused"})])
def test_eps_zero_is_refused_where_vdn_or_lowering_replaces_the_site(recipe, options):
    """vdn rewrites excluded sites too, and lowering swaps a stock site for the fused op: both
    normalise themselves, so eps=0 there gave NaN on a constant channel where stock BN raises."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=0.0))
    extra = {"data_stats": ([0.0] * 3, [1.0] * 3)} if "vdn" in recipe else {}
    with pytest.raises(InputError, match=r"site '1' \(BatchNorm2d\) has eps=0.0"):
        bnrewrite.transform(model, recipe, **options, **extra)
