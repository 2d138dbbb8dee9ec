"""The ``>>>`` examples in the public docstrings run as written (doctest), against the real
package, torch and torchvision."""
import doctest
import importlib

import pytest
import torch
import torchvision

import bnrewrite

# export (writes a file) and tuning (needs a trained model and data) show usage, not a session
MODULES = ["bnrewrite.api", "bnrewrite.optim", "bnrewrite.recipe", "bnrewrite.schedule", "bnrewrite.runtime.extreme"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, globs={"torch": torch, "torchvision": torchvision, "bnrewrite": bnrewrite})
             if t.examples]
    assert tests, f"{name} has no docstring examples"
    torch.manual_seed(0)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"
