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
    with pytest.raises(ValueError, match=re.escape(message)):
        bnrewrite.register_variant(bnrewrite.Variant(**fields))
    assert "mine" not in VARIANTS
