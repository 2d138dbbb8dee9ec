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
