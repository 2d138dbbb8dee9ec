"""bnrewrite/registry.py: the README's "Adding a variant" example, run as written, and what
register_variant refuses."""
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import bnrewrite
from bnrewrite.passes import stock
from bnrewrite.registry import VARIANTS

SECTION = (Path(__file__).parent.parent / "docs" / "sections" / "20-recipes.md").read_text()


@pytest.fixture
def registry_restored():
    before = dict(VARIANTS)
    yield
    VARIANTS.clear()
    VARIANTS.update(before)


def test_the_readme_variant_example_runs_and_computes_what_it_says(registry_restored):
    code = SECTION.split("### Adding a variant", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    stock_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    stock_model[1].running_mean.uniform_(-1, 1)
    stock_model[1].running_var.uniform_(0.5, 2)
    space = {"model": stock_model}
    exec(compile(code, "README: Adding a variant", "exec"), space)
    model = space["model"]
    assert type(model.get_submodule("1")).__name__ == "RunningStatisticsNorm"
    x = torch.randn(8, 3, 6, 6)
    # training with the running statistics is stock BatchNorm's eval forward
    torch.testing.assert_close(model.train()(x), stock_model.eval()(x))
    stock_model.load_state_dict(bnrewrite.stock_state_dict(model), strict=True)
    folded = bnrewrite.fold_for_inference(model)
    torch.testing.assert_close(folded(x), stock_model(x), rtol=1e-5, atol=1e-6)


@dataclass(frozen=True)
class NoOptions:
    pass


@pytest.mark.parametrize("changes, message", [
    ({"name": "MyBN"}, "cannot appear in a recipe"), ({"name": "my+bn"}, "cannot appear in a recipe"),
    ({"name": "my:bn"}, "cannot appear in a recipe"), ({"role": "normalisation"}, "role must be one of norm, stats, post"),
    ({"options": dict}, "options must be a dataclass"), ({"name": "fs"}, "'fs' registered twice"),
])
def test_register_variant_refuses_what_a_recipe_could_not_use(changes, message, registry_restored):
    fields = dict(name="mine", options=NoOptions, rewrite=stock.keep_batchnorm, runtime=None, role="norm",
                  summary="a test variant")
    fields.update(changes)
    with pytest.raises(bnrewrite.RecipeError, match=re.escape(message)):
        bnrewrite.register_variant(bnrewrite.Variant(**fields))
    assert "mine" not in VARIANTS


@dataclass(frozen=True)
class FactorOptions:
    scale: float = 1.0


def _scaling_pass(module, sites, options, context=None):
    """Multiplies every selected BatchNorm's weight by the recipe's scale and transform's factor."""
    factor = context.take("factor", 1.0)
    for site in sites:
        with torch.no_grad():
            module.get_submodule(site.name).weight.mul_(options.scale * factor)
    return module


def test_a_user_variant_with_options_and_a_keyword_works_through_the_parser(registry_restored):
    bnrewrite.register_variant(bnrewrite.Variant("scaled", FactorOptions, _scaling_pass, None, "norm", "scale γ",
                                                 keyword_options=["factor"], combines_with=["vdn"]))
    assert VARIANTS["scaled"].keyword_options == frozenset({"factor"})
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    rewritten = bnrewrite.transform(model, "scaled:scale=1/2", factor=3.0)
    torch.testing.assert_close(rewritten.get_submodule("1").weight, torch.full((4,), 1.5))
    with pytest.raises(bnrewrite.InputError, match="option.s. fact that no component"):
        bnrewrite.transform(model, "scaled", fact=3.0)


@pytest.mark.parametrize("changes, message", [
    ({"options": FactorOptions()}, "options must be a dataclass class"),
    ({"combines_with": "vdn"}, "combines_with must be a collection of names"),
    ({"keyword_options": None}, "keyword_options must be a collection of names"),
    ({"name": None}, "cannot appear in a recipe"),
])
def test_register_variant_refuses_malformed_entries(changes, message, registry_restored):
    fields = dict(name="mine", options=FactorOptions, rewrite=_scaling_pass, runtime=None, role="norm",
                  summary="a test variant")
    fields.update(changes)
    with pytest.raises(bnrewrite.RecipeError, match=re.escape(message)):
        bnrewrite.register_variant(bnrewrite.Variant(**fields))


def test_option_fields_in_upper_case_are_refused(registry_restored):
    @dataclass(frozen=True)
    class Upper:
        Scale: float = 1.0

    with pytest.raises(bnrewrite.RecipeError, match="option field.s. Scale must be lower case"):
        bnrewrite.register_variant(bnrewrite.Variant("upper", Upper, _scaling_pass, None, "norm", "x"))
