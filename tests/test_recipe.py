"""The recipe language: parsing, typed options, clear errors, and a fuzz test."""
import copy
import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bnrewrite
from bnrewrite.errors import RecipeError
from bnrewrite.recipe import Component, Recipe, Variant, parse_recipe
from bnrewrite.registry import VARIANTS


@dataclass(frozen=True)
class SizeOptions:
    size: int = 16
    ratio: float = 1 / 32
    sync: bool = False
    kind: Literal["hadamard", "random"] = "hadamard"
    k: int | Literal["auto"] = "auto"

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"size must be a positive int, got {self.size}")


@dataclass(frozen=True)
class NoOptions:
    pass


def _noop(module, sites, options, context):
    return module


REGISTRY = {
    "bn": Variant("bn", NoOptions, _noop, None, "norm", "stock"),
    "ghost": Variant("ghost", SizeOptions, _noop, None, "norm", "ghost", combines_with=frozenset({"rot"})),
    "fs": Variant("fs", SizeOptions, _noop, None, "norm", "fs", combines_with=frozenset({"vdn"})),
    "vdn": Variant("vdn", SizeOptions, _noop, None, "stats", "vdn", combines_with=frozenset({"fs"})),
    "rot": Variant("rot", SizeOptions, _noop, None, "post", "rot", combines_with=frozenset({"ghost"})),
}


def parse(text):
    return parse_recipe(text, REGISTRY)


def test_defaults_and_types():
    r = parse("ghost:size=8,ratio=1/64,sync=true,kind=random,k=4")
    opts = r.components[0].options
    assert (opts.size, opts.ratio, opts.sync, opts.kind, opts.k) == (8, 1 / 64, True, "random", 4)
    assert parse("ghost").components[0].options == SizeOptions()
    assert parse("ghost:k=auto").components[0].options.k == "auto"


def test_combination_and_roundtrip():
    r = parse("fs:ratio=1/64+vdn:size=2")
    assert r.names() == ("fs", "vdn")
    assert str(r) == "fs:ratio=1/64+vdn:size=2"
    assert parse(str(r)) == r
    assert isinstance(r, Recipe)


def test_real_registry_parses_bn():
    assert parse_recipe("bn").names() == ("bn",)
    assert parse_recipe(" BN ").names() == ("bn",)


@pytest.mark.parametrize("text, message", [
    ("fss", "unknown component 'fss' — did you mean 'fs'? known: bn, fs, ghost, rot, vdn"),
    ("ghost:size=x", "ghost: size must be an int, got 'x'"),
    ("ghost:size=0", "ghost: size must be a positive int, got 0"),
    ("ghost:sise=3", "ghost: unknown option 'sise' — did you mean 'size'?"),
    # no close match: the list still reads as its own clause
    ("qqq", "unknown component 'qqq'; known: bn, fs, ghost, rot, vdn"),
    ("ghost:foo=3", "ghost: unknown option 'foo'; options: size, ratio, sync, kind, k"),
    ("ghost:size", "ghost: option 'size' must be key=value"),
    ("ghost:", "ghost: ':' must be followed by key=value options"),
    ("ghost:ratio=1/0", "ghost: ratio must be a number or a fraction like 1/32, got '1/0'"),
    ("ghost:kind=spiral", "ghost: kind must be one of hadamard, random, got 'spiral'"),
    ("ghost:k=many", "ghost: k must be an int or one of auto, got 'many'"),
    ("ghost:sync=maybe", "ghost: sync must be a bool (true/false), got 'maybe'"),
    ("ghost:size=2,size=3", "ghost: option 'size' given twice"),
    ("fs+ghost", "recipe combines fs and ghost: pick one normalisation"),
    ("fs+fs", "component 'fs' appears 2 times"),
    ("vdn+rot", "'vdn' cannot be combined with 'rot'"),
    ("rot", "'rot' needs a normalisation"),
    ("", "empty recipe"),
    ("fs++vdn", "empty component in recipe 'fs++vdn' (it has '++')"),
    ("+fs", "empty component in recipe '+fs' (it starts with '+')"),
    ("fs+", "empty component in recipe 'fs+' (it ends with '+')"),
    (":x+fs", "empty component in recipe; known"),
    # 1e999 overflows to inf (str() of the recipe then raised a raw OverflowError)
    ("ghost:ratio=1e999", "ghost: ratio must be a finite number, got '1e999'"),
    ("ghost:ratio=1e300/1e-300", "ghost: ratio must be a finite number"),
    ("ghost:size=99999999999999999999", "ghost: size must be an int below 2**62"),
])
def test_error_messages_name_the_bad_part(text, message):
    with pytest.raises(RecipeError) as info:
        parse(text)
    assert message in str(info.value)


def test_non_string_recipe():
    with pytest.raises(RecipeError, match="recipe must be a string"):
        parse_recipe(3)


TOKENS = st.sampled_from(["bn", "fs", "ghost", "vdn", "rot", "fss", ":", "+", ",", "=", "size", "ratio",
                          "sync", "kind", "k", "auto", "1/32", "1/0", "-3", "0", "16", "true", "x", " ",
                          "hadamard", "1e-3", "..", "ü", "=="])


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=12).map("".join) | st.text(max_size=30))
def test_fuzz_parser_returns_recipe_or_raises_recipe_error(text):
    try:
        result = parse(text)
    except RecipeError:
        return
    assert isinstance(result, Recipe)
    assert parse(str(result)) == result


def _momentum_components():
    return sorted(name for name, variant in VARIANTS.items()
                  if "momentum" in {f.name for f in dataclasses.fields(variant.options)})


# each component's stock-BatchNorm setting for a batch of 4 and 4 channels
STOCK_SETTING = {"ns": "ns:n=4", "bs": "bs:n=4", "fs": "fs:ratio=1", "frs": "frs:ratio=1", "ghost": "ghost:size=4",
                 "bgn": "bgn:groups=4,examples=4", "cbn": "cbn:k=1", "naive-cbn": "naive-cbn:k=1"}


@pytest.mark.parametrize("name", _momentum_components())
@pytest.mark.parametrize("word, momentum", [("keep", 0.1), ("none", 0.1), ("cumulative", None), ("0.3", 0.3)])
def test_every_component_takes_the_same_momentum_words(name, word, momentum):
    """keep / cumulative / a number (and none = keep) for every component that has a momentum; in its
    stock-BatchNorm setting the running statistics then follow nn.BatchNorm2d(momentum=...)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    stock = copy.deepcopy(base)
    stock[1].momentum = momentum
    model = bnrewrite.transform(copy.deepcopy(base), f"{STOCK_SETTING[name]},momentum={word}")
    site = model.get_submodule("1")
    assert getattr(site, "is_bnrewrite_norm", False) and site.momentum == momentum
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5)
        torch.testing.assert_close(model(x), stock(x))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(site, key), getattr(stock[1], key), msg=key)


@pytest.mark.parametrize("text, beta", [("fs+vdn:beta=0.3", 0.3), ("bs:n=2+vdn:beta=0", 0.0), ("vdn:n=2", 1.0)])
def test_vdn_beta_is_the_mixing_weight_with_a_sampler(text, beta):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    out = bnrewrite.transform(model, text, example_inputs=(x,), data_stats=bnrewrite.dataset_stats(x))
    assert out.get_submodule("1").beta == beta


def test_vdn_beta_alone_is_refused_not_ignored():
    """vdn alone takes its statistics from the virtual rows only (beta = 1): a beta there would be ignored."""
    with pytest.raises(RecipeError, match=r"vdn: beta only acts when vdn is combined with one of bs, frs, fs, ns"):
        parse_recipe("vdn:beta=0.3")


@pytest.mark.parametrize("components, message", [
    ((Component("fs", SizeOptions()), Component("ghost", SizeOptions())), "recipe combines fs and ghost: pick one"),
    ((Component("fs", NoOptions()),), "fs: options must be a SizeOptions, got NoOptions"),
    ((Component("fss", NoOptions()),), "unknown component 'fss' — did you mean 'fs'?"),
    ((), "empty recipe"),
])
def test_a_recipe_built_by_hand_is_checked_like_a_parsed_one(components, message):
    with pytest.raises(RecipeError) as info:
        parse(Recipe(components))
    assert message in str(info.value)
    assert parse(Recipe((Component("fs", SizeOptions()),))).names() == ("fs",)


@pytest.mark.parametrize("text, fixed", [("fs:every=+3", "fs:every=3"), ("fs:every=+3,ratio=1/8+vdn", "fs:every=3"),
                                         ("bs:n=+4", "bs:n=4")])
def test_a_value_with_a_plus_sign_says_that_plus_joins_components(text, fixed):
    with pytest.raises(RecipeError, match=f"'\\+' joins recipe components.*write {fixed}$"):
        parse_recipe(text)


@pytest.mark.parametrize("text, value", [("ghost:kind=Random", "random"), ("ghost:kind=HADAMARD", "hadamard"),
                                         ("ghost:k=AUTO", "auto")])
def test_choice_values_are_case_insensitive_like_names_and_bools(text, value):
    option = text.split(":")[1].split("=")[0]
    assert getattr(parse(text).components[0].options, option) == value


@pytest.mark.parametrize("name", _momentum_components())
def test_momentum_none_is_stored_as_keep_in_every_component(name):
    """cbn/ghost kept None: 'cbn:momentum=none' printed momentum=None and was not equal to 'cbn'."""
    parsed = parse_recipe(f"{name}:momentum=none")
    assert parsed == parse_recipe(name) and str(parsed) == name


@pytest.mark.parametrize("name", _momentum_components())
@pytest.mark.parametrize("bad", [2, 0, -1.0, True, "bogus"])
def test_a_hand_built_momentum_option_is_checked_like_a_parsed_one(name, bad):
    """Only floats were range-checked: an int 2 or 0 and True built layers with momentum 2.0 or 0.0."""
    with pytest.raises(ValueError, match="momentum must be in .0, 1.*'keep' or 'cumulative'"):
        VARIANTS[name].options(momentum=bad)
    assert VARIANTS[name].options(momentum=1).momentum == 1.0
